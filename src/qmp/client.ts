/**
 * A small typed QMP client, modelled on QEMU's own python/qemu/qmp (protocol.py,
 * qmp_client.py, events.py): an explicit connection state that methods check, one id per
 * command with replies routed by id, a hot event stream with per-consumer filters, and
 * pending commands failed cleanly when the connection drops.
 *
 * Protocol reference: QEMU docs/interop/qmp-spec.rst (cited below as "spec, <section>").
 *
 * Privacy: logs carry command names, ids, error classes and event names only; never
 * argument values or event data (secrets, key events).
 */
import net from 'node:net';
import { stat } from 'node:fs/promises';
import { AsyncSubject, Subject, filter, type Observable } from 'rxjs';
import { silentLogger, type Logger } from '../log.ts';
import {
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpNotQmpError,
  QmpProtocolError,
  QmpStateError,
  QmpTimeoutError,
  seconds,
  type DisconnectInfo,
} from './errors.ts';
import type { QmpCommands, QmpEventMap, VersionInfo } from './schema.ts';

export type QmpState = 'idle' | 'connecting' | 'running' | 'disconnecting' | 'closed';

/**
 * One asynchronous event (spec, "Asynchronous events"). Distributes over a union of names,
 * so `if (e.event === 'STOP')` narrows `e.data`. `data` is `{}` when QEMU omits it.
 */
export type QmpEvent<N extends string = string> = N extends unknown
  ? {
      event: N;
      data: N extends keyof QmpEventMap ? QmpEventMap[N] : Record<string, unknown>;
      timestamp: { seconds: number; microseconds: number };
    }
  : never;

/** The server greeting (spec, "Server Greeting"). */
export interface QmpGreeting {
  QMP: { version: VersionInfo; capabilities: string[] };
}

export interface QmpClientOptions {
  /** How long to wait for the greeting after connecting (default 5000). */
  greetingTimeoutMs?: number;
  /** Default per-command reply timeout (default 30000); Infinity or 0 = none. */
  commandTimeoutMs?: number;
  logger?: Logger;
}

export interface ExecuteOptions {
  /** Overrides commandTimeoutMs for this call; Infinity or 0 = wait for ever. */
  timeoutMs?: number;
}

/** execute()'s parameters after the command name: args optional where none are required. */
export type ArgsFor<K extends keyof QmpCommands> = QmpCommands[K]['args'] extends undefined
  ? [args?: undefined, opts?: ExecuteOptions]
  : {} extends QmpCommands[K]['args']
    ? [args?: QmpCommands[K]['args'], opts?: ExecuteOptions]
    : [args: QmpCommands[K]['args'], opts?: ExecuteOptions];

interface Pending {
  command: string;
  argKeys: string[];
  resolve(ret: unknown): void;
  reject(err: Error): void;
  timer?: NodeJS.Timeout;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Like the Python client's 10 MB read limit: a "line" longer than this is not QMP. */
const MAX_LINE_CHARS = 16 * 1024 * 1024;
/** How much of a line that is not what QMP sends is quoted in the error, so that one can tell what answered. */
const PREVIEW_CHARS = 80;
/** The start of a line from the peer, quoted with its control characters escaped, for an error message. */
const preview = (line: string): string => JSON.stringify(line.slice(0, PREVIEW_CHARS)) + (line.length > PREVIEW_CHARS ? ` (${line.length} characters)` : '');

export class QmpClient {
  readonly socketPath: string;
  readonly events$: Observable<QmpEvent>;
  readonly closed$: Observable<QmpDisconnectedError | undefined>;

  private _state: QmpState = 'idle';
  private _greeting?: QmpGreeting;
  private readonly log: Logger;
  private readonly greetingTimeoutMs: number;
  private readonly commandTimeoutMs: number;
  private readonly eventsSubject = new Subject<QmpEvent>();
  private readonly closedSubject = new AsyncSubject<QmpDisconnectedError | undefined>();
  private socket?: net.Socket;
  private socketClosed: Promise<void> = Promise.resolve();
  private buffer = '';
  private lastId = 0;
  private readonly pending = new Map<string, Pending>();
  /** Ids whose caller gave up (timeout): their late replies are expected, not suspicious. */
  private readonly timedOut = new Set<string>();
  private greetingWaiter?: { resolve(g: QmpGreeting): void; reject(e: Error): void };
  /** Why the connection is ending; set once, by whoever ends it first. */
  private ending?: { byUs: boolean; info: DisconnectInfo };
  private socketError?: Error;

  /** Connects, reads the greeting and negotiates capabilities; resolves in state 'running'. */
  static async connect(socketPath: string, options: QmpClientOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(socketPath, options);
    await client.open();
    return client;
  }

  private constructor(socketPath: string, options: QmpClientOptions) {
    this.socketPath = socketPath;
    this.greetingTimeoutMs = options.greetingTimeoutMs ?? 5000;
    this.commandTimeoutMs = options.commandTimeoutMs ?? 30_000;
    this.log = (options.logger ?? silentLogger).child({ component: 'qmp', socket: socketPath });
    this.events$ = this.eventsSubject.asObservable();
    this.closed$ = this.closedSubject.asObservable();
  }

  get state(): QmpState {
    return this._state;
  }

  get greeting(): QmpGreeting {
    if (!this._greeting) throw new QmpStateError(`no QMP greeting yet (state ${this._state})`);
    return this._greeting;
  }

  /**
   * A listener for the named events only, e.g. `client.events('BLOCK_JOB_READY')`; each
   * consumer takes its own (python/qemu/qmp/events.py). Give at least one name; for every
   * event use events$.
   */
  events<N extends keyof QmpEventMap>(...names: N[]): Observable<QmpEvent<N>> {
    const wanted = new Set<string>(names);
    // The cast is sound: the name check is what links `event` to its `data` type.
    return this.events$.pipe(filter((e) => wanted.has(e.event))) as unknown as Observable<QmpEvent<N>>;
  }

  async execute<K extends keyof QmpCommands>(command: K, ...args: ArgsFor<K>): Promise<QmpCommands[K]['ret']> {
    const [commandArgs, opts] = args as [Json | undefined, ExecuteOptions | undefined];
    return (await this.executeRaw(command, commandArgs, opts)) as QmpCommands[K]['ret'];
  }

  async executeRaw(command: string, args?: Json, opts: ExecuteOptions = {}): Promise<unknown> {
    if (this._state !== 'running') {
      throw new QmpStateError(`cannot execute ${command}: the QMP connection is ${this._state}`);
    }
    return this.send(command, args, opts.timeoutMs ?? this.commandTimeoutMs);
  }

  /** Idempotent. Pending commands fail with QmpDisconnectedError; closed$ emits undefined. */
  async close(): Promise<void> {
    this.end(true, { why: 'close() was called' });
    await this.socketClosed;
  }

  // ---- connection setup -----------------------------------------------------------------

  private async open(): Promise<void> {
    this._state = 'connecting';
    const socket = net.createConnection({ path: this.socketPath });
    this.socket = socket;
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.setEncoding('utf8'); // decodes across chunk boundaries, even mid-character
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => {
      this.socketError ??= err;
      this.log.debug({ err: err.message }, 'qmp socket error');
    });
    socket.on('close', () => this.onSocketClose());
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
    } catch (err) {
      throw await describeConnectError(this.socketPath, err as NodeJS.ErrnoException);
    }
    try {
      this._greeting = await this.readGreeting();
      // Until qmp_capabilities succeeds, QEMU runs no other command and sends no events
      // (spec, "Capabilities Negotiation"). We do not enable 'oob': we never use exec-oob.
      await this.send('qmp_capabilities', undefined, this.commandTimeoutMs);
      this._state = 'running';
      this.log.debug({ version: this._greeting.QMP.version.qemu }, 'qmp connected');
    } catch (err) {
      this.end(true, { why: 'connection setup failed', cause: err });
      await this.socketClosed;
      throw err;
    }
  }

  private readGreeting(): Promise<QmpGreeting> {
    return new Promise((resolve, reject) => {
      // QEMU greets right away (spec, "Server Greeting"), except that a second client on a
      // busy monitor socket is accepted but left silent until the first one disconnects.
      const timer = setTimeout(() => {
        this.greetingWaiter = undefined;
        reject(new QmpNotQmpError(this.socketPath,
          `no greeting within ${seconds(this.greetingTimeoutMs)}; is another client connected?`));
      }, this.greetingTimeoutMs);
      const settle = <A>(fn: (a: A) => void) => (a: A) => {
        clearTimeout(timer);
        this.greetingWaiter = undefined;
        fn(a);
      };
      this.greetingWaiter = { resolve: settle(resolve), reject: settle(reject) };
    });
  }

  // ---- receiving ----------------------------------------------------------------------------

  /** Every message is one JSON object ending in CRLF (spec, "General Definitions"). */
  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while (this.isOpen() && (nl = this.buffer.indexOf('\n')) !== -1) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line !== '') this.onLine(line);
    }
    if (this.isOpen() && this.buffer.length > MAX_LINE_CHARS) {
      this.protocolFailure(`QEMU sent a message longer than ${MAX_LINE_CHARS} characters`);
    }
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      msg = undefined;
    }
    if (this.greetingWaiter) {
      const q = isObject(msg) ? msg.QMP : undefined;
      if (isObject(q) && isObject(q.version) && Array.isArray(q.capabilities)) {
        this.greetingWaiter.resolve(msg as unknown as QmpGreeting);
      } else {
        // Quoted: it came before we sent anything (no key can be in it), and it tells what
        // answered on the socket (a suite run once failed here without saying).
        this.greetingWaiter.reject(new QmpNotQmpError(this.socketPath, `its first message is not a QMP greeting: ${preview(line)}`));
      }
      return;
    }
    if (!isObject(msg)) return this.protocolFailure('QEMU sent a line that is not a JSON object');

    if (typeof msg.event === 'string') {
      this.log.debug({ event: msg.event }, 'qmp event');
      // Delivered synchronously, so an event that precedes a reply on the wire reaches
      // subscribers before that reply's promise settles (settling runs as a microtask).
      this.eventsSubject.next({ ...msg, data: msg.data ?? {} } as QmpEvent);
      return;
    }

    const id = msg.id;
    const entry = typeof id === 'string' ? this.pending.get(id) : undefined;
    if (!entry) {
      if (typeof id === 'string' && this.timedOut.delete(id)) {
        this.log.debug({ id }, 'qmp late reply to a timed-out command dropped');
      } else if (id === undefined && isObject(msg.error)) {
        // An id-less error means QEMU could not parse a request far enough to read its id
        // (spec, "Error", NOTE). We cannot tell whose it was, so the stream is not trusted.
        this.protocolFailure(`QEMU reported an error without an id (${String(msg.error.class)})`);
      } else {
        // "Clients should drop all the responses that have an unknown id" (spec, "Commands Responses").
        this.log.warn({ id }, 'qmp reply with unknown id dropped');
      }
      return;
    }
    this.pending.delete(id as string);
    clearTimeout(entry.timer);
    if ('return' in msg) {
      this.log.debug({ cmd: entry.command, id }, 'qmp reply');
      entry.resolve(msg.return);
    } else if (isObject(msg.error)) {
      const errorClass = String(msg.error.class);
      this.log.debug({ cmd: entry.command, id, errorClass }, 'qmp error reply');
      entry.reject(new QmpCommandError(entry.command, errorClass, String(msg.error.desc), entry.argKeys));
    } else {
      entry.reject(new QmpProtocolError(`${entry.command}: QEMU sent a reply with neither "return" nor "error"`,
        { context: { command: entry.command } }));
    }
  }

  // ---- sending ------------------------------------------------------------------------------

  /** Spec, "Issuing Commands": the id comes back in the reply and is how we route it. */
  private send(command: string, args: Json | undefined, timeoutMs: number): Promise<unknown> {
    const id = `idlecrypt-${++this.lastId}`;
    const line = JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id });
    return new Promise((resolve, reject) => {
      const entry: Pending = { command, argKeys: Object.keys(args ?? {}), resolve, reject };
      if (Number.isFinite(timeoutMs) && timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.pending.delete(id);
          this.timedOut.add(id);
          this.log.debug({ cmd: command, id, timeoutMs }, 'qmp command timed out');
          reject(new QmpTimeoutError(command, timeoutMs));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      this.log.debug({ cmd: command, id }, 'qmp command');
      this.socket!.write(`${line}\n`);
    });
  }

  // ---- ending ---------------------------------------------------------------------------------

  private isOpen(): boolean {
    return this._state === 'connecting' || this._state === 'running';
  }

  private protocolFailure(message: string): void {
    this.log.error({}, `qmp protocol error: ${message}`);
    const cause = new QmpProtocolError(message);
    this.end(false, { why: `protocol error: ${message}`, cause });
  }

  /** Starts the end of the connection (once): fails what waits, then closes the socket. */
  private end(byUs: boolean, info: DisconnectInfo): void {
    if (!this.isOpen() || this.ending) return;
    this.ending = { byUs, info };
    this._state = 'disconnecting';
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QmpDisconnectedError({ ...info, command: p.command }));
      this.pending.delete(id);
    }
    this.greetingWaiter?.reject(new QmpDisconnectedError({ ...info, waitingFor: 'the QMP greeting' }));
    // end() flushes what we wrote (e.g. `quit`) before closing; destroy() drops a broken peer.
    if (byUs) this.socket?.end(() => this.socket?.destroy());
    else this.socket?.destroy();
  }

  private onSocketClose(): void {
    this.end(false, { cause: this.socketError }); // no-op if we started the ending
    this._state = 'closed';
    this.timedOut.clear();
    this.log.debug({ byUs: this.ending?.byUs }, 'qmp disconnected');
    this.eventsSubject.complete();
    const ending = this.ending!;
    this.closedSubject.next(ending.byUs ? undefined : new QmpDisconnectedError(ending.info));
    this.closedSubject.complete();
  }
}

/** Turns a failed connect() into a message that names the path and the reason in plain words. */
async function describeConnectError(path: string, err: NodeJS.ErrnoException): Promise<QmpConnectError> {
  const opts = { cause: err, context: { errno: err.code } };
  const st = await stat(path).catch((e: NodeJS.ErrnoException) => e);
  if (st instanceof Error) {
    if (st.code === 'ENOENT' || st.code === 'ENOTDIR') {
      return new QmpConnectError(path, `QMP socket ${path} does not exist`, opts);
    }
  } else if (!st.isSocket()) {
    return new QmpConnectError(path, `${path} is not a socket`, opts);
  }
  const reason =
    err.code === 'ECONNREFUSED' ? 'connection refused (is QEMU running?)'
    : err.code === 'EACCES' || err.code === 'EPERM' ? 'permission denied'
    : err.message;
  return new QmpConnectError(path, `cannot connect to QMP socket ${path}: ${reason}`, opts);
}
