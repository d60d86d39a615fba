/**
 * Run records: what a run has started, kept on disk so that a run killed at any point
 * (`kill -9`, a crash, a reboot of the host) can be finished or undone by the next one.
 *
 * A record is written before anything is created (so the target file it names is known to
 * be ours even after QEMU is gone) and removed when the run ends cleanly: completed,
 * cancelled, or failed with everything it made removed. Writes are atomic (a temporary
 * file renamed over the record), so a crash leaves the old record or the new, never half.
 *
 * Where: $IDLECRYPT_STATE_DIR, else /var/lib/idlecrypt (the host agent's state directory
 * too), in runs/<tag>.json, root-only. Nothing secret is in a record: the key file is named,
 * never read.
 *
 * What a run left in QEMU is found by its names (target.ts, encrypt.ts): job
 * `idlecrypt-<tag>`, nodes `idlecrypt-<tag>` and `idlecrypt-file-<tag>` (with the storage
 * daemon also `idlecrypt-fmt-<tag>` and `idlecrypt-nbd-<tag>`), secret object
 * `idlecrypt-key-<tag>`; a storage daemon by the pid and start time in the record.
 */
import { promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import { IdlecryptError } from '../errors.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { DaemonRecord, Encrypter } from './storage-daemon.ts';
import type { TargetFormat } from './target.ts';

export type RunPhase = 'creating-target' | 'copying' | 'completing';

export interface RunRecord {
  readonly version: 1;
  /** The suffix of every name the run gives in QEMU. */
  readonly tag: string;
  /** The idlecrypt process that drives the run, and its start time (clock ticks since boot, /proc/PID/stat), so a reused pid is not taken for it. */
  readonly owner: { readonly pid: number; readonly start: number };
  readonly vm: string;
  /** The VM's QMP socket as given. */
  readonly qmp: string;
  /** The disk as asked (qdev id, drive or node name) and the image it ran on. */
  readonly device: string;
  readonly source: string;
  /** Absolute path of the encrypted image. */
  readonly target: string;
  readonly format: TargetFormat;
  /** Absolute path of the key file QEMU's secret was read from (never its bytes). */
  readonly keyFile: string;
  readonly phase: RunPhase;
  /** When the record was first written (epoch ms). */
  readonly createdAt: number;
  /** When the copy first started (epoch ms): a policy deadline counts from here, across restarts. */
  readonly copyStartedAt?: number;
  /** Who encrypts (absent: the guest's QEMU, as before it could be chosen). */
  readonly encrypter?: Encrypter;
  /** The qemu-storage-daemon the run started (`encrypter: storage-daemon`), once it runs. */
  readonly daemon?: DaemonRecord;
}

export function stateDir(): string {
  return process.env.IDLECRYPT_STATE_DIR || '/var/lib/idlecrypt';
}

/** What every kind of run record has (QMP runs here, libvirt runs in src/libvirt/runs.ts). */
export interface BaseRunRecord {
  readonly version: 1;
  readonly tag: string;
  readonly owner: { readonly pid: number; readonly start: number };
  readonly target: string;
}

export class RunStore<R extends BaseRunRecord = RunRecord> {
  readonly dir: string;

  /** `base`: the state directory; `kind`: the folder in it ('runs' for QMP runs, 'libvirt-runs'). */
  constructor(
    readonly base = stateDir(),
    kind = 'runs',
  ) {
    this.dir = path.join(base, kind);
  }

  private file(tag: string): string {
    return path.join(this.dir, `${tag}.json`);
  }

  async save(rec: R): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const tmp = `${this.file(rec.tag)}.${process.pid}.tmp`;
    const fh = await fs.open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(JSON.stringify(rec, null, 2) + '\n');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, this.file(rec.tag));
  }

  async remove(tag: string): Promise<void> {
    await fs.rm(this.file(tag), { force: true });
  }

  /** Every record; unreadable ones are skipped (a record is never half-written, see above). */
  async list(): Promise<R[]> {
    return (await this.scan()).records;
  }

  /**
   * Every record, and the files here that are not records this version can read (corrupt,
   * or written by another version): the caller says so, and does not guess what they held.
   */
  async scan(): Promise<{ records: R[]; unreadable: { file: string; why: string }[] }> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { records: [], unreadable: [] };
      throw new IdlecryptError('USAGE', `cannot read idlecrypt's state directory ${this.dir}: ${(e as Error).message}`, { cause: e });
    }
    const records: R[] = [];
    const unreadable: { file: string; why: string }[] = [];
    for (const n of names.filter((x) => x.endsWith('.json'))) {
      const file = path.join(this.dir, n);
      let text: string;
      try {
        text = await fs.readFile(file, 'utf8');
      } catch {
        continue; // it vanished: a run ended meanwhile
      }
      try {
        const r = JSON.parse(text) as R;
        if (r.version === 1 && typeof r.tag === 'string' && typeof r.target === 'string') records.push(r);
        else unreadable.push({ file, why: `not a version-1 run record (version ${JSON.stringify((r as { version?: unknown }).version)})` });
      } catch (e) {
        unreadable.push({ file, why: `not JSON (${(e as Error).message})` });
      }
    }
    return { records, unreadable };
  }

  /** The record of the run that writes (or wrote) this target, if any. */
  async forTarget(target: string): Promise<R | undefined> {
    const abs = path.resolve(target);
    return (await this.list()).find((r) => r.target === abs);
  }
}

/** This process as a record's owner. */
export function selfOwner(): { pid: number; start: number } {
  return { pid: process.pid, start: processStart(process.pid) ?? 0 };
}

/** A record's owner still runs (same pid, same start time): the run is alive, not dead. */
export function ownerAlive(rec: Pick<BaseRunRecord, 'owner'>): boolean {
  if (rec.owner.pid === process.pid) return false;
  return processAlive(rec.owner);
}

/** The process still runs: the same pid with the same start time (a reused pid is not it). */
export function processAlive(owner: { pid: number; start: number }): boolean {
  const start = processStart(owner.pid);
  return start !== undefined && start === owner.start;
}

/**
 * Field 22 of /proc/PID/stat: the process's start time in clock ticks since boot; undefined
 * when no such process runs (a zombie, which has exited and waits to be reaped, does not).
 */
export function processStart(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return undefined;
    return Number(rest[19]);
  } catch {
    return undefined;
  }
}

/** What a run's names find in QEMU. */
export interface Leftovers {
  readonly jobId: string;
  readonly job?: { readonly status: string; readonly paused: boolean; readonly ready: boolean; readonly offset: number; readonly len: number };
  /** The concluded job's error (query-jobs), if it failed. */
  readonly jobError?: string;
  readonly node: string;
  readonly hasNode: boolean;
  readonly fileNode: string;
  readonly hasFileNode: boolean;
  /** The file the file node has open. */
  readonly fileNodePath?: string;
  readonly secret: string;
  readonly hasSecret: boolean;
  /** The storage daemon's: the guest-side format node and the nbd node (target.ts). */
  readonly formatNode: string;
  readonly hasFormatNode: boolean;
  readonly nbdNode: string;
  readonly hasNbdNode: boolean;
  /** The Unix socket the nbd node connects to (its daemon's), from the node's filename. */
  readonly nbdSocket?: string;
}

export function runNames(tag: string): { jobId: string; node: string; fileNode: string; secret: string; formatNode: string; nbdNode: string } {
  return { jobId: `idlecrypt-${tag}`, node: `idlecrypt-${tag}`, fileNode: `idlecrypt-file-${tag}`, secret: `idlecrypt-key-${tag}`, formatNode: `idlecrypt-fmt-${tag}`, nbdNode: `idlecrypt-nbd-${tag}` };
}

export async function findLeftovers(client: QmpClient, tag: string): Promise<Leftovers> {
  const names = runNames(tag);
  const jobs = await client.execute('query-block-jobs');
  const j = jobs.find((x) => x.device === names.jobId);
  let jobError: string | undefined;
  if (j?.status === 'concluded') jobError = (await client.execute('query-jobs')).find((x) => x.id === names.jobId)?.error;
  const nodes = await client.execute('query-named-block-nodes', { flat: true });
  const node = nodes.find((n) => n['node-name'] === names.node);
  const fileNode = nodes.find((n) => n['node-name'] === names.fileNode);
  const objects = (await client.executeRaw('qom-list', { path: '/objects' })) as { name: string }[];
  const nbd = nodes.find((n) => n['node-name'] === names.nbdNode);
  const nbdSocket = nbd ? nbdSocketOf(nbd.file) : undefined;
  return {
    ...names,
    ...(j ? { job: { status: j.status, paused: j.paused, ready: j.ready, offset: j.offset, len: j.len } } : {}),
    ...(jobError !== undefined ? { jobError } : {}),
    hasNode: !!node,
    hasFileNode: !!fileNode,
    ...(fileNode ? { fileNodePath: fileNode.file } : {}),
    hasSecret: objects.some((o) => o.name === names.secret),
    hasFormatNode: nodes.some((n) => n['node-name'] === names.formatNode),
    hasNbdNode: !!nbd,
    ...(nbdSocket ? { nbdSocket } : {}),
  };
}

/**
 * The Unix socket in an nbd node's filename, as QEMU 7.2 writes it (block/nbd.c
 * nbd_refresh_filename: `nbd+unix:///EXPORT?socket=PATH`), or a `json:` filename's
 * `server.path`.
 */
export function nbdSocketOf(filename: string): string | undefined {
  const m = /^nbd\+unix:\/\/\/?[^?]*\?socket=(.+)$/.exec(filename);
  if (m) return m[1];
  if (filename.startsWith('json:')) {
    try {
      const j = JSON.parse(filename.slice(5)) as { server?: { type?: string; path?: string }; 'server.path'?: string };
      return j.server?.path ?? j['server.path'];
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/** A job that can go on: running, paused, or at READY (QEMU's job states, qapi/job.json). */
export function continuable(l: Leftovers): boolean {
  return !!l.job && ['created', 'running', 'paused', 'ready', 'standby'].includes(l.job.status);
}
