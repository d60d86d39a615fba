/**
 * Runs one bpftrace process as an Observable: subscribing spawns
 * `bpftrace -f json -B line -e <program> <interval_ms>`, and the process's JSON lines come
 * out as typed events. One subscription is one process ("run"); restarts are the
 * caller's (see restart.ts), so each policy stays small and testable.
 *
 *   spawned   the process exists (its pid, for people and tests)
 *   attached  every probe is attached: counting has begun (the baseline, all totals 0)
 *   report    running totals per QEMU pid, timed by the kernel's clock (bpftrace `nsecs`)
 *
 * Ending: `stop$` asks bpftrace to stop (SIGINT); it detaches, prints a final report
 * covering every event up to then, and the Observable completes. Unsubscribing instead
 * sends SIGTERM (same handling in bpftrace, but nobody waits for the output).
 *
 * Errors (IdlecryptError):
 *   PROBE_UNAVAILABLE  bpftrace missing, not permitted, or failing before it attached:
 *                      one line that says which; restarting will not help.
 *   PROBE_FAILED       bpftrace died after attaching; context.retryable = true.
 *
 * stderr goes to the logger line by line, except bpftrace 0.17's harmless
 * "couldn't set RLIMIT_MEMLOCK" complaint (it runs fine without; kernels >= 5.11 account
 * BPF memory to the cgroup instead).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { createInterface } from 'node:readline';
import { Observable, type Subscription } from 'rxjs';
import { IdlecryptError } from '../errors.ts';
import { silentLogger, type Logger } from '../log.ts';
import type { ComposedProgram } from './program.ts';
import { ATTACHED_NOTICE, BpftraceJsonParser, type TotalsReport } from './records.ts';

export type RunnerState = 'spawning' | 'compiling' | 'attached' | 'stopping' | 'exited';

export type ProbeEvent =
  | { type: 'spawned'; run: number; pid: number }
  | { type: 'attached'; run: number; monoMs: number; epochMs: number }
  | (TotalsReport & { run: number; epochMs: number });

/** Clocks, injectable for tests. monoMs must be CLOCK_MONOTONIC, the clock of bpftrace's nsecs. */
export interface Clock {
  monoMs(): number;
  epochMs(): number;
}

export const systemClock: Clock = {
  // Node's hrtime is libuv's uv_hrtime: clock_gettime(CLOCK_MONOTONIC) on Linux, the
  // same clock as bpf_ktime_get_ns(), bpftrace's nsecs.
  monoMs: () => Number(process.hrtime.bigint() / 1000n) / 1000,
  epochMs: () => Date.now(),
};

export interface BpftraceOptions {
  program: ComposedProgram;
  intervalMs: number;
  /** The bpftrace binary (a name looked up in PATH, or a path). Default: $IDLECRYPT_BPFTRACE or "bpftrace". */
  bpftrace?: string;
  logger?: Logger;
  /** Emits once to stop gracefully (final report, then complete). */
  stop$?: Observable<unknown>;
  /** Give up if the probes are not attached by then (default 60 s: LLVM compile + attach). */
  attachTimeoutMs?: number;
  /** After asking bpftrace to stop, SIGKILL it if it has not exited by then (default 5 s). */
  stopTimeoutMs?: number;
  clock?: Clock;
}

export const MIN_INTERVAL_MS = 50;

/**
 * bpftrace 0.17 prints this when it may not raise RLIMIT_MEMLOCK (as in this project's VMs);
 * kernels >= 5.11 charge BPF memory to the cgroup instead, so it runs fine anyway.
 */
const HARMLESS_STDERR = /couldn't set RLIMIT_MEMLOCK/;
const NOT_PERMITTED = /only supports running as the root user|Operation not permitted|Permission denied|EPERM|EACCES|lockdown/i;

export function defaultBpftrace(): string {
  return process.env.IDLECRYPT_BPFTRACE || 'bpftrace';
}

/**
 * The bpftrace executable's path: `bin` itself if it contains a '/', else the first
 * executable `bin` in PATH. Looked up here (not left to spawn) so that "not installed"
 * is told apart from everything else before anything runs.
 */
export function resolveBpftrace(bin: string, path = process.env.PATH ?? ''): string {
  const candidates = bin.includes('/') ? [bin] : path.split(delimiter).filter(Boolean).map((d) => join(d, bin));
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      if (statSync(c).isFile()) return c;
    } catch {
      // not this one
    }
  }
  const where = bin.includes('/') ? `${bin} does not exist or is not executable` : `"${bin}" is not in PATH`;
  throw new IdlecryptError('PROBE_UNAVAILABLE', `bpftrace not found (${where}; on Debian: apt-get install bpftrace)`, {
    context: { bin },
  });
}

/** util-linux setpriv: used for --pdeathsig, so bpftrace dies with us even if we are SIGKILLed. */
const SETPRIV = '/usr/bin/setpriv';

let runs = 0;

/** Live bpftrace children: killed if this process exits without stopping them. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function track(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const c of live) c.kill('SIGKILL');
    });
  }
  live.add(child);
  child.once('close', () => live.delete(child));
}

export function runBpftrace(options: BpftraceOptions): Observable<ProbeEvent> {
  return new Observable<ProbeEvent>((subscriber) => {
    const run = ++runs;
    const bin = options.bpftrace ?? defaultBpftrace();
    const clock = options.clock ?? systemClock;
    const log = (options.logger ?? silentLogger).child({ component: 'bpftrace', run });
    const { program, intervalMs } = options;
    if (!Number.isInteger(intervalMs) || intervalMs < MIN_INTERVAL_MS) {
      subscriber.error(new IdlecryptError('USAGE', `probe interval must be a whole number of ms >= ${MIN_INTERVAL_MS}`));
      return;
    }

    let state: RunnerState = 'spawning';
    const stderrTail: string[] = [];
    const stdoutOther: string[] = [];
    let failure: IdlecryptError | undefined;
    let killTimer: NodeJS.Timeout | undefined;
    let stopSub: Subscription | undefined;
    // Reports are timed by CLOCK_MONOTONIC; this turns that into wall-clock time. Fixed for
    // the run, so wall-clock steps (NTP) do not distort intervals.
    const epochOffset = clock.epochMs() - clock.monoMs();

    let path: string;
    try {
      path = resolveBpftrace(bin);
    } catch (err) {
      subscriber.error(err);
      return;
    }
    const args = ['-f', 'json', '-B', 'line', '-e', program.text, String(intervalMs)];
    log.debug({ bin: path, intervalMs, expectedProbes: program.expectedProbes }, 'starting bpftrace');
    // Its own process group (detached): a Ctrl-C at the terminal reaches only us, and we
    // stop bpftrace ourselves, so its final report is ours to wait for. setpriv (which
    // execs bpftrace, keeping the pid) makes the kernel kill it should we die without
    // cleaning up; a bpftrace left behind would keep its probes attached.
    const [cmd, argv] = existsSync(SETPRIV)
      ? [SETPRIV, ['--pdeathsig', 'KILL', '--', path, ...args]]
      : [path, args];
    const child = spawn(cmd, argv, {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
      env: { ...process.env, [ATTACHED_NOTICE]: '1' },
    });
    track(child);

    const kill = (signal: NodeJS.Signals) => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    };
    const fail = (err: IdlecryptError) => {
      failure ??= err;
      kill('SIGKILL');
    };
    const onAttached = () => {
      if (state !== 'compiling') return;
      state = 'attached';
      clearTimeout(attachTimer);
      const monoMs = clock.monoMs();
      log.info({ probes: program.expectedProbes }, 'bpftrace probes attached');
      subscriber.next({ type: 'attached', run, monoMs, epochMs: monoMs + epochOffset });
    };

    const attachTimeoutMs = options.attachTimeoutMs ?? 60_000;
    const attachTimer = setTimeout(() => {
      fail(new IdlecryptError('PROBE_UNAVAILABLE', `bpftrace did not attach its probes within ${attachTimeoutMs / 1000} s`));
    }, attachTimeoutMs);

    child.once('spawn', () => {
      state = 'compiling';
      log.debug({ pid: child.pid }, 'bpftrace spawned');
      subscriber.next({ type: 'spawned', run, pid: child.pid! });
    });
    child.once('error', (err: NodeJS.ErrnoException) => {
      // spawn failures: the binary is missing or not executable. 'close' still follows.
      failure ??= new IdlecryptError('PROBE_UNAVAILABLE', `cannot run bpftrace (${path}: ${err.code ?? err.message})`,
        { cause: err, context: { bin: path } });
    });

    const parser = new BpftraceJsonParser();
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const rec = parser.push(line);
      if (!rec) return;
      switch (rec.type) {
        case 'probe_count':
          if (rec.probes < program.expectedProbes) {
            fail(new IdlecryptError('PROBE_UNAVAILABLE',
              `bpftrace found only ${rec.probes} of ${program.expectedProbes} probe points: a QEMU binary lacks a probed function (stripped or too different a build?)`,
              { context: { found: rec.probes, expected: program.expectedProbes } }));
          }
          break;
        case 'attached':
          onAttached();
          break;
        case 'report':
          if (state === 'attached' || state === 'stopping') {
            subscriber.next({ ...rec, run, epochMs: rec.monoMs + epochOffset });
          }
          break;
        case 'lost_events':
          log.warn({ events: rec.events }, 'bpftrace lost output events (a report was dropped; totals stay exact)');
          break;
        case 'other':
          if (stdoutOther.length < 20) stdoutOther.push(rec.line);
          log.debug({ line: rec.line }, 'bpftrace output');
          break;
      }
    });
    createInterface({ input: child.stderr! }).on('line', (line) => {
      if (line.trim() === ATTACHED_NOTICE) return onAttached();
      if (HARMLESS_STDERR.test(line)) return log.debug({ line }, 'bpftrace stderr (harmless)');
      if (line.trim() === '') return;
      stderrTail.push(line);
      if (stderrTail.length > 20) stderrTail.shift();
      log.warn({ line }, 'bpftrace stderr');
    });

    child.once('close', (code, signal) => {
      clearTimeout(attachTimer);
      clearTimeout(killTimer);
      stopSub?.unsubscribe();
      const wasState = state;
      state = 'exited';
      log.debug({ code, signal, wasState }, 'bpftrace exited');
      if (failure) return subscriber.error(failure);
      if (wasState === 'stopping') return subscriber.complete();
      if (wasState === 'attached') {
        return subscriber.error(new IdlecryptError('PROBE_FAILED',
          `bpftrace exited unexpectedly (${signal ? `signal ${signal}` : `exit code ${code}`})`,
          { context: { retryable: true, code, signal, stderr: stderrTail.slice(-3) } }));
      }
      subscriber.error(notStarted(code, signal, stderrTail, stdoutOther));
    });

    stopSub = options.stop$?.subscribe(() => {
      if (state === 'exited' || state === 'stopping') return;
      state = 'stopping';
      log.debug({}, 'stopping bpftrace');
      kill('SIGINT');
      killTimer = setTimeout(() => kill('SIGKILL'), options.stopTimeoutMs ?? 5000);
    });

    return () => {
      stopSub?.unsubscribe();
      clearTimeout(attachTimer);
      if (state !== 'exited') {
        state = 'stopping';
        kill('SIGTERM');
        // Not unref'd: a bpftrace that ignores SIGTERM must not outlive us (the exit
        // hook covers the case where this process ends first).
        killTimer = setTimeout(() => kill('SIGKILL'), options.stopTimeoutMs ?? 5000);
      }
    };
  });
}

/** Why bpftrace ended before attaching, in one line. */
function notStarted(code: number | null, signal: NodeJS.Signals | null, stderr: string[], stdout: string[]): IdlecryptError {
  // bpftrace's errors read "ERROR: what" or "stdin:1:5-20: ERROR: what", followed by the
  // offending source line and a ~~~ underline; the "what" is the line worth showing.
  const errors = [...stderr, ...stdout].flatMap((l) => {
    const m = /(?:^|\s)ERROR:\s*(.+)$/.exec(l);
    return m ? [m[1]!.trim()] : [];
  });
  const lines = errors.length ? errors : [...stderr, ...stdout].map((l) => l.trim()).filter(Boolean);
  const context = { code, signal, stderr: stderr.slice(-5) };
  const denied = lines.find((l) => NOT_PERMITTED.test(l));
  if (denied) {
    return new IdlecryptError('PROBE_UNAVAILABLE',
      `bpftrace is not permitted to trace (${denied}); run idlecrypt as root, or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN`,
      { context });
  }
  if (signal) {
    // Killed while compiling or attaching: nothing says it would fail again.
    return new IdlecryptError('PROBE_FAILED', `bpftrace was killed (signal ${signal}) before its probes attached`,
      { context: { ...context, retryable: true } });
  }
  const why = lines[0] ?? `exit code ${code}`;
  return new IdlecryptError('PROBE_UNAVAILABLE', `bpftrace could not start its probes: ${why}`, { context });
}

export function isRetryableProbeError(err: unknown): boolean {
  return err instanceof IdlecryptError && err.code === 'PROBE_FAILED' && err.context.retryable === true;
}
