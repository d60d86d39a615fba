/**
 * Harm measured as the guest's own disk latency (issue 12, `latency.margin`), as Linux's
 * io.latency does for cgroups: while the guest works its disk, the copy runs at the highest
 * speed that keeps the guest's typical request latency within a margin of its latency
 * without the copy (graded speeds, not only paused or full).
 *
 * The input is QEMU's own accounting of the guest's devices (query-blockstats, or libvirt's
 * virDomainBlockStatsFlags): per kind of request (read, write, flush), the requests
 * completed and the nanoseconds they took, from block_acct_start to block_acct_done, and
 * where QEMU keeps one (block-latency-histogram-set, which the QMP backend sets) a histogram
 * of their latencies. The copy's own I/O is not in it (a block job's BlockBackend is not
 * accounted). Polled every 250 ms on the copy's own connection; no probe is involved (a
 * per-request bpftrace probe costs 14 us per request on Debian's bpftrace: probes/README.md).
 *
 * The typical latency of a kind is its median where a histogram is kept (the QMP backend),
 * else its mean (libvirt, which does not expose the histograms). The median is what a
 * request usually waits; the mean also carries the rare request that landed beside a burst
 * of the copy (a mirror writes its buffer, 4-8 MiB, at once between rate-limit sleeps), and
 * a 15% margin on a mean holds a trickle guest's copy to a few MiB/s (bench/README.md).
 * A guest that waits for each request is also judged by its request rate (below), which is
 * what such a guest loses when its mean latency rises.
 *
 * The rule, one judgement per half second that holds at least 8 completed requests (or
 * every 2 s, whatever it holds):
 *   copy quiet (<= 1.5 MiB/s)  the judgement's typical latency per kind, and the guest's
 *   in this judgement and      request rate, join the baseline. A judgement is compared
 *   the one before             with the last 40 such at a similar load (request rate
 *                              within 2x): the lower quartile of their latencies (the
 *                              host's other work only ever slows a request), the median of
 *                              their rates. A load not seen yet is learnt first.
 *   the mix's baseline         expected = sum over kinds of requests x baseline: a guest
 *                              that turns from reads to flushes is not taken for harm
 *   while the guest is busy    latency <= expected x (1 + margin), and the request rate
 *   with its disk, or idle     not under the baseline's / (1 + margin): a hit; after two
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
 *
 * An idle guest (under its thresholds, fixed or learnt) that still does requests, at least
 * IDLE_JUDGED_RATE a second (a database's log writes, which `thresholds: auto` learns to
 * call idle), is judged the same way, with a grade of its own that starts at the idle speed
 * (full) and is cut to half what the copy made on the first miss; a raise the copy cannot
 * use (it made under 70% of the speed) gives the idle speed back. Once judged, an idle guest
 * stays judged while the copy moves (a guest the copy slows does fewer requests, which must
 * not end its judgement); a quiet judgement under the rate ends it. A guest that does
 * nothing is not judged: the idle speed, as without this.
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
  /** Where QEMU keeps one: the requests per latency bucket, per kind (cumulative). */
  readonly hist?: Readonly<Partial<Record<OpKind, Histogram>>>;
}

/**
 * QEMU's BlockLatencyHistogramInfo: bins[0] counts requests under boundaries[0] ns,
 * bins[i] those in [boundaries[i-1], boundaries[i]), the last those at or over the last.
 */
export interface Histogram {
  readonly boundaries: readonly number[];
  readonly bins: readonly number[];
}

/**
 * The latency histogram's boundaries the QMP backend sets: 10 us to about 10 s, each 10%
 * above the one before (146 buckets). Within a bucket the median is interpolated, so it is
 * known to a few per cent, under the margins a policy would ask for.
 */
export const HISTOGRAM_BOUNDARIES: readonly number[] = (() => {
  const b: number[] = [];
  for (let x = 10_000; x < 1e10; x = Math.ceil(x * 1.1)) b.push(x);
  return b;
})();

/**
 * The p-quantile (0.5: the median) of the requests counted in `bins`, in ns, interpolated
 * linearly within its bucket; undefined when none were counted.
 */
export function histogramQuantile(boundaries: readonly number[], bins: readonly number[], p = 0.5): number | undefined {
  const n = bins.reduce((a, x) => a + x, 0);
  if (n <= 0) return undefined;
  const rank = n * p;
  let below = 0;
  for (let i = 0; i < bins.length; i++) {
    const c = bins[i]!;
    if (c > 0 && below + c >= rank) {
      const lo = i === 0 ? 0 : boundaries[i - 1]!;
      if (i >= boundaries.length) return lo; // the open bucket: at least its lower end
      return lo + (boundaries[i]! - lo) * ((rank - below) / c);
    }
    below += c;
  }
  return boundaries.at(-1);
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
  /** The graded speed, bytes/s; 0 = paused; Infinity = the idle speed (an idle grade not cut). */
  readonly speedBps: number;
  /** The last judgement's latency (median or mean, per kind, weighted by the mix), ms; null before the first. */
  readonly latencyMs: number | null;
  /** The baseline for the same mix of requests, ms; null while none is known. */
  readonly baselineMs: number | null;
  /** The policy's margin (0.15 = 15%). */
  readonly margin: number;
  /**
   * Which state the graded speed is for: 'busy' (a guest busy with its disk), or 'idle' (a
   * guest idle by its thresholds that still does requests). An idle guest not judged shows
   * the busy grade.
   */
  readonly scope: 'busy' | 'idle';
  /** How the latency is summed up: the median (a histogram is kept) or the mean. */
  readonly statistic: 'median' | 'mean';
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
/** An idle guest is judged when it does at least this many requests a second (JUDGE_MIN_OPS per JUDGE_MAX_MS). */
export const IDLE_JUDGED_RATE = (JUDGE_MIN_OPS * 1000) / JUDGE_MAX_MS;
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
  /** The histograms' counts over the judgement, per kind that has one. */
  readonly bins: Partial<Record<OpKind, number[]>>;
}

/** A settled judgement with the copy quiet: the guest's own latency at its own load. */
export interface QuietSample {
  /** The guest's requests per second (all kinds). */
  readonly rate: number;
  /** Typical ns per request (median or mean), per kind with at least 2 requests. */
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
  /** The idle guest's graded speed (Infinity: the idle speed), and its hits. */
  readonly idleSpeed: number;
  readonly idleHits: number;
  /** The last judgement judged an idle guest. */
  readonly idleJudged: boolean;
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
  idleSpeed: Infinity,
  idleHits: 0,
  idleJudged: false,
  probing: 0,
  wasActive: false,
  view: null,
};

export interface LatencyContext {
  /** The job's offset (bytes copied, cumulative) when the sample was read. */
  readonly offset: number;
  /** The guest is busy with its disk (not input, not a stall): the speed is graded. */
  readonly active: boolean;
  /** The guest is idle by its thresholds: graded while it does requests (IDLE_JUDGED_RATE). */
  readonly idle?: boolean;
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
  const busySpeed = activated && mem.speed > 0 ? Math.max(GRADED_START_BPS, mem.speed * CUT) : mem.speed;
  const base = { ...mem, prev: here, wasActive: c.active, speed: busySpeed };
  if (!prev || restarted(prev, s) || c.offset < prev.offset) {
    return { ...base, pending: null }; // first reading, or the counters restarted: start over
  }
  const p: Pending = mem.pending ?? { start: prev.time, startOffset: prev.offset, ops: { read: 0, write: 0, flush: 0 }, ns: { read: 0, write: 0, flush: 0 }, bins: {} };
  const ops = { ...p.ops };
  const ns = { ...p.ns };
  const bins: Partial<Record<OpKind, number[]>> = {};
  for (const k of OP_KINDS) {
    ops[k] += s.ops[k] - prev.ops[k];
    ns[k] += s.ns[k] - prev.ns[k];
    const h = s.hist?.[k];
    const h0 = prev.hist?.[k];
    if (h && h0 && (mem.pending === null || p.bins[k])) {
      const acc = p.bins[k] ?? h.bins.map(() => 0);
      bins[k] = acc.map((x, i) => x + h.bins[i]! - h0.bins[i]!);
    }
  }
  const span = s.time - p.start;
  const total = OP_KINDS.reduce((n, k) => n + ops[k], 0);
  const pending: Pending = { ...p, ops, ns, bins };
  if (span < JUDGE_MS || (total < JUDGE_MIN_OPS && span < JUDGE_MAX_MS)) {
    return { ...base, pending, ...(activated ? { view: viewOf(base, mem.view, c) } : {}) };
  }

  // A judgement.
  const copiedBps = ((c.offset - p.startOffset) * 1000) / span;
  const quietCopy = copiedBps <= QUIET_BPS;
  const rate = (total * 1000) / span;
  // The typical latency per kind: the median of the judgement's requests where a histogram
  // is kept, else their mean.
  const typical: Partial<Record<OpKind, number>> = {};
  let medians = 0;
  for (const k of OP_KINDS) {
    if (ops[k] === 0) continue;
    const b = bins[k];
    const m = b && s.hist?.[k] ? histogramQuantile(s.hist[k].boundaries, b) : undefined;
    if (m !== undefined) medians++;
    typical[k] = m ?? ns[k] / ops[k];
  }
  const statistic: LatencyView['statistic'] = medians > 0 ? 'median' : 'mean';
  let quiet = mem.quiet;
  let baselineAt = mem.baselineAt;
  // Settled: the copy was quiet in the judgement before this one too. The first judgement
  // after a pause still holds the tail of the copy (its requests in flight, the host's
  // writeback), which would raise the baseline a little at every pause.
  if (quietCopy && mem.lastQuiet && total >= 2) {
    const own: Partial<Record<OpKind, number>> = {};
    for (const k of OP_KINDS) if (ops[k] >= 2) own[k] = typical[k]!;
    quiet = [...quiet, { rate, ns: own }].slice(-BASELINE_KEEP);
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
    actual += ops[k] * typical[k]!;
    judged += ops[k];
  }
  const latencyNs = total > 0 ? OP_KINDS.reduce((n, k) => n + ops[k] * (typical[k] ?? 0), 0) / total : null;
  const baselineMeanNs = judged > 0 ? expected / judged : null;
  const after = { ...base, pending: null, quiet, lastQuiet: quietCopy, baselineAt };
  const known = judged >= 2;
  const limit = `+${Math.round(c.margin * 100)}%`;
  const idleJudged = c.idle === true && !c.active && (rate >= IDLE_JUDGED_RATE || (mem.idleJudged && !quietCopy));
  const scope: LatencyView['scope'] = idleJudged ? 'idle' : 'busy';
  const view = (phase: LatencyView['phase'], speedBps: number, note: string): LatencyView => ({
    phase,
    speedBps,
    latencyMs: latencyNs === null ? null : latencyNs / 1e6,
    baselineMs: baselineMeanNs === null ? null : baselineMeanNs / 1e6,
    margin: c.margin,
    scope,
    statistic,
    note,
  });
  const measured = latencyNs === null ? 'no requests' : `latency ${statistic === 'median' ? 'p50 ' : ''}${ms(latencyNs)}`;
  const atLoad = `${measured} at ${fmtRate(rate)} requests/s`;

  if (!c.active && !idleJudged) {
    const speed = busySpeed;
    return {
      ...after,
      probing: 0,
      idleJudged: false,
      view: known ? view('graded', speed, `${measured}; graded speed ${describe(speed)} when busy`) : view('learning', 0, `${atLoad}; learning the baseline`),
    };
  }
  // The grade judged here: the busy one, or the idle guest's own.
  const was = idleJudged ? { speed: mem.idleSpeed, hits: mem.idleHits } : { speed: busySpeed, hits: mem.hits };
  const keep = (speed: number, hits: number, probing: number, v: LatencyView): LatencyMemory =>
    idleJudged ? { ...after, idleSpeed: speed, idleHits: hits, idleJudged: true, probing, view: v } : { ...after, speed, hits, idleJudged: false, probing, view: v };
  if (total < 2 && !quietCopy) {
    // The guest is busy with its disk, yet next to nothing completed: frozen, maybe by us.
    const speed = cut(was.speed, copiedBps);
    return keep(speed, 0, 0, view('graded', speed, `${total} requests completed in ${(span / 1000).toFixed(1)} s: ${describe(speed)}`));
  }
  if (mem.probing > 0 && baselineAt !== s.time && mem.probing < PROBE_MAX) {
    return keep(was.speed, was.hits, mem.probing + 1, view('probing', 0, `${measured}; paused to measure the baseline again`));
  }
  if (!known) {
    // No baseline at this load yet: the busy speed (paused by default) while it is learnt.
    return keep(idleJudged ? was.speed : 0, 0, 0, view('learning', 0, `${atLoad}; learning the baseline at this load (the busy speed until one is known)`));
  }
  if (mem.probing > 0) {
    // The probe is over: the copy was paused, and the baseline took what it could.
    const resumed = was.speed > 0 ? was.speed : GRADED_START_BPS;
    return keep(resumed, 0, 0, view('graded', resumed, `${measured}: baseline re-measured; ${describe(resumed)}`));
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
  let speed = was.speed;
  let hits = 0;
  if (within) {
    hits = was.hits + 1;
    if (speed === 0) {
      speed = GRADED_START_BPS;
      hits = 0;
    } else if (Number.isFinite(speed) && hits >= RAISE_AFTER) {
      if (copiedBps >= speed * BINDING) speed = Math.ceil((speed * RAISE) / (256 * 1024)) * 256 * 1024;
      // An idle guest's copy that cannot use its speed is held back by something else:
      // the idle speed, which is what it had before its first miss.
      else if (idleJudged) speed = Infinity;
      hits = 0;
    }
  } else {
    speed = cut(speed, copiedBps);
  }
  if (speed > 0 && baselineAt !== null && s.time - baselineAt >= c.refreshMs) {
    return keep(speed, hits, 1, view('probing', 0, `${said}; paused to measure the baseline again`));
  }
  const idleNote = idleJudged ? `; idle at ${fmtRate(rate)} requests/s` : '';
  return keep(speed, hits, 0, view('graded', speed, `${said}: ${describe(speed)}${idleNote}`));
}

/** Counters that went back, or histograms whose buckets changed: QEMU restarted, or someone reset them. */
function restarted(prev: LatencySample, s: LatencySample): boolean {
  if (OP_KINDS.some((k) => s.ops[k] < prev.ops[k] || s.ns[k] < prev.ns[k])) return true;
  for (const k of OP_KINDS) {
    const a = prev.hist?.[k];
    const b = s.hist?.[k];
    if (!a || !b) continue;
    if (a.bins.length !== b.bins.length || a.boundaries.some((x, i) => x !== b.boundaries[i]) || b.bins.some((x, i) => x < a.bins[i]!)) return true;
  }
  return false;
}

const fmtRate = (r: number): string => (r >= 100 ? Math.round(r).toString() : r.toFixed(1));

/** Half the speed; from the idle speed (unlimited), half what the copy made. */
function cut(speed: number, copiedBps: number): number {
  const next = (Number.isFinite(speed) ? speed : copiedBps) * CUT;
  return next < GRADED_MIN_BPS ? 0 : Math.round(next);
}

function describe(speed: number): string {
  return !Number.isFinite(speed) ? 'the idle speed' : speed > 0 ? formatSpeed(speed) : 'paused';
}

/** The view when a busy phase starts, before its first judgement. */
function viewOf(mem: LatencyMemory, last: LatencyView | null, c: LatencyContext): LatencyView {
  if (!last || last.phase === 'learning') return last ? { ...last, scope: 'busy' } : { phase: 'learning', speedBps: 0, latencyMs: null, baselineMs: null, margin: c.margin, scope: 'busy', statistic: 'mean', note: 'learning the baseline' };
  return { ...last, phase: 'graded', scope: 'busy', speedBps: mem.speed, note: `busy again: ${describe(mem.speed)} until the first judgement` };
}
