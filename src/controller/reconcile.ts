/**
 * The reconciler: makes the job match the desired decision, level-triggered, in the manner
 * of Kubernetes controller-runtime. Each pass reads the job back (`snapshot`), computes the
 * actions that close the gap from that whole snapshot (`plan`, pure), applies them, and
 * reports. A pass runs on every new decision and on every tick, so a missed or failed
 * command, or someone else's `block-job-set-speed`, is corrected on the next tick instead
 * of being remembered as done. Errors are retryable (try again next tick) unless they mean
 * the job or the VM is gone (terminal: moderation ends).
 *
 * QMP (QEMU 7.2 qapi/job.json, qapi/block-core.json):
 * - `job-pause` fails if the job is already paused by a user ("The job is already paused"),
 *   `job-resume` if it is not ("Can't resume a job that was not paused"): hence pause and
 *   resume only from what the snapshot shows.
 * - `block-job-set-speed` takes bytes/s, 0 = unlimited; the limit acts per 100 ms slice,
 *   and a mirror copies up to `buf-size` between sleeps (host-facts.md), so a low limit
 *   is approximate over short spans.
 * - A paused job stays paused while READY (status `standby`): pausing a READY mirror is
 *   allowed, but it cannot be completed until resumed; `stop()` resumes it by default.
 * - `paused` in query-block-jobs is true for any pause: ours, another client's
 *   (`job-pause`, `block-job-pause`), or QEMU's own while it
 *   drains the disk. A pause that is not ours is the one thing not undone: the operator
 *   who paused the copy keeps it paused (the speed is still kept right, for when they
 *   resume it), and a pause of QEMU's passes by itself. Ours is the pause from the
 *   moment we ask for it until a snapshot shows the job running again.
 *
 * Holding back comes first. A QMP round trip beside a copy that keeps QEMU's main loop 90%
 * busy takes 2 ms typically but 50-70 ms one time in ten and up to 350 ms (measured on the
 * project's hosts, sparse raw source, writeback, 2026-12-02); a pass that read the job
 * before acting put one such read, and any pass still in flight (most decisions arrive
 * during one: passes run on every 250 ms tick), between a busy guest and its pause: from
 * a decision to its command leaving idlecrypt took 44 ms by the median and up to 313 ms.
 * Now 1 ms by the median (docs/starvation.md).
 * So a decision that only slows the job (a pause, a lower speed) is applied at once,
 * planned on the last snapshot with what has been applied since: at the start of a pass,
 * or beside a pass still waiting for QEMU (its commands then queue right behind that
 * pass's, and the pass adds what they did to what it read, which may not show it). The
 * pass then reads the job back as usual and corrects whatever that snapshot did not know.
 * A pass plans on the newest decision, taken after its read, and stops applying a plan
 * once a newer decision has come. Speeding up (a resume, a higher speed) always waits for
 * a fresh read.
 */
import { Subject, type Observable, type Subscription } from 'rxjs';
import { describeError, isIdlecryptError, type ErrorCode } from '../errors.ts';
import type { JobControl, JobSnapshot, JobStatus } from '../jobs/types.ts';
import type { Logger } from '../log.ts';
import { formatSpeed } from '../policy/units.ts';
import type { Decision } from './types.ts';

export type Action = { readonly kind: 'setSpeed'; readonly bps: number } | { readonly kind: 'pause' } | { readonly kind: 'resume' };

export interface Capabilities {
  /** Whether `pause()` is real; a libvirt block job cannot be paused. */
  readonly canPause: boolean;
  /** The speed that stands in for 'paused' when it is not: bytes/s, > 0. */
  readonly pausedSpeed: number;
}

/**
 * 1 MiB/s: low enough to leave a busy guest its disk (the test guest's loop alone makes
 * ~155 MiB/s), and a whole MiB/s because libvirt's `--bandwidth` counts in MiB/s, so the
 * speed reads back as set and the reconciler does not re-apply it every tick.
 */
export const DEFAULT_PAUSED_SPEED = 1024 * 1024;

/** The job can take commands in these states (QAPI JobStatus). */
const STEERABLE: ReadonlySet<JobStatus> = new Set(['created', 'running', 'paused', 'ready', 'standby']);
/** The job will not run again: moderation is over. pending/waiting are on the way there; we wait. */
const ENDED: ReadonlySet<JobStatus> = new Set(['aborting', 'concluded', 'null']);

/**
 * The actions that take the job from `s` to `d`. Pure. Speed before resume, so that a job
 * coming out of a pause starts at its new speed; when pausing, the speed is left as it is
 * (it does not matter while paused, and the next decision sets it).
 */
export function plan(d: Decision, s: JobSnapshot, caps: Capabilities): Action[] {
  if (!STEERABLE.has(s.status)) return [];
  if (d.mode === 'paused') {
    if (caps.canPause) return s.paused ? [] : [{ kind: 'pause' }];
    return s.speed === caps.pausedSpeed ? [] : [{ kind: 'setSpeed', bps: caps.pausedSpeed }];
  }
  const actions: Action[] = [];
  if (s.speed !== d.speed) actions.push({ kind: 'setSpeed', bps: d.speed });
  if (s.paused && caps.canPause) actions.push({ kind: 'resume' });
  return actions;
}

/**
 * The actions that take the job from `s` to `d` if they all only slow it (a pause; a speed
 * lower than the one it runs at, 0 being unlimited), else none. Pure.
 */
export function holdBack(d: Decision, s: JobSnapshot, caps: Capabilities): Action[] {
  const actions = plan(d, s, caps);
  const slows = (a: Action) => a.kind === 'pause' || (a.kind === 'setSpeed' && a.bps > 0 && (s.speed === 0 || a.bps < s.speed));
  return actions.length > 0 && actions.every(slows) ? actions : [];
}

/** Whether two decisions ask the job for the same thing (their mode and speed). */
function sameTarget(a: Decision, b: Decision): boolean {
  return a.mode === b.mode && a.speed === b.speed;
}

/** The job as it is after `a`, for planning before the next read. Pure. */
function after(s: JobSnapshot, a: Action): JobSnapshot {
  if (a.kind === 'setSpeed') return { ...s, speed: a.bps };
  return { ...s, paused: a.kind === 'pause' };
}

/** Why moderation ended. */
export type ModerationEnd =
  | { readonly cause: 'stopped' }
  /** The job finished or is going away (status aborting, concluded or null). */
  | { readonly cause: 'job-ended'; readonly status: JobStatus; readonly error?: string }
  /** The job is no longer listed (dismissed, or the VM restarted). */
  | { readonly cause: 'job-gone' }
  /** A terminal error (connection lost) or the decision stream failed. */
  | { readonly cause: 'error'; readonly error: unknown };

export type SyncResult =
  | { readonly outcome: 'no-decision' }
  /** `actions` were applied (possibly none: already in the desired state). */
  | { readonly outcome: 'ok'; readonly snapshot: JobSnapshot; readonly actions: readonly Action[] }
  /** Failed; `actions` are those applied before the failure. Tried again on the next tick. */
  | { readonly outcome: 'retry'; readonly error: unknown; readonly snapshot?: JobSnapshot; readonly actions: readonly Action[] }
  | { readonly outcome: 'terminal'; readonly end: ModerationEnd; readonly snapshot?: JobSnapshot };

const TERMINAL_CODES: ReadonlySet<ErrorCode> = new Set(['QMP_DISCONNECTED', 'QMP_STATE', 'VM_EXITED', 'CANCELLED']);

/**
 * Default terminal test: the connection is gone or closed, the VM exited, or the run was
 * cancelled. Anything else (a QMP command error, a timeout) is retried: if it meant the job
 * is gone, the next snapshot says so.
 */
export function isTerminalError(e: unknown): boolean {
  return isIdlecryptError(e) && TERMINAL_CODES.has(e.code);
}

export interface ReconcilerOptions {
  readonly logger: Logger;
  /** See DEFAULT_PAUSED_SPEED; used only when the job cannot pause. */
  readonly pausedSpeed?: number;
  readonly isTerminal?: (e: unknown) => boolean;
}

export class Reconciler {
  readonly caps: Capabilities;
  /** Every snapshot read, for progress (the deadline) and views. Completes when moderation ends. */
  readonly snapshots$: Observable<JobSnapshot>;
  /** Settles (never rejects) when moderation ends, with why. */
  readonly ended: Promise<ModerationEnd>;

  private readonly log: Logger;
  private readonly isTerminal: (e: unknown) => boolean;
  private readonly snapshots = new Subject<JobSnapshot>();
  private desired: Decision | undefined;
  /** When `desired` last changed (Date.now()), for the log of what was applied. */
  private desiredAt = 0;
  /** The job as the last pass read it, with the actions applied since. */
  private known: JobSnapshot | undefined;
  /** Actions sent so far: orders a hold-back against a read (see sync). */
  private sent = 0;
  /** Hold-backs that succeeded since the last read began, with their place in that order. */
  private rushed: { sent: number; action: Action }[] = [];
  /** A hold-back in progress (settles, never rejects). */
  private rushing: Promise<void> | null = null;
  private lastError: string | undefined;
  /** The job's pause, if it is paused, is ours (see the file comment). */
  private ourPause = false;
  /** The job is paused by someone else, and we leave it so. */
  private held = false;
  private inFlight: Promise<void> | null = null;
  private again = false;
  private started = false;
  private finished = false;
  private subs: Subscription[] = [];
  private resolveEnded!: (e: ModerationEnd) => void;

  constructor(
    readonly job: JobControl,
    options: ReconcilerOptions,
  ) {
    this.log = options.logger;
    this.isTerminal = options.isTerminal ?? isTerminalError;
    const pausedSpeed = options.pausedSpeed ?? DEFAULT_PAUSED_SPEED;
    if (!(pausedSpeed > 0) || !Number.isSafeInteger(pausedSpeed)) throw new RangeError(`pausedSpeed must be a positive integer, got ${pausedSpeed}`);
    this.caps = { canPause: job.canPause, pausedSpeed };
    this.snapshots$ = this.snapshots.asObservable();
    this.ended = new Promise((resolve) => (this.resolveEnded = resolve));
  }

  get decision(): Decision | undefined {
    return this.desired;
  }

  /** A new desired state; logged, as every change of state is, with its reason. */
  setDesired(d: Decision): void {
    const prev = this.desired;
    this.desired = d;
    if (!prev || !sameTarget(prev, d)) this.desiredAt = Date.now();
    if (d.learnt && d.learnt.summary !== prev?.learnt?.summary) {
      this.log.info({ learnt: d.learnt.levels, thresholds: d.learnt.thresholds }, `moderation: thresholds learnt: ${d.learnt.summary}`);
    }
    if (prev && prev.state === d.state && prev.mode === d.mode && prev.speed === d.speed && prev.reason === d.reason) return;
    // The headroom retunes the cap every few hundred ms: that is not a change of state.
    if (prev && prev.state === d.state && prev.mode === d.mode && prev.reason === d.reason && d.headroom) {
      this.log.debug({ capBps: d.headroom.capBps, load: d.headroom.load, ...(d.headroom.ceiling ? { ceiling: true } : {}) }, 'moderation: headroom cap');
      return;
    }
    // The latency control judges twice a second and moves a graded speed up or down by a
    // step each time: only a change of state or mode (paused, throttled, full) is news.
    if (prev && prev.state === d.state && prev.mode === d.mode && d.latency) {
      this.log.debug({ latency: d.latency }, `moderation: ${d.latency.note}`);
      return;
    }
    this.log.info({ state: d.state, reason: d.reason, speed: this.speedText(d), ...(d.latency ? { latency: d.latency } : {}) }, `moderation: ${d.state}, ${this.speedText(d)}`);
  }

  /** "paused", "unlimited", "15 MiB/s", or "paused (as 1 MiB/s)" where pause is emulated. */
  speedText(d: Decision): string {
    if (d.mode === 'paused') return this.caps.canPause ? 'paused' : `paused (as ${formatSpeed(this.caps.pausedSpeed)})`;
    if (d.headroom) return `${d.mode === 'full' ? 'full' : formatSpeed(d.speed)}, headroom cap ${formatSpeed(d.headroom.capBps)}${d.headroom.ceiling ? ' (ceiling after a stall)' : ''}`;
    return d.mode === 'full' ? 'unlimited' : formatSpeed(d.speed);
  }

  /**
   * One pass: hold the job back at once if the decision only slows it (planned on the last
   * snapshot), then read the job back, plan on the newest decision, apply. Never throws.
   */
  async sync(): Promise<SyncResult> {
    if (!this.desired) return { outcome: 'no-decision' };
    const applied: Action[] = [...(await this.rush())];
    const readAfter = this.sent;
    let read: JobSnapshot | undefined;
    try {
      read = await this.job.snapshot();
    } catch (e) {
      return this.failed(e, applied, undefined);
    }
    if (!read) return { outcome: 'terminal', end: { cause: 'job-gone' } };
    if (ENDED.has(read.status)) {
      return { outcome: 'terminal', snapshot: read, end: { cause: 'job-ended', status: read.status, ...(read.error ? { error: read.error } : {}) } };
    }
    // A hold-back sent while the job was being read (beside this pass, see kick) is
    // answered after the read and may not show in it: what it did is added to what was read.
    for (let r = this.rushing; r; r = this.rushing) await r;
    const since = this.rushed.filter((r) => r.sent > readAfter).map((r) => r.action);
    this.rushed = [];
    applied.push(...since);
    const snapshot = since.reduce(after, read);
    this.known = snapshot;
    if (!snapshot.paused) this.ourPause = false;
    this.hold(this.caps.canPause && snapshot.paused && !this.ourPause, snapshot);
    // The newest decision: one that arrived during the read is acted on now.
    const d = this.desired;
    const actions = plan(d, snapshot, this.caps).filter((a) => !(this.held && a.kind === 'resume'));
    for (const a of actions) {
      // A newer decision of another mode or speed came meanwhile (and may have been held
      // back already): the rest of this plan is stale, and the next pass plans the newest.
      if (!sameTarget(this.desired, d)) break;
      this.sent++;
      try {
        await this.apply(a);
        applied.push(a);
      } catch (e) {
        return this.failed(e, applied, snapshot);
      }
    }
    if (applied.length > 0) this.log.debug({ actions: applied, was: { paused: read.paused, speed: read.speed }, ms: Date.now() - this.desiredAt }, 'moderation: applied');
    if (this.lastError !== undefined) {
      this.log.info({ after: this.lastError }, 'moderation: job control works again');
      this.lastError = undefined;
    }
    return { outcome: 'ok', snapshot: read, actions: applied };
  }

  /**
   * Holds the job back now if the newest decision only slows it, planned on what the job is
   * known to be with the commands already sent; the actions that succeeded. It does not wait
   * for a hold-back or a pass's command still in flight: QEMU answers one connection's
   * commands in order, so this one queues right behind them, where waiting for their
   * replies first cost a pause up to 113 ms (a lower speed in flight as the guest turned
   * busy, test/moderation 2026-12-03). A failure is not news: the next read sees the job as
   * it is, and the plan on it tries again.
   */
  private rush(): Promise<Action[]> {
    const known = this.known;
    if (this.finished || !this.desired || !known || !STEERABLE.has(known.status) || this.held) return Promise.resolve([]);
    const actions = holdBack(this.desired, known, this.caps);
    if (actions.length === 0) return Promise.resolve([]);
    const run = async (): Promise<Action[]> => {
      const done: Action[] = [];
      for (const a of actions) {
        const sent = ++this.sent;
        if (!(await this.apply(a).then(() => true, () => false))) break;
        this.rushed.push({ sent, action: a });
        done.push(a);
      }
      if (done.length > 0) this.log.debug({ actions: done, ms: Date.now() - this.desiredAt }, 'moderation: held back');
      return done;
    };
    const p = run(); // its first command is on its way (and in `known`) before this returns
    const settled = Promise.all([this.rushing, p]).then(
      () => undefined,
      () => undefined,
    );
    this.rushing = settled;
    void settled.then(() => {
      if (this.rushing === settled) this.rushing = null;
    });
    return p;
  }

  /**
   * Issues one action. What the job is known to be follows it as it is sent, so that a
   * hold-back planned meanwhile does not send it again; if it fails, and nothing was sent
   * after it, back to what it was.
   */
  private async apply(a: Action): Promise<void> {
    const before = this.known;
    const expected = before && after(before, a);
    this.known = expected;
    try {
      await this.send(a);
    } catch (e) {
      if (this.known === expected) this.known = before;
      throw e;
    }
  }

  private async send(a: Action): Promise<void> {
    if (a.kind === 'setSpeed') await this.job.setSpeed(a.bps);
    else if (a.kind === 'pause') {
      const was = this.ourPause;
      this.ourPause = true; // before asking: a reply lost in a timeout must not make it someone else's
      try {
        await this.job.pause();
      } catch (e) {
        // QEMU answered no (the job was paused by someone else meanwhile): not ours.
        if (isIdlecryptError(e) && e.code === 'QMP_COMMAND') this.ourPause = was;
        throw e;
      }
    } else await this.job.resume();
  }

  /** Whether the job is held paused by someone else; logged when that changes. */
  get heldOutside(): boolean {
    return this.held;
  }

  private hold(held: boolean, s: JobSnapshot): void {
    if (held === this.held) return;
    this.held = held;
    if (held) {
      this.log.warn(
        { status: s.status },
        'moderation: the job was paused by someone else (job-pause or block-job-pause from another QMP client, or QEMU itself): leaving it paused until it is resumed',
      );
    } else {
      this.log.warn({ status: s.status }, 'moderation: the job was resumed; moderating it again');
    }
  }

  private failed(e: unknown, applied: Action[], snapshot: JobSnapshot | undefined): SyncResult {
    if (this.isTerminal(e)) return { outcome: 'terminal', end: { cause: 'error', error: e }, ...(snapshot ? { snapshot } : {}) };
    const message = describeError(e);
    // Once per distinct error, not every tick: a job that cannot be resumed for a while
    // (QEMU pausing it internally) would otherwise fill the log 4 times a second.
    if (message !== this.lastError) this.log.warn({ err: message }, 'moderation: job control failed, retrying on the next tick');
    this.lastError = message;
    return { outcome: 'retry', error: e, actions: applied, ...(snapshot ? { snapshot } : {}) };
  }

  /**
   * Runs passes on every decision and every tick until stopped or a terminal outcome. At
   * most one pass at a time; triggers during a pass coalesce into one more pass, which
   * then reads the latest decision and a fresh snapshot.
   */
  start(decisions$: Observable<Decision>, ticks$: Observable<unknown>): void {
    if (this.started) throw new Error('Reconciler.start: already started');
    this.started = true;
    const track = (sub: Subscription) => (this.finished ? sub.unsubscribe() : this.subs.push(sub));
    track(
      decisions$.subscribe({
        next: (d) => {
          this.setDesired(d);
          this.kick();
        },
        error: (e: unknown) => {
          // Without decisions the guest's activity is unknown, and unknown never holds
          // the copy back (nor leaves it paused for good).
          this.log.error({ err: describeError(e) }, 'moderation: the decision stream failed; releasing the job to full speed');
          this.finish({ cause: 'error', error: e });
          void this.inFlightDone().then(() => this.release());
        },
      }),
    );
    if (!this.finished) track(ticks$.subscribe(() => this.kick()));
  }

  /**
   * Ends moderation: no more passes; waits for one in progress; then, with `release`
   * (default), leaves the job resumed at unlimited speed, so that it can converge and be
   * completed (a paused mirror cannot complete, host-facts.md).
   */
  async stop(options: { release?: boolean } = {}): Promise<void> {
    this.finish({ cause: 'stopped' });
    await this.inFlightDone();
    if (options.release ?? true) await this.release();
  }

  /** Best effort: resume and set unlimited speed, if the job is still there. */
  async release(): Promise<void> {
    try {
      const s = await this.job.snapshot();
      if (!s || !STEERABLE.has(s.status)) return;
      if (s.speed !== 0) await this.job.setSpeed(0);
      if (s.paused && this.caps.canPause) await this.job.resume();
      this.log.debug({ was: { paused: s.paused, speed: s.speed } }, 'moderation: job released to full speed');
    } catch (e) {
      this.log.warn({ err: describeError(e) }, 'moderation: could not release the job to full speed');
    }
  }

  private kick(): void {
    if (this.finished) return;
    if (this.inFlight) {
      this.again = true;
      // A pass is waiting for QEMU (under load a reply takes up to 350 ms): hold the job
      // back beside it now rather than after it; its read is corrected for this.
      void this.rush();
      return;
    }
    this.inFlight = (async () => {
      do {
        this.again = false;
        const r = await this.sync();
        if ('snapshot' in r && r.snapshot) this.snapshots.next(r.snapshot);
        if (r.outcome === 'terminal') {
          this.finish(r.end);
          break;
        }
      } while (this.again && !this.finished);
    })()
      .catch((e: unknown) => this.finish({ cause: 'error', error: e }))
      .finally(() => {
        this.inFlight = null;
      });
  }

  private async inFlightDone(): Promise<void> {
    while (this.inFlight || this.rushing) await (this.inFlight ?? this.rushing);
  }

  private finish(end: ModerationEnd): void {
    if (this.finished) return;
    this.finished = true;
    for (const s of this.subs) s.unsubscribe();
    this.subs = [];
    if (end.cause === 'job-ended') this.log.info({ status: end.status, ...(end.error ? { jobError: end.error } : {}) }, 'moderation: the job ended');
    else if (end.cause === 'job-gone') this.log.info('moderation: the job is gone');
    else if (end.cause === 'error') this.log.error({ err: describeError(end.error) }, 'moderation stopped by an error');
    this.snapshots.complete();
    this.resolveEnded(end);
  }
}
