/**
 * totalsToSamples: running totals in, per-interval samples out (one per target VM per
 * reading). Differences of running totals are exact whatever the sampling jitter or a
 * dropped report; the interval is the measured time between the two readings, never the
 * nominal one. Pure: no clock, no I/O; state lives per subscription.
 */
import { Observable, type OperatorFunction } from 'rxjs';
import { COUNTER_KEYS, type Totals } from '../probes/counters.ts';
import type { ActivitySample, TotalsEvent } from './types.ts';

interface Reading {
  monoMs: number;
  totals: Totals;
}

interface RunState {
  /** Time of the last 'all'-scope reading (or the baseline): the start of a new pid's interval. */
  lastMono?: number;
  /** Started by a baseline event (a bpftrace run). */
  fromBaseline: boolean;
  perPid: Map<number, Reading>;
}

/**
 * The state of one live bpftrace run (a new baseline drops the old one), and of one QMP
 * run per QEMU process seen (a few numbers each; kept for the subscription's lifetime).
 */
export class SampleAccumulator {
  private readonly runs = new Map<string, RunState>();

  push(event: TotalsEvent): ActivitySample[] {
    if (event.type === 'baseline') {
      // A new bpftrace run: its totals start from zero, and the earlier run is over.
      for (const [run, st] of this.runs) if (st.fromBaseline) this.runs.delete(run);
      this.runs.set(event.run, { lastMono: event.monoMs, perPid: new Map(), fromBaseline: true });
      return [];
    }
    let state = this.runs.get(event.run);
    if (!state) {
      state = { perPid: new Map(), fromBaseline: false };
      this.runs.set(event.run, state);
    }
    const samples: ActivitySample[] = [];
    for (const t of event.targets) {
      const cur = event.totals.get(t.pid) ?? (event.scope === 'all' ? {} : undefined);
      if (!cur) continue;
      const prev = state.perPid.get(t.pid) ?? (state.lastMono !== undefined ? { monoMs: state.lastMono, totals: {} } : undefined);
      if (event.scope === 'listed') state.perPid.set(t.pid, { monoMs: event.monoMs, totals: cur });
      if (!prev || event.monoMs <= prev.monoMs) continue;
      const sample = {
        time: event.epochMs,
        pid: t.pid,
        vm: t.vm,
        intervalS: (event.monoMs - prev.monoMs) / 1000,
        source: event.source,
        final: event.final,
      } as ActivitySample;
      for (const k of COUNTER_KEYS) {
        if (!t.measured.has(k)) {
          sample[k] = null;
          continue;
        }
        const now = cur[k] ?? 0;
        const before = prev.totals[k] ?? 0;
        // Running totals only grow; a smaller one means the counter restarted from zero.
        sample[k] = now >= before ? now - before : now;
      }
      samples.push(sample);
    }
    if (event.scope === 'all') {
      // Every process's totals, targets or not: a VM discovered later starts from here.
      state.perPid = new Map([...event.totals].map(([pid, totals]) => [pid, { monoMs: event.monoMs, totals }]));
      state.lastMono = event.monoMs;
    }
    return samples;
  }
}

export function totalsToSamples(): OperatorFunction<TotalsEvent, ActivitySample> {
  return (source) =>
    new Observable<ActivitySample>((subscriber) => {
      const acc = new SampleAccumulator();
      return source.subscribe({
        next: (e) => {
          for (const s of acc.push(e)) subscriber.next(s);
        },
        error: (err) => subscriber.error(err),
        complete: () => subscriber.complete(),
      });
    });
}
