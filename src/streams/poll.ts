/**
 * pollEvery: calls `read` at once and then every periodMs, and emits what each call
 * yields. A call still running when the next tick comes makes that tick skip
 * (exhaustMap): a slow source is sampled less often, never queued up. The scheduler is
 * injected (marble tests); `read` returns an Observable so tests can give cold ones
 * (a Promise-returning reader is wrapped with `defer(() => from(promise))` at the edge).
 */
import { asyncScheduler, exhaustMap, timer, type Observable, type SchedulerLike } from 'rxjs';

export function pollEvery<T>(periodMs: number, read: () => Observable<T>, scheduler: SchedulerLike = asyncScheduler): Observable<T> {
  return timer(0, periodMs, scheduler).pipe(exhaustMap(() => read()));
}
