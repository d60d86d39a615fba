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
 *
 * Opening the image costs the same: blockdev-add of the LUKS node runs the key slot's PBKDF2
 * (the iter-time, 2 s) in the main loop, and the guest stalled that long (bench/start-stall.ts).
 * So QEMU opens it with a key of its own, the opening key: 32 random bytes (hex) made for
 * this run, in key slot 0 with a 10 ms PBKDF; the operator's key goes into slot 1 with the
 * full iter-time (`qemu-img amend`, in its own process again), and once QEMU has the node
 * open, slot 0 is erased (QMP x-blockdev-amend). The header then holds the operator's key
 * alone, as if made by `cryptsetup luksFormat`, in slot 1. The opening key never touches a
 * disk: qemu-img reads it from a pipe (/dev/stdin), QEMU from the QMP socket (an inline
 * secret; QEMU gives no way to read one back). Key stretching is for passphrases: a slot
 * whose key is 256 random bits needs none, and this one is gone before the copy starts.
 *   qemu-img create -f luks --object secret,file=/dev/stdin  slot 0: the opening key, 10 ms
 *   qemu-img amend -o state=active,new-secret=…             slot 1: the key file, iter-time
 *   object-add secret (data=the opening key)
 *   blockdev-add file, blockdev-add luks|qcow2               opened with slot 0: ~20 ms
 *   x-blockdev-amend state=inactive,keyslot=0               slot 0 erased (~50 ms)
 * The master key's digest has the iteration count of the first create (10 ms, ~8000):
 * it checks a 256-bit random master key, which no iteration count makes easier to guess.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { firstValueFrom, filter, timeout } from 'rxjs';
import type { QmpClient } from '../qmp/client.ts';
import { QmpCommandError } from '../qmp/errors.ts';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { DiskCache } from './disks.ts';
import { StorageDaemon, type DaemonRecord, type Encrypter } from './storage-daemon.ts';

/** Tries at LUKS key-slot creation before its spurious timing failure is believed (see create()). */
const LUKS_TIMING_ATTEMPTS = 12;
/** PBKDF time of the opening key's slot (see the file comment): QEMU opens the image this fast. */
export const OPENING_SLOT_ITER_TIME_MS = 10;
/** The key slot the opening key is written to, and erased from once the image is open. */
export const OPENING_SLOT = 0;

export type TargetFormat = 'luks' | 'qcow2';
/** What the operator asks for: a format, or `auto`, the source's (targetFormatFor). */
export type FormatChoice = TargetFormat | 'auto';
export const FORMAT_CHOICES = ['auto', 'luks', 'qcow2'] as const satisfies readonly FormatChoice[];

/**
 * The target's format for a source whose format driver is `sourceDriver` (raw, qcow2, ...):
 * `auto` keeps a qcow2 disk qcow2 (with LUKS encryption) and makes everything else raw
 * LUKS, as cryptsetup would. A qcow2 target keeps a thin disk thin: the copy writes the
 * source's unallocated areas as zero clusters (metadata, no encryption, not counted by the
 * speed limit), where a raw LUKS target must hold every byte encrypted. Measured on QEMU 7.2,
 * a 64 GiB qcow2 holding 768 MiB, unthrottled: 5.9 s and 779 MiB on the host into qcow2,
 * against 336 s and 64 GiB into raw LUKS (docs/starvation.md).
 */
export function targetFormatFor(choice: FormatChoice, sourceDriver: string): TargetFormat {
  if (choice !== 'auto') return choice;
  return sourceDriver === 'qcow2' ? 'qcow2' : 'luks';
}

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
  /** How long one qemu-img run may take before it is killed and the target fails: default 120 s + twice the iter-time. */
  readonly qemuImgTimeoutMs?: number;
  /**
   * Who encrypts: the guest's QEMU (its LUKS or qcow2 node, in its main loop; the default),
   * or a qemu-storage-daemon of idlecrypt's own, which the guest's QEMU writes plaintext to
   * over NBD until the pivot (storage-daemon.ts).
   */
  readonly encrypter?: Encrypter;
  /** The guest's QEMU's user and group, who must reach the daemon's socket. */
  readonly qemuOwner?: { readonly uid: number; readonly gid: number };
}

/** What a dead run left of its target, found by its names (runs.ts findLeftovers). */
export interface TargetLeftovers {
  readonly file: boolean;
  readonly node: boolean;
  readonly fileNode: boolean;
  readonly secret: boolean;
  /** With the storage daemon: the guest-side format node, the nbd node, and the daemon. */
  readonly formatNode?: boolean;
  readonly nbdNode?: boolean;
  readonly daemon?: DaemonRecord;
}

/**
 * The encrypted image and its nodes in the guest's QEMU. `node` is the one the mirror writes
 * into and the guest runs on after the pivot: the LUKS (or qcow2) node itself, or with the
 * storage daemon a `raw` node over it:
 *
 *   encrypter qemu            node = luks|qcow2 → fileNode (the image)
 *   encrypter storage-daemon  node = raw → nbdNode → (socket) → qemu-storage-daemon: luks|qcow2 → the image
 *                             formatNode = luks|qcow2 → fileNode, open beside it, unused until
 *                             beforePivot() points the raw node's `file` at it (blockdev-reopen)
 *                             and the nbd node and the daemon go
 */
export class EncryptedTarget {
  readonly secretId: string;
  readonly fileNode: string;
  readonly node: string;
  /** The luks|qcow2 node in the guest's QEMU: `node` itself, unless the daemon encrypts. */
  readonly formatNode: string;
  readonly nbdNode: string;
  private createdFile = false;
  private secretAdded = false;
  private fileNodeAdded = false;
  private nodeAdded = false;
  private formatNodeAdded = false;
  private nbdNodeAdded = false;
  private daemon: StorageDaemon | undefined;
  /** A dead run's daemon, known by its record: stopped by remove() when it still runs. */
  private daemonRecord: DaemonRecord | undefined;

  constructor(
    private readonly client: QmpClient,
    readonly spec: TargetSpec,
    private readonly log: Logger,
  ) {
    this.secretId = `idlecrypt-key-${spec.tag}`;
    this.fileNode = `idlecrypt-file-${spec.tag}`;
    this.node = `idlecrypt-${spec.tag}`;
    this.formatNode = spec.encrypter === 'storage-daemon' ? `idlecrypt-fmt-${spec.tag}` : this.node;
    this.nbdNode = `idlecrypt-nbd-${spec.tag}`;
  }

  /**
   * The copy's writes bypass the host's page cache: the guest's cache mode, or with the
   * storage daemon its own (O_DIRECT where the filesystem takes it, storage-daemon.ts
   * copyCache). Moderation flushes a target written through the page cache (writeback.ts).
   */
  get copyDirect(): boolean {
    const d = this.daemon?.record ?? this.daemonRecord;
    return d?.direct ?? this.spec.cache.direct;
  }

  /** The storage daemon this target was written through, when it no longer runs. */
  daemonExited(): DaemonRecord | undefined {
    const r = this.daemon?.record ?? this.daemonRecord;
    return r && !(this.daemon?.alive() ?? false) ? r : undefined;
  }


  /**
   * The target a dead run made, found in QEMU (runs.ts): `remove()` then undoes what is
   * there. The file is the run's own: its record was written before the file was made.
   */
  static adopt(client: QmpClient, spec: TargetSpec, log: Logger, found: TargetLeftovers): EncryptedTarget {
    const t = new EncryptedTarget(client, spec, log);
    t.createdFile = found.file;
    t.nodeAdded = found.node;
    t.fileNodeAdded = found.fileNode;
    t.secretAdded = found.secret;
    t.formatNodeAdded = !!found.formatNode && t.formatNode !== t.node;
    t.nbdNodeAdded = !!found.nbdNode;
    t.daemonRecord = found.daemon;
    t.daemon = found.daemon ? StorageDaemon.adopt(found.daemon, log) : undefined;
    return t;
  }

  /** What remove() would take away, in words, for the operator. */
  describe(): string[] {
    return [
      ...(this.nodeAdded ? [`node ${this.node}`] : []),
      ...(this.nbdNodeAdded ? [`node ${this.nbdNode}`] : []),
      ...(this.daemon?.alive() ? [`qemu-storage-daemon (pid ${this.daemon.record.pid})`] : []),
      ...(this.formatNodeAdded ? [`node ${this.formatNode}`] : []),
      ...(this.fileNodeAdded ? [`node ${this.fileNode}`] : []),
      ...(this.secretAdded ? [`secret ${this.secretId}`] : []),
      ...(this.createdFile ? [`file ${this.spec.path}`] : []),
    ];
  }

  /**
   * `onDaemon`: called as soon as the storage daemon runs, before anything else, so that the
   * run record names it (a run that dies then leaves it to the next run to adopt or stop).
   */
  async create(onDaemon?: (d: DaemonRecord) => Promise<void>): Promise<void> {
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

    const qemuImg = this.spec.qemuImg === undefined ? 'qemu-img' : this.spec.qemuImg;
    const openingKey = randomBytes(32).toString('hex');
    let made = false;
    const t0 = performance.now();
    const took = () => Math.round(performance.now() - t0);
    if (qemuImg !== null) made = await this.createWithQemuImg(qemuImg, openingKey);
    if (made) this.log.info({ ms: took() }, `target header written by qemu-img: key slot ${OPENING_SLOT} this run's opening key, slot ${OPENING_SLOT + 1} the key file's`);
    // QEMU opens the image with the opening key (slot 0); without qemu-img, it makes the
    // header itself with the key file's key, and opens it with that.
    await this.client.execute('object-add', made ? { 'qom-type': 'secret', id: this.secretId, data: openingKey, format: 'raw' } : { 'qom-type': 'secret', id: this.secretId, file: keyFile, format: 'raw' });
    this.secretAdded = true;
    // Without qemu-img, QEMU makes the file, and then the header on the opened file node.
    if (!made) await runJob(this.client, 'blockdev-create', `idlecrypt-mkfile-${tag}`, { options: { driver: 'file', filename: path, size: 0 } });
    await this.client.execute('blockdev-add', { driver: 'file', 'node-name': this.fileNode, filename: path, cache });
    this.fileNodeAdded = true;
    if (!made) {
      const luksOptions = { 'key-secret': this.secretId, 'iter-time': iterTimeMs };
      const createOptions =
        format === 'luks'
          ? { driver: 'luks' as const, file: this.fileNode, size, ...luksOptions }
          : { driver: 'qcow2' as const, file: this.fileNode, size, encrypt: { format: 'luks' as const, ...luksOptions } };
      await retryLuksTiming(this.log, (attempt) => runJob(this.client, 'blockdev-create', `idlecrypt-mkfmt-${tag}-${attempt}`, { options: createOptions }));
    }

    await this.client.execute(
      'blockdev-add',
      format === 'luks'
        ? { driver: 'luks', 'node-name': this.formatNode, file: this.fileNode, 'key-secret': this.secretId, cache }
        : { driver: 'qcow2', 'node-name': this.formatNode, file: this.fileNode, encrypt: { format: 'luks', 'key-secret': this.secretId }, cache },
    );
    if (this.formatNode === this.node) this.nodeAdded = true;
    else this.formatNodeAdded = true;
    this.log.info({ ms: took() }, 'target opened in QEMU');
    if (this.spec.encrypter === 'storage-daemon') {
      // The daemon opens the image with the same key as QEMU (the opening key, or without
      // qemu-img the key file), before slot 0 is erased below.
      this.daemon = await StorageDaemon.start(
        { path, format, cache: this.spec.cache, tag, ...(this.spec.qemuOwner ? { owner: this.spec.qemuOwner } : {}) },
        made ? { data: openingKey } : { file: keyFile },
        this.log,
      );
      await onDaemon?.(this.daemon.record);
      await this.client.execute('blockdev-add', { driver: 'nbd', 'node-name': this.nbdNode, server: this.daemon.server, export: this.daemon.record.exportName } as never);
      this.nbdNodeAdded = true;
      await this.client.execute('blockdev-add', { driver: 'raw', 'node-name': this.node, file: this.nbdNode } as never);
      this.nodeAdded = true;
    }
    // Before the copy starts: a job a later run adopts (runs.ts) always comes after this.
    if (made && (await this.eraseOpeningSlot())) this.log.info({ ms: took() }, `target's key slot ${OPENING_SLOT} (the opening key) erased`);
  }

  /**
   * Erases the opening key's slot now that QEMU holds the image open (see the file comment).
   * Where QEMU cannot (no x-blockdev-amend before 5.1, or it fails), the slot stays: its
   * key is forgotten with this run, and the operator's key is in slot 1 either way.
   */
  private async eraseOpeningSlot(): Promise<boolean> {
    const erase = { state: 'inactive' as const, keyslot: OPENING_SLOT };
    const options = this.spec.format === 'luks' ? { driver: 'luks' as const, ...erase } : { driver: 'qcow2' as const, encrypt: { format: 'luks' as const, ...erase } };
    try {
      await runJob(this.client, 'x-blockdev-amend', `idlecrypt-amend-${this.spec.tag}`, { 'node-name': this.formatNode, options });
      return true;
    } catch (e) {
      this.log.warn(
        { err: (e as Error).message },
        `could not erase key slot ${OPENING_SLOT} of the target (this run's random opening key, forgotten when it ends); the key file's key is in slot ${OPENING_SLOT + 1}`,
      );
      return false;
    }
  }

  /**
   * Writes the header with qemu-img in its own process, with the opening key in slot 0
   * and the key file's in slot 1. Returns false when there is no qemu-img to run (the
   * caller falls back to blockdev-create).
   */
  private async createWithQemuImg(bin: string, openingKey: string): Promise<boolean> {
    try {
      await writeImageWithQemuImg(bin, this.spec, this.log, openingKey);
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      this.log.warn({ qemuImg: bin }, 'qemu-img not found: the LUKS header is made inside the guest\'s QEMU, which stalls the guest while it derives the key');
      return false;
    }
  }

  /**
   * With the storage daemon, just before the pivot (the mirror in sync): the raw node the
   * mirror writes into is pointed at the guest's QEMU's own format node over the image
   * (blockdev-reopen drains its requests first), then the nbd node and the daemon go. From
   * here the guest's QEMU encrypts what the mirror still copies, and after the pivot the
   * guest runs on raw → luks|qcow2 → the image, with no process of idlecrypt's under it.
   * Checked on QEMU 7.2 with writes between every step: the image compares identical to
   * the source (test/encrypt/storage-daemon.test.ts).
   */
  async beforePivot(): Promise<void> {
    if (!this.nbdNodeAdded && !this.daemon) return;
    const t0 = performance.now();
    await this.client.executeRaw('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': this.node, file: this.formatNode }] });
    // The format node stays ours to delete (blockdev-add's reference): after the raw node,
    // should the run fail before the pivot.
    await this.client.execute('blockdev-del', { 'node-name': this.nbdNode });
    this.nbdNodeAdded = false;
    await this.daemon?.stop();
    this.daemon = this.daemonRecord = undefined;
    this.log.info({ ms: Math.round(performance.now() - t0) }, 'target switched from qemu-storage-daemon to the guest\'s QEMU');
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
    const live = this.client?.state === 'running';
    if (live && this.nodeAdded) await step('blockdev-del target', () => this.client.execute('blockdev-del', { 'node-name': this.node }));
    if (live && this.nbdNodeAdded) await step('blockdev-del nbd', () => this.client.execute('blockdev-del', { 'node-name': this.nbdNode }));
    // Stopped if it still runs; its socket directory goes either way.
    const daemon = this.daemon ?? (this.daemonRecord ? StorageDaemon.adopt(this.daemonRecord, this.log) : undefined);
    if (daemon) await step('stop qemu-storage-daemon', () => daemon.stop());
    if (live && this.formatNodeAdded) await step('blockdev-del format', () => this.client.execute('blockdev-del', { 'node-name': this.formatNode }));
    if (live && this.fileNodeAdded) await step('blockdev-del file', () => this.client.execute('blockdev-del', { 'node-name': this.fileNode }));
    if (live && this.secretAdded) await step('object-del secret', () => this.client.execute('object-del', { id: this.secretId }));
    this.nodeAdded = this.nbdNodeAdded = this.formatNodeAdded = this.fileNodeAdded = this.secretAdded = false;
    this.daemon = this.daemonRecord = undefined;
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

/** An option value as QemuOpts reads it: a comma is written ",," (a key file's path may hold one). */
const optValue = (v: string) => v.replaceAll(',', ',,');

/** qemu-img's (and qemu-io's) arguments for a secret object `id` read from `file`: never the key itself on a command line. */
const secretObject = (id: string, file: string) => ['--object', `secret,id=${id},format=raw,file=${optValue(file)}`];

/**
 * Writes an encrypted image (LUKS, or qcow2 with LUKS encryption) with qemu-img, in its own
 * process, into `spec.path` (which may exist, empty). The key file's key reaches qemu-img as
 * QEMU's does, through a secret object that names the file: never on the command line.
 * With `openingKey`, that key is written to slot 0 with a 10 ms PBKDF and the key file's to
 * slot 1 (see the file comment); qemu-img reads it from a pipe (/dev/stdin). An error with code ENOENT
 * means there is no such qemu-img.
 */
export async function writeImageWithQemuImg(
  bin: string,
  spec: Pick<TargetSpec, 'path' | 'format' | 'size' | 'keyFile' | 'iterTimeMs' | 'qemuImgTimeoutMs'>,
  log: Logger,
  openingKey?: string,
): Promise<void> {
  const { path, format, size, keyFile, iterTimeMs } = spec;
  // The PBKDF's iter-time (twice: timing, then the slot) and a generous margin.
  const timeoutMs = spec.qemuImgTimeoutMs ?? 120_000 + 2 * iterTimeMs;
  const luks = (o: string) => (format === 'luks' ? o : o.split(',').map((kv) => `encrypt.${kv}`).join(','));
  const exe = await findExecutable(bin);
  if (exe === undefined) throw Object.assign(new Error(`${bin}: not found`), { code: 'ENOENT' });
  const run = (args: string[], input?: string) =>
    retryLuksTiming(log, async () => {
      try {
        await runQemuImg(exe, args, timeoutMs, input);
      } catch (e) {
        const err = e as NodeJS.ErrnoException & { stderr?: string };
        if (err.code === 'ENOENT') throw err;
        const msg = qemuImgError(err.stderr ?? '') || err.message;
        throw new IdlecryptError('JOB_FAILED', `creating the encrypted target failed: ${msg}`, { cause: e });
      }
    });
  if (openingKey === undefined) {
    const opts = format === 'luks' ? `key-secret=sec0,iter-time=${iterTimeMs}` : `encrypt.format=luks,${luks(`key-secret=sec0,iter-time=${iterTimeMs}`)}`;
    await run(['create', '-q', '-f', format, ...secretObject('sec0', keyFile), '-o', opts, path, String(size)]);
    return;
  }
  const createOpts = `${format === 'luks' ? '' : 'encrypt.format=luks,'}${luks(`key-secret=open,iter-time=${OPENING_SLOT_ITER_TIME_MS}`)}`;
  await run(['create', '-q', '-f', format, ...secretObject('open', '/dev/stdin'), '-o', createOpts, path, String(size)], openingKey);
  await run(
    [
      'amend', '-q',
      ...secretObject('open', '/dev/stdin'),
      ...secretObject('sec0', keyFile),
      '--image-opts', `driver=${format},file.filename=${optValue(path)},${luks('key-secret=open')}`,
      '-o', luks(`state=active,new-secret=sec0,keyslot=${OPENING_SLOT + 1},iter-time=${iterTimeMs}`),
    ],
    openingKey,
  );
}

/**
 * Whether the key file's key opens the encrypted image at `path`: `qemu-io` (qemu-utils, with
 * qemu-img) reads its first sector through it, read-only and without image locking, in its
 * own process (a running QEMU may hold the image, as the target of a copy). `qemu-img info`
 * would not do: it opens an image without I/O, and the LUKS driver then unlocks no key slot
 * (any key passes). It costs one key slot's PBKDF (up to the iter-time). For a run that takes
 * over an earlier run's image and must not hand libvirt a key that does not open it. False
 * only for a key that opens no slot; any other failure throws. An error with code ENOENT
 * means there is no qemu-io.
 */
export async function keyFileOpens(path: string, format: TargetFormat, keyFile: string, timeoutMs = 120_000): Promise<boolean> {
  const exe = await findExecutable('qemu-io');
  if (exe === undefined) throw Object.assign(new Error('qemu-io: not found'), { code: 'ENOENT' });
  // file.locking=off: a mirror's target is held without "consistent read" shared, which -U
  // alone does not get past; read-only, the header is all this reads.
  const file = `file.filename=${optValue(path)},file.locking=off`;
  const opts = format === 'luks' ? `driver=luks,key-secret=k,${file}` : `driver=qcow2,encrypt.key-secret=k,${file}`;
  try {
    await runQemuImg(exe, ['-r', '-U', ...secretObject('k', keyFile), '--image-opts', '-c', 'read 0 512', opts], timeoutMs);
    return true;
  } catch (e) {
    const stderr = (e as { stderr?: string }).stderr ?? '';
    // crypto/block-luks.c: "Invalid password, cannot unlock any keyslot".
    if (/Invalid password/.test(stderr)) return false;
    throw new IdlecryptError('JOB_FAILED', `could not check the key against ${path}: ${qemuImgError(stderr, 'qemu-io') || (e as Error).message}`, { cause: e });
  }
}

/**
 * qemu-img's (or `tool`'s) error from its stderr, in one line: the last `qemu-img: ` line,
 * and what follows it in parentheses. QEMU prints an error's hint on the lines after it
 * (error_report_err), and `amend` adds one to a key slot's failure: "qemu-img: Unable to
 * get accurate CPU usage" then "Failed to write to keyslot 1". Taking the last line alone
 * hid the cause, so the timing failure was not retried (CI, 2026-12-03). Empty when stderr is.
 */
export function qemuImgError(stderr: string, tool = 'qemu-img'): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter(Boolean);
  const at = lines.findLastIndex((l) => l.startsWith(`${tool}: `));
  if (at < 0) return lines.at(-1) ?? '';
  const hint = lines.slice(at + 1).join('; ');
  const error = lines[at]!.slice(`${tool}: `.length);
  return hint ? `${error} (${hint})` : error;
}

/**
 * Runs qemu-img (`exe`, with `args`) to its end; `input`, when given, is what it reads from
 * /dev/stdin. Rejects with its stderr on a non-zero exit, or when it has not ended within
 * `timeoutMs` (it is killed then).
 *
 * The input goes through `cat` into a pipe (`sh -c 'cat | exec qemu-img …'`): Node gives a
 * child a socket, not a pipe, and a socket cannot be opened by path (/dev/stdin: ENXIO),
 * which is how qemu-img reads a secret's file.
 *
 * Under `setpriv --pdeathsig KILL` (util-linux), qemu-img dies with us. A run killed while
 * it wrote the header otherwise left it running, and when the next run had removed that
 * file and made its own, the orphan's failure deleted the file at the path (QEMU's LUKS
 * create deletes its file when it fails): the next run's target vanished before it was
 * opened (ci17, test/encrypt/resume.test.ts). With the pipe, the shell dies with us and
 * qemu-img with the shell.
 */
async function runQemuImg(exe: string, args: string[], timeoutMs: number, input?: string): Promise<void> {
  const setpriv = await findExecutable('setpriv');
  const guarded = (argv: string[]) => (setpriv ? [setpriv, '--pdeathsig', 'KILL', '--', ...argv] : argv);
  const [cmd, ...cmdArgs] = guarded(input === undefined ? [exe, ...args] : ['/bin/sh', '-c', 'cat | exec "$@"', 'sh', ...guarded([exe, ...args])]);
  await new Promise<void>((resolve, reject) => {
    const child = spawn(cmd!, cmdArgs, { env: { ...process.env, LC_ALL: 'C' }, stdio: [input === undefined ? 'ignore' : 'pipe', 'ignore', 'pipe'] });
    let stderr = '';
    // Never a silent wait: a qemu-img that does not end is killed (and with setpriv, what it runs).
    const timer = setTimeout(() => {
      stderr += `qemu-img: ${args[0]} did not finish within ${Math.round(timeoutMs / 1000)} s\n`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    if (input !== undefined) {
      child.stdin!.on('error', () => {}); // qemu-img failed before reading it: its exit says why
      child.stdin!.end(input);
    }
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(Object.assign(new Error(`${exe} ${args[0]} exited with ${code ?? signal}`), { stderr }));
    });
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
 * blockdev-create and x-blockdev-amend run as jobs: wait for one to conclude, read its error
 * (query-jobs), and dismiss it. We subscribe to JOB_STATUS_CHANGE before sending the command
 * because the event can arrive before the reply (qmp-spec: events are asynchronous).
 */
export async function runJob(client: QmpClient, command: 'blockdev-create' | 'x-blockdev-amend', jobId: string, args: Record<string, unknown>): Promise<void> {
  const concluded = firstValueFrom(
    client.events('JOB_STATUS_CHANGE').pipe(
      filter((e) => e.data.id === jobId && e.data.status === 'concluded'),
      timeout({ first: 120_000 }),
    ),
  );
  concluded.catch(() => undefined); // observed below; avoid an unhandled rejection if execute throws
  await client.execute(command, { 'job-id': jobId, ...args } as never);
  await concluded;
  const jobs = await client.execute('query-jobs');
  const job = jobs.find((j) => j.id === jobId);
  await client.execute('job-dismiss', { id: jobId });
  if (job?.error) {
    const what = command === 'blockdev-create' ? 'creating the encrypted target' : "changing the target's key slots";
    throw new IdlecryptError('JOB_FAILED', `${what} failed: ${job.error}`, {
      context: { job: jobId },
    });
  }
}

export function isQmpClass(e: unknown, cls: string): boolean {
  return e instanceof QmpCommandError && e.errorClass === cls;
}
