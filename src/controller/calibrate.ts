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
 * Keyboard and pointer input are never learnt: a person at the console comes first. Nor is
 * the vCPUs' stall, which the copy itself causes.
 */
import { fixedThresholds, LEARN_FLOOR, LEARNABLE, type LearnableSignal, type Moderation, type Signal } from '../policy/schema.ts';
import { formatRate } from '../policy/units.ts';

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
  /** Whole seconds (epoch s) and each learnable signal's highest windowed rate in it; oldest first. */
  readonly seconds: readonly { readonly s: number; readonly peak: Readonly<Partial<Record<LearnableSignal, number>>> }[];
  readonly learnt: Readonly<Partial<Record<LearnableSignal, Learnt>>>;
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
export function thresholdFor(signal: LearnableSignal, level: number): number {
  return round2(Math.max(LEARN_FLOOR[signal], Math.min(LEARN_CAP[signal], level * LEVEL_MARGIN)));
}

/** The level and threshold of one signal from its per-second peaks; undefined before enough seconds. */
export function learnLevel(peaks: readonly number[], signal: LearnableSignal): Learnt | undefined {
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
export function calibrate(c: Calibration, time: number, rates: Readonly<Partial<Record<LearnableSignal, number | null>>>): Calibration {
  const s = Math.floor(time / 1000);
  let seconds = c.seconds;
  const last = seconds.at(-1);
  const values = Object.fromEntries(LEARNABLE.flatMap((sig) => (rates[sig] == null ? [] : [[sig, rates[sig]!]]))) as Partial<Record<LearnableSignal, number>>;
  if (last && last.s === s) {
    const peak = { ...last.peak };
    for (const sig of LEARNABLE) if (values[sig] !== undefined) peak[sig] = Math.max(peak[sig] ?? 0, values[sig]!);
    seconds = [...seconds.slice(0, -1), { s, peak }];
  } else if (!last || s > last.s) {
    const from = s - LEARN_SPAN_MS / 1000;
    seconds = [...(seconds[0] && seconds[0].s <= from ? seconds.filter((x) => x.s > from) : seconds), { s, peak: values }];
  }
  if (time - c.learntAt < RELEARN_MS) return { ...c, seconds };
  // The second in progress is not whole yet: learn from the finished ones.
  const whole = seconds.slice(0, -1);
  const learnt: Partial<Record<LearnableSignal, Learnt>> = {};
  for (const sig of LEARNABLE) {
    const l = learnLevel(whole.flatMap((x) => (x.peak[sig] === undefined ? [] : [x.peak[sig]!])), sig);
    if (l) learnt[sig] = l;
  }
  return { seconds, learnt, learntAt: time };
}

/**
 * The thresholds in force: the policy's fixed ones, and for `auto` the learnt threshold, or
 * the source design's value while nothing is learnt yet (fixedThresholds).
 */
export function thresholdsInForce(policy: Moderation['thresholds'], c: Calibration): { thresholds: Record<Signal, number | null>; learnt: Signal[] } {
  const thresholds = fixedThresholds(policy);
  const learnt: Signal[] = [];
  for (const sig of LEARNABLE) {
    const l = c.learnt[sig];
    if (policy[sig] !== 'auto' || !l) continue;
    thresholds[sig] = l.threshold;
    learnt.push(sig);
  }
  return { thresholds, learnt };
}

/** "disk level 18/s, busy above 27/s, interrupts learning" for status and logs. */
export function describeCalibration(c: Calibration, signals: readonly LearnableSignal[]): string {
  return signals
    .map((sig) => {
      const l = c.learnt[sig];
      return l ? `${sig} level ${formatRate(l.level)}/s, busy above ${formatRate(l.threshold)}/s` : `${sig} learning (busy above ${formatRate(LEARN_FLOOR[sig])}/s until ${LEARN_MIN_SECONDS} s are seen)`;
    })
    .join(', ');
}
