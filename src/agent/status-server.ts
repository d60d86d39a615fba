/**
 * The agent's status socket: a unix socket (default /run/idlecrypt/agent.sock) that answers
 * one JSON request per connection, `{"cmd":"status"}`, with one JSON line. Root only: the
 * socket is 0600 in a 0700 directory, so anyone else's connect fails with EACCES before
 * a byte is read. `idlecrypt status` without --qmp is its client (askAgent).
 */
import { chmod, rm } from 'node:fs/promises';
import net from 'node:net';
import { IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';

export class StatusServer {
  private server?: net.Server;

  constructor(
    readonly socketPath: string,
    private readonly status: () => unknown,
    private readonly log: Logger,
  ) {}

  async listen(): Promise<void> {
    // The lock is ours (agent.ts took it first): a socket file left here is a dead agent's.
    await rm(this.socketPath, { force: true });
    const server = net.createServer((conn) => {
      let buf = '';
      conn.setEncoding('utf8');
      conn.setTimeout(5000, () => conn.destroy());
      conn.on('data', (chunk: string) => {
        buf += chunk;
        const nl = buf.indexOf('\n');
        if (nl < 0) {
          if (buf.length > 4096) conn.destroy();
          return;
        }
        let reply: unknown;
        try {
          const req = JSON.parse(buf.slice(0, nl)) as { cmd?: unknown };
          reply = req.cmd === 'status' ? { ok: true, status: this.status() } : { ok: false, error: `unknown command ${JSON.stringify(req.cmd)}` };
        } catch {
          reply = { ok: false, error: 'expected one JSON line such as {"cmd":"status"}' };
        }
        conn.end(`${JSON.stringify(reply)}\n`);
      });
      conn.on('error', () => undefined);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => resolve());
    });
    await chmod(this.socketPath, 0o600);
    server.on('error', (e) => this.log.error({ err: e.message }, 'status socket'));
    this.server = server;
  }

  async close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
    await rm(this.socketPath, { force: true });
  }
}

/** Asks the agent behind `socketPath` for its status. One clear line for each way it fails. */
export async function askAgent(socketPath: string, timeoutMs = 5000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const conn = net.createConnection(socketPath);
    let buf = '';
    const fail = (msg: string) => {
      conn.destroy();
      reject(new IdlecryptError('USAGE', msg, { exitCode: 1 }));
    };
    conn.setEncoding('utf8');
    conn.setTimeout(timeoutMs, () => fail(`the agent at ${socketPath} did not answer within ${timeoutMs / 1000} s`));
    conn.on('connect', () => conn.write('{"cmd":"status"}\n'));
    conn.on('data', (c: string) => (buf += c));
    conn.on('end', () => {
      try {
        const r = JSON.parse(buf) as { ok: boolean; status?: unknown; error?: string };
        if (r.ok) resolve(r.status);
        else fail(`the agent refused: ${r.error}`);
      } catch {
        fail(`the agent at ${socketPath} sent no status`);
      }
    });
    conn.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') fail(`no idlecrypt agent is running (no socket at ${socketPath}); start it with systemctl start idlecrypt-agent, or ask a VM directly with --qmp`);
      else if (e.code === 'EACCES') fail(`permission denied on ${socketPath}: the agent's status is for root`);
      else fail(`cannot reach the agent at ${socketPath}: ${e.message}`);
    });
  });
}
