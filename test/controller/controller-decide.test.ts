/**
 * The decision operators in virtual time (rxjs TestScheduler, 1 frame = 1 ms): hold-off,
 * staleness, the guarantee, and the whole pipeline's reaction to a simulated guest sampled
 * every 50 ms.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BehaviorSubject, interval, map, of, takeUntil, timer, type Observable } from 'rxjs';
import { TestScheduler } from 'rxjs/testing';
import {
  classifyActivity,
  decide,
  desiredDecision,
  guarantee,
  guaranteeStep,
  holdOff,
  INITIAL_GUARANTEE,
  INITIAL_PUSH,
  pushStep,
  NO_GUARANTEE,
  staleAfter,
  type GuaranteeMemory,
} from '../../src/controller/decide.ts';
import type { ActivityRates, Classified, Decision, StateChange } from '../../src/controller/types.ts';
import { defaultPolicy, resolvePolicy, type EffectivePolicy, type Moderation } from '../../src/policy/index.ts';

const MiB = 1024 * 1024;
const P: EffectivePolicy = resolvePolicy(defaultPolicy(), 'vm1'); // hold-off 1 s, window 250 ms
const withPolicy = (over: Partial<EffectivePolicy>): EffectivePolicy => ({ ...P, ...over });

function scheduler(): TestScheduler {
  return new TestScheduler((actual, expected) => assert.deepEqual(actual, expected));
}

const busy: Classified = { time: 0, state: 'busy', reasons: [{ signal: 'disk', value: 37.5, threshold: 5 }] };
const idle: Classified = { time: 0, state: 'idle', reasons: [] };
const stalled: Classified = { time: 0, state: 'busy', reasons: [{ signal: 'stall', value: 900, threshold: 800 }] };

const S = {
  I: { state: 'idle', reason: 'quiet' },
  B: { state: 'busy', reason: 'disk 37.5/s > 5/s' },
  H: { state: 'holdoff', reason: 'quiet; hold-off 1s after disk 37.5/s > 5/s' },
  Q: { state: 'idle', reason: 'quiet for 1s' },
} satisfies Record<string, StateChange>;

describe('holdOff', () => {
  test('busy at once; when quiet, hold-off, then idle after the hold-off', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const src = cold('i 99ms b 99ms i 99ms i', { b: busy, i: idle });
      expectObservable(src.pipe(holdOff(of(P), ts))).toBe('I 99ms B 99ms H 999ms Q', S);
    });
  });

  test('a busy sample during the hold-off cancels it', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const src = cold('b 99ms i 499ms b', { b: busy, i: idle });
      expectObservable(src.pipe(holdOff(of(P), ts))).toBe('B 99ms H 499ms B', S);
    });
  });

  test('uses the hold-off of the policy in force', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const src = cold('b 99ms i', { b: busy, i: idle });
      const h = { state: 'holdoff', reason: 'quiet; hold-off 250ms after disk 37.5/s > 5/s' };
      expectObservable(src.pipe(holdOff(of(withPolicy({ holdoff: 250 })), ts))).toBe('B 99ms h 249ms q', {
        ...S,
        h,
        q: { state: 'idle', reason: 'quiet for 250ms' },
      });
      expectObservable(src.pipe(holdOff(of(withPolicy({ holdoff: 0 })), ts))).toBe('B 99ms q', { ...S, q: { state: 'idle', reason: 'quiet for 0ms' } });
    });
  });

  test('a busy spell that only the stall made is held off for one window, and urgent', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const src = cold('s 99ms i', { s: stalled, i: idle });
      expectObservable(src.pipe(holdOff(of(P), ts))).toBe('T 99ms t 249ms q', {
        T: { state: 'busy', reason: 'stall 900ms/s > 800ms/s', urgent: true },
        t: { state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', urgent: true, held: true },
        q: { state: 'idle', reason: 'quiet for 250ms' },
      });
    });
  });

  test('requests held in flight are a held signal like the stall: alone, or with the stall, one window and urgent; the disk working after them, the full hold-off', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const waiting: Classified = { time: 0, state: 'busy', reasons: [{ signal: 'inflight', value: 820, threshold: 600 }] };
      const both: Classified = { time: 0, state: 'busy', reasons: [...waiting.reasons, ...stalled.reasons] };
      const W = { state: 'busy', reason: 'inflight 820ms/s > 600ms/s', urgent: true };
      expectObservable(cold('w 99ms i', { w: waiting, i: idle }).pipe(holdOff(of(P), ts))).toBe('W 99ms w 249ms q', {
        W,
        w: { state: 'holdoff', reason: 'quiet; hold-off 250ms after inflight 820ms/s > 600ms/s', urgent: true, held: true },
        q: { state: 'idle', reason: 'quiet for 250ms' },
      });
      expectObservable(cold('x 99ms i', { x: both, i: idle }).pipe(holdOff(of(P), ts))).toBe('X 99ms x 249ms q', {
        X: { state: 'busy', reason: 'inflight 820ms/s > 600ms/s, stall 900ms/s > 800ms/s', urgent: true },
        x: { state: 'holdoff', reason: 'quiet; hold-off 250ms after inflight 820ms/s > 600ms/s, stall 900ms/s > 800ms/s', urgent: true, held: true },
        q: { state: 'idle', reason: 'quiet for 250ms' },
      });
      // the busy phase's first read held up by the copy, then the guest's reads once it pauses: work
      expectObservable(cold('w 49ms b 599ms i', { w: waiting, b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe('W 49ms U 599ms h 999ms Q', {
        ...S,
        W,
        U: { state: 'busy', reason: 'disk 37.5/s > 5/s; hold-off 1s after inflight 820ms/s > 600ms/s', urgent: true },
        h: { state: 'holdoff', reason: 'quiet; hold-off 1s after inflight 820ms/s > 600ms/s', urgent: true },
      });
    });
  });

  test('a stall with the disk busy in the same spell, before or during its short hold-off, gets the full hold-off; the next stall-only spell the short one again', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const both: Classified = { time: 0, state: 'busy', reasons: [{ signal: 'disk', value: 37.5, threshold: 5 }, stalled.reasons[0]!] };
      const T = { state: 'busy', reason: 'stall 900ms/s > 800ms/s', urgent: true };
      const t = { state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', urgent: true, held: true };
      const q = { state: 'idle', reason: 'quiet for 250ms' };
      // disk and stall at once, then quiet: the full hold-off
      expectObservable(cold('d 99ms i', { d: both, i: idle }).pipe(holdOff(of(P), ts))).toBe('D 99ms H 999ms Q', {
        ...S,
        D: { state: 'busy', reason: 'disk 37.5/s > 5/s, stall 900ms/s > 800ms/s', urgent: true },
        H: { state: 'holdoff', reason: 'quiet; hold-off 1s after disk 37.5/s > 5/s, stall 900ms/s > 800ms/s', urgent: true },
      });
      // the disk busy during the stall's short hold-off: its own quiet gets the full one;
      // once idle, a stall alone is held off for one window again
      // (the stall stays urgent for the hold-off after it, as input does)
      expectObservable(cold('s 99ms i 99ms b 1099ms i 1099ms s 99ms i', { s: stalled, b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe(
        'T 99ms t 99ms U 999ms B 99ms H 999ms Q 99ms T 99ms t 249ms q',
        { ...S, T, t, q, U: { state: 'busy', reason: 'disk 37.5/s > 5/s; hold-off 1s after stall 900ms/s > 800ms/s', urgent: true } },
      );
    });
  });

  test("the disk busy for at most two windows after a stall began the spell is the stall's catch-up: one window's hold-off, and the guest was held; longer is work: the full one", () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const T = { state: 'busy', reason: 'stall 900ms/s > 800ms/s', urgent: true };
      const U = { state: 'busy', reason: 'disk 37.5/s > 5/s; hold-off 1s after stall 900ms/s > 800ms/s', urgent: true };
      // the requests the frozen guest could not submit, over its threshold for 200 ms once the copy paused
      expectObservable(cold('s 49ms b 199ms i', { s: stalled, b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe('T 49ms U 199ms h 249ms q', {
        T,
        U,
        h: { state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', urgent: true, held: true },
        q: { state: 'idle', reason: 'quiet for 250ms' },
      });
      // a guest that works once the copy paused: 600 ms of it
      expectObservable(cold('s 49ms b 599ms i', { s: stalled, b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe('T 49ms U 599ms h 999ms Q', {
        ...S,
        T,
        U,
        h: { state: 'holdoff', reason: 'quiet; hold-off 1s after stall 900ms/s > 800ms/s', urgent: true },
      });
    });
  });

  test('a held spell in which the guest submitted no disk request, from its first busy sample to its end, is marked heldIdle; one request in it, or counts not known, is not', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const T = { state: 'busy', reason: 'stall 900ms/s > 800ms/s', urgent: true };
      const t = { state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', urgent: true, held: true };
      const q = { state: 'idle', reason: 'quiet for 250ms' };
      const none = { s: { ...stalled, diskPerS: 0 }, i: { ...idle, diskPerS: 0 }, r: { ...idle, diskPerS: 20 } };
      // an idle guest whose vCPU waited: no request before the spell's end
      expectObservable(cold('s 49ms s 49ms i', none).pipe(holdOff(of(P), ts))).toBe('T 99ms t 249ms q', { T, t: { ...t, heldIdle: true }, q });
      // a request before the spell began is not in it
      expectObservable(cold('r 49ms s 49ms i', none).pipe(holdOff(of(P), ts))).toBe('I 49ms T 49ms t 249ms q', { ...S, T, t: { ...t, heldIdle: true }, q });
      // a trickling guest's write released as the spell ends: it did something
      expectObservable(cold('s 49ms s 49ms r', none).pipe(holdOff(of(P), ts))).toBe('T 99ms t 249ms q', { T, t, q });
      // counts not known (no diskPerS): taken as some, as before
      expectObservable(cold('s 99ms i', { s: stalled, i: idle }).pipe(holdOff(of(P), ts))).toBe('T 99ms t 249ms q', { T, t, q });
      // the next spell starts afresh: a request in the first does not count for the second
      expectObservable(cold('s 49ms r 399ms s 49ms i', none).pipe(holdOff(of(P), ts))).toBe('T 49ms t 249ms q 149ms T 49ms u 249ms q', {
        T, t, q, u: { ...t, heldIdle: true },
      });
    });
  });

  test('once idle, a busy disk is not held for the input or stall of an earlier spell', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const key: Classified = { time: 0, state: 'busy', reasons: [{ signal: 'keyboard', value: 8, threshold: 5 }] };
      expectObservable(cold('k 99ms i 1099ms b', { k: key, b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe('K 99ms h 999ms Q 99ms B', {
        ...S,
        K: { state: 'busy', reason: 'keyboard 8/s > 5/s', urgent: true },
        h: { state: 'holdoff', reason: 'quiet; hold-off 1s after keyboard 8/s > 5/s', urgent: true },
      });
    });
  });

  test('empty in, empty out', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      expectObservable(cold<Classified>('|').pipe(holdOff(of(P), ts))).toBe('|');
    });
  });

  test('a source that completes during the hold-off still ends idle, then completes', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      expectObservable(cold('b 99ms i|', { b: busy, i: idle }).pipe(holdOff(of(P), ts))).toBe('B 99ms H 999ms (Q|)', S);
    });
  });

  test('an error passes through', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      expectObservable(cold('b 99ms #', { b: busy }, new Error('probe died')).pipe(holdOff(of(P), ts))).toBe('B 99ms #', S, new Error('probe died'));
    });
  });

  test('unsubscribing during the hold-off cancels its timer and the source', () => {
    const ts = scheduler();
    ts.run(({ hot, expectObservable, expectSubscriptions }) => {
      const src = hot('b 99ms i', { b: busy, i: idle });
      expectObservable(src.pipe(holdOff(of(P), ts)), '^ 500ms !').toBe('B 99ms H', S);
      expectSubscriptions(src.subscriptions).toBe('^ 500ms !');
    });
  });
});

describe('staleAfter', () => {
  const stale: Classified = { time: 2000, state: 'idle', reasons: [], note: 'no activity data for 2s' };

  test('busy with no sample after it for 2 s turns idle: unknown activity never holds the job', () => {
    const ts = scheduler();
    ts.run(({ hot, expectObservable }) => {
      expectObservable(hot('b', { b: busy }).pipe(staleAfter(2000, ts))).toBe('b 1999ms s', { b: busy, s: stale });
    });
  });

  test('samples that keep coming keep it busy; idle samples are passed on', () => {
    const ts = scheduler();
    ts.run(({ hot, expectObservable }) => {
      expectObservable(hot('b 999ms b 999ms i', { b: busy, i: idle }).pipe(staleAfter(2000, ts))).toBe('b 999ms b 999ms i', { b: busy, i: idle });
    });
  });

  test('empty, error and unsubscribe', () => {
    const ts = scheduler();
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      expectObservable(cold<Classified>('|').pipe(staleAfter(2000, ts))).toBe('|');
      expectObservable(cold<Classified>('#').pipe(staleAfter(2000, ts))).toBe('#');
      const src = hot('b', { b: busy });
      expectObservable(src.pipe(staleAfter(2000, ts)), '^ 1000ms !').toBe('b', { b: busy });
      expectSubscriptions(src.subscriptions).toBe('^ 1000ms !');
    });
  });
});

describe('classifyActivity', () => {
  const sample = (time: number, diskPerS: number): ActivityRates => ({ time, vm: 'vm1', diskPerS, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' });

  test("each sample is classified from the window's rates with the policy's thresholds", () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      // samples at 50, 100, 150 ms: one request, one more, then nothing
      const src = cold('50ms a 49ms b 49ms c', { a: sample(50, 20), b: sample(100, 20), c: sample(150, 0) });
      expectObservable(src.pipe(classifyActivity(of(P)))).toBe('50ms a 49ms b 49ms c', {
        // diskPerS: the sample's own rate, not the window's (holdOff asks whether a held guest did anything)
        a: { time: 50, state: 'idle', reasons: [], diskPerS: 20 },
        b: { time: 100, state: 'busy', reasons: [{ signal: 'disk', value: 8, threshold: 5 }], diskPerS: 20 },
        c: { time: 150, state: 'busy', reasons: [{ signal: 'disk', value: 8, threshold: 5 }], diskPerS: 0 },
      });
    });
  });

  test('empty, error and unsubscribe', () => {
    const ts = scheduler();
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      expectObservable(cold<ActivityRates>('|').pipe(classifyActivity(of(P)))).toBe('|');
      expectObservable(cold<ActivityRates>('#').pipe(classifyActivity(of(P)))).toBe('#');
      const src = hot('a 99ms a', { a: sample(0, 0) });
      expectObservable(src.pipe(classifyActivity(of(P))), '^ 50ms !').toBe('a', { a: { time: 0, state: 'idle', reasons: [], diskPerS: 0 } });
      expectSubscriptions(src.subscriptions).toBe('^ 50ms !');
    });
  });
});

describe('desiredDecision', () => {
  const st = (state: StateChange['state'], reason = 'r'): StateChange => ({ state, reason });

  test('idle runs at the idle speed; busy and hold-off at the busy speed', () => {
    assert.deepEqual(desiredDecision(st('idle', 'quiet'), P, NO_GUARANTEE), { mode: 'full', speed: 0, state: 'idle', reason: 'quiet' });
    assert.deepEqual(desiredDecision(st('busy'), P, NO_GUARANTEE), { mode: 'paused', speed: 0, state: 'busy', reason: 'r' });
    assert.deepEqual(desiredDecision(st('holdoff'), P, NO_GUARANTEE), { mode: 'paused', speed: 0, state: 'holdoff', reason: 'r' });
    const limited = withPolicy({ speed: { ...P.speed, idle: 200 * MiB, busy: 20 * MiB } });
    assert.deepEqual(desiredDecision(st('idle'), limited, NO_GUARANTEE), { mode: 'throttled', speed: 200 * MiB, state: 'idle', reason: 'r' });
    assert.deepEqual(desiredDecision(st('busy'), limited, NO_GUARANTEE), { mode: 'throttled', speed: 20 * MiB, state: 'busy', reason: 'r' });
  });

  test('the hold-off after a held spell is marked held, and heldIdle when the guest did nothing in it', () => {
    const t: StateChange = { state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', urgent: true, held: true };
    assert.deepEqual(desiredDecision(t, P, NO_GUARANTEE), { mode: 'paused', speed: 0, state: 'holdoff', reason: t.reason, held: true });
    assert.deepEqual(desiredDecision({ ...t, heldIdle: true }, P, NO_GUARANTEE), { mode: 'paused', speed: 0, state: 'holdoff', reason: t.reason, held: true, heldIdle: true });
  });

  test('the floor raises a slower speed, and says so', () => {
    const floored = withPolicy({ guarantee: { ...P.guarantee, floor: 10 * MiB } });
    assert.deepEqual(desiredDecision(st('busy', 'disk 80/s > 5/s'), floored, NO_GUARANTEE), {
      mode: 'throttled',
      speed: 10 * MiB,
      state: 'busy',
      reason: 'disk 80/s > 5/s; floor 10 MiB/s',
    });
    assert.equal(desiredDecision(st('idle'), floored, NO_GUARANTEE).mode, 'full');
  });

  test('the deadline raises the speed to what it needs; past it, full speed', () => {
    const g = { requiredBps: 14 * MiB, deadlineAt: 60_000 };
    assert.deepEqual(desiredDecision(st('busy', 'disk 80/s > 5/s'), P, g), {
      mode: 'throttled',
      speed: 14 * MiB,
      state: 'busy',
      reason: 'disk 80/s > 5/s; raised to 14 MiB/s to finish by 1970-01-01T00:01:00.000Z',
      guaranteed: true,
    });
    assert.deepEqual(desiredDecision(st('busy', 'disk 80/s > 5/s'), P, { requiredBps: Infinity, deadlineAt: 60_000 }), {
      mode: 'full',
      speed: 0,
      state: 'busy',
      reason: 'disk 80/s > 5/s; deadline 1970-01-01T00:01:00.000Z passed: full speed',
      guaranteed: true,
    });
  });
});

describe('guaranteeStep', () => {
  const g60: Moderation['guarantee'] = { floor: 0, deadline: { after: 60_000 }, margin: 1.25 };
  const run = (samples: [time: number, offset: number][], g = g60, len = 600 * MiB): GuaranteeMemory[] => {
    let m = INITIAL_GUARANTEE;
    return samples.map(([time, offset]) => (m = guaranteeStep(m, { time, offset, len }, g, 0)));
  };

  test('a copy that keeps up asks for nothing', () => {
    const out = run([[0, 0], [1000, 100 * MiB], [3000, 300 * MiB], [4000, 400 * MiB]]);
    assert.deepEqual(out.map((m) => m.out.requiredBps), [0, 0, 0, 0]);
    assert.equal(out.at(-1)!.out.deadlineAt, 60_000);
  });

  test('a copy that stands still engages after judging for 1/20 of the time allowed, and fixes a finish time', () => {
    const out = run([[0, 0], [2999, 0], [3000, 0], [4000, 14 * MiB]]);
    assert.deepEqual(out.map((m) => m.out.requiredBps), [0, 0, 14 * MiB, 14 * MiB]);
    // finish by now + time left / margin = 3 s + 57 s / 1.25 = 48.6 s; 600 MiB in 45.6 s = 13.2 MiB/s, rounded up
    assert.equal(out[2]!.finishBy, 48_600);
  });

  test('a long deadline is first judged over 20 s of history, not on a first busy phase', () => {
    // 4 h for 64 GiB with margin 1.25 asks 5.7 MiB/s. The copy ran 1 s before the guest's
    // first busy phase (50 MiB: 5.0 MiB/s over 10 s, when it was first judged before),
    // stood still through it, then ran in the next idle phase.
    const g4h: Moderation['guarantee'] = { floor: 0, deadline: { after: 4 * 3600_000 }, margin: 1.25 };
    const len = 64 * 1024 * MiB;
    const mix = run([[0, 0], [1000, 50 * MiB], [9000, 50 * MiB], [10_000, 50 * MiB], [15_000, 1000 * MiB], [20_000, 1900 * MiB], [25_000, 1950 * MiB]], g4h, len);
    assert.deepEqual(mix.map((m) => m.out.requiredBps), [0, 0, 0, 0, 0, 0, 0]);
    assert.equal(mix.at(-1)!.finishBy, null);
    // A guest that never lets it copy is still caught, at 20 s: 64 GiB by 0:20 + 3:59:40 / 1.25.
    const still = run([[0, 0], [19_999, 0], [20_000, 0]], g4h, len);
    assert.deepEqual(still.map((m) => m.out.requiredBps), [0, 0, 6 * MiB]);
  });

  test('once engaged it stays, though the raised speed makes the progress look good', () => {
    const out = run([[0, 0], [3000, 0], [13_000, 300 * MiB]]);
    assert.equal(out[1]!.out.requiredBps, 14 * MiB);
    // 300 MiB left, 35.6 s to the finish time: 8.4 → 9 MiB/s
    assert.equal(out[2]!.out.requiredBps, 9 * MiB);
  });

  test('past the planned finish time with work left: full speed before the deadline (a busy guest keeps dirtying what is left)', () => {
    // engaged at 3 s: finish by 48.6 s; at 49 s 20 MiB are left (re-dirtied by the guest)
    const out = run([[0, 0], [3000, 0], [49_000, 580 * MiB]]);
    assert.deepEqual(out.at(-1)!.out, { requiredBps: Infinity, deadlineAt: 60_000, overdue: true });
    const d = desiredDecision({ state: 'busy', reason: 'disk 80/s > 5/s' }, P, out.at(-1)!.out);
    assert.equal(d.mode, 'full');
    assert.equal(d.reason, 'disk 80/s > 5/s; past the planned finish time: full speed to finish by 1970-01-01T00:01:00.000Z');
  });

  test('copied but not yet in sync (offset == len, ready false): a trickle, so that a paused mirror can become ready', () => {
    let m = run([[0, 0], [3000, 0]]).at(-1)!;
    m = guaranteeStep(m, { time: 40_000, offset: 600 * MiB, len: 600 * MiB, ready: false }, g60, 0);
    assert.equal(m.out.requiredBps, MiB);
    m = guaranteeStep(m, { time: 40_100, offset: 600 * MiB, len: 600 * MiB, ready: true }, g60, 0);
    assert.equal(m.out.requiredBps, 0);
  });

  test('past the deadline with work left: full speed; nothing left: nothing asked', () => {
    assert.equal(run([[0, 0], [60_000, 0]]).at(-1)!.out.requiredBps, Infinity);
    assert.equal(run([[0, 0], [3000, 600 * MiB]]).at(-1)!.out.requiredBps, 0);
  });

  test('an absolute deadline; no deadline; a change of settings judges afresh', () => {
    const at = { floor: 0, deadline: { at: 120_000 }, margin: 1 };
    assert.equal(run([[0, 0], [6000, 0]], at).at(-1)!.out.requiredBps, 6 * MiB); // 600 MiB / 114 s = 5.3 → 6
    assert.deepEqual(run([[0, 0], [6000, 0]], { ...g60, deadline: null }).at(-1)!.out, NO_GUARANTEE);
    const engaged = run([[0, 0], [3000, 0]]).at(-1)!;
    const after = guaranteeStep(engaged, { time: 4000, offset: 0, len: 600 * MiB }, { ...g60, margin: 2 }, 0);
    assert.equal(after.out.requiredBps, 0);
    assert.equal(after.finishBy, null);
  });
});

describe('guarantee (operator)', () => {
  test('stamps progress with the scheduler clock and emits only changes; empty, error, unsubscribe', () => {
    const ts = scheduler();
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const p = withPolicy({ guarantee: { floor: 0, deadline: { after: 60_000 }, margin: 1.25 } });
      const src = cold('a 2999ms a 999ms a', { a: { offset: 0, len: 600 * MiB } });
      // at 4 s still 14 MiB/s (600 MiB in the 44.6 s to the finish time: 13.45, rounded up): no emission
      expectObservable(src.pipe(guarantee(of(p), ts, 0))).toBe('z 2999ms r', {
        z: { requiredBps: 0, deadlineAt: 60_000 },
        r: { requiredBps: 14 * MiB, deadlineAt: 60_000 },
      });
      expectObservable(cold<{ offset: number; len: number }>('|').pipe(guarantee(of(p), ts, 0))).toBe('|');
      expectObservable(cold<{ offset: number; len: number }>('#').pipe(guarantee(of(p), ts, 0))).toBe('#');
      const h = hot('a', { a: { offset: 0, len: 1 } });
      expectObservable(h.pipe(guarantee(of(p), ts, 0)), '^ 10ms !').toBe('z', { z: { requiredBps: 0, deadlineAt: 60_000 } });
      expectSubscriptions(h.subscriptions).toBe('^ 10ms !');
    });
  });
});

// ------------------------------------------------------------------ the whole pipeline

interface Recorded {
  t: number;
  d: Decision;
}

/**
 * Runs decide() in virtual time on a guest sampled every 50 ms whose per-sample disk rate
 * is `disk(t)` (and keyboard rate `keys(t)`), for `untilMs`. Returns each decision with the
 * frame it came in.
 */
function simulate(o: {
  disk: (t: number) => number;
  keys?: (t: number) => number;
  untilMs: number;
  policy?: EffectivePolicy;
  policy$?: (ts: TestScheduler) => Observable<EffectivePolicy>;
}): Recorded[] {
  const out: Recorded[] = [];
  const ts = scheduler();
  ts.run(() => {
    const end = timer(o.untilMs, ts);
    const activity$ = interval(50, ts).pipe(
      map((i): ActivityRates => {
        const t = (i + 1) * 50;
        return { time: t, vm: 'vm1', diskPerS: o.disk(t), keyPerS: o.keys?.(t) ?? 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
      }),
      takeUntil(end),
    );
    const policy$ = o.policy$ ? o.policy$(ts) : of(o.policy ?? P);
    decide({ activity$, policy$, scheduler: ts }).pipe(takeUntil(end)).subscribe((d) => out.push({ t: ts.now(), d }));
  });
  return out;
}

describe('reaction (unit level, samples every 50 ms)', () => {
  // 20 requests per 50 ms sample while busy (400/s, a light disk loop)
  const phases = (t: number) => (t === 500 ? 20 : t > 1000 && t <= 3000 ? 400 : 0);

  test("a busy phase's first busy sample pauses the job in the same tick; a stray request does not; full speed after the hold-off", () => {
    assert.deepEqual(simulate({ disk: phases, untilMs: 6000 }), [
      { t: 50, d: { mode: 'full', speed: 0, state: 'idle', reason: 'quiet' } },
      // t=500: one stray request (4/s over the window): nothing changes
      { t: 1050, d: { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 80/s > 5/s' } },
      // last busy sample at 3000; the window has drained at 3250, full speed 1 s later
      { t: 3250, d: { mode: 'paused', speed: 0, state: 'holdoff', reason: 'quiet; hold-off 1s after disk 80/s > 5/s' } },
      { t: 4250, d: { mode: 'full', speed: 0, state: 'idle', reason: 'quiet for 1s' } },
    ]);
  });

  test('a key press alone (one event, before its release) makes the guest busy at once', () => {
    const r = simulate({ disk: () => 0, keys: (t) => (t === 1000 ? 20 : 0), untilMs: 1500 });
    assert.deepEqual(r[1], { t: 1000, d: { mode: 'paused', speed: 0, state: 'busy', reason: 'keyboard 4/s > 0/s' } });
  });

  test('a reload applies at once: a busy guest gets the new busy speed in the tick it arrives', () => {
    const r = simulate({
      disk: (t) => (t > 1000 ? 400 : 0),
      untilMs: 2500,
      policy$: (ts) => {
        const s = new BehaviorSubject(P);
        ts.schedule(() => s.next(withPolicy({ speed: { ...P.speed, idle: Infinity, busy: 20 * MiB } })), 2000);
        return s;
      },
    });
    assert.deepEqual(r.slice(1), [
      { t: 1050, d: { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 80/s > 5/s' } },
      { t: 2000, d: { mode: 'throttled', speed: 20 * MiB, state: 'busy', reason: 'disk 80/s > 5/s' } },
    ]);
  });

  test('empty activity: no decision, and the stream completes', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      expectObservable(decide({ activity$: cold<ActivityRates>('|'), policy$: of(P), scheduler: ts })).toBe('|');
    });
  });

  test('an error of the activity stream ends the decisions with it', () => {
    const ts = scheduler();
    ts.run(({ cold, expectObservable }) => {
      const a: ActivityRates = { time: 0, vm: 'vm1', diskPerS: 0, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
      expectObservable(decide({ activity$: cold('a 9ms #', { a }), policy$: of(P), scheduler: ts })).toBe('d 9ms #', {
        d: { mode: 'full', speed: 0, state: 'idle', reason: 'quiet' },
      });
    });
  });

  test('unsubscribing stops everything, timers included', () => {
    const ts = scheduler();
    ts.run(({ hot, expectObservable, expectSubscriptions }) => {
      const b: ActivityRates = { time: 0, vm: 'vm1', diskPerS: 400, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
      const src = hot('b', { b });
      expectObservable(decide({ activity$: src, policy$: of(P), scheduler: ts }), '^ 100ms !').toBe('d', {
        d: { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 80/s > 5/s' },
      });
      expectSubscriptions(src.subscriptions).toBe('^ 100ms !');
    });
  });
});

describe('the completion guarantee, simulated', () => {
  /**
   * A job of `len` bytes that copies at the decided speed (full = 400 MiB/s), reporting
   * progress every 250 ms, beside a guest that is busy when `busyAt(t)`. Returns when it
   * finished and the decisions.
   */
  function copy(len: number, busyAt: (t: number) => boolean, deadlineMs: number, untilMs: number) {
    const decisions: Recorded[] = [];
    let finishedAt: number | null = null;
    const ts = scheduler();
    ts.run(() => {
      const end = timer(untilMs, ts);
      let current: Decision | undefined;
      let offset = 0;
      const progress$ = interval(250, ts).pipe(
        map(() => {
          const bps = !current || current.mode === 'paused' ? 0 : current.mode === 'full' ? 400 * MiB : current.speed;
          offset = Math.min(len, offset + bps / 4);
          if (offset === len && finishedAt === null) finishedAt = ts.now();
          return { offset, len };
        }),
        takeUntil(end),
      );
      const activity$ = interval(50, ts).pipe(
        map((i): ActivityRates => {
          const t = (i + 1) * 50;
          return { time: t, vm: 'vm1', diskPerS: busyAt(t) ? 400 : 0, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
        }),
        takeUntil(end),
      );
      const policy = withPolicy({ guarantee: { floor: 0, deadline: { after: deadlineMs }, margin: 1.25 } });
      decide({ activity$, policy$: of(policy), progress$, scheduler: ts, startedAt: 0 })
        .pipe(takeUntil(end))
        .subscribe((d) => {
          current = d;
          decisions.push({ t: ts.now(), d });
        });
    });
    return { finishedAt: finishedAt as number | null, decisions };
  }

  test('a guest that is never idle is still fully encrypted before the deadline, at a modest speed', () => {
    const { finishedAt, decisions } = copy(600 * MiB, () => true, 60_000, 70_000);
    assert.ok(finishedAt !== null && finishedAt <= 60_000, `finished at ${finishedAt}`);
    // planned for 1/1.25 of the time: done near 48.6 s, not at full speed early
    assert.ok(finishedAt >= 40_000, `finished at ${finishedAt}: faster than needed, at the guest's expense`);
    assert.deepEqual(decisions[1], {
      t: 3250,
      d: { mode: 'throttled', speed: 14 * MiB, state: 'busy', reason: 'disk 80/s > 5/s; raised to 14 MiB/s to finish by 1970-01-01T00:01:00.000Z', guaranteed: true },
    });
    assert.ok(decisions.every((r) => r.d.mode !== 'full'), 'never at full speed: the deadline was never passed');
  });

  test('a guest idle half the time gets its copy done in the idle phases: busy phases stay paused', () => {
    const alternating = (t: number) => Math.floor(t / 8000) % 2 === 1; // idle 0-8 s, busy 8-16 s, ...
    const { finishedAt, decisions } = copy(4 * 1024 * MiB, alternating, 60_000, 40_000);
    assert.ok(finishedAt !== null && finishedAt < 30_000, `finished at ${finishedAt}`);
    assert.ok(decisions.every((r) => r.d.mode !== 'throttled'), 'the guarantee never had to raise the busy speed');
    assert.ok(decisions.some((r) => r.d.mode === 'paused'));
  });
});

describe('the convergence push (pivot.push)', () => {
  const pivot = { 'quiet-wait': 30_000, push: 2000, 'push-after': 120_000 };
  /** Progress every 250 ms from `from` to `to`: `bps` copied, `left` bytes left after it. */
  function feed(mem: GuaranteeLike, from: number, to: number, bps: number, left: (t: number) => number, ready = false): GuaranteeLike[] {
    const out: GuaranteeLike[] = [];
    let m = mem;
    let offset = m.history.at(-1)?.offset ?? 0;
    for (let t = from; t <= to; t += 250) {
      offset += bps / 4;
      m = pushStep(m, { time: t, offset, len: offset + left(t), ready }, pivot);
      out.push(m);
    }
    return out;
  }
  type GuaranteeLike = ReturnType<typeof pushStep>;
  // 10 s at full speed (400 MiB/s), then paused with 300 MiB left that the guest keeps dirty
  const fast = feed(INITIAL_PUSH, 0, 10_000, 400 * MiB, () => 4096 * MiB).at(-1)!;

  test('work left within one push of full speed for push-after: a push of at most push, then none for push-after', () => {
    assert.equal(Math.round(fast.peakBps / MiB), 400);
    const stuck = feed(fast, 10_250, 250_000, 0, () => 300 * MiB);
    const first = stuck.findIndex((m) => m.push !== null);
    assert.equal(10_250 + first * 250, 130_250, 'after 2 minutes within reach');
    assert.equal(stuck[first]!.push!.note, 'pushing the last 300 MiB at full speed (2s at most): 2m without catching up');
    const pushing = stuck.filter((m) => m.push !== null);
    // 2 s of push, then a pause of 2 minutes (still stuck at 250 s: not again yet)
    assert.equal(pushing.length, 8);
  });

  test('the speed is remembered while the copy sits paused: a guest busy for 10 minutes gets a push every push-after', () => {
    const stuck = feed(fast, 10_250, 610_000, 0, () => 300 * MiB);
    const starts = stuck.filter((m, i) => m.push !== null && stuck[i - 1]?.push === null).length;
    assert.equal(starts, 4); // at 130 s, 252 s, 374 s, 496 s
    assert.equal(Math.round(stuck.at(-1)!.peakBps / MiB), 400);
  });

  test('a copy far from done (more than one push of work left) is not pushed', () => {
    const far = feed(fast, 10_250, 250_000, 0, () => 900 * MiB);
    assert.ok(far.every((m) => m.push === null && m.nearSince === null));
  });

  test('catching up ends a push at once; push: 0s never pushes', () => {
    const stuck = feed(fast, 10_250, 130_250, 0, () => 300 * MiB);
    assert.ok(stuck.at(-1)!.push);
    const ready = feed(stuck.at(-1)!, 130_500, 130_500, 300 * MiB, () => 0, true);
    assert.equal(ready[0]!.push, null);
    let m = fast;
    for (let t = 10_250; t <= 250_000; t += 250) m = pushStep(m, { time: t, offset: m.history.at(-1)!.offset, len: m.history.at(-1)!.offset + 300 * MiB }, { ...pivot, push: 0 });
    assert.equal(m.push, null);
  });

  test('in the pipeline: a busy guest gets the push at full speed; a person at the console does not', () => {
    const run = (keys: boolean) => {
      const out: Recorded[] = [];
      const ts = scheduler();
      ts.run(() => {
        const end = timer(140_000, ts);
        let offset = 0;
        const progress$ = interval(250, ts).pipe(
          map((i) => {
            const t = (i + 1) * 250;
            offset += t <= 5000 ? 100 * MiB : 0; // 400 MiB/s for 5 s, then paused by the busy guest
            return { offset, len: offset + (t <= 5000 ? 4096 * MiB : 200 * MiB) };
          }),
          takeUntil(end),
        );
        const activity$ = interval(50, ts).pipe(
          map((i): ActivityRates => ({ time: (i + 1) * 50, vm: 'vm1', diskPerS: (i + 1) * 50 > 5000 ? 400 : 0, keyPerS: keys && (i + 1) * 50 > 5000 ? 40 : 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' })),
          takeUntil(end),
        );
        const policy = withPolicy({ guarantee: { floor: 0, deadline: null, margin: 1.25 }, pivot });
        decide({ activity$, policy$: of(policy), progress$, scheduler: ts, startedAt: 0 })
          .pipe(takeUntil(end))
          .subscribe((d) => out.push({ t: ts.now(), d }));
      });
      return out;
    };
    const pushed = run(false).find((r) => r.d.reason.includes('pushing'));
    assert.ok(pushed, 'a push');
    assert.equal(pushed.d.mode, 'full');
    assert.equal(pushed.d.state, 'busy');
    assert.ok(pushed.t >= 125_000 && pushed.t <= 126_000, `at ${pushed.t}`);
    assert.ok(run(true).every((r) => !r.d.reason.includes('pushing')));
  });
});
