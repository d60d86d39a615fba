/**
 * One encryption run on a libvirt domain, end to end, through libvirt's own block copy
 * (never around it, so libvirt's view and the domain's definition follow the guest):
 *
 *   preflight              the domain, its disk, the key, the target path and its room
 *   qemu-img create        the LUKS header, in a process of its own (the guest's QEMU would
 *                          stall its guest while deriving the key: src/encrypt/target.ts):
 *                          slot 0 this run's random opening key (a 10 ms PBKDF), slot 1 the
 *                          key file's (the full iter-time)
 *   virSecretDefineXML     a private libvirt secret (usage volume = the target) holding the
 *                          opening key, its value passed through the helper's stdin, never a file
 *   virDomainBlockCopy     REUSE_EXT (+ TRANSIENT_JOB for a persistent domain), the source's
 *                          cache mode, bandwidth in bytes/s; moderated by speed (copy-job.ts).
 *                          libvirt's QEMU opens the target with the secret, in its main loop:
 *                          with the opening key in ~10 ms, where the key file's slot stalled
 *                          the guest for the iter-time (2 s by default)
 *   virSecretSetValue      the secret's value becomes the key file's key (rekeySecret): what
 *                          the domain's next boot unlocks slot 1 with. Slot 0 stays in the
 *                          header, its key forgotten (libvirt has no call to erase a key slot
 *                          of an open image; the operator may, with the domain off)
 *   virDomainBlockJobAbort PIVOT as soon as the copy is READY (a READY mirror ignores its
 *                          speed in QEMU, so waiting for a quiet guest would not hold it)
 *   persistence            the persistent definition names the encrypted image after the
 *                          pivot: libvirt rewrites it itself when its source matched the live
 *                          one (qemuBlockJobRewriteConfigDiskSource); otherwise we do, and say so
 *
 * A run is recorded (runs.ts, folder libvirt-runs) before anything is made, so a run killed
 * at any point is finished or undone by the next one into the same target. Anything that
 * fails before the pivot leaves the guest on its original disk, which we never write to,
 * and removes what we made (the target file, our secret).
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { firstValueFrom, filter, merge, take, timer, type Observable } from 'rxjs';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { iothreadTidByName, type LoopThread } from '../probes/mainloop.ts';
import type { JobControl } from '../jobs/types.ts';
import { checkKeyFile, checkSpace, checkTargetPath, targetBytesNeeded, thinDiskNote } from '../encrypt/preflight.ts';
import { keyFileOpens, OPENING_SLOT, targetFormatFor, writeImageWithQemuImg, type FormatChoice, type TargetFormat } from '../encrypt/target.ts';
import { ProgressMeter, type Progress } from '../encrypt/progress.ts';
import { RunModeration, type ModerationOptions } from '../encrypt/moderation.ts';
import { RunMetrics } from '../encrypt/metrics.ts';
import { allocatedShare, HELD_SPEED, moderatedBufSize, mustSnapshot, untilAborted, waitForQuiet, waitUntilReady } from '../encrypt/encrypt.ts';
import { ownerAlive, RunStore, selfOwner, stateDir } from '../encrypt/runs.ts';
import type { MetricsSink } from '../metrics/sink.ts';
import { hostTag } from '../metrics/index.ts';
import { LibvirtClient, LibvirtCallError, VIR_ERR } from './client.ts';
import { LIBVIRT_PAUSED_SPEED, LibvirtCopyJob, type LibvirtPauseMode } from './copy-job.ts';
import { checkCopyable, directCache, domainVm, findDomainDisk, xmlAttr } from './domains.ts';
import { BLOCK_JOB, type DomainDisk } from './types.ts';

export type LibvirtPhase = 'preflight' | 'creating-target' | 'copying' | 'completing' | 'completed' | 'cancelling';

export interface DomainEncryptOptions {
  /** An open connection (the caller's, left open); default: connect to `uri` and close at the end. */
  readonly client?: LibvirtClient;
  /** libvirt URI (default qemu:///system). */
  readonly uri?: string;
  readonly domain: string;
  /** The disk's target name, as `virsh domblklist` shows it (vda). */
  readonly disk: string;
  readonly target: string;
  /** The passphrase file: idlecrypt makes the image and a libvirt secret from it. */
  readonly keyFile?: string;
  /** Or an existing libvirt secret (UUID) holding the passphrase: libvirt then makes the image. */
  readonly secret?: string;
  /** The target's format; `auto`: the disk's (targetFormatFor). */
  readonly format: FormatChoice;
  /** Initial speed limit, bytes/s; 0 = unlimited. */
  readonly speed: number;
  readonly iterTimeMs: number;
  readonly bufSize?: number;
  readonly pollMs?: number;
  readonly signal?: AbortSignal;
  /**
   * Stop steering and leave the copy to libvirt, held at 1 byte/s, with its run record, for
   * the next run (the agent's next start) to adopt: the agent's SIGTERM. The run then fails
   * with code DETACHED.
   */
  readonly detach?: AbortSignal;
  readonly logger: Logger;
  readonly onPhase?: (phase: LibvirtPhase, disk?: { readonly device: string; readonly source: string }) => void;
  readonly onProgress?: (p: Progress) => void;
  readonly onJob?: (job: JobControl) => void;
  readonly moderation?: Omit<ModerationOptions, 'logger' | 'vm' | 'pausedSpeed'>;
  readonly metrics?: (vmName: string) => Promise<MetricsSink>;
  readonly onVm?: (vmName: string) => void;
  /** Things the operator should know: an earlier run resumed or rolled back, the definition updated. */
  readonly onNote?: (text: string, record: Record<string, unknown>) => void;
  readonly runStore?: RunStore<LibvirtRunRecord>;
  /** The qemu-img that writes the header (tests point it elsewhere). */
  readonly qemuImg?: string;
  /** How a pause is made (copy-job.ts): 1 byte/s through libvirt (default), or QEMU's job-pause (taints the domain). */
  readonly pause?: LibvirtPauseMode;
}

export interface DomainEncryptResult {
  readonly domain: string;
  readonly device: string;
  readonly source: string;
  readonly target: string;
  readonly format: TargetFormat;
  readonly secret: string;
  readonly virtualSize: number;
  readonly bytesCopied: number;
  readonly elapsedS: number;
  /** What the next boot uses: 'rewritten-by-libvirt', 'updated' (by us), or 'transient' (no definition). */
  readonly persistence: 'rewritten-by-libvirt' | 'updated' | 'transient';
}

export interface LibvirtRunRecord {
  readonly version: 1;
  readonly tag: string;
  readonly owner: { readonly pid: number; readonly start: number };
  readonly uri: string;
  readonly domain: string;
  readonly uuid: string;
  readonly disk: string;
  readonly source: string;
  readonly target: string;
  readonly format: TargetFormat;
  /** The libvirt secret the target is opened with. */
  readonly secret: string;
  /** We defined that secret (from --key-file), so undoing the run removes it. */
  readonly secretOurs: boolean;
  readonly phase: 'creating-target' | 'copying' | 'completing';
  /** The run paused with QEMU's job-pause: a run adopting it resumes the job first. */
  readonly pause?: LibvirtPauseMode;
  readonly createdAt: number;
  readonly copyStartedAt?: number;
}

export function libvirtRunStore(base = stateDir()): RunStore<LibvirtRunRecord> {
  return new RunStore<LibvirtRunRecord>(base, 'libvirt-runs');
}

/** The `<disk>` the copy writes: the encrypted image, opened with the secret. */
export function destinationXml(target: string, format: TargetFormat, secret: string): string {
  return (
    `<disk type='file'><driver type='${format === 'luks' ? 'raw' : 'qcow2'}'/>` +
    `<source file='${xmlAttr(target)}'><encryption format='luks' engine='qemu'><secret type='passphrase' uuid='${xmlAttr(secret)}'/></encryption></source></disk>`
  );
}

/**
 * The secret's value becomes the key file's key (virSecretSetValue; the value crosses the
 * helper's stdin): the domain's next boot unlocks
 * the target's slot 1 with it. The running QEMU opened the target with the opening key
 * already and does not read the secret again. A later run that adopts the copy of a run
 * that died before it saved the phase 'copying' calls it again, with a key file it has
 * checked opens the image (keyFileOpens). With
 * `onNote` (the run that made the target) the operator is told about slot 0.
 */
async function rekeySecret(
  client: LibvirtClient,
  rec: Pick<LibvirtRunRecord, 'secret' | 'target' | 'format'>,
  keyFile: string,
  log: Logger,
  onNote?: DomainEncryptOptions['onNote'],
): Promise<void> {
  await client.setSecretValue(rec.secret, await fs.readFile(keyFile));
  log.info({ secret: rec.secret }, "libvirt's secret holds the key file's key now (the next boot's)");
  if (!onNote) return;
  const erase =
    rec.format === 'luks'
      ? `cryptsetup luksKillSlot --key-file KEYFILE ${rec.target} ${OPENING_SLOT}`
      : `qemu-img amend --object secret,id=k,file=KEYFILE -o encrypt.state=inactive,encrypt.keyslot=${OPENING_SLOT} --image-opts driver=qcow2,encrypt.key-secret=k,file.filename=${rec.target}`;
  onNote(
    `key slot ${OPENING_SLOT} of ${rec.target} holds this run's random opening key, which nothing keeps (it let libvirt open the image without stalling the guest); the key file's key is in slot ${OPENING_SLOT + 1}. To erase slot ${OPENING_SLOT}, with the domain shut off: ${erase}`,
    { openingSlot: OPENING_SLOT },
  );
}

/** A private, persistent secret whose usage is the target volume (virsh secret-list shows it). */
function secretXml(uuid: string, domain: string, disk: string, target: string): string {
  return (
    `<secret ephemeral='no' private='yes'><uuid>${uuid}</uuid>` +
    `<description>idlecrypt: key of ${xmlAttr(domain)} ${xmlAttr(disk)}</description>` +
    `<usage type='volume'><volume>${xmlAttr(target)}</volume></usage></secret>`
  );
}

export async function encryptDomainDisk(o: DomainEncryptOptions): Promise<DomainEncryptResult> {
  const log = o.logger;
  const started = performance.now();
  o.onPhase?.('preflight');
  if ((o.keyFile === undefined) === (o.secret === undefined)) throw new IdlecryptError('USAGE', 'give the key as --key-file FILE or --secret UUID (one of them)');
  const keyFile = o.keyFile !== undefined ? await checkKeyFile(o.keyFile) : undefined;
  const store = o.runStore ?? libvirtRunStore();
  const prior = await store.forTarget(o.target);
  if (prior && ownerAlive(prior)) {
    throw new IdlecryptError('JOB_EXISTS', `idlecrypt (pid ${prior.owner.pid}) is already encrypting domain '${prior.domain}' disk ${prior.disk} into ${prior.target}`);
  }
  if (!prior) await checkTargetPath(o.target, undefined);
  if (o.signal?.aborted) throw new IdlecryptError('CANCELLED', 'cancelled before the copy started; nothing was changed');

  const client = o.client ?? (await LibvirtClient.connect({ logger: log, ...(o.uri !== undefined ? { uri: o.uri } : {}) }));
  try {
    const dom = await client.domain(o.domain);
    if (!dom.active) throw new IdlecryptError('USAGE', `domain '${o.domain}' is not running; idlecrypt encrypts running domains (qemu-img convert does the others)`);
    if (o.secret !== undefined) {
      const sec = await client.secret(o.secret);
      if (!sec) throw new IdlecryptError('KEY_FILE', `libvirt has no secret ${o.secret} (virsh secret-list)`);
      // A volume secret is bound to one volume's path: one made for another image is not this one's key.
      if (sec.usageType !== 'volume' || path.resolve(sec.usage) !== path.resolve(o.target)) {
        throw new IdlecryptError('KEY_FILE', `libvirt secret ${o.secret} is for ${sec.usageType === 'volume' ? `volume ${sec.usage}` : `usage ${sec.usageType} ${sec.usage}`}, not for volume ${path.resolve(o.target)} (define one with <usage type='volume'><volume>${path.resolve(o.target)}</volume></usage>)`);
      }
    }
    let disk = findDomainDisk(o.domain, await client.disks(o.domain), o.disk);
    const pauseMode = o.pause ?? 'speed';
    const job = new LibvirtCopyJob(client, o.domain, o.disk, pauseMode);
    const events$ = client.events$.pipe(filter((e) => e.event === 'block-job' && e.domain === o.domain && e.disk === o.disk));
    const sub = events$.subscribe((e) => {
      if (e.event === 'block-job' && e.status === BLOCK_JOB.READY) job.ready = true;
    });

    let adopting: LibvirtRunRecord | undefined;
    if (prior) {
      if (prior.domain !== o.domain || prior.disk !== o.disk) {
        throw new IdlecryptError('TARGET_EXISTS', `${prior.target} belongs to an earlier run on domain '${prior.domain}' disk ${prior.disk}; choose another target`);
      }
      if (disk.source === prior.target) {
        const persistence = await persist(client, dom.persistent, prior, log, o.onNote);
        await store.remove(prior.tag);
        o.onNote?.(`the earlier run into ${prior.target} had already switched the guest onto it; nothing left to do`, { resumed: 'done', tag: prior.tag });
        o.onPhase?.('completed', { device: o.disk, source: prior.target });
        sub.unsubscribe();
        return { domain: o.domain, device: o.disk, source: prior.source, target: prior.target, format: prior.format, secret: prior.secret, virtualSize: 0, bytesCopied: 0, elapsedS: (performance.now() - started) / 1000, persistence };
      }
      const info = await client.jobInfo(o.domain, o.disk);
      if (info && disk.mirror?.source === prior.target) {
        // A run that died before it saved 'copying' may have left libvirt's secret with its
        // opening key (rekeySecret): this run sets the key file's, and only one that opens the image.
        if (keyFile !== undefined && prior.secretOurs && prior.phase === 'creating-target' && !(await keyFileOpens(prior.target, prior.format, keyFile))) {
          throw new IdlecryptError('KEY_FILE', `${o.keyFile} does not open ${prior.target}, which an earlier run made with another key and whose copy is still running; give that run's key file`);
        }
        adopting = prior;
        job.ready = disk.mirror.ready === 'yes';
      } else {
        const removed = await undo(client, prior, log);
        await store.remove(prior.tag);
        o.onNote?.(`an earlier run into ${prior.target} died and could not be continued; removed ${removed.join(', ') || 'nothing'}; starting again`, { resumed: 'rolled-back', tag: prior.tag, removed });
        await checkTargetPath(o.target, disk.source ?? undefined);
      }
    }
    const targetPath = path.resolve(o.target);
    if (!adopting) {
      checkCopyable(o.domain, disk);
      if (disk.mirror || (await client.jobInfo(o.domain, o.disk))) {
        throw new IdlecryptError('JOB_EXISTS', `a block job is already running on domain '${o.domain}' disk ${o.disk}; wait for it or end it first (virsh blockjob ${o.domain} ${o.disk} --abort)`);
      }
      await checkTargetPath(targetPath, disk.source ?? undefined);
    }
    const info = await client.call<{ capacity: number; allocation: number }>('block-info', { domain: o.domain, disk: o.disk });
    const size = info.capacity;
    // What the image holds on the host (virDomainGetBlockInfo's allocation), where that is
    // what the copy reads as data: a file with no backing image (as disks.ts for QMP).
    const share = disk.type === 'file' && !disk.backing ? allocatedShare({ allocatedBytes: info.allocation, virtualSize: info.capacity }) : null;
    // An adopted run keeps the format it was started with.
    const format = adopting ? adopting.format : targetFormatFor(o.format, disk.format ?? 'raw');
    const allocated = share === null ? null : info.allocation;
    if (!adopting) {
      await checkSpace(targetPath, targetBytesNeeded(size, format, allocated));
      const thin = thinDiskNote(o.format, format, size, allocated);
      if (thin) o.onNote?.(thin.text, thin.record);
    }

    // Observation starts now, so that bpftrace attaches while the LUKS header is written.
    let rec: RunMetrics | undefined;
    const vm = o.moderation ? await domainVm(dom) : undefined;
    const mod = o.moderation
      ? await RunModeration.start(undefined, {
          ...o.moderation,
          vm: vm!,
          ...(pauseMode === 'speed' ? { pausedSpeed: LIBVIRT_PAUSED_SPEED } : {}),
          logger: log,
          stateDir: store.base,
          onSample: (s) => rec?.sample(s),
          onStatus: (t, r) => rec?.probeStatus(t, r),
        })
      : undefined;
    o.onVm?.(o.domain);
    if (o.metrics) rec = new RunMetrics(await o.metrics(o.domain), { host: hostTag(), vm: o.domain, device: o.disk });
    const report = (p: Progress) => {
      rec?.progress(p, mod?.moderation.policy, mod?.moderation.decision);
      o.onProgress?.(p);
    };

    const tag = adopting?.tag ?? randomBytes(4).toString('hex');
    const { pause: _earlierPause, ...base }: LibvirtRunRecord = adopting ?? {
        version: 1 as const,
        tag,
        uri: client.uri,
        domain: o.domain,
        uuid: dom.uuid,
        disk: o.disk,
        source: disk.source!,
        target: targetPath,
        format,
        secret: o.secret ?? randomUUID(),
        secretOurs: o.secret === undefined,
        phase: 'creating-target' as const,
        createdAt: Date.now(),
        owner: selfOwner(),
      };
    let record: LibvirtRunRecord = { ...base, ...(pauseMode === 'qemu' ? { pause: 'qemu' as const } : {}), owner: selfOwner() };
    if (pauseMode === 'qemu') {
      const taint = `pausing with QEMU's job-pause through libvirt's monitor pass-through: libvirt marks domain '${o.domain}' tainted (custom-monitor) until it is shut down`;
      log.warn({ domain: o.domain }, taint);
      o.onNote?.(taint, { taint: 'custom-monitor' });
    }
    // The record goes to disk before anything is made: whatever happens next, the next run knows what is ours.
    await store.save(record);
    let pivoting = false;
    let undone = false;
    try {
      if (adopting) {
        // A moderated copy is held at once (see src/encrypt/encrypt.ts): the probes take a second or more to attach.
        await job.setSpeed(mod ? HELD_SPEED : o.speed);
        // The run before may have died between the copy's start and the secret's rekey (checked above).
        if (keyFile !== undefined && adopting.secretOurs && adopting.phase === 'creating-target') await rekeySecret(client, adopting, keyFile, log);
        if (mod) {
          log.info({ domain: o.domain, disk: o.disk }, 'copy held until the probes attach');
          await untilAborted(mod.attached, o.signal, o.detach);
        }
        if (o.detach?.aborted) throw detached(targetPath, true, adopting.pause);
        // Paused with QEMU's job-pause by the run before (a detach): resumed, so that the
        // controller starts from a running job (a paused one it would take for someone else's).
        if (adopting.pause === 'qemu') await new LibvirtCopyJob(client, o.domain, o.disk, 'qemu').resume();
        const at = await mustSnapshot(job);
        o.onNote?.(`resuming the copy into ${targetPath} that an earlier run (pid ${adopting.owner.pid}) left at ${at.len > 0 ? ((100 * at.offset) / at.len).toFixed(1) : '0.0'}%`, { resumed: 'adopted', tag, offset: at.offset, len: at.len });
      } else {
        o.onPhase?.('creating-target', { device: o.disk, source: disk.source! });
        const reuse = keyFile !== undefined;
        if (keyFile !== undefined) {
          // Ours alone from the start (O_EXCL), then the header written into it.
          await (await fs.open(targetPath, 'wx', 0o600)).close();
          const openingKey = randomBytes(32).toString('hex');
          await writeImageWithQemuImg(o.qemuImg ?? 'qemu-img', { path: targetPath, format, size, keyFile, iterTimeMs: o.iterTimeMs }, log, openingKey);
          await client.defineSecret(secretXml(record.secret, o.domain, o.disk, targetPath), Buffer.from(openingKey));
          log.info({ secret: record.secret }, `target header written by qemu-img: key slot ${OPENING_SLOT} this run's opening key (libvirt's secret until the copy starts), slot ${OPENING_SLOT + 1} the key file's`);
        } else {
          log.warn({ secret: record.secret }, "the key is a libvirt secret idlecrypt cannot read: libvirt makes the LUKS image inside the guest's QEMU, which stalls the guest while it derives the key");
        }
        if (mod) await untilAborted(mod.attached, o.signal, o.detach);
        if (o.signal?.aborted) throw new IdlecryptError('CANCELLED', `cancelled before the copy started; ${targetPath} and its secret were removed, nothing else was changed`);
        if (o.detach?.aborted) throw detached(targetPath, false);
        const bufSize = o.bufSize ?? (mod ? moderatedBufSize({ direct: directCache(disk.cache), noFlush: false }, share, format) : undefined);
        log.info({ bufSize: bufSize ?? 'qemu-default', ...(share === null ? {} : { allocatedShare: Number(share.toFixed(3)) }) }, 'block copy buffer');
        await startCopy(client, { ...o, speed: mod ? HELD_SPEED : o.speed }, dom.persistent, destinationXml(targetPath, format, record.secret), reuse, bufSize);
        // QEMU holds the target open now: the secret becomes the key file's key, for the next boot.
        if (keyFile !== undefined) await rekeySecret(client, record, keyFile, log, o.onNote);
        record = { ...record, phase: 'copying', copyStartedAt: Date.now() };
        await store.save(record);
      }
      log.info({ domain: o.domain, disk: o.disk, target: targetPath, speed: o.speed, moderated: !!mod, adopted: !!adopting }, adopting ? 'block copy adopted' : 'block copy started');
      o.onPhase?.('copying', { device: o.disk, source: disk.source! });
      mod?.moderation.steer(job, record.copyStartedAt, { path: targetPath, direct: directCache(disk.cache) }, vm && (await domainLoopThread(vm.pid, disk, log)));
      o.onJob?.(job);

      const meter = new ProgressMeter();
      const moderation = mod?.moderation;
      const wo = { ...(o.signal ? { signal: o.signal } : {}), ...(o.detach ? { detach: o.detach } : {}), pollMs: o.pollMs ?? 250, logger: log, onProgress: (p: Progress) => report(p) };
      const gone$ = merge(client.closed$, client.events$.pipe(filter((e) => e.event === 'lifecycle' && e.domain === o.domain)));
      // At READY, with the speed pause, no quiet-moment wait as the QMP engine makes: QEMU's
      // mirror ignores its speed once READY (copy-job.ts), so a held copy would follow the
      // guest's writes at full speed for as long as we waited; the pivot now costs the guest
      // the least. With QEMU's own pause the copy holds at READY: wait as the QMP engine does.
      let outcome = await waitUntilReady(job, merge(events$, gone$), meter, wo, moderation);
      if (outcome === 'ready' && moderation && job.canPause) outcome = await waitForQuiet(job, gone$, meter, wo, moderation);
      if (outcome === 'detach') {
        await moderation?.close();
        // libvirt keeps the job; held (1 byte/s, or paused) nobody's guest is disturbed while nobody moderates.
        await job.pause().catch((e: unknown) => log.warn({ err: describe(e) }, 'could not hold the copy while detaching'));
        log.info({ domain: o.domain, disk: o.disk, target: targetPath }, `detached: the copy is left to libvirt ${held(pauseMode)} for the next run to adopt`);
        throw detached(targetPath, true, pauseMode);
      }
      if (outcome !== 'ready') {
        o.onPhase?.('cancelling', { device: o.disk, source: disk.source! });
        await moderation?.close();
        await undo(client, record, log, events$);
        await store.remove(tag);
        undone = true;
        throw new IdlecryptError('CANCELLED', `cancelled: the copy was stopped and ${targetPath} removed; the guest runs on its original disk ${disk.source}`);
      }

      o.onPhase?.('completing', { device: o.disk, source: disk.source! });
      await moderation?.release(); // unlimited speed: the last dirty blocks go fast
      record = { ...record, phase: 'completing' };
      await store.save(record);
      pivoting = true;
      const last = await mustSnapshot(job);
      report(meter.sample(last, performance.now()));
      await job.pivot();
      disk = findDomainDisk(o.domain, await client.disks(o.domain), o.disk);
      if (disk.source !== targetPath) throw new IdlecryptError('JOB_FAILED', `the pivot returned but domain '${o.domain}' disk ${o.disk} still runs on ${disk.source}`);
      const persistence = await persist(client, dom.persistent, record, log, o.onNote);
      await store.remove(tag);
      sub.unsubscribe();
      o.onPhase?.('completed', { device: o.disk, source: targetPath });
      return {
        domain: o.domain,
        device: o.disk,
        source: record.source,
        target: targetPath,
        format: record.format,
        secret: record.secret,
        virtualSize: size,
        bytesCopied: last.offset,
        elapsedS: (performance.now() - started) / 1000,
        persistence,
      };
    } catch (e) {
      await mod?.moderation.close();
      sub.unsubscribe();
      if (undone || (e instanceof IdlecryptError && e.code === 'DETACHED')) throw e; // a detached run's record and copy are the next run's
      // Where does the guest run now? On the target, the pivot happened: keep everything.
      const now = await client.disks(o.domain).then((ds) => ds.find((d) => d.target === o.disk), () => undefined);
      if (pivoting && (now === undefined || now.source === targetPath)) {
        throw new IdlecryptError('JOB_FAILED', `${describe(e)}; ${targetPath} and its secret were kept: check which image domain '${o.domain}' uses (virsh domblklist) before deleting either`, { cause: e });
      }
      let removed: string[];
      try {
        removed = await undo(client, record, log, events$);
        await store.remove(tag);
      } catch (err) {
        // The record stays: the next run into this target finishes or undoes what is left.
        throw new IdlecryptError('JOB_FAILED', `${describe(e)}; and undoing the run failed (${describe(err)}): run the same command again to finish or undo it`, { cause: e });
      }
      // The domain shut down or was destroyed under the copy: say what that means for its data.
      if (!(await client.domain(o.domain).then((d) => d.active, () => false))) {
        const what = removed.filter((r) => r !== 'the copy');
        throw new IdlecryptError(
          'VM_EXITED',
          `domain '${o.domain}' stopped during the copy; its disk ${record.source} is intact (never written by idlecrypt); ${what.length ? `${what.join(' and ')} removed` : 'nothing of ours was left'}`,
          { cause: e },
        );
      }
      throw e;
    } finally {
      await mod?.moderation.close();
    }
  } finally {
    if (!o.client) await client.close();
  }
}

const held = (mode: LibvirtPauseMode) => (mode === 'qemu' ? "paused (QEMU's job-pause)" : 'at 1 byte/s');

function detached(target: string, copying: boolean, mode: LibvirtPauseMode = 'speed'): IdlecryptError {
  return new IdlecryptError(
    'DETACHED',
    copying ? `detached: the copy into ${target} is left to libvirt ${held(mode)} for the next run to resume` : `detached before the copy started; ${target} is left for the next run to roll back`,
    { context: { target } },
  );
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** virDomainBlockCopy; a job already on the disk (someone else's) is said so in one line. */
async function startCopy(client: LibvirtClient, o: DomainEncryptOptions, persistent: boolean, xml: string, reuse: boolean, bufSize: number | undefined): Promise<void> {
  const flags = [...(reuse ? ['reuse-external'] : []), ...(persistent ? ['transient-job'] : [])];
  try {
    await client.call('blockcopy', { domain: o.domain, disk: o.disk, xml, bandwidth: o.speed, flags, ...(bufSize !== undefined ? { 'buf-size': bufSize } : {}) });
  } catch (e) {
    if (e instanceof LibvirtCallError && /block job|already active|in use/i.test(e.message)) {
      throw new IdlecryptError('JOB_EXISTS', `another block job is already running on domain '${o.domain}' disk ${o.disk} (${e.message})`, { cause: e });
    }
    throw e;
  }
}

/**
 * Undoes a run that did not pivot: ends its copy (the guest stays on its source), then
 * deletes the target file and, if we defined it, the secret. Never touches a target the
 * guest runs on. Returns what it removed, for the operator.
 */
async function undo(client: LibvirtClient, rec: LibvirtRunRecord, log: Logger, events$?: Observable<unknown>): Promise<string[]> {
  const removed: string[] = [];
  // Not knowing where the guest runs is not "nowhere": only a domain that is gone is.
  const disk = await client.disks(rec.domain).then(
    (ds) => ds.find((d) => d.target === rec.disk),
    (e: unknown) => {
      if (e instanceof LibvirtCallError && e.virCode === VIR_ERR.NO_DOMAIN) return undefined;
      throw e;
    },
  );
  if (disk?.source === rec.target) return removed;
  // Only our copy is ended: a job whose destination is not our target is someone else's.
  if (disk?.mirror?.source === rec.target && (await client.jobInfo(rec.domain, rec.disk).catch(() => null))) {
    const ended = events$ ? firstValueFrom(merge(events$, timer(30_000)).pipe(take(1))) : Promise.resolve();
    await client.call('abort', { domain: rec.domain, disk: rec.disk, pivot: false });
    await ended;
    for (let i = 0; i < 100 && (await client.jobInfo(rec.domain, rec.disk).catch(() => null)); i++) await new Promise((r) => setTimeout(r, 100));
    removed.push('the copy');
  }
  try {
    await fs.rm(rec.target);
    removed.push(rec.target);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') log.warn({ target: rec.target, err: describe(e) }, 'could not remove the target');
  }
  if (rec.secretOurs && (await client.undefineSecret(rec.secret).catch(() => false))) removed.push(rec.target === removed.at(-1) ? 'its secret' : `libvirt secret ${rec.secret}`);
  return removed;
}

/**
 * After the pivot: the persistent definition must name the encrypted image, or the next
 * boot brings the guest back on its plaintext disk. libvirt 9.0 rewrites it itself when the
 * inactive disk's source matched the live one (qemuBlockJobRewriteConfigDiskSource); when
 * it did not (the definition was edited meanwhile), we point it at the image and say so.
 */
async function persist(
  client: LibvirtClient,
  persistent: boolean,
  rec: LibvirtRunRecord,
  log: Logger,
  onNote: DomainEncryptOptions['onNote'],
): Promise<DomainEncryptResult['persistence']> {
  if (!persistent) return 'transient';
  const next = (await client.disks(rec.domain, true)).find((d) => d.target === rec.disk);
  if (next?.source === rec.target && next.encryption?.secret === rec.secret) {
    log.info({ domain: rec.domain, disk: rec.disk }, 'libvirt rewrote the persistent definition itself');
    return 'rewritten-by-libvirt';
  }
  const old = await client.call<string | null>('retarget-inactive', { domain: rec.domain, disk: rec.disk, source: rec.target, format: rec.format === 'luks' ? 'raw' : 'qcow2', secret: rec.secret });
  onNote?.(`updated domain '${rec.domain}''s persistent definition: ${rec.disk} now names ${rec.target} (was ${old ?? 'nothing'}), so the next boot uses the encrypted image`, { persistence: 'updated', was: old, now: rec.target });
  return 'updated';
}

/**
 * The thread the headroom reads for a domain's disk: its iothread (`<driver iothread='N'/>`,
 * or its SCSI controller's), found by the name QEMU gives it under libvirt (`IO iothreadN`:
 * libvirt starts QEMU with debug-threads=on), else (undefined) the main loop.
 */
async function domainLoopThread(pid: number, disk: DomainDisk, log: Logger): Promise<LoopThread | undefined> {
  if (disk.iothread === null) return undefined;
  const tid = await iothreadTidByName(pid, disk.iothread);
  if (tid === undefined) {
    log.warn({ iothread: disk.iothread, pid }, `the disk has iothread '${disk.iothread}', but QEMU (pid ${pid}) has no thread named 'IO ${disk.iothread}': the headroom reads its main loop`);
    return undefined;
  }
  return { tid, iothread: disk.iothread };
}
