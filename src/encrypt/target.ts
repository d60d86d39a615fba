/**
 * Creating the encrypted target inside the running QEMU, and removing it again.
 *
 * The recipe (QAPI blockdev-create, docs/system/images.rst "luks"):
 *   object-add secret (file=KEYFILE)          the key reaches QEMU from the file, never inline
 *   blockdev-create driver=file               the empty image file
 *   blockdev-add    driver=file               opened as a protocol node
 *   blockdev-create driver=luks|qcow2         the LUKS header (or qcow2 with LUKS encryption)
 *   blockdev-add    driver=luks|qcow2         the node the mirror writes into
 * Every step is recorded so that `remove()` undoes exactly what was done, in reverse.
 */
import { promises as fs } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { firstValueFrom, filter, timeout } from 'rxjs';
import type { QmpClient } from '../qmp/client.ts';
import { QmpCommandError } from '../qmp/errors.ts';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { DiskCache } from './disks.ts';

/** Tries at LUKS key-slot creation before its spurious timing failure is believed (see create()). */
const LUKS_TIMING_ATTEMPTS = 12;

export type TargetFormat = 'luks' | 'qcow2';

export interface TargetSpec {
  readonly path: string;
  readonly format: TargetFormat;
  readonly size: number;
  readonly keyFile: string;
  /** PBKDF iteration time in ms for the key slot (QEMU and cryptsetup default: 2000). */
  readonly iterTimeMs: number;
  /** Unique suffix for node, object and job ids. */
  readonly tag: string;
  /**
   * Host-cache mode of both target nodes: the source's, as libvirt's blockcopy does, so the
   * guest keeps its O_DIRECT (`cache=none`) or page-cache behaviour across the pivot.
   */
  readonly cache: DiskCache;
}

export class EncryptedTarget {
  readonly secretId: string;
  readonly fileNode: string;
  readonly node: string;
  private createdFile = false;
  private secretAdded = false;
  private fileNodeAdded = false;
  private nodeAdded = false;

  constructor(
    private readonly client: QmpClient,
    readonly spec: TargetSpec,
    private readonly log: Logger,
  ) {
    this.secretId = `idlecrypt-key-${spec.tag}`;
    this.fileNode = `idlecrypt-file-${spec.tag}`;
    this.node = `idlecrypt-${spec.tag}`;
  }

  async create(): Promise<void> {
    const { path, format, size, keyFile, iterTimeMs, tag } = this.spec;
    const cache = { direct: this.spec.cache.direct, 'no-flush': this.spec.cache.noFlush };
    // O_EXCL: if anything appeared at the path since the preflight check, we stop here
    // rather than let QEMU truncate it.
    try {
      await (await fs.open(path, 'wx', 0o600)).close();
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') throw new IdlecryptError('TARGET_EXISTS', `target ${path} already exists; refusing to overwrite it`);
      throw new IdlecryptError('USAGE', `cannot create target ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.createdFile = true;

    await this.client.execute('object-add', { 'qom-type': 'secret', id: this.secretId, file: keyFile, format: 'raw' });
    this.secretAdded = true;

    await runCreateJob(this.client, `idlecrypt-mkfile-${tag}`, { driver: 'file', filename: path, size: 0 });
    await this.client.execute('blockdev-add', { driver: 'file', 'node-name': this.fileNode, filename: path, cache });
    this.fileNodeAdded = true;

    const luksOptions = { 'key-secret': this.secretId, 'iter-time': iterTimeMs };
    const createOptions =
      format === 'luks'
        ? { driver: 'luks' as const, file: this.fileNode, size, ...luksOptions }
        : { driver: 'qcow2' as const, file: this.fileNode, size, encrypt: { format: 'luks' as const, ...luksOptions } };
    // Key-slot creation times the PBKDF on this CPU (QEMU's qcrypto_pbkdf2_count_iters):
    // it first runs 2^15 iterations, a few ms, and reads the thread's CPU time around them.
    // Where the kernel accounts CPU time by ticks (CONFIG_TICK_CPU_ACCOUNTING, as on these
    // VMs), the reading is sometimes 0 and QEMU fails with "Unable to get accurate CPU
    // usage" (host-facts.md), whatever the iter-time. Each attempt is an independent draw
    // (about one in three on a busy host; five in a row were seen in CI): retry, a little
    // apart.
    for (let attempt = 1; ; attempt++) {
      try {
        await runCreateJob(this.client, `idlecrypt-mkfmt-${tag}-${attempt}`, createOptions);
        break;
      } catch (e) {
        if (attempt < LUKS_TIMING_ATTEMPTS && e instanceof IdlecryptError && /accurate CPU usage/i.test(e.message)) {
          this.log.info({ attempt }, 'LUKS key-slot timing failed spuriously; retrying');
          await sleep(50 * attempt);
          continue;
        }
        throw e;
      }
    }

    await this.client.execute(
      'blockdev-add',
      format === 'luks'
        ? { driver: 'luks', 'node-name': this.node, file: this.fileNode, 'key-secret': this.secretId, cache }
        : { driver: 'qcow2', 'node-name': this.node, file: this.fileNode, encrypt: { format: 'luks', 'key-secret': this.secretId }, cache },
    );
    this.nodeAdded = true;
  }

  /**
   * Undo create(): detach the nodes, drop the secret, delete the file we made. Best effort
   * per step (QEMU may be gone); the file is deleted even when QMP no longer answers.
   * Never called after the guest pivoted onto the target.
   */
  async remove(): Promise<void> {
    const step = async (what: string, fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (e) {
        this.log.warn({ step: what, err: (e as Error).message }, 'cleanup step failed');
      }
    };
    const live = this.client.state === 'running';
    if (live && this.nodeAdded) await step('blockdev-del target', () => this.client.execute('blockdev-del', { 'node-name': this.node }));
    if (live && this.fileNodeAdded) await step('blockdev-del file', () => this.client.execute('blockdev-del', { 'node-name': this.fileNode }));
    if (live && this.secretAdded) await step('object-del secret', () => this.client.execute('object-del', { id: this.secretId }));
    this.nodeAdded = this.fileNodeAdded = this.secretAdded = false;
    if (this.createdFile) {
      await step('unlink target', () => fs.rm(this.spec.path, { force: true }));
      this.createdFile = false;
    }
  }
}

/**
 * blockdev-create runs as a job: wait for it to conclude, read its error (query-jobs), and
 * dismiss it. We subscribe to JOB_STATUS_CHANGE before sending the command because the
 * event can arrive before the reply (qmp-spec: events are asynchronous).
 */
export async function runCreateJob(client: QmpClient, jobId: string, options: Record<string, unknown>): Promise<void> {
  const concluded = firstValueFrom(
    client.events('JOB_STATUS_CHANGE').pipe(
      filter((e) => e.data.id === jobId && e.data.status === 'concluded'),
      timeout({ first: 120_000 }),
    ),
  );
  concluded.catch(() => undefined); // observed below; avoid an unhandled rejection if execute throws
  await client.execute('blockdev-create', { 'job-id': jobId, options } as never);
  await concluded;
  const jobs = await client.execute('query-jobs');
  const job = jobs.find((j) => j.id === jobId);
  await client.execute('job-dismiss', { id: jobId });
  if (job?.error) {
    throw new IdlecryptError('JOB_FAILED', `creating the encrypted target failed: ${job.error}`, {
      context: { job: jobId },
    });
  }
}

export function isQmpClass(e: unknown, cls: string): boolean {
  return e instanceof QmpCommandError && e.errorClass === cls;
}
