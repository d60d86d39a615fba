/**
 * Finishing or undoing what a dead run started (its record: runs.ts).
 *
 *   the guest already runs on the target   the run died after the pivot: done
 *   its job is still in QEMU (running,     adopt it: the next run steers it on and pivots,
 *   paused or at READY) with its nodes     its deadline counting from the copy's first start
 *   anything else (a target without a      roll back: cancel the job, delete the nodes and
 *   job, nodes without a job, QEMU         the secret, delete the target file (ours: the
 *   restarted, a job that failed)          record was written before the file was made)
 *
 * `idlecrypt encrypt` run again with the same arguments takes the first two ways on its
 * own (and the third, then starts afresh); `idlecrypt cancel` always rolls back.
 */
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { QmpClient } from '../qmp/client.ts';
import { findDisk, listDisks, type DiskInfo } from './disks.ts';
import { continuable, findLeftovers, ownerAlive, processAlive, RunStore, runNames, type Leftovers, type RunRecord } from './runs.ts';
import { EncryptedTarget, type FormatChoice, type TargetLeftovers } from './target.ts';
import { StorageDaemon } from './storage-daemon.ts';

export type Recovery =
  | { readonly kind: 'done'; readonly record: RunRecord; readonly leftovers: Leftovers }
  | { readonly kind: 'adopt'; readonly record: RunRecord; readonly leftovers: Leftovers }
  | { readonly kind: 'rolled-back'; readonly record: RunRecord; readonly removed: string[] };

/** What `encrypt` does with a dead run's record for its target, before anything new is made. */
export async function recoverForRerun(
  client: QmpClient,
  store: RunStore,
  rec: RunRecord,
  disk: DiskInfo,
  asked: { readonly format: FormatChoice; readonly keyFile: string },
  log: Logger,
): Promise<Recovery> {
  if (disk.file !== rec.source && disk.file !== rec.target) {
    throw new IdlecryptError(
      'TARGET_EXISTS',
      `target ${rec.target} belongs to an unfinished run for VM '${rec.vm}' disk ${rec.device} (${rec.source}); finish it with its own command, or remove it with: idlecrypt cancel --target ${rec.target}`,
    );
  }
  // `auto` takes the run's own: the disk may already be on the target, of another format.
  if (asked.format !== 'auto' && rec.format !== asked.format) {
    throw new IdlecryptError('USAGE', `the unfinished run into ${rec.target} was started with --format ${rec.format}; run it again with that, or remove it with: idlecrypt cancel --target ${rec.target}`);
  }
  if (rec.keyFile !== path.resolve(asked.keyFile)) {
    throw new IdlecryptError('USAGE', `the unfinished run into ${rec.target} was started with --key-file ${rec.keyFile}; run it again with that, or remove it with: idlecrypt cancel --target ${rec.target}`);
  }
  const l = await findLeftovers(client, rec.tag);
  if (disk.file === rec.target && disk.nodeName === l.node) {
    if (l.job?.status === 'concluded') await client.execute('job-dismiss', { id: l.jobId });
    await store.remove(rec.tag);
    return { kind: 'done', record: rec, leftovers: l };
  }
  // With the storage daemon, the copy goes on only while the daemon that encrypts it does.
  const daemonOk = !rec.daemon || (l.hasNbdNode && l.hasFormatNode && processAlive(rec.daemon));
  if (continuable(l) && l.hasNode && l.hasFileNode && l.hasSecret && l.fileNodePath === rec.target && daemonOk) {
    return { kind: 'adopt', record: rec, leftovers: l };
  }
  const removed = await rollBack(client, rec, l, log);
  await store.remove(rec.tag);
  return { kind: 'rolled-back', record: rec, removed };
}

/**
 * Removes everything of a run from QEMU and the disk: its job (cancelled, so the guest stays
 * on its source), its nodes, its secret, its target file. Returns what it removed, in words.
 * Never called on a run whose guest runs on the target.
 */
export async function rollBack(client: QmpClient | undefined, rec: RunRecord, l: Leftovers | undefined, log: Logger): Promise<string[]> {
  const removed: string[] = [];
  if (client && l?.job) {
    if (l.job.status !== 'concluded') {
      // job-cancel: the guest stays on the source, for a mirror at READY too (qmp-mirror.ts)
      await client.execute('job-cancel', { id: l.jobId }).catch((e: unknown) => log.warn({ err: (e as Error).message }, 'cancelling the job'));
      await untilConcluded(client, l.jobId);
    }
    await client.execute('job-dismiss', { id: l.jobId }).catch((e: unknown) => log.warn({ err: (e as Error).message }, 'dismissing the job'));
    removed.push(`job ${l.jobId}`);
  }
  // The nodes say who encrypted, whatever the record says (an orphan's says nothing): the
  // daemon's layout has a format node and an nbd node of their own to remove.
  const encrypter = client && (l?.hasNbdNode || l?.hasFormatNode) ? 'storage-daemon' : rec.encrypter;
  // A record that does not name its daemon: an orphan's (made up by agent/orphans.ts), whose
  // nbd node names the daemon's socket, or a run killed before it wrote the daemon's pid down.
  // The daemon is found beside its socket, and stopped.
  const daemon =
    rec.daemon ??
    (client && l?.nbdSocket ? (await StorageDaemon.find(l.nbdSocket, log))?.record : undefined) ??
    (encrypter === 'storage-daemon' ? (await StorageDaemon.findByTag(rec.tag, log))?.record : undefined);
  const target = EncryptedTarget.adopt(
    client ?? (undefined as unknown as QmpClient),
    { path: rec.target, format: rec.format, size: 0, keyFile: rec.keyFile, iterTimeMs: 0, tag: rec.tag, cache: { direct: false, noFlush: false }, ...(encrypter ? { encrypter } : {}) },
    log,
    targetLeftovers(client ? l : undefined, daemon ? { daemon } : {}, existsSync(rec.target)),
  );
  removed.push(...target.describe());
  await target.remove();
  if (encrypter === 'storage-daemon') {
    const dirs = await StorageDaemon.removeDeadDirs(rec.tag);
    if (dirs > 0) removed.push(`${dirs} socket director${dirs === 1 ? 'y' : 'ies'} of a daemon that had exited`);
  }
  return removed;
}

/**
 * A dead run's copy whose VM has exited (its QMP socket gone or refusing): the job went with
 * that QEMU, so nothing can resume it, yet its qemu-storage-daemon (which outlives a run so
 * that the next run adopts a paused copy) would hold the target open and the key in memory
 * until the VM returned or `idlecrypt cancel` ran. Rolled back now, as `idlecrypt cancel`
 * does for a VM that is gone: the daemon stopped, the partial target and the record removed;
 * the guest never ran on the target. Not a run in the pivot ('completing': the target may
 * hold the guest's newest writes), nor one whose QEMU still listens (a VM restarted on the
 * same socket: its next run rolls back). Returns what it removed, or undefined.
 */
export async function rollBackIfVmGone(store: RunStore, rec: RunRecord, log: Logger): Promise<string[] | undefined> {
  if (rec.phase === 'completing' || ownerAlive(rec)) return undefined;
  if (await qmpListening(rec.qmp)) return undefined;
  const removed = await rollBack(undefined, rec, undefined, log);
  await store.remove(rec.tag);
  return removed;
}

/**
 * Something listens on this QMP socket. Only a socket file that is missing or refuses
 * (nobody listens: its QEMU exited) says no; any other failure (permissions, a slow accept)
 * says yes, so that nothing is rolled back on a doubt.
 */
export function qmpListening(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socket);
    const done = (v: boolean) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(2000, () => done(true));
    s.once('connect', () => done(true));
    s.once('error', (e: NodeJS.ErrnoException) => done(e.code !== 'ENOENT' && e.code !== 'ECONNREFUSED'));
  });
}

/**
 * What of a run's target is there, for EncryptedTarget.adopt: its nodes as `l` found them
 * in QEMU (none without `l`), its daemon as its record names it, and whether its file is.
 */
export function targetLeftovers(l: Leftovers | undefined, rec: Pick<RunRecord, 'daemon'>, file: boolean): TargetLeftovers {
  return {
    file,
    node: !!l?.hasNode,
    fileNode: !!l?.hasFileNode,
    secret: !!l?.hasSecret,
    formatNode: !!l?.hasFormatNode,
    nbdNode: !!l?.hasNbdNode,
    ...(rec.daemon ? { daemon: rec.daemon } : {}),
  };
}

async function untilConcluded(client: QmpClient, jobId: string): Promise<void> {
  const until = performance.now() + 60_000;
  while (performance.now() < until) {
    const j = (await client.execute('query-block-jobs')).find((x) => x.device === jobId);
    if (!j || j.status === 'concluded') return;
    await sleep(100);
  }
  throw new IdlecryptError('JOB_FAILED', `job ${jobId} did not end within 60 s of being cancelled`);
}

export interface CancelResult {
  readonly record: RunRecord;
  /** What was removed, in words. */
  readonly removed: string[];
  /** The guest already ran on the target: nothing was cancelled. */
  readonly alreadyDone: boolean;
  /** The VM was no longer running. */
  readonly vmGone: boolean;
  /** The image the guest runs on now (when the VM runs). */
  readonly guestOn?: string;
}

/** `idlecrypt cancel`: remove a dead run's job, nodes, secret, target and record. */
export async function cancelDeadRun(o: { target: string; qmp?: string; store?: RunStore; logger: Logger }): Promise<CancelResult> {
  const store = o.store ?? new RunStore();
  const abs = path.resolve(o.target);
  const rec = await store.forTarget(abs);
  if (!rec) throw new IdlecryptError('USAGE', `no unfinished idlecrypt run writes ${abs} (records in ${store.dir})`);
  if (ownerAlive(rec)) {
    throw new IdlecryptError(
      'JOB_EXISTS',
      `idlecrypt (pid ${rec.owner.pid}) is still running this copy; stop it with Ctrl-C or kill -INT ${rec.owner.pid}, which cancels it and cleans up`,
    );
  }
  let client: QmpClient | undefined;
  try {
    client = await QmpClient.connect(o.qmp ?? rec.qmp, { logger: o.logger });
  } catch (e) {
    if (o.qmp !== undefined) throw e; // the operator named a socket: say what is wrong with it
  }
  try {
    if (!client) {
      if (rec.phase === 'completing') {
        throw new IdlecryptError(
          'VM_EXITED',
          `the run died while switching VM '${rec.vm}' onto ${rec.target} and the VM no longer runs: the target may hold the guest's newest writes; check which image the VM uses before deleting ${rec.target} or ${rec.source}`,
        );
      }
      const removed = await rollBack(undefined, rec, undefined, o.logger);
      await store.remove(rec.tag);
      return { record: rec, removed, alreadyDone: false, vmGone: true };
    }
    const disk = findDisk(await listDisks(client), rec.device);
    const l = await findLeftovers(client, rec.tag);
    if (disk.file === rec.target && disk.nodeName === runNames(rec.tag).node) {
      if (l.job?.status === 'concluded') await client.execute('job-dismiss', { id: l.jobId });
      await store.remove(rec.tag);
      return { record: rec, removed: [], alreadyDone: true, vmGone: false, guestOn: disk.file };
    }
    const removed = await rollBack(client, rec, l, o.logger);
    await store.remove(rec.tag);
    const now = findDisk(await listDisks(client), rec.device);
    return { record: rec, removed, alreadyDone: false, vmGone: false, guestOn: now.file };
  } finally {
    await client?.close();
  }
}
