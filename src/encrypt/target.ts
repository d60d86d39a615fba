/**
 * Creating the encrypted target and opening it in the running QEMU, and removing it again.
 *
 * The recipe:
 *   open(O_EXCL)                              the empty image file, ours alone
 *   object-add secret (file=KEYFILE)          the key reaches QEMU from the file, never inline
 *   qemu-img create -f luks|qcow2             the LUKS header (or qcow2 with LUKS encryption),
 *     --object secret,file=KEYFILE            written by a process of its own
 *   blockdev-add    driver=file               opened as a protocol node
 *   blockdev-add    driver=luks|qcow2         the node the mirror writes into
 * Every step is recorded so that `remove()` undoes exactly what was done, in reverse.
 *
 * Why the header is not made by the guest's QEMU (QAPI blockdev-create, as before): QEMU
 * benchmarks and runs the key slot's PBKDF2 (`iter-time`, 2 s by default) in its main loop,
 * where the guest's disk requests are handled too: a guest doing ~900 requests/s had none
 * reach QEMU for 4 s while blockdev-create ran (host-facts.md). `qemu-img create` is the
 * same code (block/crypto.c, crypto/block-luks.c) in another process, so the guest does not
 * notice (docs/starvation.md has the gaps measured). Where no qemu-img is installed, the
 * header is made with blockdev-create as before, and a warning says the guest will stall.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { promisify } from 'node:util';
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
  /**
   * The qemu-img that writes the header ('qemu-img' on PATH by default); `null` makes it in
   * the guest's QEMU with blockdev-create (see the file comment).
   */
  readonly qemuImg?: string | null;
}

const execFileP = promisify(execFile);

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

  /**
   * The target a dead run made, found in QEMU (runs.ts): `remove()` then undoes what is
   * there. The file is the run's own: its record was written before the file was made.
   */
  static adopt(client: QmpClient, spec: TargetSpec, log: Logger, found: { file: boolean; node: boolean; fileNode: boolean; secret: boolean }): EncryptedTarget {
    const t = new EncryptedTarget(client, spec, log);
    t.createdFile = found.file;
    t.nodeAdded = found.node;
    t.fileNodeAdded = found.fileNode;
    t.secretAdded = found.secret;
    return t;
  }

  /** What remove() would take away, in words, for the operator. */
  describe(): string[] {
    return [
      ...(this.nodeAdded ? [`node ${this.node}`] : []),
      ...(this.fileNodeAdded ? [`node ${this.fileNode}`] : []),
      ...(this.secretAdded ? [`secret ${this.secretId}`] : []),
      ...(this.createdFile ? [`file ${this.spec.path}`] : []),
    ];
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

    const qemuImg = this.spec.qemuImg === undefined ? 'qemu-img' : this.spec.qemuImg;
    let made = false;
    if (qemuImg !== null) made = await this.createWithQemuImg(qemuImg);
    // Without qemu-img, QEMU makes the file, and then the header on the opened file node.
    if (!made) await runCreateJob(this.client, `idlecrypt-mkfile-${tag}`, { driver: 'file', filename: path, size: 0 });
    await this.client.execute('blockdev-add', { driver: 'file', 'node-name': this.fileNode, filename: path, cache });
    this.fileNodeAdded = true;
    if (!made) {
      const luksOptions = { 'key-secret': this.secretId, 'iter-time': iterTimeMs };
      const createOptions =
        format === 'luks'
          ? { driver: 'luks' as const, file: this.fileNode, size, ...luksOptions }
          : { driver: 'qcow2' as const, file: this.fileNode, size, encrypt: { format: 'luks' as const, ...luksOptions } };
      await retryLuksTiming(this.log, (attempt) => runCreateJob(this.client, `idlecrypt-mkfmt-${tag}-${attempt}`, createOptions));
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
   * Writes the header with qemu-img in its own process. The key reaches it as QEMU's does,
   * through a secret object that names the key file: never on the command line. Returns
   * false when there is no qemu-img to run (the caller falls back to blockdev-create).
   */
  private async createWithQemuImg(bin: string): Promise<boolean> {
    try {
      await writeImageWithQemuImg(bin, this.spec, this.log);
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      this.log.warn({ qemuImg: bin }, 'qemu-img not found: the LUKS header is made inside the guest\'s QEMU, which stalls the guest while it derives the key');
      return false;
    }
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

/** `name` as a path (if it has a slash) or found on PATH, if it is an executable file. */
export async function findExecutable(name: string): Promise<string | undefined> {
  const dirs = name.includes('/') ? [''] : (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':').filter(Boolean);
  for (const d of dirs) {
    const file = d ? `${d}/${name}` : name;
    try {
      await fs.access(file, fs.constants.X_OK);
      if ((await fs.stat(file)).isFile()) return file;
    } catch {
      // not here
    }
  }
  return undefined;
}

/**
 * Writes an encrypted image (LUKS, or qcow2 with LUKS encryption) with qemu-img, in its own
 * process, into `spec.path` (which may exist, empty). The key reaches qemu-img as QEMU's
 * does, through a secret object that names the key file: never on the command line. An
 * error with code ENOENT means there is no such qemu-img.
 */
export async function writeImageWithQemuImg(
  bin: string,
  spec: Pick<TargetSpec, 'path' | 'format' | 'size' | 'keyFile' | 'iterTimeMs'>,
  log: Logger,
): Promise<void> {
  const { path, format, size, keyFile, iterTimeMs } = spec;
  const sec = 'sec0';
  const opts =
    format === 'luks'
      ? `key-secret=${sec},iter-time=${iterTimeMs}`
      : `encrypt.format=luks,encrypt.key-secret=${sec},encrypt.iter-time=${iterTimeMs}`;
  // A comma in an option value is written ",," (QemuOpts); the key file's path is one.
  const args = ['create', '-q', '-f', format, '--object', `secret,id=${sec},format=raw,file=${keyFile.replaceAll(',', ',,')}`, '-o', opts, path, String(size)];
  const exe = await findExecutable(bin);
  if (exe === undefined) throw Object.assign(new Error(`${bin}: not found`), { code: 'ENOENT' });
  // Under `setpriv --pdeathsig KILL` (util-linux), qemu-img dies with us. A run killed while
  // it wrote the header otherwise left it running, and when the next run had removed that
  // file and made its own, the orphan's failure deleted the file at the path (QEMU's LUKS
  // create deletes its file when it fails): the next run's target vanished before it was
  // opened (ci17, test/encrypt/resume.test.ts).
  const setpriv = await findExecutable('setpriv');
  const [cmd, cmdArgs] = setpriv ? [setpriv, ['--pdeathsig', 'KILL', '--', exe, ...args]] : [exe, args];
  await retryLuksTiming(log, async () => {
    try {
      await execFileP(cmd, cmdArgs, { env: { ...process.env, LC_ALL: 'C' } });
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { stderr?: string };
      if (err.code === 'ENOENT') throw err;
      const msg = (err.stderr ?? '').trim().split('\n').at(-1)?.replace(/^qemu-img: /, '') || err.message;
      throw new IdlecryptError('JOB_FAILED', `creating the encrypted target failed: ${msg}`, { cause: e });
    }
  });
}

/**
 * Key-slot creation times the PBKDF on this CPU (QEMU's qcrypto_pbkdf2_count_iters): it
 * first runs 2^15 iterations, a few ms, and reads the thread's CPU time around them. Where
 * the kernel accounts CPU time by ticks (CONFIG_TICK_CPU_ACCOUNTING, as on these VMs), the
 * reading is sometimes 0 and QEMU (or qemu-img, the same code) fails with "Unable to get
 * accurate CPU usage" (host-facts.md), whatever the iter-time. Each attempt is an
 * independent draw (about one in three on a busy host; five in a row were seen in CI):
 * retry, a little apart.
 */
async function retryLuksTiming(log: Logger, fn: (attempt: number) => Promise<void>): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await fn(attempt);
      return;
    } catch (e) {
      if (attempt < LUKS_TIMING_ATTEMPTS && e instanceof IdlecryptError && /accurate CPU usage/i.test(e.message)) {
        log.info({ attempt }, 'LUKS key-slot timing failed spuriously; retrying');
        await sleep(50 * attempt);
        continue;
      }
      throw e;
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
