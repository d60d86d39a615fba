/** moderate(): activity and policy in, a fake job steered, on the real clock (short times). */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BehaviorSubject, Subject } from 'rxjs';
import { moderate } from '../../src/controller/controller.ts';
import type { ActivityRates, Decision } from '../../src/controller/types.ts';
import { defaultPolicy, parsePolicy, type Policy } from '../../src/policy/index.ts';
import { captureLog, eventually, FakeJob, sleep } from './fake-job.ts';

const MiB = 1024 * 1024;

function sample(diskPerS: number, vm = 'vm1'): ActivityRates {
  return { time: Date.now(), intervalMs: 50, vm, diskPerS, keyPerS: 0, pointerPerS: 0, interruptsPerS: 0, source: 'ebpf' };
}

function setup(o: { policy?: Policy; job?: FakeJob; resyncMs?: number } = {}) {
  const job = o.job ?? new FakeJob();
  const activity = new Subject<ActivityRates>();
  const policy = new BehaviorSubject<Policy>(o.policy ?? defaultPolicy());
  const { logger, records } = captureLog();
  const run = moderate({ activity$: activity, policy$: policy, job, vmName: 'vm1', logger, resyncMs: o.resyncMs ?? 1000 });
  return { job, activity, policy, records, run };
}

describe('moderate', () => {
  test('the first busy sample pauses the job at once; the decision is logged with the VM, job and reason', async () => {
    const { job, activity, records, run } = setup();
    activity.next(sample(0));
    const t0 = Date.now();
    activity.next(sample(400)); // 20 requests in 50 ms
    await eventually(() => job.state.paused);
    assert.ok(Date.now() - t0 < 50, `paused after ${Date.now() - t0} ms`);
    assert.deepEqual(job.actions(), ['pause']);
    const line = records.find((r) => r.msg === 'moderation: busy, paused')!;
    assert.deepEqual(
      { vm: line.vm, job: line.job, state: line.state, reason: line.reason, speed: line.speed },
      { vm: 'vm1', job: 'idlecrypt-vda', state: 'busy', reason: 'disk 80/s > 5/s', speed: 'paused' },
    );
    await run.stop();
  });

  test('decisions$ replays the current decision to late subscribers and completes at the end', async () => {
    const { activity, run } = setup();
    activity.next(sample(400));
    const seen: Decision[] = [];
    let completed = false;
    run.decisions$.subscribe({ next: (d) => seen.push(d), complete: () => (completed = true) });
    assert.deepEqual(seen, [{ mode: 'paused', speed: 0, state: 'busy', reason: 'disk 80/s > 5/s' }]);
    await run.stop();
    assert.equal(completed, true);
    assert.deepEqual(await run.done, { cause: 'stopped' });
  });

  test("the VM's own override applies, and a policy reload takes effect while running", async () => {
    const policy = parsePolicy('vms:\n  vm1:\n    speed:\n      busy: 20MiB\n', 'p.yaml');
    const { job, activity, policy: policy$, run } = setup({ policy });
    activity.next(sample(400));
    await eventually(() => job.state.speed === 20 * MiB);
    assert.equal(job.state.paused, false);
    policy$.next(parsePolicy('vms:\n  vm1:\n    speed:\n      busy: 5MiB\n', 'p.yaml'));
    await eventually(() => job.state.speed === 5 * MiB);
    await run.stop({ release: false });
    assert.deepEqual(job.actions(), [`setSpeed ${20 * MiB}`, `setSpeed ${5 * MiB}`]);
  });

  test('without pause (a libvirt job), busy means 1 MiB/s', async () => {
    const { job, activity, run } = setup({ job: new FakeJob(false) });
    activity.next(sample(400));
    await eventually(() => job.state.speed === MiB);
    await run.stop();
    assert.deepEqual(job.actions(), [`setSpeed ${MiB}`, 'setSpeed 0']);
  });

  test('when the job goes away, moderation ends and says so', async () => {
    const { job, activity, run } = setup({ resyncMs: 10 });
    activity.next(sample(0));
    job.gone = true;
    assert.deepEqual(await run.done, { cause: 'job-gone' });
  });

  test('samples that name another VM are a wiring mistake: warned about once', async () => {
    const { activity, records, run } = setup();
    activity.next(sample(0, 'other'));
    activity.next(sample(0, 'other'));
    await run.stop();
    assert.equal(records.filter((r) => r.msg === 'moderation: activity samples name another VM').length, 1);
  });

  test("without progress$, the reconciler's snapshots drive the deadline: a never-idle guest gets a raised busy speed", async () => {
    // 64 MiB that do not move; deadline 20 s: judged after 1 s, then 64 MiB / (19 s / 1.25) = 4.2 → 5 MiB/s
    const policy = parsePolicy('guarantee:\n  deadline: 20s\n', 'p.yaml');
    const { job, activity, run } = setup({ policy, job: new FakeJob(true, { len: 64 * MiB }), resyncMs: 50 });
    const feed = setInterval(() => activity.next(sample(400)), 50);
    try {
      activity.next(sample(400));
      await eventually(() => job.state.paused);
      await eventually(() => job.state.speed === 5 * MiB && !job.state.paused, 3000);
      const d = await new Promise<Decision>((resolve) => run.decisions$.subscribe(resolve));
      assert.equal(d.mode, 'throttled');
      assert.match(d.reason, /^disk 80\/s > 5\/s; raised to 5 MiB\/s to finish by \d{4}-/);
    } finally {
      clearInterval(feed);
      await run.stop();
    }
  });

  test('under the deadline, a mirror that has copied everything but is not yet in sync is not left paused: QEMU makes it ready only while it runs', async () => {
    const policy = parsePolicy('guarantee:\n  deadline: 20s\n', 'p.yaml');
    const { job, activity, run } = setup({ policy, job: new FakeJob(true, { len: 64 * MiB }), resyncMs: 50 });
    const feed = setInterval(() => activity.next(sample(400)), 50);
    try {
      activity.next(sample(400));
      await eventually(() => job.state.speed === 5 * MiB && !job.state.paused, 3000); // the deadline engaged
      job.state.offset = job.state.len; // copied; QEMU has not yet turned it ready
      await sleep(300);
      assert.equal(job.state.paused, false, 'a paused mirror would never turn ready');
      assert.equal(job.state.speed, MiB, 'a trickle: there is nothing left to copy');
      job.state.ready = true; // in sync: the busy guest gets its disk back until the pivot
      await eventually(() => job.state.paused, 1000);
    } finally {
      clearInterval(feed);
      await run.stop();
    }
  });
});
