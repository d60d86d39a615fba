/** The measuring harness's own arithmetic (test/helpers/moderation-lab.ts), on idlecrypt's real metric lines. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { activityPoint } from '../../src/metrics/names.ts';
import { toLineProtocol } from '../../src/metrics/line-protocol.ts';
import { EARLY_MS, firstCaughtUp, firstRequestAt, measurable, parseActivity, rateOver, reactionAt, jobOffset, type Sample } from '../helpers/moderation-lab.ts';

/** The line idlecrypt writes for one 50 ms probe sample ending at `t` (epoch ms). */
function line(t: number, reads: number, writes = 0): string {
  const p = activityPoint({ host: 'h1', vm: 'mod', time: t, intervalS: 0.05, source: 'ebpf' }, { diskReads: reads, diskWrites: writes, diskFlushes: 0, diskDiscards: 0, keyEvents: 0, pointerEvents: 0, interrupts: 3 });
  return toLineProtocol(p!);
}

describe('moderation lab: probe samples from a metrics file', () => {
  const T = 1_795_600_000_000;
  const file = [
    '# DML',
    '# CONTEXT-DATABASE: idlecrypt',
    line(T + 50, 0),
    'idlecrypt_job,host=h1,vm=mod,device=disk0 speed_set_bps=0i 1795600000060000000',
    line(T + 100, 0),
    line(T + 150, 2, 1),
    line(T + 200, 40, 40),
  ].join('\n');

  test('reads the activity points (ms on the probe clock, interval, every disk request kind) and nothing else', () => {
    assert.deepEqual(parseActivity(file), [
      { t: T + 50, intervalMs: 50, disk: 0 },
      { t: T + 100, intervalMs: 50, disk: 0 },
      { t: T + 150, intervalMs: 50, disk: 3 },
      { t: T + 200, intervalMs: 50, disk: 80 },
    ]);
  });

  test('the first request of a phase lies in the first interval with requests after a quiet one', () => {
    const pts = parseActivity(file);
    assert.equal(firstRequestAt(pts, T + 120), T + 100, 'the line arrived after the interval began');
    assert.equal(firstRequestAt(pts, T + 400), T + 100, 'a line delivered late still finds it (look-back)');
    assert.equal(firstRequestAt(pts, T + 10_000), undefined, 'nothing new after the phase began');
    assert.equal(firstRequestAt(pts.slice(2), T + 120), undefined, 'no quiet interval before: not a start');
  });
});

describe('moderation lab: the end of the copy in the harness\'s polls', () => {
  const job = (offset: number, len: number, ready = false) => ({ id: 'idlecrypt-1', offset, len, paused: false, speed: 0, ready, status: ready ? 'ready' : 'running' });
  const at = (t: number, j: Sample['job']): Sample => ({ sent: t, t: t + 10, job: j });

  test('the first poll that saw it READY, or all copied', () => {
    assert.equal(firstCaughtUp([at(0, null), at(100, job(10, 100)), at(200, job(100, 100)), at(300, job(100, 100, true))]), 200);
    assert.equal(firstCaughtUp([at(0, job(10, 100)), at(100, job(90, 120, true))]), 100);
  });

  test('a job that completed between two polls ends at the last poll that saw it, where its rate is still measurable', () => {
    const samples = [at(0, null), at(100, job(0, 100)), at(200, job(50, 100)), at(300, job(90, 100)), at(400, null)];
    const end = firstCaughtUp(samples);
    assert.equal(end, 300);
    assert.notEqual(rateOver(samples, 105, end, jobOffset), undefined);
  });

  test('a job still copying, or none yet: Infinity', () => {
    assert.equal(firstCaughtUp([at(0, null), at(100, job(10, 100))]), Infinity);
    assert.equal(firstCaughtUp([at(0, null)]), Infinity);
  });
});

describe('moderation lab: the reaction to a busy phase', () => {
  const job = (paused: boolean, speed = 0) => ({ id: 'idlecrypt-1', offset: 1, len: 100, paused, speed, ready: false, status: paused ? 'paused' : 'running' });
  const at = (t: number, paused: boolean, speed = 0): Sample => ({ sent: t - 5, t, job: job(paused, speed) });
  const ev = (t: number, status: string) => ({ t, arrived: t + 2, id: 'idlecrypt-1', status });

  test('running at the line: the earlier of the paused event and the first poll showing it', () => {
    const r = reactionAt([at(900, false), at(1000, false), at(1100, true)], [ev(1060, 'paused')], 1000);
    assert.deepEqual([r.before, r.ms, r.eventMs, r.pollMs], ['running', 60, 60, 100]);
    assert.equal(measurable(r), true);
  });

  test('running until shortly before the line and slowed by then: early, a negative reaction', () => {
    const r = reactionAt([at(600, false), at(700, false), at(800, true), at(900, true), at(1100, true)], [ev(760, 'paused')], 1000);
    assert.deepEqual([r.before, r.ms], ['early', -240]);
    assert.equal(measurable(r), true);
    const throttled = reactionAt([at(700, false), at(800, false, 4 * 1024 * 1024), at(1100, true)], [], 1000);
    assert.deepEqual([throttled.before, throttled.ms], ['early', -200], 'held under 8 MiB/s counts as slowed');
  });

  test('slowed for longer than EARLY_MS before the line (a hold-off, keys): not a reaction to this phase', () => {
    const r = reactionAt([at(1000 - EARLY_MS - 100, false), at(1000 - EARLY_MS, true), at(900, true), at(1100, true)], [ev(1000 - EARLY_MS - 50, 'paused')], 1000);
    assert.equal(r.before, 'slowed');
    assert.equal(measurable(r), false);
  });
});
