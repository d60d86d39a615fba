/**
 * Moderation of one job, wired: activity and policy in, decisions out, and a reconciler
 * that holds the job to the latest decision.
 *
 *   activity$ ─┐
 *   policy$ ───┤
 *   progress$ ─┼─ decide (decide.ts) ─ decisions$ ─ Reconciler (reconcile.ts) ─ JobControl
 *   latency$ ──┘                          ▲                 │ snapshots (progress, when
 *   (job.latency, latency.margin on)      └─────────────────┘  no progress$ is given)
 */
import { asyncScheduler, catchError, distinctUntilChanged, EMPTY, exhaustMap, filter, from, interval, map, ReplaySubject, shareReplay, switchMap, tap, type Observable, type SchedulerLike } from 'rxjs';
import { describeError } from '../errors.ts';
import type { JobControl, JobSnapshot } from '../jobs/types.ts';
import type { Logger } from '../log.ts';
import { resolvePolicy } from '../policy/resolve.ts';
import type { Policy } from '../policy/schema.ts';
import { decide, same, type Learning } from './decide.ts';
import { Reconciler, type ModerationEnd } from './reconcile.ts';
import type { LatencySample, LatencyTotals } from './latency.ts';
import type { ActivityRates, Decision, JobProgress } from './types.ts';

export interface ModerateOptions {
  /** This VM's activity samples (see ActivityRates: per-sample rates, not yet windowed). */
  readonly activity$: Observable<ActivityRates>;
  /** The policy in force (watchPolicy); this VM's override is picked by `vmName`. */
  readonly policy$: Observable<Policy>;
  readonly job: JobControl;
  /** The job's progress for the deadline; default: the reconciler's own snapshots. */
  readonly progress$?: Observable<JobProgress>;
  readonly vmName: string;
  readonly logger: Logger;
  readonly scheduler?: SchedulerLike;
  /**
   * ms between passes that read the job back and correct it even without a new decision;
   * default 250. Decisions are applied at once regardless; this bounds how long a failed
   * command or an outside change stays uncorrected, at 4 cheap query-block-jobs a second.
   */
  readonly resyncMs?: number;
  /** Speed that stands in for 'paused' when the job cannot pause; see DEFAULT_PAUSED_SPEED. */
  readonly pausedSpeed?: number;
  /** When the job started (scheduler clock), for a deadline relative to it; default: now. */
  readonly startedAt?: number;
  /** See staleAfter in decide.ts; default 2000 ms. */
  readonly staleMs?: number;
  /** The VM's main-loop load, for the headroom (headroom.ts); none: the idle speed is not capped. */
  readonly load$?: Observable<{ time: number; load: number }>;
  /** Per-guest calibration (`thresholds: auto`): what was learnt before, and where to save it. */
  readonly learning?: Learning;
  /** ms between readings of the guest's disk latency (job.latency), while `latency.margin` is on; default 250. */
  readonly latencyPollMs?: number;
}

/** Four readings a second: a judgement (latency.ts) spans at least two. */
const LATENCY_POLL_MS = 250;

export interface ModerationRun {
  /** The current desired state: replays the latest to new subscribers; completes when moderation ends. */
  readonly decisions$: Observable<Decision>;
  /**
   * Every reading of the job the reconciler takes (at least one per resync tick), for a
   * caller that would otherwise read the job itself: see RunModeration.snapshotSince.
   */
  readonly snapshots$: Observable<JobSnapshot>;
  /** Settles (never rejects) when moderation ends: stopped, the job ended or is gone, or an error. */
  readonly done: Promise<ModerationEnd>;
  /**
   * Ends moderation and waits for a pass in progress. With `release` (default true) the
   * job is left resumed at unlimited speed, ready to converge and complete.
   */
  stop(options?: { release?: boolean }): Promise<void>;
}

export function moderate(o: ModerateOptions): ModerationRun {
  const scheduler = o.scheduler ?? asyncScheduler;
  const log = o.logger.child({ vm: o.vmName, job: o.job.id });
  const reconciler = new Reconciler(o.job, { logger: log, ...(o.pausedSpeed !== undefined ? { pausedSpeed: o.pausedSpeed } : {}) });

  const policy$ = o.policy$.pipe(
    map((p) => resolvePolicy(p, o.vmName)),
    distinctUntilChanged(same),
    tap((p) => log.debug({ source: p.source, override: p.override ?? null }, 'moderation: policy in force')),
    shareReplay({ bufferSize: 1, refCount: true }),
  );

  // The activity stream should be this VM's; a name mismatch is a wiring mistake (say,
  // libvirt's domain name against QEMU's -name), reported once rather than filtered on,
  // which would silently leave the job unmoderated.
  let warned = false;
  const activity$ = o.activity$.pipe(
    tap((a) => {
      if (a.vm !== o.vmName && !warned) {
        warned = true;
        log.warn({ sampleVm: a.vm }, 'moderation: activity samples name another VM');
      }
    }),
  );

  // The guest's disk latency, read on the job's own connection while `latency.margin` is on.
  const read = o.job.latency?.bind(o.job);
  const latency$: Observable<LatencySample> | undefined = read
    ? policy$.pipe(
        map((p) => p.latency.margin !== null),
        distinctUntilChanged(),
        switchMap((on) =>
          on
            ? interval(o.latencyPollMs ?? LATENCY_POLL_MS, scheduler).pipe(
                exhaustMap(() =>
                  from(read()).pipe(
                    catchError((err: unknown) => {
                      log.debug({ err: describeError(err) }, 'moderation: latency reading failed');
                      return EMPTY;
                    }),
                  ),
                ),
                filter((t): t is LatencyTotals => t !== undefined),
                map((t) => ({ ...t, time: scheduler.now() })),
              )
            : EMPTY,
        ),
      )
    : undefined;

  const decisions = new ReplaySubject<Decision>(1);
  const decisions$ = decide({
    activity$,
    policy$,
    progress$: o.progress$ ?? reconciler.snapshots$,
    scheduler,
    startedAt: o.startedAt ?? scheduler.now(),
    ...(o.staleMs !== undefined ? { staleMs: o.staleMs } : {}),
    ...(o.load$ ? { load$: o.load$ } : {}),
    ...(o.learning ? { learning: o.learning } : {}),
    ...(latency$ ? { latency$ } : {}),
  }).pipe(tap({ next: (d) => decisions.next(d) }));

  const done = reconciler.ended.then((end) => {
    decisions.complete();
    return end;
  });
  reconciler.start(decisions$, interval(o.resyncMs ?? 250, scheduler));

  return {
    decisions$: decisions.asObservable(),
    snapshots$: reconciler.snapshots$,
    done,
    stop: (options) => reconciler.stop(options),
  };
}
