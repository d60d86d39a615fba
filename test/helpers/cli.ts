/** Runs the real `idlecrypt` command (bin/idlecrypt) as an operator would. */
import { spawn, type ChildProcess } from 'node:child_process';
import { tmpdir } from 'node:os';
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
  result: Promise<CliResult>;
}

export function startCli(args: string[], env: Record<string, string> = {}): RunningCli {
  const child = spawn(BIN, args, {
    // Out of the repo: a run without --influx writes ./idlecrypt-metrics/ where it runs.
    cwd: tmpdir(),
    env: { ...process.env, IDLECRYPT_LOG: 'debug', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  const waiters: { re: RegExp; resolve: (l: string) => void }[] = [];
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    for (const w of [...waiters]) {
      const line = out.split('\n').find((l) => w.re.test(l));
      if (line !== undefined) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const result = new Promise<CliResult>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal, stdout: out, stderr: err })),
  );
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    waitForStdout(re, timeoutMs = 60_000) {
      const line = out.split('\n').find((l) => re.test(l));
      if (line !== undefined) return Promise.resolve(line);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no stdout line matching ${re} within ${timeoutMs} ms; stderr: ${err}`)), timeoutMs);
        waiters.push({ re, resolve: (l) => (clearTimeout(t), resolve(l)) });
      });
    },
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
