/**
 * Harm measured as the guest's own disk latency (issue 12, `latency.margin`), as Linux's
 * io.latency does for cgroups: while the guest works its disk, the copy runs at the highest
 * speed that keeps the guest's mean request latency within a margin of its latency without
 * the copy (graded speeds, not only paused or full).
 *
 * The input is QEMU's own accounting of the guest's devices (query-blockstats, or libvirt's
 * virDomainBlockStatsFlags): per kind of request (read, write, flush), the requests
 * completed and the nanoseconds they took, from block_acct_start to block_acct_done. The
 * copy's own I/O is not in it (a block job's BlockBackend is not accounted). Polled every
 * 250 ms on the copy's own connection; no probe is involved (a per-request bpftrace probe
 * costs 14 us per request on Debian's bpftrace: probes/README.md).
 *
 * The rule, one judgement per half second that holds at least 8 completed requests (or
 * every 2 s, whatever it holds):
 *   copy quiet (<= 1.5 MiB/s)  the judgement's mean latency per kind, and the guest's
 *   in this judgement and      request rate, join the baseline. A judgement is compared
 *   the one before             with the last 40 such at a similar load (request rate
 *                              within 2x): the lower quartile of their latencies (the
 *                              host's other work only ever slows a request), the median of
 *                              their rates. A load not seen yet is learnt first.
 *   the mix's baseline         expected = sum over kinds of requests x baseline: a guest
 *                              that turns from reads to flushes is not taken for harm
 *   while the guest is busy    latency <= expected x (1 + margin), and the request rate
 *   with its disk              not under the baseline's / (1 + margin): a hit; after two
 *                              hits in a row the speed grows by a quarter (from paused, one
 *                              hit starts it at 4 MiB/s), if the copy made most of it (a
 *                              copy held back by something else keeps its speed)
 *                              latency above, or fewer than 2 requests completed in 2 s
 *                              (the guest may be frozen): a miss, the speed halves, under
 *                              1 MiB/s it pauses
 *   every `latency.refresh`    the copy paused until a settled quiet judgement (1-1.5 s),
 *   of graded copying          to measure the baseline again (the guest's own latency
 *                              drifts with its work)
 * Until a baseline is known the busy speed applies (`speed.busy`, paused by default), which
 * is what measures it. A person at the console (keyboard, pointer) and a stalled vCPU are
 * not judged by latency: they get the busy speed at once, as without this.
 */
import { formatSpeed } from '../policy/units.ts';
import { percentile } from './calibrate.ts';

export const OP_KINDS = ['read', 'write', 'flush'] as const;
export type OpKind = (typeof OP_KINDS)[number];

/** Cumulative counts since QEMU started, over the VM's guest devices. */
export interface LatencyTotals {
  /** Requests completed, per kind. */
  readonly ops: Readonly<Record<OpKind, number>>;
  /** Nanoseconds those requests took in QEMU (start to completion), per kind. */
  readonly ns: Readonly<Record<OpKind, number>>;
}

export interface LatencySample extends LatencyTotals {
  /** When it was read (scheduler clock, ms). */
  readonly time: number;
}

/** What the latency control says, for decisions, status, logs and metrics. */
export interface LatencyView {
  /**
   * learning: no baseline yet (the busy speed applies); graded: the speed is the latency's;
   * probing: paused to measure the baseline again (until a settled judgement, at most 3).
   */
  readonly phase: 'learning' | 'graded' | 'probing';
  /** The graded speed, bytes/s; 0 = paused. */
  readonly speedBps: number;
  /** The last judgement's mean latency, ms; null before the first. */
  readonly latencyMs: number | null;
  /** The baseline for the same mix of requests, ms; null while none is known. */
  readonly baselineMs: number | null;
  /** The policy's margin (0.15 = 15%). */
  readonly margin: number;
  /** "latency 1.31 ms <= 1.10 ms +15%: 24 MiB/s" */
  readonly note: string;
}

const MiB = 1024 * 1024;
/** A judgement spans at least this long... */
export const JUDGE_MS = 500;
/** ...and at least this many completed requests, unless it reaches JUDGE_MAX_MS. */
export const JUDGE_MIN_OPS = 8;
export const JUDGE_MAX_MS = 2000;
/** The copy counts as quiet (its latency is the guest's own) at or under this. */
export const QUIET_BPS = 1.5 * MiB;
/** Where graded copying starts from paused. */
export const GRADED_START_BPS = 4 * MiB;
/** Under this a halved speed pauses. */
export const GRADED_MIN_BPS = 1 * MiB;
/** A raise needs the copy to have made this share of its speed (QEMU's slices give 80-90%). */
const BINDING = 0.7;
const RAISE = 1.25;
/** Judgements within the margin in a row before a raise: the speed doubles in about 3 s at most. */
const RAISE_AFTER = 2;
const CUT = 0.5;
/** Quiet judgements kept (about 20 s of them, of every load the guest showed). */
const BASELINE_KEEP = 40;
/** Judgements a probe of the baseline may last (the first after a pause is not settled). */
const PROBE_MAX = 3;
/** A kind needs this many quiet judgements before it has a baseline. */
const BASELINE_MIN = 3;
/** Quiet judgements are alike in load within this factor of the guest's request rate. */
const SIMILAR = 2;

interface Pending {
  readonly start: number;
  readonly startOffset: number;
  readonly ops: Record<OpKind, number>;
  readonly ns: Record<OpKind, number>;
}

/** A settled judgement with the copy quiet: the guest's own latency at its own load. */
export interface QuietSample {
  /** The guest's requests per second (all kinds). */
  readonly rate: number;
  /** Mean ns per request, per kind with at least 2 requests. */
  readonly ns: Readonly<Partial<Record<OpKind, number>>>;
}

export interface LatencyMemory {
  readonly prev: (LatencySample & { readonly offset: number }) | null;
  readonly pending: Pending | null;
  /** Recent quiet judgements, newest last. */
  readonly quiet: readonly QuietSample[];
  /** The last judgement found the copy quiet: the next quiet one is settled. */
  readonly lastQuiet: boolean;
  /** When the baseline last took a quiet judgement. */
  readonly baselineAt: number | null;
  /** The graded speed, bytes/s; 0 = paused. */
  readonly speed: number;
  /** Judgements within the margin in a row at this speed. */
  readonly hits: number;
  /** Judgements spent paused to measure the baseline again; 0 = not probing. */
  readonly probing: number;
  readonly wasActive: boolean;
  readonly view: LatencyView | null;
}

export const INITIAL_LATENCY: LatencyMemory = {
  prev: null,
  pending: null,
  quiet: [],
  lastQuiet: false,
  baselineAt: null,
  speed: 0,
  hits: 0,
  probing: 0,
  wasActive: false,
  view: null,
};

export interface LatencyContext {
  /** The job's offset (bytes copied, cumulative) when the sample was read. */
  readonly offset: number;
  /** The guest is busy with its disk (not input, not a stall): the speed is graded. */
  readonly active: boolean;
  /** latency.margin (0.15); latency.refresh, ms. */
  readonly margin: number;
  readonly refreshMs: number;
}

/**
 * The latency baseline is the lower quartile of the quiet means: a quiet judgement can only
 * be slowed by what else the host does, never sped up, so the low ones are the guest's own.
 */
const lowerQuartile = (xs: readonly number[]): number => percentile([...xs].sort((a, b) => a - b), 25);

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

export interface Baseline {
  /** ns per request, per kind with enough quiet judgements. */
  readonly ns: Partial<Record<OpKind, number>>;
  /** The guest's request rate in those judgements (median). */
  readonly rate: number;
}

/**
 * The baseline for a guest doing `rate` requests/s: from the quiet judgements at a similar
 * load (within a factor of SIMILAR), so that a guest that turns from a trickle of small
 * writes to a burst of large ones (or back) is judged against itself doing the same, not
 * taken for harmed. Undefined while fewer than BASELINE_MIN such judgements are known: a
 * load not seen yet is learnt first.
 */
export function baselineFor(quiet: readonly QuietSample[], rate: number): Baseline | undefined {
  const like = quiet.filter((q) => q.rate <= rate * SIMILAR && q.rate * SIMILAR >= rate);
  if (like.length < BASELINE_MIN) return undefined;
  const ns: Partial<Record<OpKind, number>> = {};
  for (const k of OP_KINDS) {
    const xs = like.flatMap((q) => (q.ns[k] === undefined ? [] : [q.ns[k]]));
    if (xs.length >= BASELINE_MIN) ns[k] = lowerQuartile(xs);
  }
  return { ns, rate: median(like.map((q) => q.rate)) };
}

const ms = (ns: number): string => `${(ns / 1e6).toFixed(ns < 1e7 ? 2 : 1)} ms`;

/** One latency reading → the control's memory and view. Pure. */
export function latencyStep(mem: LatencyMemory, s: LatencySample, c: LatencyContext): LatencyMemory {
  const prev = mem.prev;
  const here = { ...s, offset: c.offset };
  const activated = c.active && !mem.wasActive;
  // On a new busy phase: from half the speed the last one ended at (its guest may differ now).
  let speed = activated && mem.speed > 0 ? Math.max(GRADED_START_BPS, mem.speed * CUT) : mem.speed;
  const base = { ...mem, prev: here, wasActive: c.active, speed };
  if (!prev || OP_KINDS.some((k) => s.ops[k] < prev.ops[k] || s.ns[k] < prev.ns[k]) || c.offset < prev.offset) {
    return { ...base, pending: null }; // first reading, or the counters restarted: start over
  }
  const p: Pending = mem.pending ?? { start: prev.time, startOffset: prev.offset, ops: { read: 0, write: 0, flush: 0 }, ns: { read: 0, write: 0, flush: 0 } };
  const ops = { ...p.ops };
  const ns = { ...p.ns };
  for (const k of OP_KINDS) {
    ops[k] += s.ops[k] - prev.ops[k];
    ns[k] += s.ns[k] - prev.ns[k];
  }
  const span = s.time - p.start;
  const total = OP_KINDS.reduce((n, k) => n + ops[k], 0);
  const pending: Pending = { ...p, ops, ns };
  if (span < JUDGE_MS || (total < JUDGE_MIN_OPS && span < JUDGE_MAX_MS)) {
    return { ...base, pending, ...(activated ? { view: viewOf(base, mem.view, c) } : {}) };
  }

  // A judgement.
  const copiedBps = ((c.offset - p.startOffset) * 1000) / span;
  const quietCopy = copiedBps <= QUIET_BPS;
  const rate = (total * 1000) / span;
  let quiet = mem.quiet;
  let baselineAt = mem.baselineAt;
  // Settled: the copy was quiet in the judgement before this one too. The first judgement
  // after a pause still holds the tail of the copy (its requests in flight, the host's
  // writeback), which would raise the baseline a little at every pause.
  if (quietCopy && mem.lastQuiet && total >= 2) {
    const means: Partial<Record<OpKind, number>> = {};
    for (const k of OP_KINDS) if (ops[k] >= 2) means[k] = ns[k] / ops[k];
    quiet = [...quiet, { rate, ns: means }].slice(-BASELINE_KEEP);
    baselineAt = s.time;
  }
  const baseline = baselineFor(quiet, rate);
  let expected = 0;
  let actual = 0;
  let judged = 0;
  for (const k of OP_KINDS) {
    const b = baseline?.ns[k];
    if (b === undefined || ops[k] === 0) continue;
    expected += ops[k] * b;
    actual += ns[k];
    judged += ops[k];
  }
  const latencyNs = total > 0 ? OP_KINDS.reduce((n, k) => n + ns[k], 0) / total : null;
  const baselineMeanNs = judged > 0 ? expected / judged : null;
  const after = { ...base, pending: null, quiet, lastQuiet: quietCopy, baselineAt };
  const known = judged >= 2;
  const limit = `+${Math.round(c.margin * 100)}%`;
  const view = (phase: LatencyView['phase'], speedBps: number, note: string): LatencyView => ({
    phase,
    speedBps,
    latencyMs: latencyNs === null ? null : latencyNs / 1e6,
    baselineMs: baselineMeanNs === null ? null : baselineMeanNs / 1e6,
    margin: c.margin,
    note,
  });
  const measured = latencyNs === null ? 'no requests' : `latency ${ms(latencyNs)}`;
  const atLoad = `${measured} at ${fmtRate(rate)} requests/s`;

  if (!c.active) {
    return { ...after, probing: 0, view: known ? view('graded', speed, `${measured}; graded speed ${describe(speed)} when busy`) : view('learning', 0, `${atLoad}; learning the baseline`) };
  }
  if (total < 2 && !quietCopy) {
    // The guest is busy with its disk, yet next to nothing completed: frozen, maybe by us.
    speed = cut(speed);
    return { ...after, speed, hits: 0, probing: 0, view: view('graded', speed, `${total} requests completed in ${(span / 1000).toFixed(1)} s: ${describe(speed)}`) };
  }
  if (mem.probing > 0 && baselineAt !== s.time && mem.probing < PROBE_MAX) {
    return { ...after, probing: mem.probing + 1, view: view('probing', 0, `${measured}; paused to measure the baseline again`) };
  }
  if (!known) {
    // No baseline at this load yet: the busy speed (paused by default) while it is learnt.
    return { ...after, speed: 0, hits: 0, probing: 0, view: view('learning', 0, `${atLoad}; learning the baseline at this load (the busy speed until one is known)`) };
  }
  if (mem.probing > 0) {
    // The probe is over: the copy was paused, and the baseline took what it could.
    const resumed = speed > 0 ? speed : GRADED_START_BPS;
    return { ...after, speed: resumed, hits: 0, probing: 0, view: view('graded', resumed, `${measured}: baseline re-measured; ${describe(resumed)}`) };
  }
  // The guest's own request rate, for a guest that waits for each request (one at a time,
  // or a fixed number in flight): time its requests spend before QEMU accounts them (its
  // vCPU, QEMU's main loop) is not in the latency but slows it down all the same. A guest
  // that asks for less of its own accord looks the same, and is given less copy: the safe
  // side, corrected by the next baseline.
  const baseRate = baseline!.rate;
  const slower = rate * (1 + c.margin) < baseRate;
  const within = actual <= expected * (1 + c.margin) && !slower;
  const said = slower
    ? `${measured}, ${fmtRate(rate)} requests/s < ${fmtRate(baseRate)}/s -${Math.round((1 - 1 / (1 + c.margin)) * 100)}%`
    : `${measured} ${within ? '<=' : '>'} ${ms(baselineMeanNs!)} ${limit}`;
  let hits = 0;
  if (within) {
    hits = mem.hits + 1;
    if (speed === 0) {
      speed = GRADED_START_BPS;
      hits = 0;
    } else if (hits >= RAISE_AFTER && copiedBps >= speed * BINDING) {
      speed = Math.ceil((speed * RAISE) / (256 * 1024)) * 256 * 1024;
      hits = 0;
    }
  } else {
    speed = cut(speed);
  }
  if (speed > 0 && baselineAt !== null && s.time - baselineAt >= c.refreshMs) {
    return { ...after, speed, hits, probing: 1, view: view('probing', 0, `${said}; paused to measure the baseline again`) };
  }
  return { ...after, speed, hits, view: view('graded', speed, `${said}: ${describe(speed)}`) };
}

const fmtRate = (r: number): string => (r >= 100 ? Math.round(r).toString() : r.toFixed(1));

function cut(speed: number): number {
  const next = speed * CUT;
  return next < GRADED_MIN_BPS ? 0 : Math.round(next);
}

function describe(speed: number): string {
  return speed > 0 ? formatSpeed(speed) : 'paused';
}

/** The view when a busy phase starts, before its first judgement. */
function viewOf(mem: LatencyMemory, last: LatencyView | null, c: LatencyContext): LatencyView {
  if (!last || last.phase === 'learning') return last ?? { phase: 'learning', speedBps: 0, latencyMs: null, baselineMs: null, margin: c.margin, note: 'learning the baseline' };
  return { ...last, phase: 'graded', speedBps: mem.speed, note: `busy again: ${describe(mem.speed)} until the first judgement` };
}
