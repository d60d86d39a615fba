/**
 * Measuring moderation from the outside, for test/moderation and bench/moderation.ts: what
 * the guest did and what the copy job did, on one host clock.
 *
 * - The guest's phases: its `PHASE idle|busy` serial lines, timestamped as they arrive on
 *   the host (the guest's own t= is its uptime, another clock). A phase starts when its
 *   line arrives, which is before the guest's first request of the phase: reaction times
 *   measured from it are upper bounds.
 * - The guest's throughput: QEMU's `query-blockstats` for the guest's device (rd_bytes +
 *   wr_bytes), which counts the guest's own requests and not the mirror's.
 * - The job: `query-block-jobs` (offset, len, paused, speed). A reply shows the job as it
 *   was at some moment between the command being sent and the reply arriving; a state
 *   change is dated at the reply (an upper bound), counters at the midpoint.
 *
 * Both are polled on the harness's own QMP socket (vm.qmpSocket), never on the one
 * idlecrypt uses. Everything here is measurement; the analysis functions are pure.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import type { TestContext } from 'node:test';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Subscription } from 'rxjs';
import { keepLatencyHistograms } from '../../src/probes/qmp-blockstats.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { startTestVm, type TestVm, type TestVmOptions } from '../../vm-images/launch.ts';
import { jsonLines, startCli, type RunningCli } from './cli.ts';

/** Epoch milliseconds with sub-millisecond resolution: one clock for every record. */
export const now = (): number => performance.timeOrigin + performance.now();

/**
 * The host's dirty and under-writeback memory (/proc/meminfo's Dirty + Writeback), MiB,
 * every `everyMs` until stop(): what a copy through the host's page cache leaves for the
 * kernel to write back (bench/moderation.ts, test/helpers/matrix-cell.ts).
 */
export function sampleDirty(everyMs: number): { samples: { t: number; mib: number }[]; stop: () => void } {
  const samples: { t: number; mib: number }[] = [];
  const read = () => {
    const m = readFileSync('/proc/meminfo', 'utf8');
    const kib = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(m)?.[1] ?? 0);
    samples.push({ t: now(), mib: (kib('Dirty') + kib('Writeback')) / 1024 });
  };
  read();
  const timer = setInterval(read, everyMs);
  return { samples, stop: () => clearInterval(timer) };
}
export const MiB = 1024 * 1024;

export async function sleepUntil(t: number): Promise<void> {
  const ms = t - now();
  if (ms > 0) await sleep(ms);
}

export interface JobState {
  readonly id: string;
  readonly offset: number;
  readonly len: number;
  readonly paused: boolean;
  /** the limit in force, bytes/s; 0 = unlimited */
  readonly speed: number;
  readonly ready: boolean;
  readonly status: string;
}

export interface Sample {
  /** when the poll was sent and when its replies arrived */
  readonly sent: number;
  readonly t: number;
  /** the guest device's rd_bytes + wr_bytes, when polled */
  readonly guestBytes?: number;
  readonly guestOps?: number;
  /** the guest device's writes and flushes, and the ns QEMU took for them (query-blockstats) */
  readonly guestWrites?: { readonly ops: number; readonly flushes: number; readonly ns: number };
  /** the guest device's latency histograms of writes and flushes, where QEMU keeps them (poll's `histograms`) */
  readonly guestHist?: { readonly boundaries: readonly number[]; readonly write: readonly number[]; readonly flush: readonly number[] };
  /** the copy job, when polled: null when there is none */
  readonly job?: JobState | null;
}

export interface Phase {
  readonly kind: 'idle' | 'busy';
  readonly start: number;
  /** the next phase's start; Infinity for the last one */
  readonly end: number;
  /** index among the phases of its kind, from 0 */
  readonly n: number;
}

/**
 * Below this a speed limit counts as the job slowed. idlecrypt's idle speed is itself a limit
 * (the headroom's cap, src/controller/headroom.ts, never under 8 MiB/s), so a limit alone
 * no longer says the job was slowed for a busy guest.
 */
export const SLOWED_BPS = 8 * 1024 * 1024;

/** Is the job slowed (paused, or held to a speed under SLOWED_BPS)? */
export const slowed = (j: JobState): boolean => j.paused || (j.speed > 0 && j.speed < SLOWED_BPS);

/**
 * Serial lines and QMP samples of one guest. Attach right after startTestVm (before
 * `ready`) so that no line is missed; `poll()` once the guest is up.
 */
export interface JobEvent {
  /** QEMU's own timestamp of the event (host wall clock, epoch ms) */
  readonly t: number;
  /** arrival on the harness's socket */
  readonly arrived: number;
  readonly id: string;
  readonly status: string;
}

export class GuestRecorder {
  readonly lines: { t: number; line: string }[] = [];
  readonly samples: Sample[] = [];
  /** JOB_STATUS_CHANGE events: when a job really stopped ('paused') or ran again ('running'). */
  readonly jobEvents: JobEvent[] = [];
  private readonly sub: Subscription;
  private qmp?: QmpClient;
  private eventSub?: Subscription;
  private polling?: Promise<void>;
  private stopped = false;
  private waiters: (() => void)[] = [];

  constructor(readonly vm: TestVm) {
    this.sub = vm.lines$.subscribe((line) => {
      this.lines.push({ t: now(), line });
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /**
   * Polls every `intervalMs` (sequentially: a slow reply delays the next poll rather than
   * piling up commands). `stats`: the guest device's counters; `jobs`: the copy job (any
   * job whose id starts with `jobPrefix`).
   */
  async poll(o: { intervalMs: number; stats: boolean; jobs: boolean; jobPrefix?: string; histograms?: boolean }): Promise<void> {
    this.qmp = await QmpClient.connect(this.vm.qmpSocket);
    const qmp = this.qmp;
    // QEMU keeps latency histograms on the guest's disks from now on, as a copy's job has it
    // do (which then uses them as they are)
    if (o.histograms) await keepLatencyHistograms(qmp, await qmp.execute('query-blockstats'));
    const prefix = o.jobPrefix ?? 'idlecrypt-';
    this.eventSub = qmp.events('JOB_STATUS_CHANGE').subscribe((e) => {
      if (!e.data.id.startsWith(prefix)) return;
      this.jobEvents.push({ t: e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000, arrived: now(), id: e.data.id, status: e.data.status });
    });
    this.polling = (async () => {
      let next = now();
      while (!this.stopped) {
        const sent = now();
        try {
          const [stats, jobs] = await Promise.all([
            o.stats ? qmp.execute('query-blockstats') : undefined,
            o.jobs ? qmp.execute('query-block-jobs') : undefined,
          ]);
          const t = now();
          let sample: Sample = { sent, t };
          if (stats) {
            const dev = stats.find((s) => s.qdev?.includes('/disk0/') || s.device === 'drive0' || s.device === 'disk0');
            if (dev) {
              const st = dev.stats;
              sample = {
                ...sample,
                guestBytes: st.rd_bytes + st.wr_bytes,
                guestOps: st.rd_operations + st.wr_operations + st.flush_operations,
                guestWrites: { ops: st.wr_operations, flushes: st.flush_operations, ns: st.wr_total_time_ns + st.flush_total_time_ns },
                ...(st.wr_latency_histogram && st.flush_latency_histogram
                  ? { guestHist: { boundaries: st.wr_latency_histogram.boundaries, write: st.wr_latency_histogram.bins, flush: st.flush_latency_histogram.bins } }
                  : {}),
              };
            }
          }
          if (jobs) {
            const j = jobs.find((x) => x.device.startsWith(prefix));
            sample = {
              ...sample,
              job: j ? { id: j.device, offset: j.offset, len: j.len, paused: j.paused, speed: j.speed, ready: j.ready, status: j.status } : null,
            };
          }
          this.samples.push(sample);
        } catch {
          if (this.stopped || qmp.state !== 'running') break; // the guest is gone
        }
        next = Math.max(next + o.intervalMs, now());
        await sleepUntil(next);
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.polling;
    this.eventSub?.unsubscribe();
    await this.qmp?.close().catch(() => {});
    this.sub.unsubscribe();
  }

  /** The harness's QMP connection (after poll()), for commands of its own. */
  get client(): QmpClient {
    if (!this.qmp) throw new Error('GuestRecorder: poll() first');
    return this.qmp;
  }

  /** The guest's phases so far, from its PHASE lines. */
  phases(): Phase[] {
    return phasesFrom(this.lines);
  }

  /** Arrival time of the first PHASE `kind` line that arrives after `after`. */
  async nextPhase(kind: 'idle' | 'busy', after: number, timeoutMs = 40_000): Promise<number> {
    return nextPhaseLine(this.lines, kind, after, timeoutMs, this.vm.name, () =>
      new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 200);
      }),
    );
  }

  /** Waits until a poll sent after `after` shows a job, and returns that sample. */
  async jobAppears(timeoutMs = 60_000, after = 0): Promise<Sample & { job: JobState }> {
    const deadline = now() + timeoutMs;
    for (;;) {
      const s = this.samples.find((x) => x.job && x.sent > after);
      if (s) return s as Sample & { job: JobState };
      if (now() > deadline) throw new Error(`${this.vm.name}: no copy job within ${timeoutMs} ms`);
      await sleep(10);
    }
  }
}

/** Arrival time of the first PHASE `kind` line after `after`, waiting (`more`) for lines to come. */
export async function nextPhaseLine(lines: readonly { t: number; line: string }[], kind: 'idle' | 'busy', after: number, timeoutMs: number, name: string, more: () => Promise<void>): Promise<number> {
  const deadline = now() + timeoutMs;
  for (;;) {
    const hit = lines.find((l) => l.t > after && l.line.startsWith(`PHASE ${kind} `));
    if (hit) return hit.t;
    if (now() > deadline) throw new Error(`${name}: no PHASE ${kind} line within ${timeoutMs} ms`);
    await more();
  }
}

export function phasesFrom(lines: readonly { t: number; line: string }[]): Phase[] {
  const starts = lines
    .map((l) => ({ t: l.t, m: /^PHASE (idle|busy) /.exec(l.line) }))
    .filter((x): x is { t: number; m: RegExpExecArray } => x.m !== null)
    .map((x) => ({ t: x.t, kind: x.m[1] as 'idle' | 'busy' }));
  const count = { idle: 0, busy: 0 };
  return starts.map((s, i) => ({ kind: s.kind, start: s.t, end: starts[i + 1]?.t ?? Infinity, n: count[s.kind]++ }));
}

// ---------------------------------------------------------------- analysis (pure)

/** The midpoint of a sample: when its counters are taken to have been read. */
const mid = (s: Sample) => (s.sent + s.t) / 2;

/**
 * A cumulative counter at time `t`, linearly interpolated between the samples around it;
 * undefined outside the samples' span, or, with `edgeMs`, the nearest end's value when `t`
 * lies less than that outside it (the benchmark's windows reach to its first and last poll).
 */
export function counterAt(samples: readonly Sample[], t: number, get: (s: Sample) => number | undefined, edgeMs = 0): number | undefined {
  let prev: { t: number; v: number } | undefined;
  for (const s of samples) {
    const v = get(s);
    if (v === undefined) continue;
    const ts = mid(s);
    if (ts >= t) {
      if (!prev) return ts === t || ts - t < edgeMs ? v : undefined;
      return prev.v + ((v - prev.v) * (t - prev.t)) / (ts - prev.t);
    }
    prev = { t: ts, v };
  }
  return prev && t - prev.t < edgeMs ? prev.v : undefined;
}

/** Average rate of a cumulative counter over [from, to], per second; undefined if not covered. */
export function rateOver(samples: readonly Sample[], from: number, to: number, get: (s: Sample) => number | undefined): number | undefined {
  const a = counterAt(samples, from, get);
  const b = counterAt(samples, to, get);
  if (a === undefined || b === undefined || !(to > from)) return undefined;
  return (b - a) / ((to - from) / 1000);
}

/** The parts of [from, to] that lie in phases of `kind`, each from `skipMs` into its phase. */
export function phaseWindows(phases: readonly Phase[], kind: 'idle' | 'busy', from: number, to: number, skipMs = 0): { from: number; to: number }[] {
  return phases
    .filter((p) => p.kind === kind)
    .map((p) => ({ from: Math.max(p.start + skipMs, from), to: Math.min(p.end, to) }))
    .filter((w) => w.to > w.from);
}

/**
 * A cumulative counter's growth over the windows, per second of them; windows shorter than
 * `minMs`, or whose ends the samples do not cover (within `edgeMs`, see counterAt), are left
 * out. Null when none is left.
 */
export function rateIn(samples: readonly Sample[], windows: readonly { from: number; to: number }[], get: (s: Sample) => number | undefined, o: { edgeMs: number; minMs: number }): number | null {
  let d = 0;
  let ms = 0;
  for (const w of windows) {
    if (w.to - w.from < o.minMs) continue;
    const a = counterAt(samples, w.from, get, o.edgeMs);
    const b = counterAt(samples, w.to, get, o.edgeMs);
    if (a === undefined || b === undefined) continue;
    d += b - a;
    ms += w.to - w.from;
  }
  return ms > 0 ? d / (ms / 1000) : null;
}

export const guestBytes = (s: Sample): number | undefined => s.guestBytes;

/**
 * A latency histogram's counts over `windows` (each from the first poll at or after its
 * start to the last at or before its end; a window without two such polls is left out), and
 * its boundaries; undefined without histograms.
 */
export function histIn(samples: readonly Sample[], windows: readonly { from: number; to: number }[], kind: 'write' | 'flush'): { boundaries: readonly number[]; bins: number[] } | undefined {
  let out: { boundaries: readonly number[]; bins: number[] } | undefined;
  for (const w of windows) {
    const inside = samples.filter((s) => s.guestHist && s.t >= w.from && s.t <= w.to);
    const a = inside[0]?.guestHist;
    const b = inside.at(-1)?.guestHist;
    if (!a || !b || inside.length < 2) continue;
    out ??= { boundaries: b.boundaries, bins: b[kind].map(() => 0) };
    b[kind].forEach((x, i) => (out!.bins[i]! += x - a[kind][i]!));
  }
  return out;
}
/** The job's copied bytes (offset); undefined when the poll saw no job. */
export const jobOffset = (s: Sample): number | undefined => s.job?.offset;

/** The job as the last reply before `t` showed it (undefined: no reply yet or no job). */
export function jobBefore(samples: readonly Sample[], t: number): JobState | undefined {
  let j: JobState | undefined;
  for (const s of samples) {
    if (s.t > t) break;
    if (s.job !== undefined) j = s.job ?? undefined;
  }
  return j;
}

/**
 * When the job first had nothing left to copy (READY), or Infinity. A job that completes
 * within a poll interval of READY (idlecrypt pivots at once when the guest is quiet) is
 * never seen READY: then the last poll that saw it, the end of what the polls can measure.
 */
export function firstCaughtUp(samples: readonly Sample[]): number {
  let last: Sample | undefined;
  for (const x of samples) {
    if (x.job === undefined) continue; // not polled for jobs
    if (x.job === null) {
      if (last) return last.sent; // gone
      continue; // not there yet
    }
    if (x.job.ready || (x.job.len > 0 && x.job.offset >= x.job.len)) return x.sent;
    last = x;
  }
  return Infinity;
}

export interface Reaction {
  readonly phaseStart: number;
  /**
   * 'running': the job ran unthrottled when the phase began; 'early': it ran within
   * EARLY_MS before and had slowed by the time the host read the PHASE line (`ms` is then
   * negative: the guest's vCPU stalls behind a busy main loop, which also holds its serial
   * output, so the stall signal can see a phase before its line arrives); 'slowed': it
   * already was (hold-off, keys)
   */
  readonly before: 'running' | 'early' | 'slowed' | 'none';
  /**
   * ms from the phase start to the job being slowed: the earlier of QEMU's JOB_STATUS_CHANGE
   * to 'paused' (QEMU's timestamp: the job really stopped) and the first poll reply showing
   * it paused or throttled (an upper bound)
   */
  readonly ms: number | undefined;
  /** ms to the 'paused' event alone */
  readonly eventMs: number | undefined;
  /** ms to the first poll reply showing it slowed */
  readonly pollMs: number | undefined;
}

const STOPPED = new Set(['paused', 'standby']);

/**
 * A job that ran this close before a phase's line arrived and had slowed by then reacted to
 * that phase ('early'): the guest's serial line waits for the same main loop as its disk
 * requests (up to ~600 ms seen), and 1 s is shorter than any idle phase's full-speed part.
 */
export const EARLY_MS = 1000;

/** A phase whose line is a moderation's measurable start: the job ran at full speed up to it. */
export const measurable = (r: Reaction): boolean => r.before === 'running' || r.before === 'early';

/** How the job reacted to activity starting at `t0`. */
export function reactionAt(samples: readonly Sample[], events: readonly JobEvent[], t0: number, horizonMs = 5000): Reaction {
  const polled = jobBefore(samples, t0);
  const lastEvent = events.filter((e) => e.t <= t0).at(-1);
  const before =
    polled === undefined && lastEvent === undefined
      ? 'none'
      : (polled && slowed(polled)) || (lastEvent && STOPPED.has(lastEvent.status))
        ? 'slowed'
        : 'running';
  if (before === 'slowed') {
    const lastRunning = samples.filter((s) => s.t <= t0 && s.job && !slowed(s.job)).at(-1);
    if (lastRunning && t0 - lastRunning.t <= EARLY_MS) {
      // A poll reports the job as it was between its sending and its reply: the pause event
      // may lie in between (seen in CI, 2026-12-01: an 'early' phase with no moment found).
      const ev = events.find((e) => e.t > lastRunning.sent && e.t <= t0 && STOPPED.has(e.status));
      const poll = samples.find((s) => s.t > lastRunning.t && s.t <= t0 && s.job && slowed(s.job));
      const eventMs = ev ? ev.t - t0 : undefined;
      const pollMs = poll ? poll.t - t0 : undefined;
      const both = [eventMs, pollMs].filter((x): x is number => x !== undefined);
      return { phaseStart: t0, before: 'early', ms: both.length ? Math.min(...both) : undefined, eventMs, pollMs };
    }
  }
  const ev = events.find((e) => e.t > t0 && e.t < t0 + horizonMs && STOPPED.has(e.status));
  const poll = samples.find((s) => s.t > t0 && s.t < t0 + horizonMs && s.job && slowed(s.job));
  const eventMs = ev ? ev.t - t0 : undefined;
  const pollMs = poll ? poll.t - t0 : undefined;
  const both = [eventMs, pollMs].filter((x): x is number => x !== undefined);
  return { phaseStart: t0, before, ms: both.length ? Math.min(...both) : undefined, eventMs, pollMs };
}

/**
 * One probe sample as idlecrypt wrote it to its metrics file (measurement
 * idlecrypt_activity): the end of its interval on bpftrace's own clock, and the guest's
 * disk requests in it.
 */
export interface ActivityPoint {
  readonly t: number;
  readonly intervalMs: number;
  readonly disk: number;
}

/** The idlecrypt_activity points of a line-protocol metrics file (a run's --metrics-file). */
export function parseActivity(lineProtocol: string): ActivityPoint[] {
  const out: ActivityPoint[] = [];
  for (const line of lineProtocol.split('\n')) {
    if (!line.startsWith('idlecrypt_activity,')) continue;
    const m = /^\S+ (\S+) (\d+)$/.exec(line); // no spaces in our tag or number values
    if (!m) continue;
    const f = new Map(m[1]!.split(',').map((kv) => kv.split('=') as [string, string]));
    const num = (k: string) => (f.has(k) ? Number(f.get(k)!.replace(/i$/, '')) : 0);
    const interval = num('interval_s');
    if (!(interval > 0)) continue;
    out.push({ t: Number(BigInt(m[2]!) / 1000n) / 1000, intervalMs: interval * 1000, disk: num('disk_reads') + num('disk_writes') + num('disk_flushes') + num('disk_discards') });
  }
  return out.sort((a, b) => a.t - b.t);
}

/**
 * The start of the probe interval that holds the guest's first disk request of a busy
 * phase announced at `phaseStart` (its PHASE line's arrival): the first interval with
 * requests after one without, from `lookbackMs` before the line (a loaded host may deliver
 * the line after the requests) to `horizonMs` after. A reaction measured from it is an
 * upper bound of the time from the first request (which lies in that interval).
 */
export function firstRequestAt(points: readonly ActivityPoint[], phaseStart: number, lookbackMs = 300, horizonMs = 3000): number | undefined {
  for (let i = 1; i < points.length; i++) {
    const p = points[i]!;
    if (p.t < phaseStart - lookbackMs) continue;
    if (p.t > phaseStart + horizonMs) break;
    if (p.disk > 0 && points[i - 1]!.disk === 0) return p.t - p.intervalMs;
  }
  return undefined;
}

/** When the job ran again / stopped, from its events, in [from, to]. */
export function jobEventsIn(events: readonly JobEvent[], from: number, to: number): JobEvent[] {
  return events.filter((e) => e.t >= from && e.t <= to);
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The median of the finite numbers among `xs` (runs without a figure leave null), or null if none. */
export function medianOf(xs: readonly (number | null | undefined)[]): number | null {
  const v = xs.filter((x): x is number => typeof x === 'number' && Number.isFinite(x));
  return v.length ? median(v) : null;
}

/** A benchmark's table (header row first) as aligned plain text, for stdout. */
export function textTable(t: string[][]): string {
  const w = t[0]!.map((_, i) => Math.max(...t.map((r) => r[i]!.length)));
  return t.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join('  ')).join('\n');
}

/** The same table in Markdown, for a report. */
export function mdTable(t: string[][]): string {
  return [t[0]!, t[0]!.map(() => '---'), ...t.slice(1)].map((r) => `| ${r.join(' | ')} |`).join('\n');
}

/** Nearest-rank percentile, p in [0, 100]. */
export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

export const mibps = (bps: number | undefined): string => (bps === undefined || Number.isNaN(bps) ? '-' : (bps / MiB).toFixed(0));

// ---------------------------------------------------------------- idlecrypt runs

export interface CliRecord {
  readonly time: string;
  readonly event: string;
  readonly [k: string]: unknown;
}

/**
 * A running `idlecrypt encrypt --json`, with its records timestamped by their own `time`.
 * Its metrics go to `metricsFile` (the command's default is ./idlecrypt-metrics/ in the
 * working directory, which is the repository when tests run).
 */
export class EncryptRun {
  readonly cli: RunningCli;
  readonly startedAt = now();

  constructor(args: string[], metricsFile: string, env: Record<string, string> = {}) {
    // IDLECRYPT_LOG=info: state changes with their reasons land in stderr, for diagnosis
    // (a benchmark run with IDLECRYPT_LOG=debug keeps the job commands too, with their times).
    this.cli = startCli(['encrypt', ...args, '--metrics-file', metricsFile, '--json'], { IDLECRYPT_LOG: process.env.IDLECRYPT_LOG ?? 'info', ...env });
  }

  records(): CliRecord[] {
    return jsonLines<CliRecord>(this.cli.stdout());
  }

  /** Epoch ms of a phase record ({"event":"phase","phase":...}), if seen. */
  phaseAt(phase: string): number | undefined {
    const r = this.records().find((x) => x.event === 'phase' && x.phase === phase);
    return r ? Date.parse(r.time) : undefined;
  }

  completed(): CliRecord | undefined {
    return this.records().find((x) => x.event === 'completed');
  }

  /** The log records on stderr (JSON lines). */
  log(): Record<string, unknown>[] {
    return jsonLines(this.cli.stderr());
  }

  async result(timeoutMs: number) {
    const timer = setTimeout(() => this.cli.child.kill('SIGINT'), timeoutMs);
    try {
      return await this.cli.result;
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * One keystroke (press and release, 2 events) every `everyMs` into the guest, from `from`
 * to `to`: a person typing 5 characters a second. Returns when each press was delivered
 * (its reply from QEMU, which injects the event as it runs the command): on a loaded host
 * the harness itself may run late, so measure from these, not from the schedule.
 */
export async function typeKeys(qmp: QmpClient, from: number, to: number, everyMs = 200, holdMs = 60): Promise<number[]> {
  const keys = ['h', 'e', 'l', 'o', 'w', 'r', 'd', 'spc'];
  const pressed: number[] = [];
  await sleepUntil(from);
  for (let t = from; t < to; t += everyMs) {
    await sleepUntil(t);
    const key = { type: 'qcode' as const, data: keys[pressed.length % keys.length]! };
    await qmp.execute('input-send-event', { events: [{ type: 'key', data: { down: true, key } }] });
    pressed.push(now());
    await sleep(holdMs);
    await qmp.execute('input-send-event', { events: [{ type: 'key', data: { down: false, key } }] });
  }
  return pressed;
}

/** qemu-system processes on the host that are not among `ours` (other people's guests add noise). */
export async function otherQemus(ours: readonly number[]): Promise<number> {
  const { readdir, readFile } = await import('node:fs/promises');
  let n = 0;
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e) || ours.includes(Number(e))) continue;
    const comm = await readFile(`/proc/${e}/comm`, 'utf8').catch(() => '');
    if (comm.trim().startsWith('qemu-system')) n++;
  }
  return n;
}

// ---------------------------------------------------------------- side-by-side runs

/**
 * The guests of one test file: booted with a recorder attached before `ready` (so no serial
 * line is missed), and stopped together, recorders first.
 */
export class GuestLab {
  private readonly vms: TestVm[] = [];
  private readonly recorders: GuestRecorder[] = [];

  async boot(under: string, opts: TestVmOptions): Promise<{ vm: TestVm; rec: GuestRecorder }> {
    const vmDir = path.join(under, opts.name);
    await mkdir(vmDir);
    const vm = await startTestVm({ dir: vmDir, ...opts });
    this.vms.push(vm);
    const rec = new GuestRecorder(vm);
    this.recorders.push(rec);
    await vm.ready;
    return { vm, rec };
  }

  pids(): number[] {
    return this.vms.map((v) => v.pid);
  }

  /** Stops every recorder's polling (the measurements end here). */
  async stopRecorders(): Promise<void> {
    await Promise.all(this.recorders.map((r) => r.stop()));
  }

  readonly stopAll = async (): Promise<void> => {
    await Promise.all(this.recorders.splice(0).map((r) => r.stop()));
    await Promise.all(this.vms.splice(0).map((vm) => vm.stop()));
  };
}

/**
 * Runs a side-by-side measurement up to `attempts` times, each in a fresh directory under
 * `dir` with fresh guests, until one returns no shortfalls (figures that depend on the shared
 * host as much as on idlecrypt); fails with every attempt's shortfalls. Anything else the
 * run asserts fails at once.
 */
export async function untilNoShortfall(
  t: TestContext,
  o: { dir: string; name: string; attempts: number; lab: GuestLab },
  run: (base: string, attempt: number) => Promise<string[]>,
): Promise<void> {
  const shortfalls: string[] = [];
  for (let attempt = 1; attempt <= o.attempts; attempt++) {
    const base = path.join(o.dir, `${o.name}-${attempt}`);
    await mkdir(base);
    let short: string[];
    try {
      short = await run(base, attempt);
    } finally {
      await o.lab.stopAll(); // the next attempt or test must not share the CPUs with these guests
      await rm(base, { recursive: true, force: true });
    }
    if (short.length === 0) {
      if (attempt > 1) t.diagnostic(`attempt ${attempt} met every criterion; before it: ${shortfalls.join('; ')}`);
      return;
    }
    shortfalls.push(...short.map((x) => `attempt ${attempt}: ${x}`));
    t.diagnostic(`attempt ${attempt} fell short: ${short.join('; ')}`);
  }
  assert.fail(`every attempt fell short:\n${shortfalls.join('\n')}`);
}

/**
 * The three guests of a side-by-side run, booted at once: `mod` (its copy is moderated),
 * `ref` (the same workload with no job: the reference for its throughput) and `cmp` (idle;
 * copied by `--no-moderation`, the unthrottled mirror, started now and held paused until
 * the caller's window). All three are polled every `pollMs` on the harness's own monitor;
 * mod and ref for the guest's device counters, mod and cmp for the copy job.
 */
export async function startSideBySide(
  lab: GuestLab,
  base: string,
  o: {
    mod: TestVmOptions;
    ref: TestVmOptions;
    cmp: TestVmOptions;
    keyFile: string;
    pollMs: number;
    runTimeoutMs: number;
    /** more arguments of mod's run (a --policy) */
    modArgs?: string[];
    /** more arguments of cmp's unthrottled run (an --encrypter) */
    cmpArgs?: string[];
    /** The target format of every run (default luks: see encrypt below). */
    format?: 'auto' | 'luks' | 'qcow2';
    /**
     * Before the measured run, one of the same arguments for this long, then cancelled (its
     * target removed): what it learnt of the guest (`thresholds: auto`, kept per guest) is
     * there when the measured run starts, as for a guest the agent has watched.
     */
    warmUpMs?: number;
  },
): Promise<{
  mod: Booted;
  ref: Booted;
  cmp: Booted;
  others: number;
  cmpRun: EncryptRun;
  cmpJob: string;
  /** mod's first idle phase; the moderated `idlecrypt encrypt` started 2 s into it */
  idle0: number;
  run: EncryptRun;
  target: string;
  done: ReturnType<EncryptRun['result']>;
  /** the first poll that saw mod's copy job */
  jobStart: number;
}> {
  const [mod, ref, cmp] = await Promise.all([lab.boot(base, o.mod), lab.boot(base, o.ref), lab.boot(base, o.cmp)]);
  const others = await otherQemus(lab.pids());
  await Promise.all([
    mod.rec.poll({ intervalMs: o.pollMs, stats: true, jobs: true }),
    ref.rec.poll({ intervalMs: o.pollMs, stats: true, jobs: false }),
    cmp.rec.poll({ intervalMs: o.pollMs, stats: false, jobs: true }),
  ]);
  /**
   * `idlecrypt encrypt` of a guest's disk0 into `target` in this run's directory: raw LUKS
   * for every source unless `o.format` says otherwise, so that a sparse qcow2 disk's copy
   * encrypts its holes as a raw one's does (`--format auto` would make it qcow2, whose holes
   * cost nothing: no copy to measure).
   */
  const encrypt = (b: Booted, target: string, more: readonly string[], env: Record<string, string> = {}) =>
    new EncryptRun(['--qmp', b.vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', o.keyFile, '--iter-time', '50', '--format', o.format ?? 'luks', ...more], path.join(base, `${path.basename(target, '.luks')}.lp`), env);
  const cmpRun = encrypt(cmp, path.join(base, 'cmp.luks'), ['--no-moderation', ...(o.cmpArgs ?? [])]);
  const cmpJob = (await withRunOutput(cmpRun, cmp.rec.jobAppears())).job.id;
  await cmp.rec.client.execute('job-pause', { id: cmpJob });
  // The moderated run, 2 s into mod's first idle phase: the job starts 3-6 s later
  // (bpftrace compiles and attaches meanwhile), before or at the first busy phase.
  // With a warm-up, both runs keep their state (what was learnt) in this cell's directory:
  // not in the suite's, where the next cell's guest of the same name would find it.
  const modEnv: Record<string, string> = o.warmUpMs ? { IDLECRYPT_STATE_DIR: path.join(base, 'state') } : {};
  if (o.warmUpMs) {
    const warm = encrypt(mod, path.join(base, 'warm-up.luks'), o.modArgs ?? [], modEnv);
    const warmDone = warm.result(o.warmUpMs + 120_000);
    await sleepUntil(warm.startedAt + o.warmUpMs);
    warm.cli.child.kill('SIGINT');
    const r = await warmDone;
    if (r.code !== 130) throw new Error(`the warm-up run ended with ${r.code}, not as cancelled:\n${r.stderr.slice(-2000)}`);
  }
  // After a warm-up, the next idle phase's start (the first one is long past).
  const idle0 = await mod.rec.nextPhase('idle', o.warmUpMs ? now() : 0);
  await sleepUntil(idle0 + 2000);
  const target = path.join(base, 'mod.luks');
  const run = encrypt(mod, target, o.modArgs ?? [], modEnv);
  const done = run.result(o.runTimeoutMs);
  // (not the warm-up's job, which earlier polls saw)
  const jobStart = (await withRunOutput(run, mod.rec.jobAppears(60_000, run.startedAt))).sent;
  return { mod, ref, cmp, others, cmpRun, cmpJob, idle0, run, target, done, jobStart };
}

/** `wait`, or its error with what the run printed (why it made no job, say). */
async function withRunOutput<T>(run: EncryptRun, wait: Promise<T>): Promise<T> {
  try {
    return await wait;
  } catch (e) {
    const tail = (run.cli.stdout() + run.cli.stderr()).trim().split('\n').slice(-8).join('\n');
    throw new Error(`${(e as Error).message}; the run printed:\n${tail || '(nothing)'}`);
  }
}

export interface Booted {
  readonly vm: TestVm;
  readonly rec: GuestRecorder;
}
