/** Marble specs of restartWithBackoff, the bpftrace restart policy. */
import { equal } from 'node:assert/strict';
import { describe, it } from 'node:test';
import { IdlecryptError } from '../../src/errors.ts';
import { backoffDelay, restartWithBackoff } from '../../src/probes/restart.ts';
import { isRetryableProbeError } from '../../src/probes/runner.ts';
import { testScheduler } from '../streams/marbles.ts';

const died = new IdlecryptError('PROBE_FAILED', 'bpftrace exited unexpectedly (signal SIGKILL)', { context: { retryable: true } });
const missing = new IdlecryptError('PROBE_UNAVAILABLE', 'bpftrace not found');

describe('restartWithBackoff', () => {
  it('resubscribes after a retryable error, waiting initialMs, then twice as long each time', () => {
    testScheduler().run(({ cold, expectObservable, expectSubscriptions }) => {
      const src = cold('a#', { a: 'x' }, died);
      const out = src.pipe(restartWithBackoff({ initialMs: 2, factor: 2, maxFailures: 2, isRetryable: isRetryableProbeError }));
      // run 1 at 0 (fails at 1), waits 2 -> run 2 at 3 (fails at 4), waits 4 -> run 3 at 8 (fails at 9: third failure > 2)
      expectObservable(out).toBe('a--a----a#', { a: 'x' }, died);
      expectSubscriptions(src.subscriptions).toBe(['^!', '---^!', '--------^!']);
    });
  });

  it('resets the backoff once the source is healthy again', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      // 'h' = attached: every run gets healthy before failing, so the delay stays initialMs and it never gives up
      const src = cold('h#', { h: 'h' }, died);
      const out = src.pipe(restartWithBackoff({ initialMs: 2, maxFailures: 1, isRetryable: isRetryableProbeError, isHealthy: (v) => v === 'h' }));
      expectObservable(out, '^----------!').toBe('h--h--h--h-', { h: 'h' });
    });
  });

  it('passes terminal errors and completion straight through, and an empty source completes', () => {
    testScheduler().run(({ cold, expectObservable }) => {
      expectObservable(cold('-#', undefined, missing).pipe(restartWithBackoff({ isRetryable: isRetryableProbeError }))).toBe('-#', undefined, missing);
      expectObservable(cold('-a|').pipe(restartWithBackoff({ isRetryable: isRetryableProbeError }))).toBe('-a|');
      expectObservable(cold('|').pipe(restartWithBackoff({ isRetryable: isRetryableProbeError }))).toBe('|');
    });
  });

  it('stops restarting when until$ emits: a pending restart is dropped and the stream completes', () => {
    testScheduler().run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const src = cold('a#', { a: 'x' }, died);
      const until$ = hot('---s');
      const out = src.pipe(restartWithBackoff({ initialMs: 10, isRetryable: isRetryableProbeError, until$ }));
      expectObservable(out).toBe('a--|', { a: 'x' });
      expectSubscriptions(src.subscriptions).toBe('^!');
    });
  });

  it('unsubscribes the running source and cancels a pending restart on unsubscribe', () => {
    testScheduler().run(({ cold, expectObservable, expectSubscriptions }) => {
      const src = cold('a#', { a: 'x' }, died);
      const out = src.pipe(restartWithBackoff({ initialMs: 3, isRetryable: isRetryableProbeError }));
      expectObservable(out, '^-------!').toBe('a---a---', { a: 'x' });
      expectSubscriptions(src.subscriptions).toBe(['^!', '----^!']);
    });
  });

  it('caps the delay at maxMs', () => {
    equal(backoffDelay(1, 500, 2, 30_000), 500);
    equal(backoffDelay(4, 500, 2, 30_000), 4000);
    equal(backoffDelay(20, 500, 2, 30_000), 30_000);
  });
});
