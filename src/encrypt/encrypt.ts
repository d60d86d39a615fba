/**
 * One encryption run, end to end: preflight → create the encrypted target → mirror the live
 * disk into it → complete (the guest pivots onto the target). Anything that goes wrong
 * before the pivot leaves the guest on its original disk, which we never write to, and
 * removes what we created.
 *
 * This module drives QEMU through QMP and reports through hooks; it knows nothing of
 * terminals (src/cli/) or of moderation (src/controller/), which receives the job through
 * `onJob` and steers its speed while we wait here for it to finish.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { firstValueFrom, fromEvent, merge, timer, filter, map, take, type Observable } from 'rxjs';
import { QmpClient } from '../qmp/client.ts';
import { QmpCommandError } from '../qmp/errors.ts';
import { IdlecryptError, describeError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { JobControl, JobSnapshot } from '../jobs/types.ts';
import { QmpMirrorJob } from '../jobs/qmp-mirror.ts';
import { diskIothread, diskLabel, findDisk, imagePath, listDisks, type DiskCache, type DiskInfo } from './disks.ts';
import type { LoopThread } from '../probes/mainloop.ts';
import { checkKeyFile, checkSpace, checkTargetPath, targetBytesNeeded, thinDiskNote } from './preflight.ts';
import { EncryptedTarget, targetFormatFor, type FormatChoice, type TargetFormat } from './target.ts';
import { defaultEncrypter, QCOW2_REFUSED, storageDaemonExecutable, type Encrypter } from './storage-daemon.ts';
import { ProgressMeter, type Progress } from './progress.ts';
import { RunModeration, type ModerationOptions } from './moderation.ts';
import { RunMetrics } from './metrics.ts';
import type { MetricsSink } from '../metrics/sink.ts';
import { hostTag } from '../metrics/index.ts';
import { ownerAlive, RunStore, selfOwner, type RunRecord } from './runs.ts';
import { recoverForRerun, targetLeftovers, type Recovery } from './recover.ts';

export type { Progress };

export type Phase = 'preflight' | 'creating-target' | 'copying' | 'completing' | 'completed' | 'cancelling';

export interface EncryptOptions {
  readonly qmpSocket: string;
  /**
   * An open session to the VM (the agent's, shared by the runs on its disks: QEMU greets
   * only one client per socket). The run uses it and leaves it open. Default: the run
   * connects to qmpSocket itself and closes it at the end.
   */
  readonly client?: QmpClient;
  /**
   * Stop steering and leave the copy where it is, paused, with its target and run record,
   * for the next run (the agent's next start) to adopt: the agent's SIGTERM. The run then
   * fails with code DETACHED. A target whose copy had not started yet is left too, and
   * rolled back by the next run.
   */
  readonly detach?: AbortSignal;
  readonly device: string;
  readonly target: string;
  readonly keyFile: string;
  /** The target's format; `auto`: the source's (targetFormatFor). */
  readonly format: FormatChoice;
  /**
   * Who encrypts: a qemu-storage-daemon the guest's QEMU writes to over NBD until the pivot
   * (the default for a LUKS target, defaultEncrypter; storage-daemon.ts), or the guest's
   * QEMU. An adopted run keeps its own (a record without one is the guest's QEMU's: runs
   * before the daemon).
   */
  readonly encrypter?: Encrypter;
  /** Initial speed limit, bytes/s; 0 = unlimited. */
  readonly speed: number;
  readonly iterTimeMs: number;
  /** The mirror's buffer, bytes; default moderatedBufSize() when moderated, else QEMU's (16 MiB). */
  readonly bufSize?: number;
  readonly pollMs?: number;
  readonly signal?: AbortSignal;
  readonly logger: Logger;
  readonly onPhase?: (phase: Phase, disk?: DiskInfo) => void;
  readonly onProgress?: (p: Progress) => void;
  /** Called once the mirror runs; the controller steers it from here. */
  readonly onJob?: (job: JobControl, client: QmpClient) => void;
  /** Moderate the copy by guest activity (the default in the CLI); absent = fixed `speed`. */
  readonly moderation?: Omit<ModerationOptions, 'logger'>;
  /** Where the run's metrics go (opened by the caller, who also closes it). */
  readonly metrics?: (vmName: string) => Promise<MetricsSink>;
  /** Called with the VM's name once it is known (QMP query-name or the process's -name). */
  readonly onVm?: (vmName: string) => void;
  /** Things the operator should know: an earlier run's copy resumed or rolled back. */
  readonly onNote?: (text: string, record: Record<string, unknown>) => void;
  /** Where run records are kept (runs.ts); default $IDLECRYPT_STATE_DIR or /var/lib/idlecrypt. */
  readonly runStore?: RunStore;
}

export interface EncryptResult {
  readonly device: string;
  readonly source: string;
  readonly target: string;
  readonly targetNode: string;
  readonly format: TargetFormat;
  readonly virtualSize: number;
  /** bytes the mirror copied, including blocks the guest dirtied and that were copied again */
  readonly bytesCopied: number;
  readonly elapsedS: number;
}

/**
 * The speed a moderated copy starts at, or is adopted at (bytes/s): held. The controller's
 * first decision sets the real speed milliseconds later; a run that dies before it leaves
 * a copy that crawls instead of one that runs flat out with nobody watching the guest (a
 * 128 MiB copy started unlimited finished in 2 s after its agent was killed at 10%).
 */
export const HELD_SPEED = 1;

/**
 * The mirror's buffer (QMP blockdev-mirror `buf-size`) when the copy is moderated: 4 MiB
 * (four 1 MiB copy operations in flight) on the host's page cache, 8 MiB with O_DIRECT
 * (`cache=none`), instead of QEMU's default 16 MiB (sixteen).
 *
 * Why smaller: QEMU encrypts LUKS writes in its main loop, holding the big QEMU lock, and
 * that loop is also where QMP commands run and where the guest's disk requests are handled
 * (no iothread). An unthrottled mirror with 16 operations in flight keeps it busy nearly all
 * the time: while it runs (an idle phase, at full speed) a guest that starts working gets a
 * handful of requests through per second, so the busy phase is seen late, and every QMP
 * command, the pause included, waits its turn. Measured on the project's hosts with the
 * page cache (TCG guest, bursty workload; tmp experiments behind test/moderation and
 * bench/moderation.ts):
 *   buf-size  QMP latency while copying    busy-phase start -> paused   unthrottled speed
 *   16 MiB    p50 40-160 ms, p95 180-650   0.5-1.4 s                    100% (366-418 MiB/s)
 *    8 MiB    p50 40-80 ms,  p95 100-205   0.05-0.26 s                  ~90%
 *    4 MiB    p50 6-23 ms,   p95 33-105    0.09-0.26 s                  ~85%
 *    2 MiB    p50 3-8 ms,    p95 9-40      0.04-0.34 s                  ~80%
 *    1 MiB    p50 1-3 ms,    p95 4-13      0.01-0.03 s                  ~65%
 * Why larger with O_DIRECT: each operation then waits for the device, not for a memory copy,
 * so fewer in flight leave the device idle while the main loop has time to spare. In the
 * side-by-side acceptance test (test/moderation, cache=none, 2026-11-25; 3 runs with 4 MiB,
 * 5 with 8 MiB), the idle-phase copy ran at this share of the unthrottled one, single idle
 * phases and the median per run, and slowed this long after a busy phase began:
 *   4 MiB   75-92%, medians 79-92%   29-174 ms
 *   8 MiB   81-98%, medians 88-98%   44-146 ms
 * Issue 4 asks that the job slow within 250 ms of the guest's first busy request and run at
 * >= 80% of an unthrottled mirror while the guest is idle. A copy at a fixed speed or none
 * (--speed, --no-moderation) keeps QEMU's default, as libvirt's blockcopy does.
 *
 * 2 MiB, whatever the cache, for a source that occupies under half its size on the host
 * (`allocatedShare`): the mirror copies its holes as zero writes, each as large as the
 * buffer, and LUKS has no write-zeroes of its own, so QEMU zeroes a bounce buffer of that
 * size and encrypts it in the main loop; at 2 MiB those buffers are reused from the heap
 * rather than faulted in afresh. Six cache=none cells of issue 9's matrix, two rounds
 * interleaved (docs/starvation.md, 2026-12-03): a sparse source's idle copy 91-108% of an
 * unthrottled mirror against 70-101% with 8 MiB, its slowest reaction 19-261 ms against
 * 150-798 ms, a key's pause at most 96 ms against 576; an allocated one's copy about 6%
 * slower with 2 MiB (its reads are 1 MiB operations, fewer in flight), so it keeps 8 MiB.
 * Only into raw LUKS: a qcow2 target writes the holes as zero clusters, with no bounce
 * buffer and nothing encrypted, and what the copy does is read and encrypt the data, as an
 * allocated source's copy does. A 64 GiB qcow2 disk holding 8 GiB copied into qcow2 (issue
 * 9's matrix, cell thin-qcow2, cache=none, three rounds each way interleaved, 2026-12-03):
 * its idle copy at a median of 85% of an unthrottled mirror with 8 MiB against 72% with
 * 2 MiB beside the bursty guest, 81% against 80% beside the one-at-a-time guest.
 */
export function moderatedBufSize(cache: DiskCache, allocatedShare: number | null = null, format: TargetFormat = 'luks'): number {
  if (format === 'luks' && allocatedShare !== null && allocatedShare < MOSTLY_UNALLOCATED) return 2 * 1024 * 1024;
  return (cache.direct ? 8 : 4) * 1024 * 1024;
}

/**
 * Below this share of its size on the host, a source is copied with a 2 MiB buffer
 * (moderatedBufSize): mostly holes, which the mirror copies as zero writes.
 */
export const MOSTLY_UNALLOCATED = 0.5;

/** The share of a disk's size that its image occupies on the host, or null where that says nothing (disks.ts). */
export function allocatedShare(disk: Pick<DiskInfo, 'allocatedBytes' | 'virtualSize'>): number | null {
  return disk.allocatedBytes === null || disk.virtualSize <= 0 ? null : disk.allocatedBytes / disk.virtualSize;
}

export async function encryptDisk(o: EncryptOptions): Promise<EncryptResult> {
  const log = o.logger;
  const started = performance.now();
  o.onPhase?.('preflight');
  const keyFile = await checkKeyFile(o.keyFile);
  // A run that died writing this target left a record: finish or undo it (recover.ts).
  const store = o.runStore ?? new RunStore();
  const prior = await store.forTarget(o.target);
  if (prior && ownerAlive(prior)) {
    throw new IdlecryptError('JOB_EXISTS', `idlecrypt (pid ${prior.owner.pid}) is already encrypting VM '${prior.vm}' disk ${prior.device} into ${prior.target}`);
  }
  if (!prior) await checkTargetPath(o.target, undefined);
  if (o.signal?.aborted) throw cancelledBeforeStart();

  const client = o.client ?? (await QmpClient.connect(o.qmpSocket, { logger: log }));
  try {
    const disk = findDisk(await listDisks(client), o.device);
    let adopt: (Recovery & { kind: 'adopt' }) | undefined;
    if (prior) {
      const r = await recoverForRerun(client, store, prior, disk, { format: o.format, keyFile }, log);
      if (r.kind === 'done') {
        o.onNote?.(`the earlier run into ${prior.target} had already switched the guest onto it; nothing left to do`, { resumed: 'done', tag: prior.tag });
        o.onPhase?.('completed', disk);
        return { device: diskLabel(disk), source: prior.source, target: prior.target, targetNode: r.leftovers.node, format: prior.format, virtualSize: disk.virtualSize, bytesCopied: r.leftovers.job?.offset ?? 0, elapsedS: (performance.now() - started) / 1000 };
      }
      if (r.kind === 'rolled-back') {
        o.onNote?.(`an earlier run into ${prior.target} died and could not be continued; removed ${r.removed.join(', ')}; starting again`, { resumed: 'rolled-back', tag: prior.tag, removed: r.removed });
      } else {
        adopt = r;
      }
    }
    const targetPath = adopt ? adopt.record.target : await checkTargetPath(o.target, disk.file);
    if (!adopt) {
      if (disk.encrypted) {
        throw new IdlecryptError('USAGE', `device '${o.device}' already runs on an encrypted image (${disk.file})`);
      }
      await refuseIfBusy(client, disk, o.device);
    }
    // An adopted run keeps the format it was started with (recoverForRerun checked it).
    const format = adopt ? adopt.record.format : targetFormatFor(o.format, disk.driver);
    const encrypter: Encrypter = adopt ? (adopt.record.encrypter ?? 'qemu') : (o.encrypter ?? defaultEncrypter(format));
    if (!adopt) {
      if (encrypter === 'storage-daemon' && format === 'qcow2') throw new IdlecryptError('USAGE', QCOW2_REFUSED);
      if (encrypter === 'storage-daemon') await storageDaemonExecutable();
      await checkSpace(targetPath, targetBytesNeeded(disk.virtualSize, format, disk.allocatedBytes));
      const thin = thinDiskNote(o.format, format, disk.virtualSize, disk.allocatedBytes);
      if (thin) o.onNote?.(thin.text, thin.record);
    }
    // Observation starts now, so that bpftrace attaches while the LUKS header is written.
    let rec: RunMetrics | undefined;
    const mod = o.moderation
      ? await RunModeration.start(client, {
          ...o.moderation,
          logger: log,
          stateDir: store.base,
          onSample: (s) => rec?.sample(s),
          onStatus: (t, r) => rec?.probeStatus(t, r),
        })
      : undefined;
    const vmName = mod?.moderation.vm.name ?? (await queryName(client));
    o.onVm?.(vmName);
    if (o.metrics) rec = new RunMetrics(await o.metrics(vmName), { host: hostTag(), vm: vmName, device: diskLabel(disk) });
    const report = (p: Progress) => {
      rec?.progress(p, mod?.moderation.policy, mod?.moderation.decision);
      o.onProgress?.(p);
    };

    const tag = adopt?.record.tag ?? randomBytes(4).toString('hex');
    const qemuOwner = encrypter === 'storage-daemon' ? await socketOwner(client.socketPath) : undefined;
    const spec = { path: targetPath, format, size: disk.virtualSize, keyFile, iterTimeMs: o.iterTimeMs, tag, cache: disk.cache, encrypter, ...(qemuOwner ? { qemuOwner } : {}) };
    const target = adopt ? EncryptedTarget.adopt(client, spec, log, targetLeftovers(adopt.leftovers, adopt.record, true)) : new EncryptedTarget(client, spec, log);
    // The record goes to disk before anything is made: whatever happens next, the next run
    // (or `idlecrypt cancel`) knows what is ours.
    let record: RunRecord = {
      ...(adopt?.record ?? {
        version: 1 as const,
        tag,
        vm: vmName,
        qmp: path.resolve(o.qmpSocket),
        device: o.device,
        source: disk.file,
        target: targetPath,
        format,
        keyFile,
        phase: 'creating-target' as const,
        createdAt: Date.now(),
        ...(encrypter === 'qemu' ? {} : { encrypter }),
      }),
      owner: selfOwner(),
    };
    await store.save(record);
    let pivoting = false;
    let job: QmpMirrorJob | undefined;
    try {
      if (adopt) {
        job = QmpMirrorJob.adopt(client, adopt.leftovers.jobId);
        // A moderated copy is held at once: the dead run may have left it at full speed beside
        // a busy guest, and the probes take a second or more to attach.
        await job.setSpeed(mod ? HELD_SPEED : o.speed);
        if (mod) {
          log.info({ job: job.id }, 'mirror held until the probes attach');
          await untilAborted(mod.attached, o.signal, o.detach);
        }
        if (o.signal?.aborted) throw cancelledAdopted(targetPath, disk);
        if (o.detach?.aborted) throw detached(targetPath, job.id);
        const at = adopt.leftovers.job!;
        o.onNote?.(
          `resuming the copy into ${targetPath} that an earlier run (pid ${adopt.record.owner.pid}) left ${at.ready ? 'at READY' : `at ${at.len > 0 ? ((100 * at.offset) / at.len).toFixed(1) : '0.0'}%`}${at.paused ? ', paused' : ''}`,
          { resumed: 'adopted', tag, job: job.id, offset: at.offset, len: at.len, paused: at.paused },
        );
        // Its pause was the dead run's (moderation's, or its hold at exit), not an
        // operator's: this run steers from here, and pauses again at once if the guest is busy.
        if (at.paused) await job.resume();
        if (record.copyStartedAt === undefined) record = { ...record, copyStartedAt: Date.now() };
        record = { ...record, phase: 'copying' };
        await store.save(record);
      } else {
        o.onPhase?.('creating-target', disk);
        await target.create(async (daemon) => {
          record = { ...record, daemon };
          await store.save(record);
        });
        if (mod) await untilAborted(mod.attached, o.signal, o.detach);
        if (o.signal?.aborted) throw cancelledBeforeStart();
        if (o.detach?.aborted) throw detached(targetPath, undefined);
        job = await startMirror(client, disk, target, o, tag);
        record = { ...record, phase: 'copying', copyStartedAt: Date.now() };
        await store.save(record);
      }
      const share = allocatedShare(disk);
      log.info(
        { job: job.id, source: disk.nodeName, target: target.node, speed: o.speed, moderated: !!mod, adopted: !!adopt, ...(adopt ? {} : { bufSize: mirrorBufSize(disk, o, format) ?? 'qemu-default' }), ...(share === null ? {} : { allocatedShare: Number(share.toFixed(3)) }) },
        adopt ? 'mirror adopted' : 'mirror started',
      );
      o.onPhase?.('copying', disk);
      mod?.moderation.steer(job, record.copyStartedAt, { path: targetPath, direct: target.copyDirect }, await loopThread(client, disk, log));
      o.onJob?.(job, client);

      const meter = new ProgressMeter();
      const moderation = mod?.moderation;
      const ro = { ...o, onProgress: report };
      let outcome = await waitUntilReady(job, qmpWake$(client, job), meter, ro, moderation);
      if (outcome === 'ready' && moderation) outcome = await waitForQuiet(job, client.closed$, meter, ro, moderation);
      if (outcome === 'detach') {
        await moderation?.close();
        // Whatever happens here, the copy is the next run's to adopt, never rolled back.
        try {
          const snap = await job.snapshot();
          if (snap && !snap.paused) await job.pause();
        } catch (e) {
          if (!(e instanceof QmpCommandError && /already paused/i.test(e.desc))) log.warn({ job: job.id, err: (e as Error).message }, 'could not pause the copy while detaching');
        }
        log.info({ job: job.id, target: targetPath }, 'detached: the copy is left paused for the next run to adopt');
        throw detached(targetPath, job.id);
      }
      if (outcome === 'cancel') {
        o.onPhase?.('cancelling', disk);
        await moderation?.close();
        await cancelJob(client, job, o.pollMs ?? 250);
        await target.remove();
        await store.remove(tag);
        throw new IdlecryptError(
          'CANCELLED',
          `cancelled: the copy was stopped and ${targetPath} removed; the guest runs on its original disk ${disk.file}`,
        );
      }

      o.onPhase?.('completing', disk);
      await moderation?.release(); // resumed at unlimited speed: the last dirty blocks go fast
      record = { ...record, phase: 'completing' };
      await store.save(record);
      if (record.daemon) {
        await target.beforePivot(); // the guest's QEMU takes over the image from the storage daemon
        // A run that dies from here on leaves a copy that no longer needs the daemon.
        const { daemon: _gone, ...rest } = record;
        record = rest;
        await store.save(record);
      }
      pivoting = true;
      const snap = await completeJob(client, job, o.pollMs ?? 250);
      report(meter.sample(snap, performance.now()));
      // Re-find the disk by what survives the pivot: its qdev id or drive name (the node
      // name the operator may have given is the old node's).
      const now = findDisk(await listDisks(client), disk.qdevId || disk.device || target.node);
      if (now.nodeName !== target.node) {
        throw new IdlecryptError('JOB_FAILED', `the job completed but '${o.device}' still runs on ${now.file}`);
      }
      await store.remove(tag);
      o.onPhase?.('completed', now);
      return {
        device: diskLabel(disk),
        source: disk.file,
        target: targetPath,
        targetNode: target.node,
        format,
        virtualSize: disk.virtualSize,
        bytesCopied: snap.offset,
        elapsedS: (performance.now() - started) / 1000,
      };
    } catch (e) {
      await mod?.moderation.close(); // stop steering before the job and target go away
      if (e instanceof IdlecryptError && e.code === 'DETACHED') throw e; // left for the next run, record and all
      throw await failRun(e, { client, target, disk, pivoting, log, store, tag, job });
    } finally {
      await mod?.moderation.close();
    }
  } finally {
    if (!o.client) await client.close();
  }
}

/**
 * The filter nodes QEMU puts above a disk's node while a job runs on it (mirror, active
 * commit, backup). query-block does not show them (they are implicit), but
 * query-named-block-nodes does, named after the file beneath.
 */
const JOB_FILTER_DRIVERS = new Set(['mirror_top', 'commit_top', 'backup-top', 'copy-before-write']);

/**
 * Refuse before anything is created when a block job already runs on the disk: one named
 * after the device (legacy drive jobs), or one under any id (libvirt's, a backup tool's)
 * whose filter node sits on the disk's image.
 */
async function refuseIfBusy(client: QmpClient, disk: DiskInfo, asked: string): Promise<void> {
  const names = new Set([disk.device, disk.nodeName, disk.qdevId, asked].filter((n) => n !== ''));
  const jobs = await client.execute('query-block-jobs');
  const busy = jobs.find((j) => names.has(j.device));
  if (busy) {
    throw new IdlecryptError('JOB_EXISTS', `a ${busy.type} job (${busy.device}) is already running on '${asked}'; wait for it or cancel it first`);
  }
  if (jobs.length === 0) return;
  const nodes = await client.execute('query-named-block-nodes', { flat: true });
  const filter = nodes.find((n) => JOB_FILTER_DRIVERS.has(n.drv) && imagePath(n.file) === disk.file);
  if (filter) {
    const ids = jobs.map((j) => `${j.type} ${j.device}`).join(', ');
    throw new IdlecryptError('JOB_EXISTS', `another block job is already running on '${asked}' (QEMU's jobs: ${ids}); wait for it or cancel it first`);
  }
}

/** The mirror's buffer: the caller's, or for a moderated copy moderatedBufSize's; undefined: QEMU's default. */
function mirrorBufSize(disk: DiskInfo, o: EncryptOptions, format: TargetFormat): number | undefined {
  return o.bufSize ?? (o.moderation ? moderatedBufSize(disk.cache, allocatedShare(disk), format) : undefined);
}

async function startMirror(client: QmpClient, disk: DiskInfo, target: EncryptedTarget, o: EncryptOptions, tag: string) {
  const bufSize = mirrorBufSize(disk, o, target.spec.format);
  try {
    return await QmpMirrorJob.start(client, {
      jobId: `idlecrypt-${tag}`,
      source: disk.nodeName,
      target: target.node,
      speed: o.moderation ? HELD_SPEED : o.speed,
      ...(bufSize !== undefined ? { bufSize } : {}),
    });
  } catch (e) {
    // A job started under another id (libvirt's, or a backup) holds an op blocker on the
    // node, or has put its filter node (mirror_top, backup-top) above it, which QEMU reports
    // as the node no longer being a root node.
    if (e instanceof QmpCommandError && /is busy|in use by|block job|Need a root block node/i.test(e.desc)) {
      throw new IdlecryptError('JOB_EXISTS', `another block job is already running on '${o.device}' (${e.desc})`, { cause: e });
    }
    throw e;
  }
}

/** What the waits below need of a run: its signals, its poll period, and where progress goes. */
export type WaitOptions = Pick<EncryptOptions, 'signal' | 'detach' | 'pollMs' | 'logger' | 'onProgress'>;

/** A copy the waits can read: a `JobControl`, and QMP's dismiss (which reads a concluded job's error) where there is one. */
export type WaitableJob = JobControl & { dismiss?(): Promise<string | undefined> };

/**
 * Polls the job (level-triggered) and wakes early on `wake$` (the job's events, the
 * backend's connection closing) or an abort.
 */
export async function waitUntilReady(job: WaitableJob, wake$: Observable<unknown>, meter: ProgressMeter, o: WaitOptions, mod?: RunModeration): Promise<'ready' | 'cancel' | 'detach'> {
  const pollMs = o.pollMs ?? 250;
  const abort$ = merge(
    ...[o.signal, o.detach].filter((s): s is AbortSignal => s !== undefined).map((s) => fromEvent(s, 'abort').pipe(map(() => 'abort' as const))),
  );
  const read = progressReadings(job, meter, o, mod);
  let tick = false;
  for (;;) {
    if (o.signal?.aborted) return 'cancel';
    if (o.detach?.aborted) return 'detach';
    const snap = await read(tick);
    if (snap.ready) return 'ready';
    tick = await firstValueFrom(merge(timer(pollMs).pipe(map(() => true)), wake$.pipe(map(() => false)), abort$.pipe(map(() => false))).pipe(take(1)));
  }
}

/** What wakes a wait on a QMP mirror early: its events, and QEMU going away. */
function qmpWake$(client: QmpClient, job: JobControl): Observable<unknown> {
  return merge(
    client.events('BLOCK_JOB_READY', 'JOB_STATUS_CHANGE', 'BLOCK_JOB_ERROR').pipe(filter((e) => ('id' in e.data ? e.data.id : (e.data as { device?: string }).device) === job.id)),
    client.closed$,
  );
}

/**
 * At READY the target is in sync and the mirror keeps copying what the guest writes. The
 * pivot itself copies the last dirty blocks at full speed, so do it while the guest is
 * quiet: wait until the controller calls the guest idle and nothing is left to copy,
 * for at most the policy's pivot.quiet-wait (a guest that is never quiet still gets its pivot), and
 * never past half the time left to the policy's deadline. The deadline is for the
 * encryption, pivot included, and the guarantee cannot see this wait: a busy guest keeps
 * the job paused at READY, and a paused mirror's `len` no longer grows with the guest's
 * writes (QEMU updates it only while the job runs), so no work seems left.
 */
export async function waitForQuiet(job: WaitableJob, closed$: Observable<unknown>, meter: ProgressMeter, o: WaitOptions, mod: RunModeration): Promise<'ready' | 'cancel' | 'detach'> {
  const pollMs = o.pollMs ?? 250;
  const until = performance.now() + (mod.policy?.pivot['quiet-wait'] ?? 30_000);
  const readyAt = Date.now();
  const read = progressReadings(job, meter, o, mod);
  let tick = false;
  for (;;) {
    if (o.signal?.aborted) return 'cancel';
    if (o.detach?.aborted) return 'detach';
    const snap = await read(tick);
    const left = snap.len - snap.offset;
    // idle, not mode 'full': a policy may cap the idle speed (mode 'throttled').
    if (mod.decision?.state === 'idle' && left === 0) return 'ready';
    // A guest that kept the deadline guarantee engaged will not turn quiet in time: once
    // the mirror has caught up, pivot now (a paused mirror's len stops growing, so the
    // guarantee sees no work left and would let the job sit paused at READY).
    if (mod.guaranteeEngaged && left === 0) {
      o.logger.info({ decision: mod.decision }, 'the deadline guarantee is engaged: pivoting without waiting for a quiet guest');
      return 'ready';
    }
    const deadline = mod.deadlineAt();
    if (deadline !== null && Date.now() >= readyAt + (deadline - readyAt) / 2) {
      o.logger.info({ decision: mod.decision, deadline: new Date(deadline).toISOString() }, 'the deadline is near: pivoting without waiting for a quiet guest');
      return 'ready';
    }
    if (performance.now() > until) {
      o.logger.info({ decision: mod.decision, left }, 'the guest stayed busy at READY; pivoting anyway');
      return 'ready';
    }
    const stop$ = o.detach ? fromEvent(o.detach, 'abort') : merge();
    tick = await firstValueFrom(merge(timer(pollMs).pipe(map(() => true)), closed$.pipe(map(() => false)), stop$.pipe(map(() => false))).pipe(take(1)));
  }
}

export function withModeration(p: Progress, mod: RunModeration | undefined): Progress {
  const d = mod?.decision;
  if (!d) return p;
  return { ...p, moderation: { state: d.state, mode: d.mode, reason: d.reason, source: mod.source ?? null, ...(d.headroom ? { headroom: d.headroom } : {}), ...(d.learnt ? { learnt: d.learnt.summary } : {}), ...(d.latency ? { latency: d.latency } : {}) } };
}

/** Waits for `p`, or returns early when the run is cancelled (the caller checks). */
export async function untilAborted(p: Promise<void>, ...signals: (AbortSignal | undefined)[]): Promise<void> {
  const live = signals.filter((s): s is AbortSignal => s !== undefined);
  if (live.length === 0) return p;
  await Promise.race([p, ...live.map((s) => new Promise<void>((resolve) => s.addEventListener('abort', () => resolve(), { once: true })))]);
}

/**
 * A wait's readings of a job that should be running, each reported as progress; a job that
 * ended on its own (an I/O error on the target, say) fails the run with QEMU's error. On a
 * timer tick (`tick`), a reading the controller took since the last one here will do (see
 * snapshotSince); at the start and after an event of the job's, the job is read: a reading
 * from before the event is stale.
 */
function progressReadings(job: WaitableJob, meter: ProgressMeter, o: WaitOptions, mod: RunModeration | undefined): (tick: boolean) => Promise<JobSnapshot> {
  let last = -Infinity;
  return async (tick) => {
    const reading = (tick ? mod?.snapshotSince(last) : undefined) ?? { snap: await mustSnapshot(job), at: performance.now() };
    last = reading.at;
    const snap = reading.snap;
    o.onProgress?.(withModeration(meter.sample(snap, reading.at), mod));
    if (snap.status === 'concluded' || snap.status === 'aborting') {
      const err = await job.dismiss?.();
      throw new IdlecryptError('JOB_FAILED', `the copy failed: ${err ?? snap.error ?? snap.status}`);
    }
    return snap;
  };
}

export async function mustSnapshot(job: JobControl): Promise<JobSnapshot> {
  const snap = await job.snapshot();
  if (!snap) throw new IdlecryptError('JOB_FAILED', `the copy job ${job.id} disappeared (cancelled by someone else?)`);
  return snap;
}

/** READY → pivot. A paused mirror cannot complete (host-facts.md), so resume it first. */
async function completeJob(client: QmpClient, job: QmpMirrorJob, pollMs: number): Promise<JobSnapshot> {
  let snap = await mustSnapshot(job);
  if (snap.paused) await job.resume();
  if (snap.speed !== 0) await job.setSpeed(0); // the last dirty blocks go at full speed
  await job.complete();
  snap = await waitConcluded(client, job, pollMs);
  const err = await job.dismiss();
  if (err) throw new IdlecryptError('JOB_FAILED', `completing the copy failed: ${err}`);
  return snap;
}

async function cancelJob(client: QmpClient, job: QmpMirrorJob, pollMs: number): Promise<void> {
  await job.cancel();
  await waitConcluded(client, job, pollMs);
  await job.dismiss();
}

async function waitConcluded(client: QmpClient, job: QmpMirrorJob, pollMs: number): Promise<JobSnapshot> {
  const deadline = performance.now() + 5 * 60_000;
  for (;;) {
    const snap = await mustSnapshot(job);
    if (snap.status === 'concluded') return snap;
    if (performance.now() > deadline) throw new IdlecryptError('JOB_FAILED', `job ${job.id} did not conclude within 5 minutes (status ${snap.status})`);
    await firstValueFrom(
      merge(timer(pollMs), client.events('JOB_STATUS_CHANGE').pipe(filter((e) => e.data.id === job.id))).pipe(take(1)),
    );
  }
}

/** Turns any failure into the one line the operator reads, after undoing what we did. */
async function failRun(
  e: unknown,
  ctx: { client: QmpClient; target: EncryptedTarget; disk: DiskInfo; pivoting: boolean; log: Logger; store: RunStore; tag: string; job: QmpMirrorJob | undefined },
): Promise<unknown> {
  const { client, target, disk, pivoting, log, store, tag, job } = ctx;
  const qemuGone = client.state !== 'running' || (e instanceof IdlecryptError && e.code === 'QMP_DISCONNECTED');
  if (qemuGone) {
    if (pivoting) {
      // The pivot may have happened: the target may hold the guest's newest writes. Keep it,
      // and its record (phase 'completing': `idlecrypt cancel` will not delete it either).
      return new IdlecryptError(
        'VM_EXITED',
        `QEMU exited while the job was completing; ${disk.file} is unmodified and ${target.spec.path} was kept: check which image the VM uses before deleting either`,
        { cause: e },
      );
    }
    await target.remove();
    await store.remove(tag);
    return new IdlecryptError(
      'VM_EXITED',
      `QEMU exited during the copy; the original disk ${disk.file} is intact (the guest never ran on the target) and the partial target was removed`,
      { cause: e },
    );
  }
  if (!pivoting) {
    log.debug({ err: (e as Error).message }, 'removing the target after a failure');
    // A copy through the storage daemon fails with an NBD error when the daemon dies: say so.
    const daemonGone = target.daemonExited();
    if (daemonGone && e instanceof IdlecryptError && e.code === 'JOB_FAILED') {
      e = new IdlecryptError('JOB_FAILED', `qemu-storage-daemon (pid ${daemonGone.pid}), which encrypted ${target.spec.path}, exited during the copy (${e.message}); the guest stays on ${disk.file}`, { cause: e });
    }
    // A job still in QEMU holds the target's nodes: end it first (the guest stays on its source).
    const snap = job ? await job.snapshot().catch(() => undefined) : undefined;
    if (job && snap) {
      try {
        if (snap.status !== 'concluded') await cancelJob(client, job, 250);
        else await job.dismiss();
      } catch (err) {
        log.warn({ err: (err as Error).message }, 'cancelling the job after a failure');
      }
    }
    await target.remove();
    await store.remove(tag);
  }
  return e;
}

/** QEMU's -name (QMP query-name); the socket's name when the VM has none. */
async function queryName(client: QmpClient): Promise<string> {
  const r = (await client.executeRaw('query-name')) as { name?: string };
  return r.name ?? path.basename(client.socketPath);
}

function cancelledAdopted(target: string, disk: DiskInfo): IdlecryptError {
  return new IdlecryptError('CANCELLED', `cancelled: the earlier run's copy was stopped and ${target} removed; the guest runs on its original disk ${disk.file}`);
}

function detached(target: string, job: string | undefined): IdlecryptError {
  return new IdlecryptError(
    'DETACHED',
    job ? `detached: the copy into ${target} is left paused (job ${job}) for the next run to resume` : `detached before the copy started; ${target} is left for the next run to roll back`,
    { context: { target, ...(job ? { job } : {}) } },
  );
}

function cancelledBeforeStart(): IdlecryptError {
  return new IdlecryptError('CANCELLED', 'cancelled before the copy started; nothing was changed');
}

/**
 * The thread the headroom reads for this disk: its iothread if it has one, else (undefined)
 * the main loop. A QEMU that cannot say (an older one without query-iothreads) is read at
 * its main loop, as before iothreads were looked for.
 */
async function loopThread(client: QmpClient, disk: DiskInfo, log: Logger): Promise<LoopThread | undefined> {
  try {
    const io = await diskIothread(client, disk);
    return io && { tid: io.tid, iothread: io.id };
  } catch (e) {
    log.warn({ err: describeError(e) }, "could not tell whether the disk has an iothread: the headroom reads QEMU's main loop");
    return undefined;
  }
}

/**
 * The user and group of the guest's QEMU, read from its QMP socket, which QEMU made: the
 * storage daemon's socket is handed to them (storage-daemon.ts). Undefined for root's.
 */
async function socketOwner(socketPath: string): Promise<{ uid: number; gid: number } | undefined> {
  const st = await fs.stat(socketPath).catch(() => undefined);
  return st && st.uid !== 0 ? { uid: st.uid, gid: st.gid } : undefined;
}
