/**
 * A real InfluxDB 1.x (Debian's influxd) on loopback for one test: its own temp dir for
 * meta/data/wal, the HTTP API and the RPC bind address on free 127.0.0.1 ports, reporting,
 * monitoring, subscribers, continuous queries and every other listener off.
 *
 *   const db = await startInfluxd();
 *   ... db.url ('http://127.0.0.1:PORT'), db.influxUrl('idlecrypt'), db.query(...)
 *   await db.kill();     // InfluxDB goes away mid-run (the data dir stays)
 *   await db.restart();  // back on the same port with the same data
 *   await db.stop();     // ends it and removes the dir (always call, e.g. in after())
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

export const INFLUXD = process.env.IDLECRYPT_INFLUXD ?? '/usr/bin/influxd';

/** A port nobody listens on now (the kernel's pick for port 0). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('no port'))));
    });
  });
}

export interface InfluxQueryResult {
  results: { statement_id: number; error?: string; series?: { name: string; tags?: Record<string, string>; columns: string[]; values: unknown[][] }[] }[];
  error?: string;
}

export interface Influxd {
  /** http://127.0.0.1:PORT */
  readonly url: string;
  readonly httpPort: number;
  readonly dir: string;
  /** The --influx URL for a database on this server. */
  influxUrl(database: string): string;
  /** An InfluxQL query over HTTP (POST /query), the raw JSON answer. */
  query(q: string, database?: string): Promise<InfluxQueryResult>;
  /** POST /write of line protocol; resolves with the HTTP status and body. */
  write(lines: string, database: string): Promise<{ status: number; body: string }>;
  /** The server's pid while it runs. */
  pid(): number | undefined;
  /** Whether the server process is alive (it may be frozen). */
  running(): boolean;
  /** Kills the server (SIGKILL: it vanishes as in a crash); the data dir stays. */
  kill(): Promise<void>;
  /** SIGSTOP: the server keeps its sockets but answers nothing (InfluxDB "too slow"). */
  freeze(): void;
  /** SIGCONT after freeze(). */
  thaw(): void;
  /** Starts it again on the same ports with the same data. */
  restart(): Promise<void>;
  /** Kills the server and removes its dir. Safe to call twice. */
  stop(): Promise<void>;
}

function config(dir: string, bindPort: number, httpPort: number): string {
  return `# written by test/helpers/influxd.ts
reporting-disabled = true
bind-address = "127.0.0.1:${bindPort}"

[meta]
  dir = "${dir}/meta"
  logging-enabled = false

[data]
  dir = "${dir}/data"
  wal-dir = "${dir}/wal"
  query-log-enabled = false
  wal-fsync-delay = "0s"

[coordinator]
  # A runaway GROUP BY time() in a test fails fast instead of eating the machine.
  max-select-buckets = 100000

[retention]
  enabled = false

[shard-precreation]
  enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:${httpPort}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
  unix-socket-enabled = false

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  enabled = false
`;
}

export async function startInfluxd(o: { startTimeoutMs?: number; /** keep the data here (created; not removed by stop) */ dir?: string } = {}): Promise<Influxd> {
  const keep = o.dir !== undefined;
  if (keep) await fs.mkdir(o.dir!, { recursive: true });
  const dir = keep ? path.resolve(o.dir!) : await fs.mkdtemp(path.join(tmpdir(), 'idlecrypt-influxd-'));
  const httpPort = await freePort();
  let bindPort = await freePort();
  while (bindPort === httpPort) bindPort = await freePort();
  const configPath = path.join(dir, 'influxd.conf');
  await fs.writeFile(configPath, config(dir, bindPort, httpPort));
  const url = `http://127.0.0.1:${httpPort}`;
  let child: ChildProcess | null = null;
  let stderr = '';
  let stopped = false;
  const killOnExit = () => child?.kill('SIGKILL');
  process.once('exit', killOnExit);

  async function launch(): Promise<void> {
    stderr = '';
    const c = spawn(INFLUXD, ['-config', configPath], { stdio: ['ignore', 'ignore', 'pipe'] });
    child = c;
    c.stderr!.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-4000);
    });
    const exited = new Promise<never>((_, reject) =>
      c.once('exit', (code, signal) => reject(new Error(`influxd exited (${code ?? signal}) before answering /ping: ${stderr.trim()}`))),
    );
    exited.catch(() => {});
    const deadline = Date.now() + (o.startTimeoutMs ?? 10_000);
    for (;;) {
      try {
        const res = await Promise.race([fetch(`${url}/ping`, { signal: AbortSignal.timeout(500) }), exited]);
        if (res.status === 204) return;
      } catch (e) {
        if (c.exitCode !== null || c.signalCode !== null) throw e;
      }
      if (Date.now() > deadline) {
        c.kill('SIGKILL');
        throw new Error(`influxd did not answer ${url}/ping within ${o.startTimeoutMs ?? 10_000} ms: ${stderr.trim()}`);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  async function kill(): Promise<void> {
    const c = child;
    child = null;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const gone = new Promise<void>((resolve) => c.once('exit', () => resolve()));
    c.kill('SIGKILL');
    await gone;
  }

  try {
    await launch();
  } catch (e) {
    await kill();
    process.removeListener('exit', killOnExit);
    if (!keep) await fs.rm(dir, { recursive: true, force: true });
    throw e;
  }

  const db: Influxd = {
    url,
    httpPort,
    dir,
    influxUrl: (database) => `${url}/${database}`,
    async query(q, database) {
      const body = new URLSearchParams({ q, ...(database ? { db: database } : {}) });
      const res = await fetch(`${url}/query`, { method: 'POST', body });
      return (await res.json()) as InfluxQueryResult;
    },
    async write(lines, database) {
      const res = await fetch(`${url}/write?db=${encodeURIComponent(database)}`, { method: 'POST', body: lines });
      return { status: res.status, body: await res.text() };
    },
    pid: () => child?.pid,
    running: () => child !== null && child.exitCode === null && child.signalCode === null,
    kill,
    freeze: () => void child?.kill('SIGSTOP'),
    thaw: () => void child?.kill('SIGCONT'),
    async restart() {
      if (stopped) throw new Error('influxd was stopped');
      await kill();
      await launch();
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      // The data is thrown away: no need for a graceful shutdown (which takes seconds).
      await kill();
      process.removeListener('exit', killOnExit);
      if (!keep) await fs.rm(dir, { recursive: true, force: true });
    },
  };
  return db;
}
