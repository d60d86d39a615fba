/**
 * From activity samples to the desired job state: small pure RxJS operators, each with the
 * scheduler as a parameter (RxJS's own operator style), so that every timing rule is
 * marble-tested in virtual time.
 *
 *   ActivityRates ─ classifyActivity ─ staleAfter ─ holdOff ─┐
 *   Policy ──────────────────────────────────────────────────┼─ desiredDecision ─ Decision
 *   JobProgress ─ guarantee ─────────────────────────────────┘
 *
 * Nothing here waits for a sample to be confirmed: the sample that first crosses a
 * threshold yields the slower decision synchronously, in the same tick. The 250 ms
 * reaction budget of issue 4 belongs to the probes and QMP, not to this logic.
 */
import { isDeepStrictEqual } from 'node:util';
import {
  combineLatest,
  concat,
  defer,
  distinctUntilChanged,
  filter,
  map,
  of,
  scan,
  share,
  shareReplay,
  startWith,
  switchMap,
  tap,
  timer,
  withLatestFrom,
  type Observable,
  type OperatorFunction,
  type SchedulerLike,
} from 'rxjs';
import { fixedThresholds, LEARNABLE, SIGNALS, type EffectivePolicy, type LearnableSignal, type Moderation } from '../policy/schema.ts';
import { formatDuration, formatSpeed, PAUSED, UNLIMITED } from '../policy/units.ts';
import { classify, describeReasons, rateOf } from './classify.ts';
import { applyHeadroom } from './headroom.ts';
import { calibrate, describeCalibration, EMPTY_CALIBRATION, thresholdsInForce, type Calibration } from './calibrate.ts';
import { INITIAL_LATENCY, latencyStep, type LatencyMemory, type LatencySample, type LatencyView } from './latency.ts';
import { DISK_KINDS, type ActivityRates, type Classified, type Decision, type DiskKind, type Guarantee, type JobProgress, type LearntThresholds, type Signal, type StateChange } from './types.ts';

/** Structural equality, typed, for distinctUntilChanged. */
export const same = <T>(a: T, b: T): boolean => isDeepStrictEqual(a, b);

// ---------------------------------------------------------------- windowed rates

interface WindowSample {
  readonly start: number;
  readonly end: number;
  /** events in the sample per signal; null = unknown */
  readonly counts: Readonly<Record<Signal, number | null>>;
  /** disk requests in the sample by kind, when the source counts them apart */
  readonly kinds?: Readonly<Record<DiskKind, number>>;
}

export interface RateWindow {
  readonly samples: readonly WindowSample[];
}

export const EMPTY_WINDOW: RateWindow = { samples: [] };

/**
 * Adds one sample and returns the rates averaged over the last `windowMs`: the events in
 * the window (a sample straddling its start counts pro rata) divided by the window's length.
 * Dividing by the whole window, also before it has filled, is what makes one stray request
 * 1/window (4/s at 250 ms) rather than 1/interval (20/s at 50 ms).
 */
export function pushSample(
  w: RateWindow,
  s: ActivityRates,
  windowMs: number,
  defaultIntervalMs: number,
): { window: RateWindow; rates: ActivityRates } {
  const prev = w.samples.at(-1);
  const measured = s.intervalMs ?? (prev ? s.time - prev.end : defaultIntervalMs);
  const length = measured > 0 ? measured : defaultIntervalMs;
  const counts = Object.fromEntries(
    SIGNALS.map((sig) => {
      const r = rateOf(s, sig);
      return [sig, r === null ? null : (r * length) / 1000];
    }),
  ) as Record<Signal, number | null>;
  const kinds = s.diskKindsPerS ? (Object.fromEntries(DISK_KINDS.map((k) => [k, (s.diskKindsPerS![k] * length) / 1000])) as Record<DiskKind, number>) : undefined;
  const from = s.time - windowMs;
  const samples = [...w.samples.filter((x) => x.end > from), { start: s.time - length, end: s.time, counts, ...(kinds ? { kinds } : {}) }];
  const windowedOf = (count: (x: WindowSample) => number | null | undefined): number => {
    let n = 0;
    for (const x of samples) {
      const c = count(x);
      if (c == null) continue;
      const span = x.end - x.start;
      n += x.start >= from ? c : (c * (x.end - from)) / span;
    }
    return n / (windowMs / 1000);
  };
  // unknown now: stays unknown
  const windowed = (sig: Signal): number | null => (counts[sig] === null ? null : windowedOf((x) => x.counts[sig]));
  return {
    window: { samples },
    rates: {
      ...s,
      intervalMs: windowMs,
      diskPerS: windowed('disk') ?? 0,
      ...(kinds ? { diskKindsPerS: Object.fromEntries(DISK_KINDS.map((k) => [k, windowedOf((x) => x.kinds?.[k])])) as Record<DiskKind, number> } : {}),
      keyPerS: windowed('keyboard'),
      pointerPerS: windowed('pointer'),
      interruptsPerS: windowed('interrupts'),
      stallMsPerS: windowed('stall'),
      inflightMsPerS: windowed('inflight'),
    },
  };
}

// ---------------------------------------------------------------- operators

/**
 * Activity samples → busy/idle per sample, with the policy's window and thresholds in
 * force when the sample arrives (a reload applies from the next sample, 50 ms later).
 */
export function classifyActivity(policy$: Observable<EffectivePolicy>, learning: Learning = {}): OperatorFunction<ActivityRates, Classified> {
  interface Acc {
    readonly window: RateWindow;
    readonly calibration: Calibration;
    /** the learnt thresholds last computed, kept by reference until they change */
    readonly learnt: LearntThresholds | undefined;
    /** the signals learnt when `learnt` was made */
    readonly auto: string;
    readonly out: Classified | null;
  }
  return (source) =>
    source.pipe(
      withLatestFrom(policy$),
      scan(
        (acc: Acc, [sample, p]): Acc => {
          const { window, rates } = pushSample(acc.window, sample, p.sampling.window, p.sampling.interval);
          // Learnt whatever the policy says, so that switching to auto by a reload starts
          // from what was seen; what was learnt outlives reloads (it is not the policy's).
          const calibration = calibrate(acc.calibration, sample.time, { disk: rates.diskPerS, interrupts: rates.interruptsPerS, ...rates.diskKindsPerS });
          const auto = LEARNABLE.filter((sig) => p.thresholds[sig] === 'auto');
          let learnt = acc.learnt;
          if (auto.length === 0) learnt = undefined;
          else if (!learnt || calibration.learntAt !== acc.calibration.learntAt || auto.join() !== acc.auto) {
            const { thresholds, learnt: got, kinds } = thresholdsInForce(p.thresholds, calibration);
            const next: LearntThresholds = {
              thresholds,
              levels: Object.fromEntries(got.map((sig) => [sig, calibration.learnt[sig as LearnableSignal]!])),
              ...(Object.keys(kinds).length > 0 ? { kinds } : {}),
              summary: describeCalibration(calibration, auto),
            };
            learnt = learnt && same(learnt, next) ? learnt : next;
            if (calibration.learntAt !== acc.calibration.learntAt) learning.onLearnt?.(calibration);
          }
          const thresholds = learnt?.thresholds ?? fixedThresholds(p.thresholds);
          const learntSignals = learnt ? (Object.keys(learnt.levels) as Signal[]) : [];
          const c = classify(rates, thresholds, learntSignals, learnt?.kinds);
          return { window, calibration, learnt, auto: auto.join(), out: { time: sample.time, ...c, diskPerS: sample.diskPerS, ...(learnt ? { learnt } : {}) } };
        },
        { window: EMPTY_WINDOW, calibration: learning.initial ?? EMPTY_CALIBRATION, learnt: undefined, auto: '', out: null },
      ),
      map((acc) => acc.out!),
    );
}

/** What the controller learnt of a guest (calibrate.ts), carried over restarts by the caller. */
export interface Learning {
  /** What an earlier run learnt of this guest. */
  readonly initial?: Calibration;
  /** Called each time the thresholds are recomputed (every few seconds), to save them. */
  readonly onLearnt?: (c: Calibration) => void;
}

/**
 * A busy classification that is not followed by any sample for `ms` turns idle: when the
 * probes stop reporting, the guest's activity is unknown, and unknown never keeps the guest
 * busy, or a dead probe would hold the copy paused for good.
 */
export function staleAfter(ms: number, scheduler: SchedulerLike): OperatorFunction<Classified, Classified> {
  return (source) =>
    source.pipe(
      switchMap((c) =>
        c.state === 'busy'
          ? concat(
              of(c),
              timer(ms, scheduler).pipe(map((): Classified => ({ time: c.time + ms, state: 'idle', reasons: [], note: `no activity data for ${formatDuration(ms)}` }))),
            )
          : of(c),
      ),
    );
}

const isUrgent = (c: Classified): boolean => c.reasons.some((r) => URGENT.has(r.signal));

/**
 * The signals of a guest the copy holds back: its vCPUs waiting for QEMU's loop (stall), its
 * requests waiting to complete (inflight). Both grow because of the copy, and fall once it
 * pauses, whether the guest works or not; the hold-off below treats them alike.
 */
export const HELD: ReadonlySet<Signal> = new Set(['stall', 'inflight']);

/** Signals that pause the copy whatever its latency: a person at the console, a guest held back by the copy. */
const URGENT: ReadonlySet<Signal> = new Set(['keyboard', 'pointer', ...HELD]);

/**
 * Busy/idle samples → state changes with the hold-off: busy at once on the first busy
 * sample; when it turns quiet, 'holdoff' (the job keeps the busy speed) and, after
 * `holdoff` ms without a busy sample, 'idle'. A busy sample during the hold-off cancels it.
 * The very first state may be idle at once: there is nothing to hold off from. A busy state
 * is `urgent` while input or a held signal (HELD) is among its reasons and for `holdoff`
 * after they leave it (the latency control grades only a busy state that is not urgent).
 *
 * What is said of the stall below holds for `inflight` too (HELD: "the stall" is either or
 * both): a guest's requests held up by the copy complete once it pauses, and a guest that
 * does not work then shows nothing more. A trickle of flushes the copy slows to over the
 * threshold is such a spell, and comes back whenever the copy runs: a full hold-off each
 * time would cost the idle copy a second a time.
 *
 * A busy spell that only the stall made (no other signal since the state was last idle) is
 * held off for one window (`sampling.window`), not `holdoff`. The stall is a backstop
 * for a guest too frozen to submit its requests: once the copy pauses, a guest that works
 * gets its requests through within the window and its disk signal takes over, with the full
 * hold-off. An idle guest waits for the lock too, beside a copy held to its headroom (its
 * timer interrupts lose the lock to the main loop: 300-600 ms without it were seen), and
 * the full hold-off after each such wait cost an idle phase 1.3 s of copying, twice in
 * some (sparse raw disk, cache=none: the idle copy at 58-65% of an unthrottled mirror's
 * speed; docs/starvation.md).
 *
 * A spell that the stall began, and in which the disk (or interrupts) then stayed over its
 * threshold for no longer than two windows, is held off for one window too: once a copy that
 * held the vCPU pauses, the requests the guest could not submit meanwhile reach QEMU at
 * once, and a guest with a background (a trickle of log writes, `thresholds: auto`) is
 * over its disk threshold for a window with them. That is the stall's catch-up, not work:
 * a guest that works stays over it (the one-at-a-time guest frozen by the copy: seconds).
 * The catch-up alone cost a sparse disk's idle phase 1.25 s of copying at a time (matrix,
 * trickle cells under `thresholds: auto`, 2026-12-03). Input never counts as catch-up.
 *
 * Either kind of held spell in which the guest submitted no disk request at all, from its
 * first busy sample to its end, is also marked `heldIdle`: an idle guest whose vCPU waited
 * for its timer interrupts. The headroom sets no ceiling for it (headroom.ts heldStep).
 */
export function holdOff(policy$: Observable<EffectivePolicy>, scheduler: SchedulerLike): OperatorFunction<Classified, StateChange> {
  return (source) =>
    defer(() => {
      // what made the guest busy last; null until it first was (per subscription)
      let busyReason: string | null = null;
      let urgent = false;
      // Every busy sample since the state was last idle had held signals (HELD) as its only reasons.
      let heldOnly = true;
      // Since the state was last idle: a busy sample came (the spell began), the first had the
      // held signals alone, input came, and when the disk or interrupts were first over their
      // threshold and when they last came under it again (-1: not yet).
      let spell = false;
      let heldBegan = false;
      let input = false;
      let workFrom = -1;
      let workTo = -1;
      let working = false;
      // Since the spell began: the guest submitted a disk request (or it is not known).
      let requested = false;
      return source.pipe(
        tap((c) => {
          if ((spell || c.state === 'busy') && c.diskPerS !== 0) requested = true;
          const work = c.state === 'busy' && c.reasons.some((r) => r.signal === 'disk' || r.signal === 'interrupts');
          if (work !== working) {
            working = work;
            if (work && workFrom < 0) workFrom = scheduler.now();
            if (!work) workTo = scheduler.now();
          }
          if (c.state !== 'busy') return;
          if (!spell) {
            spell = true;
            heldBegan = c.reasons.every((r) => HELD.has(r.signal));
          }
          if (c.reasons.some((r) => !HELD.has(r.signal))) heldOnly = false;
          if (c.reasons.some((r) => r.signal === 'keyboard' || r.signal === 'pointer')) input = true;
        }),
        // Within a busy phase, input joining or leaving is a change too (urgent or not).
        distinctUntilChanged((a, b) => a.state === b.state && (a.state !== 'busy' || isUrgent(a) === isUrgent(b))),
        withLatestFrom(policy$),
        switchMap(([c, p]): Observable<StateChange> => {
          if (c.state === 'busy') {
            const reason = describeReasons(c.reasons);
            if (urgent && !isUrgent(c) && busyReason !== null && p.holdoff > 0) {
              // Input stopped while the disk stays busy: the hold-off applies to the input
              // (it stays urgent), then the disk alone decides (the latency may grade it).
              const holding: StateChange = { state: 'busy', reason: `${reason}; hold-off ${formatDuration(p.holdoff)} after ${busyReason}`, urgent: true };
              return concat(
                of(holding),
                timer(p.holdoff, scheduler).pipe(
                  map((): StateChange => {
                    urgent = false;
                    busyReason = reason;
                    return { state: 'busy', reason };
                  }),
                ),
              );
            }
            busyReason = reason;
            urgent = isUrgent(c);
            return of({ state: 'busy', reason, ...(urgent ? { urgent: true as const } : {}) });
          }
          if (busyReason === null) return of({ state: 'idle', reason: c.note ?? 'quiet' });
          // The copy held the guest: the stall alone (which began the spell), or its catch-up.
          const held = heldOnly || (heldBegan && !input && workFrom >= 0 && workTo - workFrom <= 2 * p.sampling.window);
          const hold = held ? Math.min(p.holdoff, p.sampling.window) : p.holdoff;
          const quiet: StateChange = { state: 'idle', reason: `quiet for ${formatDuration(hold)}` };
          const idleAgain = () => {
            // A new spell starts afresh: a disk busy later is not held for an earlier input.
            heldOnly = true;
            spell = heldBegan = input = requested = false;
            workFrom = workTo = -1;
            urgent = false;
            return quiet;
          };
          if (hold <= 0) return of(idleAgain());
          const holding: StateChange = {
            state: 'holdoff',
            reason: `${c.note ?? 'quiet'}; hold-off ${formatDuration(hold)} after ${busyReason}`,
            ...(urgent ? { urgent: true as const } : {}),
            ...(held ? { held: true as const, ...(requested ? {} : { heldIdle: true as const }) } : {}),
          };
          return concat(of(holding), timer(hold, scheduler).pipe(map(idleAgain)));
        }),
      );
    });
}

// ---------------------------------------------------------------- completion guarantee

/** How far back the progress rate is measured when judging whether the deadline holds. */
export const PROGRESS_WINDOW_MS = 30_000;
/** The guarantee's first judgement waits for this much history at most (1/20 of the time allowed, when less). */
export const FIRST_JUDGEMENT_MAX_MS = 20_000;
/** Speeds the deadline asks for are rounded up to whole MiB/s: fewer, stabler changes. */
const SPEED_STEP = 1024 * 1024;

export interface GuaranteeMemory {
  /** The guarantee settings this memory was built under; a change starts afresh. */
  readonly key: string;
  readonly history: readonly { time: number; remaining: number }[];
  /**
   * Once the deadline needs a raised speed, the time the copy is to be done by (ahead of
   * the deadline by the margin); kept until the copy is done or the settings change.
   */
  readonly finishBy: number | null;
  readonly out: Guarantee;
}

export const NO_GUARANTEE: Guarantee = { requiredBps: 0, deadlineAt: null };
export const INITIAL_GUARANTEE: GuaranteeMemory = { key: '', history: [], finishBy: null, out: NO_GUARANTEE };

/**
 * One progress sample → what the deadline asks for. Pure.
 *
 * The copy is judged on its net progress (remaining work shrinking, which counts the
 * guest re-dirtying copied blocks against it) over the last 30 s, i.e. at the current mix
 * of idle and busy time. If that would not finish `margin` times ahead of the deadline,
 * the guarantee engages: it fixes a finish time, now + time left / margin, and from then
 * on asks every state for at least remaining / time to that finish, recomputed on every
 * sample. That is what a guest that is never idle again needs, so the deadline holds
 * whatever the guest does; idle phases at full speed bring the number down, a guest
 * dirtying copied blocks pushes it up. (Recomputing margin x remaining / time-to-deadline
 * instead would slow down as the deadline nears, shrinking the work like
 * (time left)^margin: it would reach the deadline with work left.) The guarantee stays
 * engaged, without flapping back to paused when the raised speed makes the progress look
 * good, until the copy is done or the guarantee settings change. No judgement before
 * `judgeMs` of history (1/20 of the time allowed, 1-20 s); past the finish time with
 * work left, full speed: the time after it is the margin's reserve, and the work left
 * then is mostly blocks a busy guest keeps dirtying, which a mirror catches up with only
 * at full speed (margin x remaining / time to the deadline, as before, dropped the speed
 * at the finish time: 213 → 7 MiB/s in test/moderation, which missed a 40 s deadline).
 */
export function guaranteeStep(
  mem: GuaranteeMemory,
  sample: JobProgress & { time: number },
  g: Moderation['guarantee'],
  startedAt: number,
): GuaranteeMemory {
  const key = JSON.stringify([g.deadline, g.margin]);
  const fresh = mem.key !== key;
  const now = sample.time;
  const remaining = Math.max(0, sample.len - sample.offset);
  const history = [...(fresh ? [] : mem.history.filter((h) => h.time > now - PROGRESS_WINDOW_MS)), { time: now, remaining }];
  let finishBy = fresh ? null : mem.finishBy;
  if (g.deadline === null) return { key, history, finishBy: null, out: NO_GUARANTEE };
  const deadlineAt = 'after' in g.deadline ? startedAt + g.deadline.after : g.deadline.at;
  const result = (requiredBps: number): GuaranteeMemory => ({ key, history, finishBy, out: { requiredBps, deadlineAt } });

  if (remaining === 0) {
    // Copied but not yet in sync (ready false): QEMU turns the mirror ready only while it
    // runs, so ask for a trickle rather than nothing. Nothing would leave a busy guest's
    // job paused at offset == len, never ready, past the deadline (seen in test/moderation).
    return result(sample.ready === false ? SPEED_STEP : 0);
  }
  const leftMs = deadlineAt - now;
  if (leftMs <= 0) return result(UNLIMITED);
  if (finishBy === null) {
    const oldest = history[0]!;
    const span = now - oldest.time;
    // Judged over most of a window where the deadline allows (the history holds at most
    // the window): 10 s held one busy phase and the copy's first second (48-130 MiB), and
    // a 4 h deadline on a 64 GiB disk, which asks 5.7 MiB/s, engaged on that in 17 of 24
    // matrix runs and ran the copy at 6 MiB/s through every later busy phase, instead of
    // pausing it, in a copy that would have finished in minutes (docs/starvation.md, "The
    // guarantee's first judgement").
    const judgeMs = Math.min(FIRST_JUDGEMENT_MAX_MS, Math.max(1000, (deadlineAt - startedAt) / 20));
    if (span < judgeMs) return result(0);
    const netBps = (oldest.remaining - remaining) / (span / 1000);
    if (netBps >= (g.margin * remaining) / (leftMs / 1000)) return result(0);
    finishBy = now + leftMs / g.margin;
  }
  if (now >= finishBy) return { ...result(UNLIMITED), out: { requiredBps: UNLIMITED, deadlineAt, overdue: true } };
  const needBps = remaining / ((finishBy - now) / 1000);
  return result(Math.max(SPEED_STEP, Math.ceil(needBps / SPEED_STEP) * SPEED_STEP));
}

/**
 * Job progress → what the deadline asks for. `startedAt` (the job's start, for a deadline
 * relative to it) defaults to the time of subscription on `scheduler`.
 */
export function guarantee(
  policy$: Observable<EffectivePolicy>,
  scheduler: SchedulerLike,
  startedAt?: number,
): OperatorFunction<JobProgress, Guarantee> {
  return (source) =>
    defer(() => {
      const t0 = startedAt ?? scheduler.now();
      return source.pipe(
        withLatestFrom(policy$),
        scan((mem, [p, pol]) => guaranteeStep(mem, { offset: p.offset, len: p.len, ...(p.ready !== undefined ? { ready: p.ready } : {}), time: scheduler.now() }, pol.guarantee, t0), INITIAL_GUARANTEE),
        map((mem) => mem.out),
        distinctUntilChanged(same),
      );
    });
}

// ---------------------------------------------------------------- convergence push

/** A push at full speed in force: the copy's last stretch, which a busy guest keeps re-dirtying. */
export interface Push {
  /** When it ends (scheduler clock, ms). */
  readonly until: number;
  /** "pushing the last 120 MiB at full speed (2s at most): 1m without catching up" */
  readonly note: string;
}

export interface PushMemory {
  readonly key: string;
  /** Progress over the last two PEAK_SPAN_MS, for the copy's speed. */
  readonly history: readonly { time: number; offset: number }[];
  /**
   * The fastest the copy has gone (bytes/s over PEAK_SPAN_MS or more). Kept for the whole
   * job: a guest that keeps the copy paused for hours must not make it forget its speed.
   * A peak the host no longer gives makes a push that does not catch up: bounded all the same.
   */
  readonly peakBps: number;
  /** Since when the work left has stayed within one push; null while it has not. */
  readonly nearSince: number | null;
  readonly push: Push | null;
  /** No new push before this. */
  readonly quietUntil: number;
}

export const INITIAL_PUSH: PushMemory = { key: '', history: [], peakBps: 0, nearSince: null, push: null, quietUntil: -Infinity };
const PEAK_SPAN_MS = 1000;

/**
 * One progress sample → whether to push. Pure. A copy whose guest re-dirties blocks faster
 * than its idle time copies them never catches up (READY) while it is paused for the guest;
 * once the work left has stayed within what `pivot.push` of full speed copies (at the
 * fastest the copy has gone) for `pivot.push-after`, the copy runs at
 * full speed for at most `pivot.push`, whatever the guest does (but for a person at the
 * console), then not again for `push-after`. A push that reaches READY ends at once: the
 * pivot's own wait for a quiet moment takes over (encrypt.ts).
 */
export function pushStep(mem: PushMemory, sample: JobProgress & { time: number }, p: Moderation['pivot']): PushMemory {
  const key = JSON.stringify([p.push, p['push-after']]);
  const m = mem.key === key ? mem : { ...INITIAL_PUSH, key };
  const now = sample.time;
  const history = [...m.history.filter((h) => h.time > now - 2 * PEAK_SPAN_MS), { time: now, offset: sample.offset }];
  // The peak: the newest sample against the latest one at least PEAK_SPAN_MS older.
  let peakBps = m.peakBps;
  for (let i = history.length - 2; i >= 0; i--) {
    const h = history[i]!;
    if (now - h.time >= PEAK_SPAN_MS) {
      peakBps = Math.max(peakBps, ((sample.offset - h.offset) * 1000) / (now - h.time));
      break;
    }
  }
  const base = { ...m, history, peakBps };
  if (p.push <= 0) return { ...base, nearSince: null, push: null };
  const left = Math.max(0, sample.len - sample.offset);
  if (sample.ready || left === 0) return { ...base, nearSince: null, push: null, quietUntil: m.push ? now + p['push-after'] : m.quietUntil };
  if (m.push) {
    if (now < m.push.until) return base;
    return { ...base, push: null, nearSince: null, quietUntil: now + p['push-after'] };
  }
  const near = peakBps > 0 && left <= (peakBps * p.push) / 1000;
  if (!near) return { ...base, nearSince: null };
  const nearSince = m.nearSince ?? now;
  if (now - nearSince < p['push-after'] || now < m.quietUntil) return { ...base, nearSince };
  const mib = Math.max(1, Math.round(left / (1024 * 1024)));
  return {
    ...base,
    nearSince,
    push: { until: now + p.push, note: `pushing the last ${mib} MiB at full speed (${formatDuration(p.push)} at most): ${formatDuration(now - nearSince)} without catching up` },
  };
}

/** Job progress → the push in force, or null (see pushStep). */
export function convergence(policy$: Observable<EffectivePolicy>, scheduler: SchedulerLike): OperatorFunction<JobProgress, Push | null> {
  return (source) =>
    source.pipe(
      withLatestFrom(policy$),
      scan((mem, [pr, pol]) => pushStep(mem, { ...pr, time: scheduler.now() }, pol.pivot), INITIAL_PUSH),
      map((mem) => mem.push),
      distinctUntilChanged(same),
    );
}

// ---------------------------------------------------------------- the decision

/**
 * State + policy + guarantee → the desired job state. Pure. The state's speed (idle speed
 * when idle; busy speed when busy and during the hold-off), raised to the floor and to
 * what the deadline asks for, whichever is fastest.
 */
export function desiredDecision(s: StateChange, p: EffectivePolicy, g: Guarantee, lat?: LatencyView, push?: Push | null): Decision {
  const d = decisionFor(s, p, g, lat, push);
  return s.held ? { ...d, held: true, ...(s.heldIdle ? { heldIdle: true as const } : {}) } : d;
}

function decisionFor(s: StateChange, p: EffectivePolicy, g: Guarantee, lat?: LatencyView, push?: Push | null): Decision {
  let speed = s.state === 'idle' ? p.speed.idle : p.speed.busy;
  const why = [s.reason];
  const shown = lat !== undefined && p.latency.margin !== null ? { latency: lat } : {};
  if (push && !s.urgent) {
    // The last stretch, at full speed for a bounded time: the copy converges.
    return { mode: 'full', speed: 0, state: s.state, reason: `${s.reason}; ${push.note}`, ...shown };
  }
  // A guest busy with its disk (not a person, not a stall), or idle by its thresholds but
  // still doing requests, gets the speed its latency allows (for an idle one, at most the
  // idle speed; while its baseline is learnt, the busy speed).
  const graded = lat !== undefined && p.latency.margin !== null && !s.urgent && (s.state === 'idle') === (lat.scope === 'idle');
  if (graded && lat.phase !== 'learning') speed = lat.speedBps > 0 ? Math.min(lat.speedBps, s.state === 'idle' ? p.speed.idle : UNLIMITED) : PAUSED;
  else if (graded && s.state === 'idle') speed = p.speed.busy;
  if (graded) why.push(lat.note);
  if (p.guarantee.floor > speed) {
    speed = p.guarantee.floor;
    why.push(`floor ${formatSpeed(speed)}`);
  }
  if (g.requiredBps > speed) {
    speed = g.requiredBps;
    const by = g.deadlineAt === null ? '' : new Date(g.deadlineAt).toISOString();
    why.push(
      speed !== UNLIMITED
        ? `raised to ${formatSpeed(speed)} to finish by ${by}`
        : g.overdue
          ? `past the planned finish time: full speed to finish by ${by}`
          : `deadline ${by} passed: full speed`,
    );
  }
  const reason = why.join('; ');
  const raised = g.requiredBps > 0 && g.requiredBps >= speed ? { guaranteed: true as const } : {};
  if (speed === UNLIMITED) return { mode: 'full', speed: 0, state: s.state, reason, ...raised, ...shown };
  if (speed === PAUSED) return { mode: 'paused', speed: 0, state: s.state, reason, ...shown };
  return { mode: 'throttled', speed: Math.round(speed), state: s.state, reason, ...raised, ...shown };
}

export interface DecideInput {
  readonly activity$: Observable<ActivityRates>;
  readonly policy$: Observable<EffectivePolicy>;
  readonly progress$?: Observable<JobProgress>;
  readonly scheduler: SchedulerLike;
  /** The job's start, for a deadline relative to it; default: subscription time. */
  readonly startedAt?: number;
  /** See staleAfter; default 2 s, longer than a probe restart's first backoff should take. */
  readonly staleMs?: number;
  /**
   * The VM's main-loop load (src/streams/load.ts). With it, the idle speed keeps the
   * policy's `speed.headroom` of the loop free (headroom.ts); without it, no cap.
   */
  readonly load$?: Observable<{ time: number; load: number }>;
  /** Per-guest calibration (`thresholds: auto`): what was learnt before, and where to save it. */
  readonly learning?: Learning;
  /**
   * The guest's disk request totals with their latency (query-blockstats), read every 250 ms
   * while `latency.margin` is on (latency.ts); without them the busy speed applies.
   */
  readonly latency$?: Observable<LatencySample>;
}

/**
 * Latency readings → what the latency control says (latency.ts), given whether the guest is
 * busy with its disk and how far the copy has got (its offset: a copy that does not move is
 * what the baseline is measured beside).
 */
export function latencyControl(
  state$: Observable<StateChange>,
  policy$: Observable<EffectivePolicy>,
  offset$: Observable<number>,
): OperatorFunction<LatencySample, LatencyView> {
  return (source) =>
    source.pipe(
      withLatestFrom(state$, policy$, offset$),
      scan((mem: LatencyMemory, [sample, st, p, offset]) => {
        if (p.latency.margin === null) return INITIAL_LATENCY;
        return latencyStep(mem, sample, { offset, active: st.state !== 'idle' && !st.urgent, idle: st.state === 'idle', margin: p.latency.margin, refreshMs: p.latency.refresh });
      }, INITIAL_LATENCY),
      map((m) => m.view),
      filter((v): v is LatencyView => v !== null),
      distinctUntilChanged(same),
    );
}

/** The whole decision pipeline. Emits only when the desired state changes. */
export function decide(i: DecideInput): Observable<Decision> {
  return defer(() => {
    const policy$ = i.policy$.pipe(shareReplay({ bufferSize: 1, refCount: true }));
    const classified$ = i.activity$.pipe(classifyActivity(policy$, i.learning), share());
    const state$ = classified$.pipe(staleAfter(i.staleMs ?? 2000, i.scheduler), holdOff(policy$, i.scheduler), shareReplay({ bufferSize: 1, refCount: true }));
    // The learnt thresholds change every few seconds at most (calibrate.ts): each change is
    // a decision of its own, so that status and metrics show the thresholds in force.
    const learnt$ = classified$.pipe(
      map((c) => c.learnt),
      distinctUntilChanged(),
      startWith(undefined),
    );
    const guarantee$ = i.progress$
      ? i.progress$.pipe(guarantee(policy$, i.scheduler, i.startedAt ?? i.scheduler.now()), startWith(NO_GUARANTEE))
      : of(NO_GUARANTEE);
    const latency$: Observable<LatencyView | undefined> =
      i.latency$ && i.progress$
        ? i.latency$.pipe(latencyControl(state$, policy$, i.progress$.pipe(map((p) => p.offset))), startWith(undefined))
        : of(undefined);
    const push$: Observable<Push | null> = i.progress$ ? i.progress$.pipe(convergence(policy$, i.scheduler), startWith<Push | null>(null)) : of(null);
    const base$ = combineLatest([state$, policy$, guarantee$, learnt$, latency$, push$]).pipe(
      map(([s, p, g, l, lat, push]) => (l ? { ...desiredDecision(s, p, g, lat, push), learnt: l } : desiredDecision(s, p, g, lat, push))),
      distinctUntilChanged(same),
    );
    if (!i.load$ || !i.progress$) return base$;
    const shared$ = base$.pipe(shareReplay({ bufferSize: 1, refCount: true }));
    const progress$ = i.progress$.pipe(map((p) => ({ offset: p.offset, time: i.scheduler.now(), ...(p.paused !== undefined ? { paused: p.paused } : {}) })));
    return applyHeadroom(shared$, i.load$, progress$, policy$).pipe(distinctUntilChanged(same));
  });
}
