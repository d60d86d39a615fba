/**
 * A connection to libvirtd through idlecrypt's helper (helper.py, Debian's python3-libvirt):
 * one long-lived process per connection, requests routed by id, libvirt's events as a hot
 * stream. Why not a Node binding or `virsh`: docs/libvirt.md.
 *
 * Privacy: a secret's value is written to the helper's stdin once (`defineSecret`) and is
 * never logged, put in an error or on a command line; logs carry operation names only.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { AsyncSubject, Subject, type Observable } from 'rxjs';
import { IdlecryptError } from '../errors.ts';
import { silentLogger, type Logger } from '../log.ts';
import type { BlockJobInfo, DomainDisk, DomainRef, LibvirtEvent, SecretInfo } from './types.ts';

export const HELPER_PATH = fileURLToPath(new URL('./helper.py', import.meta.url));
/** Debian's interpreter, which python3-libvirt is installed for (not a pyenv or venv one on PATH). */
export const HELPER_PYTHON = '/usr/bin/python3';
export const DEFAULT_URI = 'qemu:///system';

/** libvirt's error codes that the engine tells apart (virterror.h). */
export const VIR_ERR = { NO_DOMAIN: 42, OPERATION_INVALID: 55, NO_SECRET: 66, BLOCK_COPY_ACTIVE: 93 } as const;

/** A call libvirt refused: its own message, one line. */
export class LibvirtCallError extends IdlecryptError {
  constructor(
    readonly op: string,
    readonly virCode: number,
    message: string,
  ) {
    super('LIBVIRT', message.replace(/\s*\n\s*/g, ' '), { context: { op, virCode } });
  }
}

interface Pending {
  readonly op: string;
  readonly args: Record<string, unknown>;
  readonly since: number;
  readonly resolve: (v: unknown) => void;
  readonly reject: (e: Error) => void;
}

export interface LibvirtConnectOptions {
  readonly uri?: string;
  readonly logger?: Logger;
  /** The interpreter (tests point it elsewhere to show the one-line failures). */
  readonly python?: string;
  /** How long to wait for the helper's hello (default 15 s). */
  readonly timeoutMs?: number;
  /**
   * How long a call waits for libvirtd to come back when it went away (restarted) before
   * failing (default 120 s). Only calls that are safe to repeat wait: reads and speeds.
   */
  readonly reconnectTimeoutMs?: number;
}

/**
 * Calls that may be sent again after libvirtd came back: reads, setting a speed, and the
 * monitor pass-through, which idlecrypt uses only for query-block-jobs, job-pause and
 * job-resume (copy-job.ts treats a pause of a paused job as done).
 */
const REPEATABLE = new Set(['ping', 'domains', 'domain', 'disks', 'block-info', 'block-stats', 'block-latency', 'job-info', 'set-speed', 'secret', 'xml', 'monitor']);

export class LibvirtClient {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private readonly eventsSubject = new Subject<LibvirtEvent>();
  private readonly closedSubject = new AsyncSubject<string>();
  private closing = false;
  /** The helper exited: every call fails from now on. */
  closedReason: string | undefined;
  /** libvirtd went away and the helper is reconnecting: repeatable calls wait for it. */
  reachable = true;
  private readonly waiting: { id: number; p: Pending }[] = [];
  private reconnectTimer: NodeJS.Timeout | undefined;

  /** libvirt's events (block jobs, domain lifecycle), hot. */
  readonly events$: Observable<LibvirtEvent> = this.eventsSubject.asObservable();
  /** Emits once, with the reason, when the connection is gone. */
  readonly closed$: Observable<string> = this.closedSubject.asObservable();

  private constructor(
    private readonly child: ChildProcessWithoutNullStreams,
    readonly uri: string,
    readonly version: number,
    private readonly log: Logger,
    private readonly reconnectTimeoutMs: number,
  ) {}

  static async connect(o: LibvirtConnectOptions = {}): Promise<LibvirtClient> {
    const uri = o.uri ?? DEFAULT_URI;
    const log = (o.logger ?? silentLogger).child({ component: 'libvirt' });
    const python = o.python ?? HELPER_PYTHON;
    const child = spawn(python, [HELPER_PATH, uri], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    const lines = createInterface({ input: child.stdout });
    const first = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new IdlecryptError('LIBVIRT', `libvirt at ${uri} did not answer within ${(o.timeoutMs ?? 15_000) / 1000} s`)), o.timeoutMs ?? 15_000);
      const fail = (why: string) => {
        clearTimeout(timer);
        reject(new IdlecryptError('LIBVIRT', why));
      };
      child.once('error', (e: NodeJS.ErrnoException) =>
        fail(e.code === 'ENOENT' ? `${python} not found: install Debian's python3 and python3-libvirt (scripts/setup.sh)` : `cannot start the libvirt helper: ${e.message}`),
      );
      child.once('exit', () => {
        setImmediate(() => fail(helperDied(uri, stderr)));
      });
      lines.once('line', (l) => {
        clearTimeout(timer);
        try {
          resolve(JSON.parse(l) as Record<string, unknown>);
        } catch {
          reject(new IdlecryptError('LIBVIRT', `the libvirt helper printed ${JSON.stringify(l.slice(0, 200))}`));
        }
      });
    }).catch((e: unknown) => {
      child.kill();
      throw e;
    });
    if (first.event === 'error') {
      child.kill();
      // Not root: libvirt's own message speaks of polkit or the system bus; say what it means.
      const hint = process.getuid?.() !== 0 && /\/system\b/.test(uri) ? ` (not permitted? ${uri} needs root, or a user in group libvirt)` : '';
      throw new IdlecryptError('LIBVIRT', `cannot connect to libvirt at ${uri}: ${String(first.message).replace(/\s*\n\s*/g, ' ')}${hint}`);
    }
    const client = new LibvirtClient(child, String(first.uri ?? uri), Number(first.libvirt ?? 0), log, o.reconnectTimeoutMs ?? 120_000);
    lines.on('line', (l) => client.onLine(l));
    child.once('exit', (code, signal) => client.onExit(code === 0 && client.closing ? 'closed' : helperDied(uri, stderr, code, signal)));
    child.stdin.on('error', () => undefined); // EPIPE after the helper died: onExit reports it
    log.debug({ uri: client.uri, version: client.version }, 'libvirt connected');
    return client;
  }

  /** One request; rejects with LibvirtCallError (libvirt's message) or when the connection is gone. */
  call<T>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    if (this.closedReason !== undefined) return Promise.reject(new IdlecryptError('LIBVIRT', `${op}: ${this.closedReason}`));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { op, args, since: Date.now(), resolve: resolve as (v: unknown) => void, reject };
      if (!this.reachable && REPEATABLE.has(op)) this.waiting.push({ id, p });
      else this.send(id, p);
    });
  }

  private send(id: number, p: Pending): void {
    this.pending.set(id, p);
    this.child.stdin.write(`${JSON.stringify({ ...p.args, id, op: p.op })}\n`);
    this.log.trace({ op: p.op, id }, 'libvirt call');
  }

  // --- typed calls (helper.py's operations) ---------------------------------------------

  domains(): Promise<DomainRef[]> {
    return this.call('domains');
  }

  /** The domain by name; UNKNOWN_DOMAIN when libvirt has none running by that name. */
  async domain(name: string): Promise<DomainRef & { active: boolean }> {
    try {
      return await this.call('domain', { domain: name });
    } catch (e) {
      if (e instanceof LibvirtCallError && e.virCode === VIR_ERR.NO_DOMAIN) {
        throw new IdlecryptError('UNKNOWN_DOMAIN', `libvirt at ${this.uri} has no domain '${name}' (virsh list --all)`);
      }
      throw e;
    }
  }

  /** The domain's disks, live or (inactive) as the next boot will have them. */
  disks(domain: string, inactive = false): Promise<DomainDisk[]> {
    return this.call('disks', { domain, inactive });
  }

  /** The block job on a disk (virDomainGetBlockJobInfo, bandwidth in bytes/s), or null. */
  jobInfo(domain: string, disk: string): Promise<BlockJobInfo | null> {
    return this.call('job-info', { domain, disk });
  }

  xml(domain: string, inactive = false): Promise<string> {
    return this.call('xml', { domain, inactive });
  }

  /**
   * Defines a secret and sets its value (virSecretDefineXML, virSecretSetValue); the value
   * crosses the helper's stdin once. Returns its UUID.
   */
  defineSecret(xml: string, value: Buffer): Promise<string> {
    return this.call('secret-define', { xml, value: value.toString('base64') });
  }

  /** A new value for an existing secret (virSecretSetValue), through the helper's stdin; the secret stays defined either way. */
  setSecretValue(uuid: string, value: Buffer): Promise<boolean> {
    return this.call('secret-set-value', { uuid, value: value.toString('base64') });
  }

  /** Removes a secret; false when there was none. */
  undefineSecret(uuid: string): Promise<boolean> {
    return this.call('secret-undefine', { uuid });
  }

  secret(uuid: string): Promise<SecretInfo | null> {
    return this.call('secret', { uuid });
  }

  async close(): Promise<void> {
    if (this.closedReason !== undefined) return;
    this.closing = true;
    const gone = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.stdin.end();
    const t = setTimeout(() => this.child.kill(), 3000);
    await gone;
    clearTimeout(t);
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.log.warn({ line: line.slice(0, 200) }, 'the libvirt helper printed a line that is not JSON');
      return;
    }
    if (typeof msg.id === 'number') {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      const err = msg.error as { message?: string; code?: number; disconnected?: boolean } | undefined;
      if (err?.disconnected && REPEATABLE.has(p.op) && Date.now() - p.since < this.reconnectTimeoutMs) {
        // libvirtd went away under this call: send it again once it is back.
        this.lost();
        this.waiting.push({ id: msg.id, p });
        return;
      }
      if (err) p.reject(new LibvirtCallError(p.op, err.code ?? -1, err.message ?? 'libvirt error'));
      else p.resolve(msg.ok);
      return;
    }
    if (msg.event === 'closed') {
      this.log.warn({ reason: msg.reason }, 'libvirtd closed the connection: reconnecting (block jobs go on in QEMU meanwhile)');
      this.lost();
      return;
    }
    if (msg.event === 'reconnected') {
      this.log.info({ uri: this.uri }, 'libvirtd is back: carrying on');
      this.reachable = true;
      clearTimeout(this.reconnectTimer);
      for (const { id, p } of this.waiting.splice(0)) this.send(id, p);
      this.eventsSubject.next({ event: 'reconnected' });
      return;
    }
    if (msg.event === 'block-job' || msg.event === 'lifecycle') this.eventsSubject.next(msg as unknown as LibvirtEvent);
  }

  /** libvirtd went away: hold repeatable calls until it is back, fail them if it stays away. */
  private lost(): void {
    if (!this.reachable) return;
    this.reachable = false;
    clearTimeout(this.reconnectTimer);
    const check = () => {
      const now = Date.now();
      for (let i = this.waiting.length - 1; i >= 0; i--) {
        const { p } = this.waiting[i]!;
        if (now - p.since >= this.reconnectTimeoutMs) {
          this.waiting.splice(i, 1);
          p.reject(new IdlecryptError('LIBVIRT', `${p.op}: libvirtd at ${this.uri} has not come back for ${Math.round(this.reconnectTimeoutMs / 1000)} s`));
        }
      }
      if (!this.reachable) this.reconnectTimer = setTimeout(check, 1000).unref();
    };
    this.reconnectTimer = setTimeout(check, 1000).unref();
  }

  private onExit(reason: string): void {
    this.closedReason = reason;
    clearTimeout(this.reconnectTimer);
    for (const { p } of this.waiting.splice(0)) p.reject(new IdlecryptError('LIBVIRT', `${p.op}: ${reason}`));
    for (const p of this.pending.values()) p.reject(new IdlecryptError('LIBVIRT', `${p.op}: ${reason}`));
    this.pending.clear();
    this.eventsSubject.complete();
    this.closedSubject.next(reason);
    this.closedSubject.complete();
  }
}

function helperDied(uri: string, stderr: string, code?: number | null, signal?: NodeJS.Signals | null): string {
  const last = stderr.trim().split('\n').at(-1) ?? '';
  if (/No module named 'libvirt'/.test(stderr)) return `python3-libvirt is not installed (apt-get install python3-libvirt; scripts/setup.sh does it)`;
  const how = signal ? `was killed (${signal})` : code === undefined ? 'exited' : `exited with code ${code}`;
  return `the connection to libvirt at ${uri} was lost: its helper ${how}${last ? `: ${last}` : ''}`;
}
