/**
 * Marble specs of the pure stream operators: totalsToSamples, windowRates, pollEvery.
 * Each covers the normal case, an empty source, an error, and unsubscription.
 */
import { deepStrictEqual, equal, throws } from 'node:assert/strict';
import { describe, it } from 'node:test';
import { zeroCounts, type CounterKey, type Totals } from '../../src/probes/counters.ts';
import { pollEvery } from '../../src/streams/poll.ts';
import { ratesOf, windowRates } from '../../src/streams/rates.ts';
import { totalsToSamples } from '../../src/streams/samples.ts';
import type { ActivitySample, SampleTarget, TotalsEvent } from '../../src/streams/types.ts';
import { testScheduler } from './marbles.ts';

const ALL = new Set<CounterKey>(['diskReads', 'diskWrites', 'diskFlushes', 'diskDiscards', 'keyEvents', 'pointerEvents', 'interrupts', 'vcpuWaitUs', 'diskBusyUs']);
const DISK = new Set<CounterKey>(['diskReads', 'diskWrites', 'diskFlushes', 'diskDiscards']);
const vmA: SampleTarget = { pid: 10, vm: 'a', measured: ALL };
const vmB: SampleTarget = { pid: 20, vm: 'b', measured: ALL };

function report(run: string, monoMs: number, totals: Record<number, Totals>, targets = [vmA, vmB], final = false): TotalsEvent {
  return {
    type: 'totals', run, monoMs, epochMs: 1_000_000 + monoMs, final, source: 'ebpf', scope: 'all',
    totals: new Map(Object.entries(totals).map(([pid, t]) => [Number(pid), t])), targets,
  };
}

function sample(pid: number, vm: string, monoMs: number, intervalS: number, counts: Partial<ActivitySample> = {}, final = false): ActivitySample {
  return { time: 1_000_000 + monoMs, pid, vm, intervalS, source: 'ebpf', final, ...zeroCounts(), ...counts };
}

describe('totalsToSamples', () => {
  it('turns running totals into per-interval counts over the measured interval, one sample per target VM', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      const src = cold<TotalsEvent>('b---r-----(s|)', {
        b: { type: 'baseline', run: 'ebpf:1', monoMs: 100 },
        r: report('ebpf:1', 150, { 10: { diskReads: 5, keyEvents: 2 } }),
        s: report('ebpf:1', 230, { 10: { diskReads: 12, keyEvents: 2 }, 20: { interrupts: 9 } }, [vmA, vmB], true),
      });
      expectObservable(src.pipe(totalsToSamples())).toBe('----(ab)--(cd|)', {
        a: sample(10, 'a', 150, 0.05, { diskReads: 5, keyEvents: 2 }),
        b: sample(20, 'b', 150, 0.05),
        c: sample(10, 'a', 230, 0.08, { diskReads: 7 }, true),
        d: sample(20, 'b', 230, 0.08, { interrupts: 9 }, true),
      });
    });
  });

  it('starts a VM discovered mid-run from the previous report, not from the baseline', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      const src = cold<TotalsEvent>('b---r-----(s|)', {
        b: { type: 'baseline', run: 'ebpf:1', monoMs: 0 },
        // pid 20 already had 40 events but was not a target yet
        r: report('ebpf:1', 100, { 20: { diskWrites: 40 } }, [vmA]),
        s: report('ebpf:1', 200, { 20: { diskWrites: 43 } }, [vmA, vmB]),
      });
      expectObservable(src.pipe(totalsToSamples())).toBe('----a-----(bc|)', {
        a: sample(10, 'a', 100, 0.1),
        b: sample(10, 'a', 200, 0.1),
        c: sample(20, 'b', 200, 0.1, { diskWrites: 3 }),
      });
    });
  });

  it('starts over from zero when bpftrace restarts (a new run)', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      const src = cold<TotalsEvent>('b-r-B-s|', {
        b: { type: 'baseline', run: 'ebpf:1', monoMs: 0 },
        r: report('ebpf:1', 100, { 10: { diskReads: 50 } }, [vmA]),
        B: { type: 'baseline', run: 'ebpf:2', monoMs: 500 },
        s: report('ebpf:2', 600, { 10: { diskReads: 4 } }, [vmA]),
      });
      expectObservable(src.pipe(totalsToSamples())).toBe('--a---b|', {
        a: sample(10, 'a', 100, 0.1, { diskReads: 50 }),
        b: sample(10, 'a', 600, 0.1, { diskReads: 4 }),
      });
    });
  });

  it('reports counters the source does not measure as null, and takes a QMP VM\'s first reading as its baseline', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      const qmp = (monoMs: number, reads: number): TotalsEvent => ({
        type: 'totals', run: 'qmp:10/1', monoMs, epochMs: 1_000_000 + monoMs, final: false, source: 'qmp', scope: 'listed',
        totals: new Map([[10, { diskReads: reads, diskWrites: 0, diskFlushes: 0, diskDiscards: 0 }]]),
        targets: [{ pid: 10, vm: 'a', measured: DISK }],
      });
      const src = cold<TotalsEvent>('x-y|', { x: qmp(1000, 700), y: qmp(1250, 760) });
      expectObservable(src.pipe(totalsToSamples())).toBe('--a|', {
        a: { ...sample(10, 'a', 1250, 0.25, { diskReads: 60 }), source: 'qmp', keyEvents: null, pointerEvents: null, interrupts: null, vcpuWaitUs: null, diskBusyUs: null },
      });
    });
  });

  it('emits nothing for an empty source, and passes errors and unsubscription through', () => {
    testScheduler().run(({ cold, expectObservable, expectSubscriptions }) => {
      expectObservable(cold<TotalsEvent>('|').pipe(totalsToSamples())).toBe('|');
      const failing = cold<TotalsEvent>('--#', undefined, new Error('bpftrace gone'));
      expectObservable(failing.pipe(totalsToSamples())).toBe('--#', undefined, new Error('bpftrace gone'));
      const endless = cold<TotalsEvent>('b--r--r--', {
        b: { type: 'baseline', run: 'ebpf:1', monoMs: 0 },
        r: report('ebpf:1', 100, {}, [vmA]),
      });
      expectObservable(endless.pipe(totalsToSamples()), '^----!').toBe('---a-', { a: sample(10, 'a', 100, 0.1) });
      expectSubscriptions(endless.subscriptions).toBe('^----!');
    });
  });
});

describe('windowRates', () => {
  const s = (pid: number, time: number, intervalS: number, diskReads: number | null) =>
    ({ ...sample(pid, `vm${pid}`, 0, intervalS, { diskReads }), time });

  it('gives per-second rates over the samples of the last windowMs, per VM', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      const src = cold('abcd|', {
        a: s(1, 1000, 0.5, 10),
        b: s(1, 1500, 0.5, 30),
        c: s(2, 1500, 1, 7),
        d: s(1, 2000, 0.5, 0), // a (time 1000) leaves the 1000 ms window
      });
      const rates = src.pipe(windowRates(1000));
      const r = (time: number, pid: number, windowS: number, diskReads: number) => ({
        time, pid, vm: `vm${pid}`, windowS, source: 'ebpf',
        perSecond: { ...zeroCounts(), diskReads },
      });
      expectObservable(rates).toBe('abcd|', {
        a: r(1000, 1, 0.5, 20),
        b: r(1500, 1, 1, 40),
        c: r(1500, 2, 1, 7),
        d: r(2000, 1, 1, 30),
      });
    });
  });

  it('is null where a sample in the window is unknown', () => {
    const r = ratesOf([s(1, 1000, 0.5, 10), s(1, 1500, 0.5, null)]);
    equal(r.perSecond.diskReads, null);
    equal(r.perSecond.diskWrites, 0);
  });

  it('completes empty, errors through, and unsubscribes its source', () => {
    testScheduler().run(({ cold, expectObservable, expectSubscriptions }) => {
      expectObservable(cold<ActivitySample>('---|').pipe(windowRates(1000))).toBe('---|');
      expectObservable(cold<ActivitySample>('-#').pipe(windowRates(1000))).toBe('-#');
      const src = cold('a---a', { a: s(1, 1000, 1, 1) });
      expectObservable(src.pipe(windowRates(1000)), '^--!').toBe('a--', { a: { time: 1000, pid: 1, vm: 'vm1', windowS: 1, source: 'ebpf', perSecond: { ...zeroCounts(), diskReads: 1 } } });
      expectSubscriptions(src.subscriptions).toBe('^--!');
    });
  });

  it('rejects a window that is not positive', () => {
    throws(() => windowRates(0), RangeError);
  });
});

describe('pollEvery', () => {
  it('reads at once and then every period, skipping ticks while a read is still running', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      let n = 0;
      // each read takes 3 frames; period 2: the tick at 2 is skipped, 4 is taken
      const read = () => cold('---(x|)', { x: ++n });
      expectObservable(pollEvery(2, read), '^--------!').toBe('---a---b-', { a: 1, b: 2 });
    });
  });

  it('errors when a read errors, and emits nothing when reads are empty', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      expectObservable(pollEvery(5, () => cold('-#', undefined, new Error('qmp gone')))).toBe('-#', undefined, new Error('qmp gone'));
      expectObservable(pollEvery(5, () => cold('|')), '^---------!').toBe('');
    });
  });

  it('stops reading when unsubscribed', () => {
    testScheduler().run(({ cold, expectObservable, flush }) => {
      const reads: number[] = [];
      const read = () => cold('(x|)', { x: reads.push(reads.length) });
      expectObservable(pollEvery(3, read), '^-----!').toBe('a--b--', { a: 1, b: 2 });
      flush();
      deepStrictEqual(reads, [0, 1]);
    });
  });
});
