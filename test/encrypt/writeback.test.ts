/** TargetFlusher (src/encrypt/writeback.ts): when the copy's writes are flushed to the target's disk. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { TargetFlusher, flushingTarget } from '../../src/encrypt/writeback.ts';
import type { JobControl, JobSnapshot } from '../../src/jobs/types.ts';

const MiB = 1024 * 1024;

/** A logger whose records are kept. */
function recordingLogger(): { log: pino.Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const log = pino({ level: 'debug' }, { write: (l: string) => records.push(JSON.parse(l)) });
  return { log, records };
}

/** A sync held until released, counting its calls (the descriptor is opened first, in libuv's pool). */
function heldSync() {
  const pending: Array<() => void> = [];
  return {
    sync: () => new Promise<void>((resolve) => pending.push(resolve)),
    /** Releases the flush in flight, once it has reached its sync. */
    finish: async () => {
      while (pending.length === 0) await new Promise((r) => setTimeout(r, 1));
      pending.shift()!();
      await new Promise((r) => setTimeout(r, 1));
    },
  };
}

async function flushed(f: TargetFlusher): Promise<void> {
  while (f.flushing) await new Promise((r) => setTimeout(r, 1));
}

test('flushes once the copy has written `every` bytes since the last flush, one flush at a time; the first reading is the baseline', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'ic-wb-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 't.luks');
  await writeFile(file, 'x');
  const s = heldSync();
  const f = new TargetFlusher(file, () => 64 * MiB, recordingLogger().log, s.sync);
  f.observe(1000 * MiB); // an adopted job, mid-way: nothing to flush yet
  f.observe(1063 * MiB);
  assert.equal(f.flushing, false, 'under 64 MiB since the baseline');
  f.observe(1064 * MiB);
  assert.equal(f.flushing, true, '64 MiB written: a flush');
  f.observe(1200 * MiB); // a flush in flight: no second one, and the count goes on from 1064 MiB
  await s.finish();
  assert.equal(f.flushing, false);
  assert.equal(f.stats.flushes, 1);
  f.observe(1127 * MiB);
  assert.equal(f.flushing, false, '63 MiB since the last flush began');
  f.observe(1128 * MiB);
  assert.equal(f.flushing, true);
  await s.finish();
  f.observe(1191 * MiB);
  assert.equal(f.flushing, false, 'counted from where the last flush began (1128 MiB)');
  await f.close();
  assert.equal(f.stats.flushes, 2);
});

test('off (null) never flushes; a policy reload to a size takes effect at the next reading; a job that starts over is a new baseline', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'ic-wb-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 't.luks');
  await writeFile(file, 'x');
  let every: number | null = null;
  const f = new TargetFlusher(file, () => every, recordingLogger().log, async () => undefined);
  f.observe(0);
  f.observe(500 * MiB);
  assert.equal(f.flushing, false);
  every = 64 * MiB;
  f.observe(501 * MiB);
  assert.equal(f.flushing, true, '501 MiB since the baseline, now that a size is set');
  await flushed(f);
  f.observe(10 * MiB); // the job's offset went back: a new copy
  f.observe(70 * MiB);
  assert.equal(f.flushing, false, '60 MiB of the new copy');
  f.observe(74 * MiB);
  assert.equal(f.flushing, true);
  await f.close();
  assert.equal(f.stats.flushes, 2);
});

test('a flush that fails is said once, at warn, and flushing stops; the copy is not failed for it', async () => {
  const { log, records } = recordingLogger();
  const f = new TargetFlusher('/nonexistent/idlecrypt/target.luks', () => MiB, log);
  f.observe(0);
  f.observe(2 * MiB);
  await new Promise((r) => setTimeout(r, 50));
  f.observe(4 * MiB);
  f.observe(8 * MiB);
  await f.close();
  const warns = records.filter((r) => r.level === 40);
  assert.equal(warns.length, 1, JSON.stringify(records));
  assert.match(String(warns[0]!.msg), /cannot flush the target/);
  assert.equal(f.stats.flushes, 0);
});

test('fdatasync on a real file, read-only descriptor: counted and timed; close() waits for the flush in flight', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'ic-wb-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 't.luks');
  await writeFile(file, Buffer.alloc(8 * MiB, 1));
  const { log, records } = recordingLogger();
  const f = new TargetFlusher(file, () => 4 * MiB, log);
  f.observe(0);
  f.observe(8 * MiB);
  await f.close(); // without waiting first: close() waits for it
  assert.equal(f.stats.flushes, 1);
  assert.ok(f.stats.ms >= 0 && f.stats.longestMs <= f.stats.ms + 1e-9);
  const summary = records.find((r) => r.msg === 'target flushes during the copy');
  assert.equal(summary?.flushes, 1);
  f.observe(100 * MiB); // after close: nothing
  assert.equal(f.stats.flushes, 1);
});

test('flushingTarget shows every reading to the flusher and passes every call through', async () => {
  const seen: number[] = [];
  const calls: string[] = [];
  const snap: JobSnapshot = { id: 'j', status: 'running', offset: 7, len: 10, speed: 0, paused: false, ready: false };
  const job: JobControl = {
    id: 'j',
    canPause: true,
    snapshot: async () => snap,
    setSpeed: async (b) => void calls.push(`speed ${b}`),
    pause: async () => void calls.push('pause'),
    resume: async () => void calls.push('resume'),
    latency: async () => undefined,
  };
  const flusher = { observe: (o: number) => seen.push(o) } as unknown as TargetFlusher;
  const w = flushingTarget(job, flusher);
  assert.equal(w.id, 'j');
  assert.equal(w.canPause, true);
  assert.deepEqual(await w.snapshot(), snap);
  await w.setSpeed(5);
  await w.pause();
  await w.resume();
  assert.equal(typeof w.latency, 'function');
  assert.deepEqual(seen, [7]);
  assert.deepEqual(calls, ['speed 5', 'pause', 'resume']);
  const noLatency = flushingTarget({ ...job, latency: undefined } as JobControl, flusher);
  assert.equal('latency' in noLatency, false);
});
