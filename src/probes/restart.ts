/**
 * restartWithBackoff: resubscribe to a source that failed with a retryable error, after
 * an exponentially growing delay (initialMs, x factor, capped at maxMs). The delay and the
 * count of consecutive failures reset whenever the source shows it is healthy again
 * (`isHealthy(value)`, e.g. "bpftrace attached"). Terminal errors, or more than
 * `maxFailures` consecutive failures, end the stream with the last error.
 *
 * `until$` ends restarting: a source still running is left to finish by itself (it got
 * the same signal), and a pending restart is dropped (the stream completes at once).
 *
 * The scheduler is injected so the policy is marble-tested (test/probes/restart.test.ts).
 */
import { Observable, asyncScheduler, type MonoTypeOperatorFunction, type SchedulerLike, type Subscription } from 'rxjs';

export interface BackoffConfig<T> {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
  /** Consecutive failures (without a healthy value between) before giving up. */
  maxFailures?: number;
  isRetryable: (err: unknown) => boolean;
  isHealthy?: (value: T) => boolean;
  onRestart?: (err: unknown, failures: number, delayMs: number) => void;
  until$?: Observable<unknown>;
  scheduler?: SchedulerLike;
}

export function backoffDelay(failures: number, initialMs: number, factor: number, maxMs: number): number {
  return Math.min(maxMs, initialMs * factor ** Math.max(0, failures - 1));
}

export function restartWithBackoff<T>(config: BackoffConfig<T>): MonoTypeOperatorFunction<T> {
  const {
    initialMs = 500,
    maxMs = 30_000,
    factor = 2,
    maxFailures = 8,
    isRetryable,
    isHealthy = () => false,
    onRestart,
    until$,
    scheduler = asyncScheduler,
  } = config;
  return (source) =>
    new Observable<T>((subscriber) => {
      let failures = 0;
      let stopped = false;
      let inner: Subscription | undefined;
      let pending: Subscription | undefined;

      const start = () => {
        pending = undefined;
        inner = source.subscribe({
          next: (v) => {
            if (isHealthy(v)) failures = 0;
            subscriber.next(v);
          },
          error: (err) => {
            inner = undefined;
            failures += 1;
            if (stopped || !isRetryable(err) || failures > maxFailures) return subscriber.error(err);
            const delayMs = backoffDelay(failures, initialMs, factor, maxMs);
            onRestart?.(err, failures, delayMs);
            pending = scheduler.schedule(start, delayMs);
          },
          complete: () => subscriber.complete(),
        });
      };

      const untilSub = until$?.subscribe(() => {
        stopped = true;
        if (pending) {
          pending.unsubscribe();
          pending = undefined;
          subscriber.complete();
        }
      });
      start();
      return () => {
        untilSub?.unsubscribe();
        pending?.unsubscribe();
        inner?.unsubscribe();
      };
    });
}
