/** Runs the real `idlecrypt` command (bin/idlecrypt) as an operator would. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const BIN = fileURLToPath(new URL('../../bin/idlecrypt', import.meta.url));

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunningCli {
  child: ChildProcess;
  /** stdout so far */
  readonly stdout: () => string;
  readonly stderr: () => string;
  /** resolves when stdout has a line matching `re` */
  waitForStdout(re: RegExp, timeoutMs?: number): Promise<string>;
  /** resolves when stderr has a line matching `re` */
  waitForStderr(re: RegExp, timeoutMs?: number): Promise<string>;
  result: Promise<CliResult>;
}

let cwd: string | undefined;
/**
 * Where the command runs: a directory of this test process's own, removed when the process
 * exits, so that the metrics files runs write by default do not pile up in /tmp.
 */
function cliCwd(): string {
  if (cwd === undefined) {
    const dir = mkdtempSync(path.join(tmpdir(), 'idlecrypt-cli-'));
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    cwd = dir;
  }
  return cwd;
}

/** The state directory (run records) the commands this test process starts are given. */
export function cliStateDir(): string {
  return path.join(cliCwd(), 'state');
}

export function startCli(args: string[], env: Record<string, string> = {}): RunningCli {
  const child = spawn(BIN, args, {
    // Out of the repo: a run without --influx writes ./idlecrypt-metrics/ where it runs.
    cwd: cliCwd(),
    // Run records (src/encrypt/runs.ts) go with the run, not into the host's /var/lib.
    env: { ...process.env, IDLECRYPT_LOG: 'debug', IDLECRYPT_STATE_DIR: cliStateDir(), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const text = { stdout: '', stderr: '' };
  type Stream = keyof typeof text;
  const waiters: { stream: Stream; re: RegExp; resolve: (l: string) => void; reject: (e: Error) => void }[] = [];
  const find = (stream: Stream, re: RegExp) => text[stream].split('\n').find((l) => re.test(l));
  for (const stream of ['stdout', 'stderr'] as const) {
    child[stream]!.setEncoding('utf8').on('data', (d: string) => {
      text[stream] += d;
      for (const w of waiters.filter((x) => x.stream === stream)) {
        const line = find(stream, w.re);
        if (line !== undefined) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    });
  }
  const result = new Promise<CliResult>((resolve) =>
    child.on('close', (code, signal) => {
      // A line that has not come by now never will: say so at once, not at the timeout.
      for (const w of waiters.splice(0)) w.reject(new Error(`idlecrypt exited (${code ?? signal}) with no ${w.stream} line matching ${w.re}; stderr: ${text.stderr.slice(-2000)}`));
      resolve({ code, signal, stdout: text.stdout, stderr: text.stderr });
    }),
  );
  const waitFor = (stream: Stream, re: RegExp, timeoutMs: number): Promise<string> => {
    const line = find(stream, re);
    if (line !== undefined) return Promise.resolve(line);
    if (child.exitCode !== null || child.signalCode !== null) return Promise.reject(new Error(`idlecrypt has exited with no ${stream} line matching ${re}; stderr: ${text.stderr.slice(-2000)}`));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no ${stream} line matching ${re} within ${timeoutMs} ms; stderr: ${text.stderr}`)), timeoutMs);
      waiters.push({ stream, re, resolve: (l) => (clearTimeout(t), resolve(l)), reject: (e) => (clearTimeout(t), reject(e)) });
    });
  };
  return {
    child,
    stdout: () => text.stdout,
    stderr: () => text.stderr,
    waitForStdout: (re, timeoutMs = 60_000) => waitFor('stdout', re, timeoutMs),
    waitForStderr: (re, timeoutMs = 60_000) => waitFor('stderr', re, timeoutMs),
    result,
  };
}

export function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  return startCli(args, env).result;
}

/** The lines an operator sees on stderr, without the JSON log records (IDLECRYPT_LOG=debug). */
export function humanLines(stderr: string): string[] {
  return stderr.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('{'));
}

/** The JSON lines of a run's output: `--json` records on stdout, log records on stderr. */
export function jsonLines<T = Record<string, unknown>>(out: string): T[] {
  return out
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as T);
}

/** The mirror's buffer as the run logged it (its `mirror started` record on stderr), or undefined. */
export function loggedBufSize(stderr: string): number | undefined {
  return jsonLines<{ msg?: string; bufSize?: number }>(stderr).find((l) => l.msg === 'mirror started')?.bufSize;
}
