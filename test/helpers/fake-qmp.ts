/**
 * A tiny scripted QMP server on a unix socket in a temp dir, for the faults real QEMU cannot
 * be made to show on demand: split or merged writes, events before replies, unknown ids,
 * drops mid-command, silence, a non-QMP greeting, slow replies.
 *
 * The test drives the conversation: accept() a connection, send() a greeting, next() to
 * read what the client sent, reply()/event()/sendChunks()/drop() to answer.
 */
import net from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino, type Logger } from 'pino';
import { QmpClient, type QmpClientOptions } from '../../src/qmp/client.ts';

type Json = Record<string, unknown>;

export const FAKE_GREETING = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'fake-qmp' }, capabilities: ['oob'] },
};

export const FAKE_TIMESTAMP = { seconds: 1700000000, microseconds: 123456 };

export class FakeConnection {
  /** Every message the client sent, parsed, in order. */
  readonly received: Json[] = [];
  readonly closed: Promise<void>;
  private buffer = '';
  private waiters: ((m: Json) => void)[] = [];
  private unread: Json[] = [];

  constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.buffer += chunk;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) !== -1) {
        const line = this.buffer.slice(0, nl).trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (line === '') continue;
        const msg = JSON.parse(line) as Json;
        this.received.push(msg);
        const w = this.waiters.shift();
        if (w) w(msg);
        else this.unread.push(msg);
      }
    });
    socket.on('error', () => {}); // the client may reset; the test looks at outcomes
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  /** The next message the client sends. */
  next(): Promise<Json> {
    const m = this.unread.shift();
    if (m) return Promise.resolve(m);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** One write: a JSON message (CRLF-terminated, as QEMU does) or raw text/bytes as given. */
  send(msg: Json | string | Buffer): void {
    this.socket.write(typeof msg === 'string' || Buffer.isBuffer(msg) ? msg : line(msg));
  }

  /** Several writes with a pause between them, so the client sees several reads. */
  async sendChunks(chunks: (string | Buffer)[], gapMs = 20): Promise<void> {
    for (const [i, c] of chunks.entries()) {
      if (i > 0) await sleep(gapMs);
      this.socket.write(c);
    }
  }

  reply(id: unknown, ret: unknown = {}): void {
    this.send({ return: ret, id });
  }

  error(id: unknown, errorClass: string, desc: string): void {
    this.send({ error: { class: errorClass, desc }, id });
  }

  event(name: string, data?: Json): void {
    this.send(eventMessage(name, data));
  }

  /** Hang up abruptly, as a killed QEMU does. */
  drop(): void {
    this.socket.destroy();
  }
}

/** A message as QEMU frames it: JSON then CRLF. */
export function line(msg: Json): string {
  return `${JSON.stringify(msg)}\r\n`;
}

export function eventMessage(name: string, data?: Json): Json {
  return data === undefined
    ? { timestamp: FAKE_TIMESTAMP, event: name }
    : { timestamp: FAKE_TIMESTAMP, event: name, data };
}

export class FakeQmpServer {
  private accepted: FakeConnection[] = [];
  private acceptWaiters: ((c: FakeConnection) => void)[] = [];
  private readonly all: FakeConnection[] = [];

  private constructor(readonly dir: string, readonly path: string, private readonly server: net.Server) {
    server.on('connection', (socket) => {
      const conn = new FakeConnection(socket);
      this.all.push(conn);
      const w = this.acceptWaiters.shift();
      if (w) w(conn);
      else this.accepted.push(conn);
    });
  }

  static async start(): Promise<FakeQmpServer> {
    const dir = await mkdtemp(join(tmpdir(), 'idlecrypt-fake-qmp-'));
    const path = join(dir, 'qmp.sock');
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    return new FakeQmpServer(dir, path, server);
  }

  /** The next client connection. */
  accept(): Promise<FakeConnection> {
    const c = this.accepted.shift();
    if (c) return Promise.resolve(c);
    return new Promise((resolve) => this.acceptWaiters.push(resolve));
  }

  /** Closes every connection and the server, and removes the temp dir. */
  async stop(): Promise<void> {
    for (const c of this.all) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await rm(this.dir, { recursive: true, force: true });
  }
}

/**
 * A client connected to a fresh fake server through the whole handshake (greeting and
 * qmp_capabilities), ready for a test's script. `capabilities` is what the client sent.
 */
export async function connectToFake(options: QmpClientOptions = {}): Promise<{
  server: FakeQmpServer;
  conn: FakeConnection;
  client: QmpClient;
  capabilities: Json;
}> {
  const server = await FakeQmpServer.start();
  const connecting = QmpClient.connect(server.path, options);
  const conn = await server.accept();
  conn.send(FAKE_GREETING);
  const capabilities = await conn.next();
  conn.reply(capabilities.id, {});
  const client = await connecting;
  return { server, conn, client, capabilities };
}

/** A debug-level pino logger whose lines are kept, parsed, for assertions. */
export function captureLogger(): { logger: Logger; lines: Json[] } {
  const lines: Json[] = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => void lines.push(JSON.parse(s) as Json) });
  return { logger, lines };
}
