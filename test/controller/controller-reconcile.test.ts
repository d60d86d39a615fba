/**
 * The reconciler against a fake job: seed the fake, run one pass, compare the actions
 * issued (sample-controller style); then the run loop: coalescing, retries, terminal
 * outcomes, stop and release.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Subject } from 'rxjs';
import { DEFAULT_PAUSED_SPEED, plan, Reconciler, type Capabilities } from '../../src/controller/reconcile.ts';
import type { Decision } from '../../src/controller/types.ts';
import type { JobSnapshot } from '../../src/jobs/types.ts';
import { captureLog, eventually, FakeJob, sleep } from './fake-job.ts';

const MiB = 1024 * 1024;
const FULL: Decision = { mode: 'full', speed: 0, state: 'idle', reason: 'quiet for 1s' };
const PAUSE: Decision = { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 37.5/s > 5/s' };
const SLOW: Decision = { mode: 'throttled', speed: 20 * MiB, state: 'busy', reason: 'disk 37.5/s > 5/s' };

const snap = (s: Partial<JobSnapshot> = {}): JobSnapshot => ({ id: 'j', status: 'running', offset: 0, len: 100, speed: 0, paused: false, ready: false, ...s });
const QEMU: Capabilities = { canPause: true, pausedSpeed: DEFAULT_PAUSED_SPEED };
const LIBVIRT: Capabilities = { canPause: false, pausedSpeed: DEFAULT_PAUSED_SPEED };

describe('plan', () => {
  test('pause a running job; nothing to do for a paused one', () => {
    assert.deepEqual(plan(PAUSE, snap(), QEMU), [{ kind: 'pause' }]);
    assert.deepEqual(plan(PAUSE, snap({ paused: true, status: 'paused' }), QEMU), []);
  });

  test('out of a pause: the speed first, then resume, so it does not burst at the old speed', () => {
    assert.deepEqual(plan(SLOW, snap({ paused: true, status: 'paused', speed: 0 }), QEMU), [{ kind: 'setSpeed', bps: 20 * MiB }, { kind: 'resume' }]);
    assert.deepEqual(plan(FULL, snap({ paused: true, status: 'paused', speed: 20 * MiB }), QEMU), [{ kind: 'setSpeed', bps: 0 }, { kind: 'resume' }]);
    assert.deepEqual(plan(FULL, snap({ paused: true, status: 'paused', speed: 0 }), QEMU), [{ kind: 'resume' }]);
  });

  test('only the speed when running', () => {
    assert.deepEqual(plan(SLOW, snap({ speed: 0 }), QEMU), [{ kind: 'setSpeed', bps: 20 * MiB }]);
    assert.deepEqual(plan(FULL, snap({ speed: 0 }), QEMU), []);
  });

  test('a READY mirror is steered too (paused while ready is standby)', () => {
    assert.deepEqual(plan(PAUSE, snap({ status: 'ready', ready: true }), QEMU), [{ kind: 'pause' }]);
    assert.deepEqual(plan(FULL, snap({ status: 'standby', ready: true, paused: true }), QEMU), [{ kind: 'resume' }]);
  });

  test('without pause (libvirt), paused is a very low speed, set once', () => {
    assert.deepEqual(plan(PAUSE, snap({ speed: 0 }), LIBVIRT), [{ kind: 'setSpeed', bps: MiB }]);
    assert.deepEqual(plan(PAUSE, snap({ speed: MiB }), LIBVIRT), []);
    assert.deepEqual(plan(FULL, snap({ speed: MiB }), LIBVIRT), [{ kind: 'setSpeed', bps: 0 }]);
  });

  test('a job that is finishing or finished is left alone', () => {
    for (const status of ['pending', 'waiting', 'aborting', 'concluded', 'null', 'undefined'] as const) {
      assert.deepEqual(plan(PAUSE, snap({ status }), QEMU), [], status);
    }
  });
});

describe('Reconciler.sync (one pass)', () => {
  test('reads the job back, then issues only what closes the gap', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    assert.deepEqual(await r.sync(), { outcome: 'no-decision' });
    assert.deepEqual(job.calls, []);

    r.setDesired(PAUSE);
    const first = await r.sync();
    assert.equal(first.outcome, 'ok');
    assert.deepEqual(job.calls, ['snapshot', 'pause']);

    const second = await r.sync();
    assert.deepEqual(second.outcome === 'ok' && second.actions, []);
    assert.deepEqual(job.calls, ['snapshot', 'pause', 'snapshot']);
  });

  test('level-triggered: a change made behind its back is undone on the next pass', async () => {
    const job = new FakeJob(true, { speed: 0 });
    const r = new Reconciler(job, { logger: captureLog().logger });
    r.setDesired(SLOW);
    await r.sync();
    job.state.speed = 5 * MiB; // someone ran block-job-set-speed
    await r.sync();
    assert.deepEqual(job.actions(), [`setSpeed ${20 * MiB}`, `setSpeed ${20 * MiB}`]);
  });

  test("someone else's pause is left alone: no resume while it lasts, the speed still kept; moderated again once they resume", async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    r.setDesired(FULL);
    await r.sync();
    Object.assign(job.state, { paused: true, status: 'paused' }); // an operator's block-job-pause
    await r.sync();
    assert.equal(r.heldOutside, true);
    r.setDesired(SLOW);
    await r.sync();
    r.setDesired(FULL);
    await r.sync();
    assert.deepEqual(job.actions(), [`setSpeed ${20 * MiB}`, 'setSpeed 0'], 'speeds kept, never resumed');
    assert.equal(job.state.paused, true);
    const warned = records.filter((x) => x.level === 40).map((x) => x.msg);
    assert.equal(warned.length, 1, 'said once');
    assert.match(warned[0]!, /paused by someone else .*leaving it paused until it is resumed/);

    Object.assign(job.state, { paused: false, status: 'running' }); // they resume it
    r.setDesired(PAUSE);
    await r.sync();
    assert.equal(r.heldOutside, false);
    assert.deepEqual(job.actions().slice(2), ['pause']);
    r.setDesired(FULL);
    await r.sync();
    assert.deepEqual(job.actions().slice(3), ['resume'], 'our own pause is ours to undo');
    assert.ok(records.some((x) => x.msg === 'moderation: the job was resumed; moderating it again'));
  });

  test('a pause whose reply was lost (a timeout) is still ours: undone when the guest is idle again', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    r.setDesired(PAUSE);
    job.failNext('pause', 'QMP_TIMEOUT');
    assert.equal((await r.sync()).outcome, 'retry');
    Object.assign(job.state, { paused: true, status: 'paused' }); // QEMU did pause it
    r.setDesired(FULL);
    await r.sync();
    assert.equal(r.heldOutside, false);
    assert.deepEqual(job.actions(), ['pause', 'resume']);
    assert.equal(job.state.paused, false);
  });

  test('a failed command is retryable: the next pass tries again; the error is logged once', async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    r.setDesired(PAUSE);
    job.failNext('pause');
    const a = await r.sync();
    assert.equal(a.outcome, 'retry');
    // twice: once held back at once (on the last snapshot), once after the read
    job.failNext('pause', 'QMP_COMMAND', 'pause: injected failure', 2);
    assert.equal((await r.sync()).outcome, 'retry');
    const c = await r.sync();
    assert.equal(c.outcome, 'ok');
    assert.deepEqual(c.outcome === 'ok' && c.actions, [{ kind: 'pause' }]);
    assert.equal(job.state.paused, true);
    assert.deepEqual(job.actions(), ['pause', 'pause', 'pause', 'pause']);
    const warnings = records.filter((x) => x.level === 40);
    assert.equal(warnings.length, 1, 'the same error twice is one warning');
    assert.equal(warnings[0]!.err, 'pause: injected failure');
    assert.ok(records.some((x) => x.msg === 'moderation: job control works again'));
  });

  test('a decision that only slows the job is applied before the job is read again; speeding up waits for the read', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    r.setDesired(FULL);
    await r.sync();
    assert.deepEqual(job.calls, ['snapshot']);

    r.setDesired(SLOW); // full -> 20 MiB/s: slower, at once
    await r.sync();
    assert.deepEqual(job.calls.slice(1), [`setSpeed ${20 * MiB}`, 'snapshot']);
    r.setDesired(PAUSE);
    await r.sync();
    assert.deepEqual(job.calls.slice(3), ['pause', 'snapshot']);

    r.setDesired(SLOW); // out of the pause: after a read, speed first, then resume
    await r.sync();
    assert.deepEqual(job.calls.slice(5), ['snapshot', 'resume']);
    r.setDesired({ ...SLOW, speed: 40 * MiB }); // faster: after a read
    await r.sync();
    assert.deepEqual(job.calls.slice(7), ['snapshot', `setSpeed ${40 * MiB}`]);
    assert.deepEqual(job.state, { ...job.state, paused: false, speed: 40 * MiB });
  });

  test('held back on a stale snapshot: a job paused by someone else meanwhile stays theirs', async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    r.setDesired(FULL);
    await r.sync();
    job.state.paused = true; // an operator's job-pause, after our last read
    job.state.status = 'paused';
    r.setDesired(PAUSE);
    const a = await r.sync(); // our pause is refused ("already paused"), the read shows theirs
    assert.equal(a.outcome, 'ok');
    assert.equal(r.heldOutside, true);
    assert.equal(records.filter((x) => x.level === 40 && /job control failed/.test(x.msg)).length, 0, 'the refusal is not logged as a failure');
    r.setDesired(FULL);
    await r.sync();
    assert.equal(job.state.paused, true, 'not resumed: the pause is not ours');
    assert.deepEqual(job.actions(), ['pause']);
  });

  test('a failed read is retryable too', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    r.setDesired(PAUSE);
    job.failNext('snapshot', 'QMP_TIMEOUT');
    assert.equal((await r.sync()).outcome, 'retry');
    assert.deepEqual(job.actions(), []);
  });

  test('terminal: the job is gone, has ended, or the connection is lost', async () => {
    const gone = new FakeJob();
    gone.gone = true;
    const r1 = new Reconciler(gone, { logger: captureLog().logger });
    r1.setDesired(PAUSE);
    assert.deepEqual(await r1.sync(), { outcome: 'terminal', end: { cause: 'job-gone' } });

    const ended = new FakeJob(true, { status: 'concluded', error: 'No space left on device' });
    const r2 = new Reconciler(ended, { logger: captureLog().logger });
    r2.setDesired(PAUSE);
    const s2 = await r2.sync();
    assert.deepEqual(s2.outcome === 'terminal' && s2.end, { cause: 'job-ended', status: 'concluded', error: 'No space left on device' });

    const lost = new FakeJob();
    const r3 = new Reconciler(lost, { logger: captureLog().logger });
    r3.setDesired(PAUSE);
    lost.failNext('pause', 'QMP_DISCONNECTED');
    const s3 = await r3.sync();
    assert.equal(s3.outcome, 'terminal');
    assert.equal(s3.outcome === 'terminal' && s3.end.cause, 'error');
  });

  test('every change of state is logged with its reason and the speed as people read it', () => {
    const { logger, records } = captureLog();
    const r = new Reconciler(new FakeJob(), { logger });
    r.setDesired(PAUSE);
    r.setDesired(PAUSE); // no change, no line
    r.setDesired(SLOW);
    r.setDesired(FULL);
    assert.deepEqual(
      records.map(({ state, reason, speed, msg }) => ({ state, reason, speed, msg })),
      [
        { state: 'busy', reason: 'disk 37.5/s > 5/s', speed: 'paused', msg: 'moderation: busy, paused' },
        { state: 'busy', reason: 'disk 37.5/s > 5/s', speed: '20 MiB/s', msg: 'moderation: busy, 20 MiB/s' },
        { state: 'idle', reason: 'quiet for 1s', speed: 'unlimited', msg: 'moderation: idle, unlimited' },
      ],
    );
    const lv = new Reconciler(new FakeJob(false), { logger });
    assert.equal(lv.speedText(PAUSE), 'paused (as 1 MiB/s)');
  });
});

describe('Reconciler run loop', () => {
  test('applies each decision at once, and corrects drift on ticks', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    const decisions = new Subject<Decision>();
    const ticks = new Subject<void>();
    r.start(decisions, ticks);
    decisions.next(PAUSE);
    await eventually(() => job.state.paused);
    job.state.paused = false; // resumed behind our back
    job.state.status = 'running';
    ticks.next();
    await eventually(() => job.state.paused);
    assert.deepEqual(job.actions(), ['pause', 'pause']);
    await r.stop({ release: false });
    assert.deepEqual(await r.ended, { cause: 'stopped' });
  });

  test('decisions that arrive during a slow pass coalesce into one more pass on the latest', async () => {
    const job = new FakeJob();
    job.delayMs = 20;
    const r = new Reconciler(job, { logger: captureLog().logger });
    const decisions = new Subject<Decision>();
    r.start(decisions, new Subject<void>());
    decisions.next(PAUSE);
    await sleep(5); // the first pass is reading the job
    decisions.next(SLOW);
    decisions.next(FULL);
    decisions.next(SLOW);
    await eventually(() => job.state.speed === 20 * MiB && !job.state.paused && job.calls.length >= 3, 1000);
    await r.stop({ release: false });
    // pass 1 plans on the decision newest when its read returns (SLOW: PAUSE is never
    // applied); pass 2, for the decisions that came meanwhile, finds nothing left to do
    assert.deepEqual(job.calls, ['snapshot', `setSpeed ${20 * MiB}`, 'snapshot']);
  });

  test('a pause is sent beside a pass still waiting for its read, and that read is corrected for it', async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    const decisions = new Subject<Decision>();
    const ticks = new Subject<void>();
    r.start(decisions, ticks);
    decisions.next(FULL);
    await eventually(() => job.calls.length === 1);
    await sleep(5);
    const release = job.holdReads();
    ticks.next(); // a pass reads the job, and QEMU is slow to answer
    await eventually(() => job.calls.length === 2);
    decisions.next(PAUSE);
    await eventually(() => job.state.paused, 500); // before the read returns
    assert.deepEqual(job.calls, ['snapshot', 'snapshot', 'pause']);
    release(); // the read says "running": it was answered before the pause
    await sleep(20);
    assert.deepEqual(job.actions(), ['pause'], 'not paused twice');
    assert.equal(r.heldOutside, false, 'the pause is ours');
    decisions.next(FULL);
    await eventually(() => !job.state.paused, 500);
    assert.deepEqual(job.actions(), ['pause', 'resume']);
    await r.stop({ release: false });
    assert.equal(records.filter((x) => x.level >= 40).length, 0, 'nothing failed');
  });

  test('a pause decided while a lower speed is still on its way is sent at once, behind it, and once', async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    const decisions = new Subject<Decision>();
    r.start(decisions, new Subject<void>());
    decisions.next(FULL);
    await eventually(() => job.calls.length === 1);
    await sleep(5);
    job.delayMs = 150; // QEMU's main loop is busy: every reply takes 150 ms
    decisions.next(SLOW); // held back at once
    await eventually(() => job.calls.includes(`setSpeed ${20 * MiB}`), 500);
    await sleep(5);
    decisions.next(PAUSE); // the guest turns busy before QEMU has answered the speed
    await sleep(20);
    assert.ok(job.calls.includes('pause'), `sent before the speed's reply: ${job.calls.join(', ')}`);
    assert.equal(job.state.speed, 0, 'the speed is not answered yet');
    await eventually(() => job.state.paused, 2000);
    await sleep(500); // the passes those decisions started read the job and find it paused
    await r.stop({ release: false });
    assert.deepEqual(job.actions(), [`setSpeed ${20 * MiB}`, 'pause'], 'each command once');
    assert.equal(records.filter((x) => x.level >= 40).length, 0, 'nothing failed');
  });

  test('a plan made stale by a newer decision is not finished: no resume once the guest is busy again', async () => {
    const job = new FakeJob();
    job.delayMs = 20;
    const r = new Reconciler(job, { logger: captureLog().logger });
    const decisions = new Subject<Decision>();
    r.start(decisions, new Subject<void>());
    decisions.next(PAUSE); // ours: the job is paused as asked
    await eventually(() => job.state.paused, 1000);
    await sleep(30);
    decisions.next(SLOW); // out of the pause: speed first, then resume
    await eventually(() => job.calls.includes(`setSpeed ${20 * MiB}`), 1000);
    decisions.next(PAUSE); // busy again while the speed is being set
    await sleep(150);
    await r.stop({ release: false });
    assert.equal(job.state.paused, true);
    assert.ok(!job.actions().includes('resume'), `no resume: ${job.actions().join(', ')}`);
  });

  test('retries on the next tick after a failure', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    const decisions = new Subject<Decision>();
    const ticks = new Subject<void>();
    r.start(decisions, ticks);
    job.failNext('pause');
    decisions.next(PAUSE);
    await eventually(() => job.actions().length === 1);
    assert.equal(job.state.paused, false);
    ticks.next();
    await eventually(() => job.state.paused);
    assert.deepEqual(job.actions(), ['pause', 'pause']);
    await r.stop({ release: false });
  });

  test('a terminal outcome ends the loop and says why', async () => {
    const job = new FakeJob();
    const r = new Reconciler(job, { logger: captureLog().logger });
    const ticks = new Subject<void>();
    const seen: JobSnapshot[] = [];
    r.snapshots$.subscribe((s) => seen.push(s));
    r.start(new Subject<Decision>(), ticks);
    r.setDesired(FULL);
    ticks.next();
    await eventually(() => seen.length === 1);
    job.gone = true;
    ticks.next();
    assert.deepEqual(await r.ended, { cause: 'job-gone' });
    ticks.next();
    await sleep(5);
    assert.equal(job.calls.length, 2, 'no pass after the end');
  });

  test('stop releases the job: unlimited speed and resumed, so that it can complete', async () => {
    const job = new FakeJob(true, { speed: 20 * MiB });
    const r = new Reconciler(job, { logger: captureLog().logger });
    const decisions = new Subject<Decision>();
    r.start(decisions, new Subject<void>());
    decisions.next(PAUSE);
    await eventually(() => job.state.paused);
    await r.stop();
    assert.deepEqual(job.actions(), ['pause', 'setSpeed 0', 'resume']);
    assert.deepEqual(await r.ended, { cause: 'stopped' });
  });

  test('a failing decision stream ends moderation and releases the job', async () => {
    const job = new FakeJob();
    const { logger, records } = captureLog();
    const r = new Reconciler(job, { logger });
    const decisions = new Subject<Decision>();
    r.start(decisions, new Subject<void>());
    decisions.next(PAUSE);
    await eventually(() => job.state.paused);
    decisions.error(new Error('bpftrace exited'));
    const end = await r.ended;
    assert.equal(end.cause, 'error');
    await eventually(() => !job.state.paused);
    assert.ok(records.some((x) => x.level === 50 && x.err === 'internal error: bpftrace exited'));
  });
});
