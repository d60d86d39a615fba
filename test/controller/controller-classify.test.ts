/** Busy or idle from rates and thresholds, and the rates averaged over the window. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { classify, describeReasons } from '../../src/controller/classify.ts';
import { ratesFromSample } from '../../src/controller/adapt.ts';
import { EMPTY_WINDOW, pushSample, type RateWindow } from '../../src/controller/decide.ts';
import type { ActivityRates } from '../../src/controller/types.ts';
import { defaultPolicy } from '../../src/policy/index.ts';
import { fixedThresholds } from '../../src/policy/schema.ts';

const thresholds = fixedThresholds(defaultPolicy().thresholds); // disk 5, keyboard 0, pointer 100, interrupts 1000

function rates(r: Partial<ActivityRates> = {}): ActivityRates {
  return { time: 0, vm: 'vm1', diskPerS: 0, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf', ...r };
}

describe('classify', () => {
  test('a guest with every rate under its threshold is idle', () => {
    assert.deepEqual(classify(rates({ diskPerS: 4, keyPerS: 0, pointerPerS: 99, interruptsPerS: 999 }), thresholds), { state: 'idle', reasons: [] });
  });

  test('one key event in the window (4/s, a press alone) makes the guest busy: a person at the console', () => {
    assert.deepEqual(classify(rates({ keyPerS: 4 }), thresholds), { state: 'busy', reasons: [{ signal: 'keyboard', value: 4, threshold: 0 }] });
  });

  test('busy means strictly above: a rate equal to its threshold is still idle', () => {
    assert.equal(classify(rates({ diskPerS: 5 }), thresholds).state, 'idle');
    assert.equal(classify(rates({ diskPerS: 5.01 }), thresholds).state, 'busy');
  });

  test('the reason names which signal crossed which threshold, for every signal that did', () => {
    const c = classify(rates({ diskPerS: 37.5, pointerPerS: 250 }), thresholds);
    assert.deepEqual(c, {
      state: 'busy',
      reasons: [
        { signal: 'disk', value: 37.5, threshold: 5 },
        { signal: 'pointer', value: 250, threshold: 100 },
      ],
    });
    assert.equal(describeReasons(c.reasons), 'disk 37.5/s > 5/s, pointer 250/s > 100/s');
  });

  test('each signal alone makes the guest busy', () => {
    assert.equal(classify(rates({ keyPerS: 8 }), thresholds).reasons[0]!.signal, 'keyboard');
    assert.equal(classify(rates({ interruptsPerS: 2500 }), thresholds).reasons[0]!.signal, 'interrupts');
  });

  test('requests in flight for more of the window than the threshold make the guest busy by themselves, whatever their count', () => {
    // One read held 206 ms of the 250 ms window: 824 ms/s, with a single request counted.
    const held = classify(rates({ diskPerS: 4, inflightMsPerS: 824 }), thresholds);
    assert.deepEqual(held, { state: 'busy', reasons: [{ signal: 'inflight', value: 824, threshold: 600 }] });
    assert.equal(describeReasons(held.reasons), 'inflight 824ms/s > 600ms/s');
    assert.equal(classify(rates({ inflightMsPerS: 600 }), thresholds).state, 'idle');
    assert.equal(classify(rates({ inflightMsPerS: null }), thresholds).state, 'idle');
    assert.equal(classify(rates({ inflightMsPerS: 1000 }), { ...thresholds, inflight: null }).state, 'idle');
  });

  test('a per-interval time in flight becomes ms per second; a source without it leaves it out', () => {
    const base = { time: 1000, pid: 42, vm: 'vm1', intervalS: 0.05, source: 'ebpf' as const, diskReads: 1, diskWrites: 0, diskFlushes: 0, keyEvents: 0, pointerEvents: 0, interrupts: 0 };
    assert.equal(ratesFromSample({ ...base, diskBusyUs: 41_000 }, 'vm1').inflightMsPerS, 820);
    assert.equal(ratesFromSample({ ...base, diskBusyUs: null }, 'vm1').inflightMsPerS, null);
    assert.ok(!('inflightMsPerS' in ratesFromSample(base, 'vm1')));
  });

  test('unknown signals (degraded mode) never make the guest busy', () => {
    const degraded = rates({ source: 'qmp', keyPerS: null, pointerPerS: null, interruptsPerS: null });
    assert.deepEqual(classify(degraded, thresholds), { state: 'idle', reasons: [] });
    assert.equal(classify({ ...degraded, diskPerS: 6 }, thresholds).state, 'busy');
  });

  test('a signal switched off is ignored', () => {
    assert.equal(classify(rates({ interruptsPerS: 1e6 }), { ...thresholds, interrupts: null }).state, 'idle');
  });
});

describe('rates over the window', () => {
  /** Feeds 50 ms samples of disk rates, returns the windowed disk rate after each. */
  function windowed(diskPerS: number[], windowMs = 250, first = 50): number[] {
    let w: RateWindow = EMPTY_WINDOW;
    return diskPerS.map((d, i) => {
      const r = pushSample(w, rates({ time: first + 50 * i, diskPerS: d }), windowMs, 50);
      w = r.window;
      return r.rates.diskPerS;
    });
  }

  test('one stray request (20/s in its 50 ms sample) is 4/s over 250 ms: under the threshold of 5/s', () => {
    assert.deepEqual(windowed([0, 0, 20, 0]), [0, 0, 4, 4]);
  });

  test('two requests are 8/s: busy', () => {
    assert.deepEqual(windowed([40]), [8]);
    assert.deepEqual(windowed([20, 20]), [4, 8]);
  });

  test('a request leaves the window after 250 ms', () => {
    assert.deepEqual(windowed([20, 0, 0, 0, 0, 0, 0]), [4, 4, 4, 4, 4, 0, 0]);
  });

  test('a sample straddling the start of the window counts pro rata', () => {
    let w: RateWindow = EMPTY_WINDOW;
    w = pushSample(w, rates({ time: 100, intervalMs: 100, diskPerS: 40 }), 250, 50).window; // 4 requests in 0..100
    const r = pushSample(w, rates({ time: 300, intervalMs: 200, diskPerS: 0 }), 250, 50);
    // window 50..300: half of the first sample's 4 requests = 2 → 8/s
    assert.equal(r.rates.diskPerS, 8);
  });

  test('without intervalMs, a sample spans the time since the previous one (the first: sampling.interval)', () => {
    let w: RateWindow = EMPTY_WINDOW;
    const a = pushSample(w, rates({ time: 1000, diskPerS: 20 }), 250, 50); // 50 ms → 1 request
    assert.equal(a.rates.diskPerS, 4);
    w = a.window;
    const b = pushSample(w, rates({ time: 1100, diskPerS: 20 }), 250, 50); // 100 ms → 2 requests
    assert.equal(b.rates.diskPerS, 12);
  });

  test('the disk requests by kind are averaged over the window as their sum is', () => {
    let w: RateWindow = EMPTY_WINDOW;
    const kinds = (reads: number, writes: number) => ({ reads, writes, flushes: 0, discards: 0 });
    w = pushSample(w, rates({ time: 50, diskPerS: 20, diskKindsPerS: kinds(0, 20) }), 250, 50).window;
    const r = pushSample(w, rates({ time: 100, diskPerS: 60, diskKindsPerS: kinds(40, 20) }), 250, 50).rates;
    assert.equal(r.diskPerS, 16);
    assert.deepEqual(r.diskKindsPerS, kinds(8, 8));
  });

  test('a signal unknown now stays unknown; known ones are averaged', () => {
    const r = pushSample(EMPTY_WINDOW, rates({ time: 50, keyPerS: null, pointerPerS: 200 }), 250, 50);
    assert.equal(r.rates.keyPerS, null);
    assert.equal(r.rates.pointerPerS, 40);
  });
});

describe('ratesFromSample (from the observation streams)', () => {
  test('per-interval counts become rates over the measured interval; disk is every request kind', () => {
    const r = ratesFromSample(
      { time: 1000, pid: 42, vm: 'vm1', intervalS: 0.05, source: 'ebpf', diskReads: 1, diskWrites: 2, diskFlushes: 1, diskDiscards: 0, keyEvents: 2, pointerEvents: 0, interrupts: 10 },
      'vm1',
    );
    assert.deepEqual(r, {
      time: 1000,
      vm: 'vm1',
      pid: 42,
      intervalMs: 50,
      diskPerS: 80,
      diskKindsPerS: { reads: 20, writes: 40, flushes: 20, discards: 0 },
      keyPerS: 40,
      pointerPerS: 0,
      interruptsPerS: 200,
      source: 'ebpf',
    });
  });

  test('unknown stays unknown (degraded), and a VM without a name takes the one moderated', () => {
    const r = ratesFromSample(
      { time: 1000, pid: 42, vm: null, intervalS: 0.25, source: 'qmp', diskReads: 1, diskWrites: 0, diskFlushes: 0, keyEvents: null, pointerEvents: null, interrupts: null },
      'vm1',
    );
    assert.deepEqual(r, {
      time: 1000,
      vm: 'vm1',
      pid: 42,
      intervalMs: 250,
      diskPerS: 4,
      diskKindsPerS: { reads: 4, writes: 0, flushes: 0, discards: 0 },
      keyPerS: null,
      pointerPerS: null,
      interruptsPerS: null,
      source: 'qmp',
    });
  });
});
