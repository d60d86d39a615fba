/**
 * The policy in force, as a stream: the file's policy at subscription, then each valid
 * change. Changes are noticed on file-system events and on SIGHUP (the daemon convention
 * for "re-read your configuration"). A change that does not validate is logged with its
 * position and the last good policy stays in force: a typo saved mid-edit must not stop
 * or unthrottle a running copy.
 */
import { watch, type FSWatcher } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { asyncScheduler, debounceTime, filter, merge, Observable, Subject, type SchedulerLike } from 'rxjs';
import { describeError, isIdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { formatIssue, loadPolicy, type PolicyIssue } from './load.ts';
import { describePolicy } from './resolve.ts';
import type { Policy } from './schema.ts';

export interface WatchPolicyOptions {
  readonly logger: Logger;
  /**
   * Quiet time after the last file-system event before the file is read again. Editors
   * save in steps (truncate, write, rename), each an event; reading after the last one
   * avoids reporting a half-written file. Default 100 ms.
   */
  readonly debounceMs?: number;
  /** Watch the file's directory for changes (default true). SIGHUP works either way. */
  readonly watchFile?: boolean;
  /** Re-read on SIGHUP (default true). While subscribed, SIGHUP no longer ends the process. */
  readonly sighup?: boolean;
  readonly scheduler?: SchedulerLike;
}

/**
 * Observable of the policy in force for `file` (the shipped default when undefined, which
 * never changes). Errors at subscription if the file is invalid: a bad policy is refused
 * before anything starts. Never completes; unsubscribing stops the watching.
 */
export function watchPolicy(file: string | undefined, options: WatchPolicyOptions): Observable<Policy> {
  const log = options.logger;
  return new Observable<Policy>((subscriber) => {
    let current: Policy;
    try {
      current = loadPolicy(file);
    } catch (e) {
      subscriber.error(e);
      return;
    }
    subscriber.next(current);
    if (file === undefined) return; // the shipped default: nothing to watch, never completes

    const path = resolve(file);
    const reload = (why: 'change' | 'SIGHUP') => {
      let next: Policy;
      try {
        next = loadPolicy(file);
      } catch (e) {
        const issues = isIdlecryptError(e) ? ((e.context.issues as PolicyIssue[] | undefined) ?? []) : [];
        log.error(
          { file, why, issues: issues.map(formatIssue) },
          `policy reload rejected, keeping the last good policy: ${describeError(e)}`,
        );
        return;
      }
      if (isDeepStrictEqual(next, current)) {
        log.debug({ file, why }, 'policy re-read, unchanged');
        return;
      }
      current = next;
      log.info({ file, why, policy: describePolicy(next) }, 'policy reloaded');
      subscriber.next(next);
    };

    const events = new Subject<'change' | 'SIGHUP'>();
    const sub = merge(
      events.pipe(filter((w) => w === 'change'), debounceTime(options.debounceMs ?? 100, options.scheduler ?? asyncScheduler)),
      events.pipe(filter((w) => w === 'SIGHUP')),
    ).subscribe(reload);

    // The directory, not the file: editors and config managers replace a file by renaming a
    // new one over it, after which a watch on the old inode would see nothing more.
    let watcher: FSWatcher | undefined;
    if (options.watchFile ?? true) {
      try {
        watcher = watch(dirname(path), { persistent: false }, (_event, name) => {
          if (name === null || name === basename(path)) events.next('change');
        });
        watcher.on('error', (e) => log.warn({ file, err: e.message }, 'policy file watch failed; SIGHUP still reloads'));
      } catch (e) {
        log.warn({ file, err: (e as Error).message }, 'cannot watch the policy file; SIGHUP still reloads');
      }
    }
    const onHup = () => events.next('SIGHUP');
    if (options.sighup ?? true) process.on('SIGHUP', onHup);

    return () => {
      sub.unsubscribe();
      watcher?.close();
      process.off('SIGHUP', onHup);
    };
  });
}
