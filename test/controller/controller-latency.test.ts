/**
 * Harm measured as latency (controller/latency.ts, `latency.margin`): the judgement rule on
 * its own, then the whole decision pipeline in virtual time beside a simulated guest whose
 * disk latency grows with the copy's speed.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { interval, map, of, takeUntil, timer } from 'rxjs';
import { TestScheduler } from 'rxjs/testing';
import { GRADED_START_BPS, HISTOGRAM_BOUNDARIES, INITIAL_LATENCY, histogramQuantile, latencyStep, type LatencyContext, type LatencyMemory, type LatencySample, type LatencyView } from '../../src/controller/latency.ts';
import { decide, desiredDecision } from '../../src/controller/decide.ts';
import { blockstatsLatency } from '../../src/probes/qmp-blockstats.ts';
import type { BlockStats } from '../../src/qmp/schema.ts';
import type { ActivityRates, Decision } from '../../src/controller/types.ts';
import { defaultPolicy, resolvePolicy, type EffectivePolicy } from '../../src/policy/index.ts';

const MiB = 1024 * 1024;

/**
 * Feeds latencyStep readings every 250 ms: `reads` and `flushes` completed per reading at
 * `readMs` / `flushMs` each, the copy moving `copyBps`. Returns the memory after each.
 */
function feed(mem: LatencyMemory, from: number, n: number, r: { reads: number; readMs: number; flushes?: number; flushMs?: number; copyBps: (m: LatencyMemory) => number; active?: boolean }) {
  const out: LatencyMemory[] = [];
  let m = mem;
  for (let i = 0; i < n; i++) {
    const t = from + i * 250;
    const prev = m.prev;
    const base: LatencySample = prev ?? { time: t - 250, ops: { read: 0, write: 0, flush: 0 }, ns: { read: 0, write: 0, flush: 0 } };
    const sample: LatencySample = {
      time: t,
      ops: { read: base.ops.read + r.reads, write: 0, flush: base.ops.flush + (r.flushes ?? 0) },
      ns: { read: base.ns.read + r.reads * r.readMs * 1e6, write: 0, flush: base.ns.flush + (r.flushes ?? 0) * (r.flushMs ?? 0) * 1e6 },
    };
    const ctx: LatencyContext = { offset: (prev?.offset ?? 0) + (r.copyBps(m) * 250) / 1000, active: r.active ?? true, margin: 0.15, refreshMs: 60_000 };
    m = latencyStep(m, sample, ctx);
    out.push(m);
  }
  return out;
}

describe('latencyStep: the judgement', () => {
  const paused = () => 0;
  const atSpeed = (m: LatencyMemory) => m.speed;

  test('learns the baseline while the copy is paused, then starts graded copying at 4 MiB/s', () => {
    const ms = feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused });
    // judgements every 500 ms (two readings); the first is not settled (the copy may have
    // moved before it), the three after it make a baseline
    assert.equal(ms[2]!.view?.phase, 'learning');
    assert.equal(ms[6]!.view?.phase, 'learning');
    const first = ms[8]!.view!;
    assert.equal(first.phase, 'graded');
    assert.equal(first.speedBps, GRADED_START_BPS);
    assert.equal(first.baselineMs, 2);
    assert.match(first.note, /^latency 2\.00 ms <= 2\.00 ms \+15%: 4 MiB\/s$/);
  });

  test('two judgements within the margin in a row raise the speed by a quarter; one over it halves it; under 1 MiB/s, paused', () => {
    const learnt = feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!;
    // judgements every other reading; the first spans a reading of the paused learning
    const up = feed(learnt, 2500, 8, { reads: 25, readMs: 2.2, copyBps: atSpeed });
    assert.deepEqual([0, 2, 4, 6].map((i) => up[i]!.speed), [4 * MiB, 5 * MiB, 5 * MiB, 6.25 * MiB]);
    const down = feed(up.at(-1)!, 4500, 8, { reads: 25, readMs: 2.4, copyBps: atSpeed });
    assert.deepEqual([0, 2, 4, 6].map((i) => down[i]!.speed), [3.125 * MiB, 1.5625 * MiB, 0, 0]);
    assert.match(down[0]!.view!.note, /^latency 2\.30 ms > 2\.00 ms \+15%: 3\.1 MiB\/s$/);
    assert.equal(down.at(-1)!.view!.note.endsWith('paused'), true);
  });

  test('a copy held back by something else (making under 70% of its speed) is not raised', () => {
    const learnt = feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!;
    const slow = feed(learnt, 2500, 4, { reads: 25, readMs: 2, copyBps: (m) => m.speed * 0.5 });
    assert.equal(slow.at(-1)!.speed, GRADED_START_BPS);
  });

  test('the baseline is per kind of request: a guest that turns to slow flushes is not taken for harm', () => {
    const learnt = feed(INITIAL_LATENCY, 0, 10, { reads: 20, readMs: 1, flushes: 5, flushMs: 10, copyBps: paused }).at(-1)!;
    // now mostly flushes: the mean latency trebles, the mix's baseline with it
    const shifted = feed(learnt, 2500, 3, { reads: 5, readMs: 1, flushes: 20, flushMs: 10, copyBps: atSpeed });
    const v = shifted.at(-1)!.view!;
    assert.equal(v.phase, 'graded');
    assert.ok(v.latencyMs! > 8 && Math.abs(v.latencyMs! - v.baselineMs!) < 1e-9, JSON.stringify(v));
    assert.equal(shifted.at(-1)!.speed, 5 * MiB);
  });

  test("a guest that waits for each request and slows down is harmed, though QEMU's latency is unchanged", () => {
    const learnt = { ...feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!, speed: 16 * MiB };
    // 100 requests/s without the copy; 80/s beside it (its vCPU waits): under 100 / 1.15
    const slowed = feed(learnt, 2500, 5, { reads: 20, readMs: 2, copyBps: atSpeed });
    assert.deepEqual([0, 2, 4].map((i) => slowed[i]!.speed), [16 * MiB, 8 * MiB, 4 * MiB]);
    assert.match(slowed[2]!.view!.note, /^latency 2\.00 ms, 80\.0 requests\/s < 100\/s -13%: 8 MiB\/s$/);
    // 90/s is within the margin
    const kept = feed(learnt, 2500, 5, { reads: 22.5, readMs: 2, copyBps: atSpeed });
    assert.equal(kept[4]!.speed, 20 * MiB);
  });

  test('a load not seen yet is learnt before it is judged: a trickle turning into a burst of slower, larger requests is not taken for harm', () => {
    // the trickle: 40 requests/s of 0.8 ms, learnt paused; then graded
    const trickle = feed(INITIAL_LATENCY, 0, 14, { reads: 10, readMs: 0.8, copyBps: (m) => m.speed });
    assert.equal(trickle.at(-1)!.view!.phase, 'graded');
    assert.ok(trickle.at(-1)!.speed > 0);
    // the burst: 500 requests/s of 1.4 ms: no baseline at this load, so the busy speed while it is learnt
    const burst = feed(trickle.at(-1)!, 3500, 12, { reads: 125, readMs: 1.4, copyBps: (m) => m.speed });
    assert.equal(burst[0]!.view!.phase, 'learning');
    assert.match(burst[0]!.view!.note, /^latency 1\.\d+ ms at \d+ requests\/s; learning the baseline at this load/);
    const graded = burst.findIndex((m) => m.view?.phase === 'graded');
    assert.ok(graded > 0 && graded <= 10, `graded again after ${graded} readings`);
    assert.equal(burst[graded]!.view!.baselineMs, 1.4);
    // and the trickle's baseline is still there when it comes back
    const back = feed(burst.at(-1)!, 6500, 4, { reads: 10, readMs: 0.8, copyBps: (m) => m.speed });
    assert.equal(back[2]!.view!.phase, 'graded');
    assert.equal(back[2]!.view!.baselineMs, 0.8);
  });

  test('a guest busy with its disk whose requests stop completing is taken as frozen: the speed halves', () => {
    const learnt = feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!;
    const running = { ...learnt, speed: 64 * MiB };
    const frozen = feed(running, 2500, 9, { reads: 0, readMs: 0, copyBps: atSpeed });
    // the first judgement holds half the requests of the baseline's rate: halved; then none in 2 s: halved again
    assert.match(frozen[0]!.view!.note, /^latency 2\.00 ms, 50\.0 requests\/s < 100\/s -13%: 32 MiB\/s$/);
    assert.equal(frozen.at(-1)!.speed, 16 * MiB);
    assert.match(frozen.at(-1)!.view!.note, /^0 requests completed in 2\.0 s: 16 MiB\/s$/);
  });

  test('after `refresh` of graded copying, one judgement paused re-measures the baseline', () => {
    const learnt = feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!;
    // 61 s of copying within the margin, while the guest's own latency drifts up 10%
    const copying = feed(learnt, 2500, 244, { reads: 25, readMs: 2.2, copyBps: (m) => (m.probing ? 0 : m.speed) });
    const probe = copying.findIndex((m) => m.probing > 0);
    assert.ok(probe > 0, 'a probe happened');
    assert.equal(copying[probe]!.view!.phase, 'probing');
    assert.equal(copying[probe]!.view!.speedBps, 0);
    // the first judgement paused still holds the copy's tail; the second is settled and re-measures
    const end = copying.findIndex((m, i) => i > probe && m.probing === 0);
    assert.equal(end, probe + 4);
    const after = copying[end]!;
    assert.equal(after.baselineAt, after.prev!.time);
    assert.equal(after.view!.phase, 'graded');
    assert.match(after.view!.note, /baseline re-measured/);
    assert.ok(after.speed > 0);
  });

  test('not busy: nothing is graded, what was learnt and the speed are kept for the next busy phase, which starts at half of it', () => {
    const learnt = { ...feed(INITIAL_LATENCY, 0, 10, { reads: 25, readMs: 2, copyBps: paused }).at(-1)!, speed: 40 * MiB };
    const idle = feed(learnt, 2500, 3, { reads: 25, readMs: 3, copyBps: () => 300 * MiB, active: false });
    assert.equal(idle.at(-1)!.speed, 40 * MiB);
    const again = feed(idle.at(-1)!, 3250, 1, { reads: 25, readMs: 2, copyBps: atSpeed });
    assert.equal(again[0]!.speed, 20 * MiB);
    assert.match(again[0]!.view!.note, /^busy again: 20 MiB\/s until the first judgement$/);
  });
});

/** The bucket of HISTOGRAM_BOUNDARIES a latency falls in. */
const bucketOf = (ns: number): number => {
  const i = HISTOGRAM_BOUNDARIES.findIndex((b) => ns < b);
  return i < 0 ? HISTOGRAM_BOUNDARIES.length : i;
};

/**
 * Readings every 250 ms of a guest doing `writes` writes per reading, most at `ms` and
 * `slow` of them at `slowMs`, with a write histogram as QEMU keeps one; `idle`: the guest is
 * idle by its thresholds (else busy with its disk).
 */
function feedWrites(mem: LatencyMemory, from: number, n: number, r: { writes: number; ms: number; slow?: number; slowMs?: number; copyBps: (m: LatencyMemory) => number; idle?: boolean; hist?: boolean }) {
  const out: LatencyMemory[] = [];
  let m = mem;
  for (let i = 0; i < n; i++) {
    const t = from + i * 250;
    const prev = m.prev;
    const zero = { read: 0, write: 0, flush: 0 };
    const prevBins = prev?.hist?.write?.bins ?? HISTOGRAM_BOUNDARIES.map(() => 0).concat([0]);
    const bins = [...prevBins];
    const slow = r.slow ?? 0;
    bins[bucketOf(r.ms * 1e6)]! += r.writes - slow;
    if (slow) bins[bucketOf(r.slowMs! * 1e6)]! += slow;
    const sample: LatencySample = {
      time: t,
      ops: { ...zero, write: (prev?.ops.write ?? 0) + r.writes },
      ns: { ...zero, write: (prev?.ns.write ?? 0) + ((r.writes - slow) * r.ms + slow * (r.slowMs ?? 0)) * 1e6 },
      ...(r.hist === false ? {} : { hist: { write: { boundaries: HISTOGRAM_BOUNDARIES, bins } } }),
    };
    const idle = r.idle ?? false;
    m = latencyStep(m, sample, { offset: (prev?.offset ?? 0) + (r.copyBps(m) * 250) / 1000, active: !idle, idle, margin: 0.15, refreshMs: 60_000 });
    out.push(m);
  }
  return out;
}

describe('latencyStep: the median, where QEMU keeps a histogram', () => {
  test('histogramQuantile interpolates within the bucket, and an empty histogram has none', () => {
    const b = [1000, 2000, 4000];
    assert.equal(histogramQuantile(b, [0, 10, 0, 0]), 1500);
    assert.equal(histogramQuantile(b, [0, 0, 4, 0], 0.25), 2500);
    assert.equal(histogramQuantile(b, [0, 0, 0, 3]), 4000); // the open bucket: its lower end
    assert.equal(histogramQuantile(b, [0, 0, 0, 0]), undefined);
  });

  test("blockstatsLatency sums the devices' histograms when their buckets match, and drops a kind's when they do not", () => {
    const dev = (wr: number, h?: { boundaries: number[]; bins: number[] }): BlockStats =>
      ({ qdev: 'x', stats: { rd_operations: 0, wr_operations: wr, flush_operations: 0, rd_total_time_ns: 0, wr_total_time_ns: wr * 1000, flush_total_time_ns: 0, ...(h ? { wr_latency_histogram: h } : {}) } }) as unknown as BlockStats;
    const same = blockstatsLatency([dev(3, { boundaries: [10, 20], bins: [1, 2, 0] }), dev(2, { boundaries: [10, 20], bins: [0, 1, 1] })]);
    assert.deepEqual(same.hist?.write, { boundaries: [10, 20], bins: [1, 3, 1] });
    assert.equal(same.ops.write, 5);
    assert.equal(blockstatsLatency([dev(3, { boundaries: [10, 20], bins: [1, 2, 0] }), dev(2, { boundaries: [10, 30], bins: [0, 1, 1] })]).hist, undefined);
    assert.equal(blockstatsLatency([dev(3, { boundaries: [10, 20], bins: [1, 2, 0] }), dev(2)]).hist, undefined);
  });

  test('a few requests that land beside a burst of the copy do not move the median: the copy keeps its speed, where the mean would have halved it', () => {
    const paused = () => 0;
    const learnt = feedWrites(INITIAL_LATENCY, 0, 10, { writes: 20, ms: 0.8, copyBps: paused }).at(-1)!;
    assert.equal(learnt.view?.statistic, 'median');
    const at = { ...learnt, speed: 16 * MiB };
    // 3 in 20 writes at 10 ms: the mean is 2.2x the baseline, the median unmoved
    const withHist = feedWrites(at, 2500, 2, { writes: 20, ms: 0.8, slow: 3, slowMs: 10, copyBps: (m) => m.speed });
    assert.equal(withHist.at(-1)!.speed, 16 * MiB);
    assert.match(withHist.at(-1)!.view!.note, /^latency p50 0\.\d\d ms <= 0\.\d\d ms \+15%: 16 MiB\/s/);
    const learntMean = feedWrites(INITIAL_LATENCY, 0, 10, { writes: 20, ms: 0.8, copyBps: paused, hist: false }).at(-1)!;
    assert.equal(learntMean.view?.statistic, 'mean');
    const withoutHist = feedWrites({ ...learntMean, speed: 16 * MiB }, 2500, 2, { writes: 20, ms: 0.8, slow: 3, slowMs: 10, copyBps: (m) => m.speed, hist: false });
    assert.equal(withoutHist.at(-1)!.speed, 8 * MiB);
  });
});

describe('latencyStep: an idle guest that still does requests', () => {
  const paused = () => 0;

  test('is judged with a grade of its own: learnt paused, then the idle speed, cut to half what the copy made on a miss, raised again within the margin', () => {
    // a trickle of 40 writes/s that the thresholds call idle; the copy makes 100 MiB/s when let
    const copy = (m: LatencyMemory) => (!m.view || m.view.phase === 'learning' || m.view?.phase === 'probing' ? 0 : Number.isFinite(m.idleSpeed) ? m.idleSpeed : 100 * MiB);
    const learning = feedWrites(INITIAL_LATENCY, 0, 10, { writes: 10, ms: 0.8, copyBps: copy, idle: true });
    assert.equal(learning[2]!.view?.phase, 'learning');
    assert.equal(learning[2]!.view?.scope, 'idle');
    const graded = learning.at(-1)!.view!;
    assert.equal(graded.phase, 'graded');
    assert.equal(graded.scope, 'idle');
    assert.equal(graded.speedBps, Infinity);
    assert.match(graded.note, /: the idle speed; idle at 40\.0 requests\/s$/);
    // the full copy doubles its latency: cut to half of what it made
    const harmed = feedWrites(learning.at(-1)!, 2500, 3, { writes: 10, ms: 1.6, copyBps: copy, idle: true });
    assert.equal(harmed.at(-1)!.idleSpeed, 50 * MiB);
    assert.equal(harmed.at(-1)!.speed, 0, 'the busy grade is its own');
    // within the margin: raised by a quarter every two judgements
    const fine = feedWrites(harmed.at(-1)!, 3250, 4, { writes: 10, ms: 0.85, copyBps: copy, idle: true });
    assert.equal(fine.at(-1)!.idleSpeed, 62.5 * MiB);
    // a raise the copy cannot use gives the idle speed back
    const capped = feedWrites(fine.at(-1)!, 4250, 4, { writes: 10, ms: 0.85, copyBps: () => 20 * MiB, idle: true });
    assert.equal(capped.at(-1)!.idleSpeed, Infinity);
  });

  test('a guest under IDLE_JUDGED_RATE is not judged; once judged, fewer requests while the copy moves keep it judged, until a quiet judgement shows it quiet', () => {
    const few = feedWrites(INITIAL_LATENCY, 0, 16, { writes: 0.5, ms: 0.8, copyBps: () => 100 * MiB, idle: true });
    assert.equal(few.at(-1)!.idleJudged, false);
    assert.equal(few.at(-1)!.view?.scope, 'busy');
    const learnt = feedWrites(INITIAL_LATENCY, 0, 10, { writes: 10, ms: 0.8, copyBps: paused, idle: true }).at(-1)!;
    assert.equal(learnt.idleJudged, true);
    // the full copy starves it to 1 request a reading: still judged (and it is a miss)
    const starved = feedWrites(learnt, 2500, 4, { writes: 1, ms: 0.8, copyBps: () => 100 * MiB, idle: true });
    assert.equal(starved.at(-1)!.idleJudged, true);
    assert.equal(starved.at(-1)!.view?.scope, 'idle');
    // paused, the guest shows itself quiet: no longer judged
    const quiet = feedWrites(starved.at(-1)!, 3500, 16, { writes: 0, ms: 0.8, copyBps: paused, idle: true });
    assert.equal(quiet.at(-1)!.idleJudged, false);
  });

  test("desiredDecision: an idle grade applies to an idle guest only (at most the idle speed; the busy speed while learning), a busy grade to a busy one only", () => {
    const base = resolvePolicy(defaultPolicy(), 'vm');
    const p: EffectivePolicy = { ...base, latency: { margin: 0.15, refresh: 60_000 } };
    const g = { requiredBps: 0, deadlineAt: null, overdue: false } as never;
    const idle = { state: 'idle', reason: 'quiet' } as never;
    const busy = { state: 'busy', reason: 'disk 80/s > 5/s' } as never;
    const v = (scope: 'idle' | 'busy', phase: LatencyView['phase'], speedBps: number): LatencyView => ({ phase, scope, speedBps, latencyMs: 1, baselineMs: 1, margin: 0.15, statistic: 'median', note: 'n' });
    assert.deepEqual([desiredDecision(idle, p, g, v('idle', 'graded', 24 * MiB)).mode, desiredDecision(idle, p, g, v('idle', 'graded', 24 * MiB)).speed], ['throttled', 24 * MiB]);
    assert.equal(desiredDecision(idle, p, g, v('idle', 'graded', Infinity)).mode, 'full');
    assert.equal(desiredDecision(idle, p, g, v('idle', 'learning', 0)).mode, 'paused');
    assert.equal(desiredDecision(idle, p, g, v('busy', 'graded', 4 * MiB)).mode, 'full');
    assert.equal(desiredDecision(busy, p, g, v('idle', 'graded', 24 * MiB)).mode, 'paused');
    assert.equal(desiredDecision(busy, p, g, v('busy', 'graded', 4 * MiB)).speed, 4 * MiB);
  });
});

describe('the decision pipeline with latency.margin, simulated', () => {
  /**
   * A guest doing 400 reads/s all the time whose latency is 1 ms x (1 + copy speed / 100 MiB/s)
   * (15 MiB/s of copy costs it 15%), a copy that runs at the decided speed, and keys at `keysAt`.
   */
  function run(policy: EffectivePolicy, untilMs: number, keysAt?: (t: number) => boolean) {
    const decisions: { t: number; d: Decision }[] = [];
    const ts = new TestScheduler((a, e) => assert.deepEqual(a, e));
    ts.run(() => {
      const end = timer(untilMs, ts);
      let current: Decision | undefined;
      let offset = 0;
      const reads = { n: 0, ns: 0 };
      const speedNow = () => (!current || current.mode === 'paused' ? 0 : current.mode === 'full' ? 400 * MiB : current.speed);
      const progress$ = interval(250, ts).pipe(
        map(() => {
          offset += speedNow() / 4;
          return { offset, len: 1e15 };
        }),
        takeUntil(end),
      );
      const latency$ = interval(250, ts).pipe(
        map((): LatencySample => {
          reads.n += 100;
          reads.ns += 100 * 1e6 * (1 + speedNow() / (100 * MiB));
          return { time: ts.now(), ops: { read: reads.n, write: 0, flush: 0 }, ns: { read: reads.ns, write: 0, flush: 0 } };
        }),
        takeUntil(end),
      );
      const activity$ = interval(50, ts).pipe(
        map((i): ActivityRates => {
          const t = (i + 1) * 50;
          return { time: t, vm: 'vm1', diskPerS: 400, keyPerS: keysAt?.(t) ? 40 : 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
        }),
        takeUntil(end),
      );
      decide({ activity$, policy$: of(policy), progress$, latency$, scheduler: ts, startedAt: 0 })
        .pipe(takeUntil(end))
        .subscribe((d) => {
          current = d;
          decisions.push({ t: ts.now(), d });
        });
    });
    return decisions;
  }
  const base = resolvePolicy(defaultPolicy(), 'vm1');
  const graded: EffectivePolicy = { ...base, latency: { margin: 0.15, refresh: 60_000 }, guarantee: { ...base.guarantee, deadline: null } };

  test('a guest that is never idle gets graded speeds around what costs it 15%, not a paused copy', () => {
    const ds = run(graded, 30_000);
    assert.deepEqual(ds[0]!.d, { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 80/s > 5/s' });
    assert.match(ds[1]!.d.reason, /^disk 80\/s > 5\/s; latency 1\.00 ms at 400 requests\/s; learning the baseline at this load \(the busy speed until one is known\)$/);
    const later = ds.filter((r) => r.t >= 10_000);
    assert.ok(later.length > 5);
    for (const r of later) {
      assert.equal(r.d.mode, 'throttled', JSON.stringify(r));
      assert.ok(r.d.speed >= 5 * MiB && r.d.speed <= 20 * MiB, `${r.t}: ${r.d.speed / MiB} MiB/s`);
      assert.ok(r.d.latency && r.d.latency.baselineMs === 1);
    }
    // the guest's latency over the last 20 s: within the margin on average
    const lat = later.map((r) => r.d.latency!.latencyMs!);
    const mean = lat.reduce((a, b) => a + b, 0) / lat.length;
    assert.ok(mean <= 1.15, `mean latency ${mean} ms`);
  });

  test('latency.margin off: the same guest gets the busy speed (paused) all the time, and no latency is shown', () => {
    const ds = run(base, 10_000);
    assert.ok(ds.every((r) => r.d.mode === 'paused' && r.d.latency === undefined));
  });

  test('a key pauses the graded copy in the tick it is seen, and the hold-off after it stays paused', () => {
    const ds = run(graded, 20_000, (t) => t === 15_000);
    const at = ds.find((r) => r.t === 15_000)!;
    assert.equal(at.d.mode, 'paused');
    assert.equal(at.d.reason, 'disk 400/s > 5/s, keyboard 8/s > 0/s');
    assert.equal(at.d.latency?.phase, 'graded'); // still shown, not in force
    assert.ok(ds.filter((r) => r.t > 15_000 && r.t < 16_250).every((r) => r.d.mode === 'paused'));
    assert.equal(ds.at(-1)!.d.mode, 'throttled');
  });
});
