/**
 * Per-guest calibration (`thresholds: auto`, issue 12): what is learnt from guests of known
 * shape, that a quiet guest is moderated exactly as with the fixed thresholds, that what was
 * learnt outlives a policy reload and starts a new run, and how it reads.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BehaviorSubject, Subject } from 'rxjs';
import {
  calibrate,
  describeCalibration,
  EMPTY_CALIBRATION,
  LEARN_CAP,
  LEARN_MIN_SECONDS,
  LEARN_SPAN_MS,
  learnLevel,
  thresholdsInForce,
  type Calibration,
} from '../../src/controller/calibrate.ts';
import { describeReasons } from '../../src/controller/classify.ts';
import { classifyActivity } from '../../src/controller/decide.ts';
import type { ActivityRates, Classified } from '../../src/controller/types.ts';
import { defaultPolicy, parsePolicy } from '../../src/policy/index.ts';
import { resolvePolicy } from '../../src/policy/resolve.ts';
import { fixedThresholds, type EffectivePolicy } from '../../src/policy/schema.ts';
import { LearntStore } from '../../src/encrypt/learnt.ts';
import { silentLogger } from '../../src/log.ts';

/** A pseudo-random sequence, the same each run. */
function rng(seed: number): () => number {
  let s = seed;
  return () => {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    return s / 2 ** 31;
  };
}

/**
 * Feeds `seconds` of samples every 50 ms; `disk(t)` is the windowed disk rate the classifier
 * would see at t (ms). Returns the calibration.
 */
function feed(c: Calibration, fromMs: number, seconds: number, disk: (t: number) => number, interrupts: (t: number) => number | null = () => 0): Calibration {
  for (let t = fromMs; t < fromMs + seconds * 1000; t += 50) c = calibrate(c, t, { disk: disk(t), interrupts: interrupts(t) });
  return c;
}

const T0 = 1_800_000_000_000;

describe('calibrate', () => {
  test('a quiet guest (background 0, the test guest between its phases) keeps the source design thresholds', () => {
    // 8 s idle (no request) / 8 s busy (hundreds a second), as the suite's bursty guest
    const c = feed(EMPTY_CALIBRATION, T0, 300, (t) => (Math.floor((t - T0) / 8000) % 2 ? 450 : 0));
    assert.deepEqual(c.learnt.disk, { level: 0, threshold: 5 });
    assert.equal(c.learnt.interrupts!.threshold, 1000);
  });

  test('a noisy server: a trickle of 10-30 writes a second with bursts on top is busy only in its bursts', () => {
    const r = rng(7);
    const trickle = () => 10 + 20 * r();
    const c = feed(EMPTY_CALIBRATION, T0, 600, (t) => (Math.floor((t - T0) / 8000) % 3 === 2 ? 1200 + 300 * r() : trickle()));
    const l = c.learnt.disk!;
    assert.ok(l.level >= 25 && l.level <= 30, `level ${l.level}: the trickle's top, not the bursts`);
    assert.ok(l.threshold > 30 && l.threshold <= 50, `threshold ${l.threshold}: above every trickle second, far under a burst`);
    const { thresholds } = thresholdsInForce({ ...fixedThresholds(defaultPolicy().thresholds), disk: 'auto' }, c);
    assert.equal(thresholds.disk, l.threshold);
  });

  test('a guest that is never idle is capped: its work is not learnt as background', () => {
    const c = feed(EMPTY_CALIBRATION, T0, 120, () => 900);
    assert.equal(c.learnt.disk!.threshold, LEARN_CAP.disk);
  });

  test('nothing is learnt before a minute of samples; meanwhile auto is the source design value', () => {
    const c = feed(EMPTY_CALIBRATION, T0, LEARN_MIN_SECONDS - 5, () => 20);
    assert.equal(c.learnt.disk, undefined);
    const { thresholds, learnt } = thresholdsInForce({ ...fixedThresholds(defaultPolicy().thresholds), disk: 'auto', interrupts: 'auto' }, c);
    assert.equal(thresholds.disk, 5);
    assert.equal(thresholds.interrupts, 1000);
    assert.deepEqual(learnt, []);
    assert.match(describeCalibration(c, ['disk']), /disk learning \(busy above 5\/s until 60 s are seen\)/);
  });

  test('only the last 10 minutes count: a guest that turns quiet is learnt quiet again', () => {
    let c = feed(EMPTY_CALIBRATION, T0, 300, () => 40);
    assert.ok(c.learnt.disk!.threshold >= 60);
    c = feed(c, T0 + 300_000, LEARN_SPAN_MS / 1000 + 10, () => 0);
    assert.equal(c.learnt.disk!.threshold, 5);
    assert.ok(c.seconds.length <= LEARN_SPAN_MS / 1000 + 1);
  });

  test('an unknown signal (no eBPF) is not learnt', () => {
    const c = feed(EMPTY_CALIBRATION, T0, 120, () => 3, () => null);
    assert.equal(c.learnt.interrupts, undefined);
    assert.ok(c.learnt.disk);
  });

  test('learnLevel: the 95th percentile of the background seconds, times 1.5, in two significant digits', () => {
    const peaks = [...Array.from({ length: 95 }, (_, i) => 10 + (i % 10)), ...Array.from({ length: 25 }, () => 2000)];
    // q25 = 12; background <= 48: the 95 trickle seconds, whose 95th percentile is 19
    assert.deepEqual(learnLevel(peaks, 'disk'), { level: 19, threshold: 29 });
    assert.equal(learnLevel(peaks.slice(0, LEARN_MIN_SECONDS - 1), 'disk'), undefined);
  });
});

describe('classifyActivity with thresholds: auto', () => {
  const sample = (time: number, diskPerS: number): ActivityRates => ({ time, vm: 'db', intervalMs: 50, diskPerS, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' });

  function run(policy: EffectivePolicy, initial?: Calibration) {
    const policy$ = new BehaviorSubject(policy);
    const in$ = new Subject<ActivityRates>();
    const out: Classified[] = [];
    const saved: Calibration[] = [];
    in$.pipe(classifyActivity(policy$, { ...(initial ? { initial } : {}), onLearnt: (c) => saved.push(c) })).subscribe((c) => out.push(c));
    return { policy$, in$, out, saved };
  }

  const autoPolicy = resolvePolicy(parsePolicy('thresholds: auto\n', 'auto.yaml'), 'db');

  test('a trickle of 20 requests/s is busy under the fixed thresholds, and idle once learnt; its bursts stay busy', () => {
    const r = run(autoPolicy);
    let t = T0;
    for (; t < T0 + 120_000; t += 50) r.in$.next(sample(t, 20));
    const last = r.out.at(-1)!;
    assert.equal(last.state, 'idle');
    assert.ok(last.learnt);
    assert.match(last.learnt.summary, /^disk level 20\/s, busy above 30\/s, interrupts level 0\/s, busy above 1000\/s$/);
    // early on, before a minute was seen: busy at the fixed 5/s
    assert.equal(r.out[200]!.state, 'busy');
    assert.equal(r.out[200]!.reasons[0]!.threshold, 5);
    r.in$.next(sample(t, 400));
    const burst = r.out.at(-1)!;
    assert.equal(burst.state, 'busy');
    assert.deepEqual(burst.reasons[0], { signal: 'disk', value: 400 * 0.2 + 20 * 0.8, threshold: 30, learnt: true });
    assert.ok(r.saved.length >= 20, 'saved every few seconds');
  });

  test('what was learnt outlives a policy reload, and a new run starts from what an earlier one saved', () => {
    const r = run(autoPolicy);
    let t = T0;
    for (; t < T0 + 90_000; t += 50) r.in$.next(sample(t, 20));
    r.policy$.next(resolvePolicy(parsePolicy('thresholds: auto\nholdoff: 2s\n', 'auto.yaml'), 'db'));
    r.in$.next(sample(t, 20));
    assert.equal(r.out.at(-1)!.state, 'idle');
    assert.equal(r.out.at(-1)!.learnt!.thresholds.disk, 30);

    const again = run(autoPolicy, r.saved.at(-1));
    again.in$.next(sample(t + 1000, 20));
    assert.equal(again.out.at(-1)!.state, 'idle', 'the new run knows the trickle from the first sample');
  });

  test("each kind of request is learnt too: a guest whose background is writes and flushes is busy on its first reads, although the sum stays under the disk's threshold", () => {
    const r = run(autoPolicy);
    // the trickle: 10 writes and 10 flushes a second, as a database's log
    const mixed = (time: number, reads: number, writes: number, flushes: number): ActivityRates => ({
      ...sample(time, reads + writes + flushes),
      diskKindsPerS: { reads, writes, flushes, discards: 0 },
    });
    let t = T0;
    for (; t < T0 + 120_000; t += 50) r.in$.next(mixed(t, 0, 10, 10));
    const learnt = r.out.at(-1)!.learnt!;
    assert.equal(r.out.at(-1)!.state, 'idle');
    assert.equal(learnt.thresholds.disk, 30);
    assert.deepEqual(learnt.kinds, { reads: { level: 0, threshold: 5 }, writes: { level: 10, threshold: 15 }, flushes: { level: 10, threshold: 15 }, discards: { level: 0, threshold: 5 } });
    assert.match(learnt.summary, /^disk level 20\/s, busy above 30\/s \(or reads above 5\/s, writes above 15\/s, flushes above 15\/s, discards above 5\/s\), interrupts/);
    // A busy phase held back by a copy: reads at 20 a second beside the trickle. Over the
    // 250 ms window the sum is 24/s after one sample and 28/s after two, under the disk's 30;
    // the reads are 4/s, then 8/s: over their own 5 at the second sample.
    r.in$.next(mixed((t += 50), 20, 10, 10));
    assert.equal(r.out.at(-1)!.state, 'idle');
    r.in$.next(mixed((t += 50), 20, 10, 10));
    const busy = r.out.at(-1)!;
    assert.equal(busy.state, 'busy');
    assert.deepEqual(busy.reasons, [{ signal: 'disk', kind: 'reads', value: 8, threshold: 5, learnt: true }]);
    assert.equal(describeReasons(busy.reasons), 'disk reads 8/s > 5/s (learnt)');
    // a burst of the guest's own kinds is judged by the sum, as before
    r.in$.next(mixed((t += 50), 0, 400, 0));
    assert.equal(r.out.at(-1)!.reasons[0]!.kind, undefined);
  });

  test('fixed thresholds: the same trickle is busy, and nothing learnt is shown', () => {
    const r = run(resolvePolicy(defaultPolicy(), 'db'));
    for (let t = T0; t < T0 + 90_000; t += 50) r.in$.next(sample(t, 20));
    assert.equal(r.out.at(-1)!.state, 'busy');
    assert.equal(r.out.at(-1)!.learnt, undefined);
    assert.equal(r.saved.length, 0);
  });
});

describe('what was learnt, kept on disk (src/encrypt/learnt.ts)', () => {
  test('saved at most every 30 s and on flush, read back by the next run, root-only; a file it cannot read starts afresh', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-learnt-'));
    try {
      const c = feed(EMPTY_CALIBRATION, T0, 90, () => 20);
      const a = new LearntStore('db/1', silentLogger, dir);
      assert.equal(a.load(), undefined, 'nothing learnt yet');
      a.offer(c, 1_000_000);
      assert.equal(path.basename(a.file), 'db%2F1.json', 'a VM name is one path component');
      assert.equal((await stat(a.file)).mode & 0o777, 0o600);
      const later = feed(c, T0 + 90_000, 5, () => 25);
      a.offer(later, 1_010_000); // 10 s after the last save: kept for flush
      assert.deepEqual(new LearntStore('db/1', silentLogger, dir).load(), c);
      a.flush(1_012_000);
      assert.deepEqual(new LearntStore('db/1', silentLogger, dir).load(), later);
      assert.equal(new LearntStore('db/2', silentLogger, dir).load(), undefined, 'another VM learns its own');
      const text = await readFile(a.file, 'utf8');
      await writeFile(a.file, text.replace('"version":1', '"version":7'));
      assert.equal(new LearntStore('db/1', silentLogger, dir).load(), undefined);
      await writeFile(a.file, '{"version":1,');
      assert.equal(new LearntStore('db/1', silentLogger, dir).load(), undefined);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
