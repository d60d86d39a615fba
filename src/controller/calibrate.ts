/**
 * Per-guest calibration (`thresholds: auto`, issue 12): each guest's own background level of
 * the signals that servers keep up all day (disk requests, interrupts), learnt from what the
 * classifier sees, and a threshold just above it. Pure: the state is a value, updated per
 * sample, so that a policy reload keeps it (it lives outside the policy) and the agent can
 * save it and start from it again after a restart.
 *
 * What is learnt, per signal: every second, the highest windowed rate the classifier saw in
 * that second (what it compares with the threshold); kept for the last LEARN_SPAN_MS. Over
 * them, the background is the seconds at most BACKGROUND_SPREAD x their 10th percentile, and
 * not beside a second above that (a burst's edges): a steady trickle (10-30 requests/s) is
 * there whenever the guest is not busy, and busy bursts (hundreds or thousands a second)
 * stand far above it. The level is the background's 95th percentile, and
 * the threshold LEVEL_MARGIN x that level, never under the source design's value (a guest as
 * quiet as the test guest, whose background is 0, is moderated exactly as with the fixed
 * thresholds) and never over LEARN_CAP (a guest that keeps its disk working most of the time
 * is not idle at that level: that is work, not background, and the latency-driven speed is
 * what protects it). Nothing is learnt before LEARN_MIN_SECONDS of samples.
 *
 * The disk's requests are also learnt by kind (reads, writes, flushes, discards), each with
 * the disk's floor and cap, and with `disk: auto` a kind over its own threshold makes the
 * guest busy too. A background is a mix: a database's log is writes and flushes, and reads
 * are not part of it. Beside a full-speed copy a one-at-a-time guest's busy phase was held
 * to 40-52 requests/s, under the learnt 60/s of a trickle of 15 writes and 15 flushes a
 * second, for 2 s; its reads were over the reads' 5/s within 175 ms (bench/README.md).
 *
 * Keyboard and pointer input are never learnt: a person at the console comes first. Nor is
 * the vCPUs' stall, which the copy itself causes.
 */
import { fixedThresholds, LEARN_FLOOR, LEARNABLE, type LearnableSignal, type Moderation, type Signal } from '../policy/schema.ts';
import { formatRate } from '../policy/units.ts';
import { DISK_KINDS, type DiskKind } from './types.ts';

/** What is learnt: the learnable signals, and the disk's requests by kind. */
export type LearnKey = LearnableSignal | DiskKind;
export const LEARN_KEYS: readonly LearnKey[] = [...LEARNABLE, ...DISK_KINDS];
/** The signal whose floor and cap a key has: a kind of disk request has the disk's. */
const signalOf = (key: LearnKey): LearnableSignal => ((LEARNABLE as readonly string[]).includes(key) ? (key as LearnableSignal) : 'disk');

/** Above these a level is the guest's work, not its background. */
export const LEARN_CAP: Readonly<Record<LearnableSignal, number>> = { disk: 100, interrupts: 10_000 };
export const LEARN_SPAN_MS = 10 * 60_000;
export const LEARN_MIN_SECONDS = 60;
export const BACKGROUND_SPREAD = 4;
/** The background's base: a guest must be at its background at least this share of the time to have one learnt. */
export const BASE_PERCENTILE = 10;
export const LEVEL_MARGIN = 1.5;
/** How often the thresholds are recomputed from the seconds kept. */
export const RELEARN_MS = 5000;

export interface Learnt {
  /** The background level: the 95th percentile of the background seconds' peak windowed rate. */
  readonly level: number;
  /** The threshold in force: max(floor, min(cap, level x margin)), rounded. */
  readonly threshold: number;
}

export interface Calibration {
  /** Whole seconds (epoch s) and each learnable signal's (and disk kind's) highest windowed rate in it; oldest first. */
  readonly seconds: readonly { readonly s: number; readonly peak: Readonly<Partial<Record<LearnKey, number>>> }[];
  readonly learnt: Readonly<Partial<Record<LearnKey, Learnt>>>;
  /** When `learnt` was last computed (ms); 0 = never. */
  readonly learntAt: number;
}

export const EMPTY_CALIBRATION: Calibration = { seconds: [], learnt: {}, learntAt: 0 };

/** The nearest-rank `p`th percentile of sorted values (0 for none). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

/** Two significant digits: thresholds that move by a request now and then are not news. */
function round2(x: number): number {
  if (x <= 0) return 0;
  const p = 10 ** (Math.floor(Math.log10(x)) - 1);
  return Math.round(x / p) * p;
}

/** The threshold a learnt background level makes: LEVEL_MARGIN over it, within the signal's floor and cap. */
export function thresholdFor(key: LearnKey, level: number): number {
  const signal = signalOf(key);
  return round2(Math.max(LEARN_FLOOR[signal], Math.min(LEARN_CAP[signal], level * LEVEL_MARGIN)));
}

/** The level and threshold of one signal (or disk kind) from its per-second peaks; undefined before enough seconds. */
export function learnLevel(peaks: readonly number[], signal: LearnKey): Learnt | undefined {
  if (peaks.length < LEARN_MIN_SECONDS) return undefined;
  const sorted = [...peaks].sort((a, b) => a - b);
  const limit = BACKGROUND_SPREAD * percentile(sorted, BASE_PERCENTILE);
  // A second beside one above the limit holds the edge of a burst (its first or last
  // requests): not background, though it may be under the limit.
  const quiet = (i: number) => peaks[i]! <= limit;
  const background = peaks.filter((_, i) => quiet(i) && (i === 0 || quiet(i - 1)) && (i === peaks.length - 1 || quiet(i + 1))).sort((a, b) => a - b);
  const level = percentile(background, 95);
  return { level: round2(level), threshold: thresholdFor(signal, level) };
}

/**
 * One classified sample's windowed rates in; the calibration out. `time` in ms. Seconds older
 * than LEARN_SPAN_MS drop out; the thresholds are recomputed every RELEARN_MS.
 */
export function calibrate(c: Calibration, time: number, rates: Readonly<Partial<Record<LearnKey, number | null>>>): Calibration {
  const s = Math.floor(time / 1000);
  let seconds = c.seconds;
  const last = seconds.at(-1);
  const values = Object.fromEntries(LEARN_KEYS.flatMap((k) => (rates[k] == null ? [] : [[k, rates[k]!]]))) as Partial<Record<LearnKey, number>>;
  if (last && last.s === s) {
    const peak = { ...last.peak };
    for (const k of LEARN_KEYS) if (values[k] !== undefined) peak[k] = Math.max(peak[k] ?? 0, values[k]!);
    seconds = [...seconds.slice(0, -1), { s, peak }];
  } else if (!last || s > last.s) {
    const from = s - LEARN_SPAN_MS / 1000;
    seconds = [...(seconds[0] && seconds[0].s <= from ? seconds.filter((x) => x.s > from) : seconds), { s, peak: values }];
  }
  if (time - c.learntAt < RELEARN_MS) return { ...c, seconds };
  // The second in progress is not whole yet: learn from the finished ones.
  const whole = seconds.slice(0, -1);
  const learnt: Partial<Record<LearnKey, Learnt>> = {};
  for (const k of LEARN_KEYS) {
    const l = learnLevel(whole.flatMap((x) => (x.peak[k] === undefined ? [] : [x.peak[k]!])), k);
    if (l) learnt[k] = l;
  }
  return { seconds, learnt, learntAt: time };
}

/**
 * The thresholds in force: the policy's fixed ones, and for `auto` the learnt threshold, or
 * the source design's value while nothing is learnt yet (fixedThresholds).
 */
export function thresholdsInForce(
  policy: Moderation['thresholds'],
  c: Calibration,
): { thresholds: Record<Signal, number | null>; learnt: Signal[]; kinds: Partial<Record<DiskKind, Learnt>> } {
  const thresholds = fixedThresholds(policy);
  const learnt: Signal[] = [];
  for (const sig of LEARNABLE) {
    const l = c.learnt[sig];
    if (policy[sig] !== 'auto' || !l) continue;
    thresholds[sig] = l.threshold;
    learnt.push(sig);
  }
  // Each kind's threshold once the disk's own is learnt: until then the floor holds for the sum.
  const kinds: Partial<Record<DiskKind, Learnt>> = {};
  if (learnt.includes('disk')) for (const k of DISK_KINDS) if (c.learnt[k]) kinds[k] = c.learnt[k];
  return { thresholds, learnt, kinds };
}

/**
 * "disk level 32/s, busy above 48/s (or reads above 5/s, writes above 24/s, flushes above
 * 24/s, discards above 5/s), interrupts learning" for status and logs.
 */
export function describeCalibration(c: Calibration, signals: readonly LearnableSignal[]): string {
  return signals
    .map((sig) => {
      const l = c.learnt[sig];
      if (!l) return `${sig} learning (busy above ${formatRate(LEARN_FLOOR[sig])}/s until ${LEARN_MIN_SECONDS} s are seen)`;
      const kinds = sig === 'disk' ? DISK_KINDS.flatMap((k) => (c.learnt[k] ? [`${k} above ${formatRate(c.learnt[k].threshold)}/s`] : [])) : [];
      return `${sig} level ${formatRate(l.level)}/s, busy above ${formatRate(l.threshold)}/s${kinds.length ? ` (or ${kinds.join(', ')})` : ''}`;
    })
    .join(', ');
}
