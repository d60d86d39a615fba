/**
 * windowRates: per-VM rates (events per second) over a sliding window of samples.
 * The window is measured in sample time (each sample's `time`), not wall-clock time, so
 * the operator needs no scheduler and gives the same answer however late it runs. The
 * rate is sum(counts) / sum(intervalS) over the samples whose time lies in
 * (newest - windowMs, newest]: the measured time they cover, never a nominal one.
 * Emits one ActivityRates per incoming sample, for that sample's VM.
 */
import { Observable, type OperatorFunction } from 'rxjs';
import { COUNTER_KEYS } from '../probes/counters.ts';
import type { ActivityRates, ActivitySample, Counts } from './types.ts';

export function windowRates(windowMs: number): OperatorFunction<ActivitySample, ActivityRates> {
  if (!(windowMs > 0)) throw new RangeError(`windowRates: windowMs must be > 0 (got ${windowMs})`);
  return (source) =>
    new Observable<ActivityRates>((subscriber) => {
      const windows = new Map<number, ActivitySample[]>();
      return source.subscribe({
        next: (s) => {
          const win = (windows.get(s.pid) ?? []).filter((w) => w.time > s.time - windowMs && w.time <= s.time);
          win.push(s);
          windows.set(s.pid, win);
          subscriber.next(ratesOf(win));
        },
        error: (err) => subscriber.error(err),
        complete: () => subscriber.complete(),
      });
    });
}

/** Rates over a non-empty list of one VM's samples; the newest (last) names the result. */
export function ratesOf(samples: readonly ActivitySample[]): ActivityRates {
  const last = samples[samples.length - 1]!;
  const windowS = samples.reduce((t, s) => t + s.intervalS, 0);
  const perSecond = {} as Counts;
  for (const k of COUNTER_KEYS) {
    let sum: number | null = 0;
    for (const s of samples) {
      const v = s[k];
      sum = v === null || sum === null ? null : sum + v;
    }
    perSecond[k] = sum === null || windowS <= 0 ? null : sum / windowS;
  }
  return { time: last.time, pid: last.pid, vm: last.vm, windowS, source: last.source, perSecond };
}
