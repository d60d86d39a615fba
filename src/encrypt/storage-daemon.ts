/**
 * The encryption outside the guest's QEMU (`--encrypter storage-daemon`): the target image
 * opened in a qemu-storage-daemon of idlecrypt's own and exported over NBD on a Unix socket.
 * The guest's QEMU writes plaintext into it (a `raw` node over an `nbd` node, target.ts);
 * the daemon encrypts in its own process, on another CPU.
 *
 * Why: without an iothread QEMU runs the mirror in its main loop, which holds the big lock
 * while it encrypts, and the guest's vCPU needs that lock to submit a request
 * (docs/starvation.md). Into a raw LUKS target every hole of a thin disk is a zeroed bounce
 * buffer encrypted there. Through NBD a hole is one write-zeroes command and data one socket
 * write: measured with `bench/mirror-cost.ts --target luks,nbd` (QEMU 7.2, no guest), a
 * sparse source's unlimited mirror kept the main loop 100% busy at 202-316 MiB/s into the
 * LUKS node and 1% busy at 205-232 MiB/s into the daemon, which used one CPU.
 *
 * Lifetime: the daemon is started with `--daemonize` (its parent exits once the export is
 * listening, so a zero exit means ready) in a session of its own, and outlives idlecrypt:
 * a run that dies leaves its copy writing through the daemon, and the next run adopts both
 * (the run record holds the daemon's pid and start time, runs.ts) or stops the daemon when
 * it rolls back. It is stopped with SIGTERM (QEMU flushes and exits) after the guest's
 * QEMU has switched to its own node over the image (target.ts, before the pivot), and when
 * a run is cancelled or fails.
 *
 * The key: the daemon opens the image with the run's opening key (target.ts), which it reads
 * from a pipe (`cat | exec …`, as qemu-img does), never from its command line or a file.
 * Its file node has `locking: off`: the guest's QEMU takes the image's locks when it opens
 * its own node over it (to erase the opening key's slot and, before the pivot, to switch),
 * while the daemon still has the image open.
 *
 * The socket is in a directory of its own (root's, 0700; 0711 when the guest's QEMU runs as
 * another user, who then gets the socket itself): whoever can connect to it reads and
 * writes the image's plaintext.
 */
import { spawn } from 'node:child_process';
import { constants as fsConstants, promises as fs } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { DiskCache } from './disks.ts';
import { processAlive, processStart } from './runs.ts';
import { findExecutable, type TargetFormat } from './target.ts';

export type Encrypter = 'qemu' | 'storage-daemon';
export const ENCRYPTERS = ['qemu', 'storage-daemon'] as const satisfies readonly Encrypter[];
/**
 * Who encrypts when nobody says (the QMP backend; through libvirt, libvirt makes the copy and
 * the VM's QEMU encrypts): the daemon for a LUKS target. Without an iothread, the VM's QEMU
 * would encrypt in the main loop that also serves the guest's disk, and a thin disk's
 * unlimited copy keeps that loop 100% busy against 1-2% through the daemon
 * (docs/starvation.md, "The encryption outside the guest's QEMU").
 *
 * A qcow2 target stays with the VM's QEMU (see QCOW2_REFUSED).
 */
export function defaultEncrypter(format: TargetFormat): Encrypter {
  return format === 'qcow2' ? 'qemu' : 'storage-daemon';
}

/**
 * Why the daemon does not make qcow2 targets yet. At the switch the VM's QEMU takes over the
 * image through its own qcow2 node, opened at the start (to erase the opening key's slot, and
 * so that the switch derives no key in its main loop). qcow2 keeps its L1 table and refcounts
 * in memory from the open: that node would know an empty image after the daemon had
 * allocated every cluster of the copy. Opening it afresh at the switch unlocks the key file's
 * slot, a PBKDF of `--iter-time` (2 s) in the guest's main loop. Not built: keeping the
 * opening key's slot until the switch.
 */
export const QCOW2_REFUSED =
  '--encrypter storage-daemon cannot make a qcow2 target yet (the guest\'s QEMU would take the image over with metadata read before the copy): use --format luks, or --encrypter qemu';

/** What a run record keeps of its daemon, so that a later run can adopt or stop it. */
export interface DaemonRecord {
  readonly pid: number;
  /** /proc/PID/stat start time: a reused pid is not taken for the daemon. */
  readonly start: number;
  readonly socket: string;
  /** The export's name on that socket. */
  readonly exportName: string;
  /** It writes the image with O_DIRECT (copyCache); undefined in older records: the guest's cache mode. */
  readonly direct?: boolean;
}

export interface DaemonSpec {
  readonly path: string;
  readonly format: TargetFormat;
  readonly cache: DiskCache;
  readonly tag: string;
  /** The guest's QEMU's user and group, who must reach the socket (undefined: leave root's). */
  readonly owner?: { readonly uid: number; readonly gid: number };
  /** How long the daemon may take to open the image and listen: default 60 s. */
  readonly startTimeoutMs?: number;
  /** For measuring only (bench/mirror-cost.ts --daemon-heap default): glibc's own heap, not DAEMON_MALLOC_ENV. */
  readonly glibcHeap?: boolean;
}

const EXPORT = 'idlecrypt';

/**
 * glibc's heap for the daemon: allocations under 32 MiB from the heap, and up to 256 MiB of
 * freed heap kept. QEMU takes a fresh buffer for each NBD request it receives and each
 * bounce buffer it encrypts into (1 MiB); above glibc's adaptive mmap threshold each is a new
 * mapping, page-faulted in and zeroed by the kernel, and on these hosts a page fault is
 * dear (docs/starvation.md, "What a MiB of the copy costs the loop"). Measured with
 * `bench/mirror-cost.ts --source data --data-mib 2048 --target nbd --daemon-heap
 * default|kept` (2026-12-05, this daemon as started here): 82 MiB/s with the daemon at 101%
 * of a CPU without, 261 MiB/s at 57% with; a sparse source 206 against 490 MiB/s.
 */
export const DAEMON_MALLOC_ENV = { MALLOC_MMAP_THRESHOLD_: String(32 * 1024 * 1024), MALLOC_TRIM_THRESHOLD_: String(256 * 1024 * 1024) } as const;

/**
 * Whether the daemon writes the copy with O_DIRECT: always, where the target's filesystem
 * takes it (ramfs does not, nor tmpfs before Linux 6.6: then the guest's cache mode). The
 * guest's own node over the image, which it runs on after the pivot, keeps the guest's cache
 * mode (target.ts); only the copy bypasses the host's page cache. Through the page cache
 * (the guest's disk with writeback, QEMU's default) a copy at 300-500 MiB/s left 0.9-1.5 GiB
 * dirty over a matrix cell, 0.7-1.3 GiB at the guest's busy phases' starts, for the kernel to
 * write back while the guest works; with O_DIRECT, the 129 MiB the rest of the host left
 * (bench/README.md, "The storage daemon by default"). The guests kept as much either way on
 * this host's disk: the bound is for slower storage and memory pressure, as `target.flush`'s
 * is (writeback.ts), which then has nothing to flush.
 */
export async function copyCache(image: string, guest: DiskCache): Promise<boolean> {
  if (guest.direct) return true;
  try {
    const fh = await fs.open(image, fsConstants.O_RDONLY | fsConstants.O_DIRECT);
    await fh.close();
    return true;
  } catch {
    return false;
  }
}

/** qemu-storage-daemon's path on PATH; a usage error that says what to do when it is not there. */
export async function storageDaemonExecutable(): Promise<string> {
  const exe = await findExecutable('qemu-storage-daemon');
  if (!exe) {
    throw new IdlecryptError('USAGE', 'qemu-storage-daemon, which encrypts the copy (--encrypter storage-daemon, the default), is not on PATH: install it (Debian: qemu-system-common), or say --encrypter qemu');
  }
  return exe;
}

export class StorageDaemon {
  private constructor(
    readonly record: DaemonRecord,
    private readonly log: Logger,
  ) {}

  /** A daemon a dead run started, from its record (it may have exited since: alive()). */
  static adopt(record: DaemonRecord, log: Logger): StorageDaemon {
    return new StorageDaemon(record, log);
  }

  /**
   * Starts the daemon on the image with `key`: the image's opening key (`data`, through a
   * pipe), or a key file by name. Returns once its export listens; throws with the daemon's
   * own error line when it cannot open the image.
   */
  static async start(spec: DaemonSpec, key: { data: string } | { file: string }, log: Logger): Promise<StorageDaemon> {
    const exe = await storageDaemonExecutable();
    const dir = await fs.mkdtemp(path.join(tmpdir(), socketDirPrefix(spec.tag)));
    // Others may pass through to the socket (given to QEMU's user below), not list or write
    // here: the daemon's pid file, which stop() signals, stays root's.
    if (spec.owner) await fs.chmod(dir, 0o711);
    const socket = path.join(dir, 'nbd.sock');
    const pidfile = path.join(dir, 'pid');
    const direct = await copyCache(spec.path, spec.cache);
    const cache = { direct, 'no-flush': spec.cache.noFlush };
    const format =
      spec.format === 'luks'
        ? { driver: 'luks', 'node-name': 'image', file: 'file', 'key-secret': 'key' }
        : { driver: 'qcow2', 'node-name': 'image', file: 'file', encrypt: { format: 'luks', 'key-secret': 'key' } };
    const args = [
      '--object', `secret,id=key,file=${'data' in key ? '/dev/stdin' : key.file.replaceAll(',', ',,')},format=raw`,
      '--blockdev', JSON.stringify({ driver: 'file', 'node-name': 'file', filename: spec.path, cache, locking: 'off' }),
      '--blockdev', JSON.stringify({ ...format, cache }),
      '--nbd-server', JSON.stringify({ addr: { type: 'unix', path: socket } }),
      '--export', JSON.stringify({ type: 'nbd', id: EXPORT, 'node-name': 'image', name: EXPORT, writable: true }),
      '--pidfile', pidfile,
      '--daemonize',
    ];
    const t0 = performance.now();
    const stderr = await new Promise<string>((resolve, reject) => {
      // The key through a pipe: Node gives a child a socket, which /dev/stdin cannot open.
      const argv = 'data' in key ? ['/bin/sh', '-c', 'cat | exec "$@"', 'sh', exe, ...args] : [exe, ...args];
      const child = spawn(argv[0]!, argv.slice(1), { stdio: ['data' in key ? 'pipe' : 'ignore', 'ignore', 'pipe'], detached: true, env: { ...process.env, LC_ALL: 'C', ...(spec.glibcHeap ? {} : DAEMON_MALLOC_ENV) } });
      let err = '';
      const timer = setTimeout(() => {
        err += `qemu-storage-daemon did not listen within ${Math.round((spec.startTimeoutMs ?? 60_000) / 1000)} s\n`;
        if (child.pid) process.kill(-child.pid, 'SIGKILL');
      }, spec.startTimeoutMs ?? 60_000);
      child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
      if ('data' in key) {
        child.stdin!.on('error', () => {});
        child.stdin!.end(key.data);
      }
      child.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        if (code === 0) resolve(err);
        else reject(new IdlecryptError('JOB_FAILED', `qemu-storage-daemon could not open ${spec.path}: ${firstLine(err) || `exit ${code}`}`));
      });
    }).catch(async (e) => {
      await fs.rm(dir, { recursive: true, force: true });
      throw e;
    });
    const running = await livePid(pidfile);
    if (!running) {
      await fs.rm(dir, { recursive: true, force: true });
      throw new IdlecryptError('JOB_FAILED', `qemu-storage-daemon for ${spec.path} exited right after it started${stderr ? `: ${firstLine(stderr)}` : ''}`);
    }
    if (spec.owner) await fs.chown(socket, spec.owner.uid, spec.owner.gid);
    const { pid, start } = running;
    log.info({ pid, ms: Math.round(performance.now() - t0), direct }, `target opened in qemu-storage-daemon${direct ? ' (O_DIRECT)' : ''}, exported over NBD to the guest's QEMU`);
    return new StorageDaemon({ pid, start, socket, exportName: EXPORT, direct }, log);
  }

  /**
   * The daemon serving `socket` (an nbd node's, found in the guest's QEMU), from the pid file
   * start() keeps beside the socket, when it still runs: a copy whose run record was lost
   * still has its daemon stopped (agent/orphans.ts). The process must be a
   * qemu-storage-daemon whose command line names that socket.
   */
  static async find(socket: string, log: Logger): Promise<StorageDaemon | undefined> {
    if (!/^idlecrypt-nbd-[0-9a-f]{8}-/.test(path.basename(path.dirname(socket)))) return undefined;
    const running = await livePid(path.join(path.dirname(socket), 'pid'));
    if (!running) return undefined;
    const { pid, start } = running;
    const argv = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!path.basename(argv[0] ?? '').startsWith('qemu-storage-daemon') || !argv.some((a) => a.includes(JSON.stringify(socket)))) return undefined;
    return new StorageDaemon({ pid, start, socket, exportName: EXPORT }, log);
  }

  /**
   * A daemon of run `tag` started in this host's temporary directory, found by its socket
   * directory's name: a run killed after the daemon listened but before its record named it
   * (a few ms) still has it stopped by the run that rolls it back.
   */
  static async findByTag(tag: string, log: Logger): Promise<StorageDaemon | undefined> {
    for (const dir of await socketDirsOf(tag)) {
      const found = await StorageDaemon.find(path.join(dir, 'nbd.sock'), log);
      if (found) return found;
    }
    return undefined;
  }

  /**
   * Removes run `tag`'s socket directories in this host's temporary directory whose daemon no
   * longer runs (one killed, or gone with a reboot of a host whose /tmp survives): what a
   * rollback leaves of its daemons once the live one, if any, is stopped. Returns how many.
   */
  static async removeDeadDirs(tag: string): Promise<number> {
    let n = 0;
    for (const dir of await socketDirsOf(tag)) {
      if (await livePid(path.join(dir, 'pid'))) continue;
      await fs.rm(dir, { recursive: true, force: true });
      n += 1;
    }
    return n;
  }

  /** The NBD server as QEMU's `nbd` block driver takes it. */
  get server(): { type: 'unix'; path: string } {
    return { type: 'unix', path: this.record.socket };
  }

  alive(): boolean {
    return processAlive(this.record);
  }

  /**
   * SIGTERM (QEMU flushes its images and exits), SIGKILL after `graceMs`; then its socket
   * directory goes. Safe to call when it is already gone.
   */
  async stop(graceMs = 10_000): Promise<void> {
    const { pid } = this.record;
    if (this.alive()) {
      process.kill(pid, 'SIGTERM');
      const deadline = performance.now() + graceMs;
      while (this.alive() && performance.now() < deadline) await sleep(20);
      if (this.alive()) {
        this.log.warn({ pid }, 'qemu-storage-daemon did not exit on SIGTERM; killed');
        process.kill(pid, 'SIGKILL');
        while (this.alive()) await sleep(20);
      }
    }
    await fs.rm(path.dirname(this.record.socket), { recursive: true, force: true });
  }
}

/** How a run's daemon socket directory is named in the temporary directory (mkdtemp adds the rest). */
const socketDirPrefix = (tag: string): string => `idlecrypt-nbd-${tag}-`;

/** Run `tag`'s daemon socket directories in this host's temporary directory (start() names them). */
async function socketDirsOf(tag: string): Promise<string[]> {
  const prefix = socketDirPrefix(tag);
  return (await fs.readdir(tmpdir()).catch(() => [] as string[])).filter((x) => x.startsWith(prefix)).map((x) => path.join(tmpdir(), x));
}

/** The process a daemon's pid file names, with its start time, while it runs. */
async function livePid(pidfile: string): Promise<{ pid: number; start: number } | undefined> {
  const pid = Number((await fs.readFile(pidfile, 'utf8').catch(() => '')).trim());
  const start = Number.isInteger(pid) && pid > 0 ? processStart(pid) : undefined;
  return start === undefined ? undefined : { pid, start };
}

function firstLine(s: string): string {
  return s.trim().split('\n')[0] ?? '';
}
