/**
 * How busy a QEMU process's main loop is: the main thread's time on a CPU, from the
 * kernel's scheduler statistics. No probe: one small read of procfs per sample.
 *
 *   /proc/PID/task/PID/schedstat   "<on-cpu ns> <runqueue-wait ns> <timeslices>"
 *                                  (Documentation/scheduler/sched-stats.rst)
 *
 * Why the main thread: without an iothread (`-object iothread` + `iothread=` on the disk,
 * which QEMU 7.2 cannot add to a running guest), QEMU runs the guest's disk requests
 * (virtqueue handling, `block_acct_start`), every block job's coroutines (the mirror,
 * including the LUKS encryption of each buffer: `qcrypto_block_encrypt` in
 * block/crypto.c's `block_crypto_co_pwritev`), and QMP in that one thread, which holds
 * QEMU's big lock while it works (util/main-loop.c releases it only around its poll).
 * Measured on the project's hosts (docs/starvation.md): with an unthrottled mirror from a
 * sparse raw disk into LUKS the main thread is on a CPU all the time, the guest's vCPU
 * thread waits ~95% of its time for the big lock, and no guest request reaches QEMU at
 * all; at a speed that leaves the loop ~40% idle the same guest gets 375 requests/s
 * through.
 *
 * Why not the runqueue wait too: on a host short of CPUs the copy's own worker threads
 * (the thread pool's writes into the page cache) keep the main thread waiting for a CPU,
 * and counting that as the loop's work held a writeback copy at half its speed while the
 * loop itself had room (test/moderation/starved.test.ts, 2026-11-30).
 *
 * The thread id of the main thread is the process id. A QEMU with an iothread for the disk
 * runs the mirror in that thread instead; this module does not look there (noted in
 * docs/starvation.md).
 */
import { readFile } from 'node:fs/promises';
import { defer, from, map, filter, type Observable, type SchedulerLike, asyncScheduler } from 'rxjs';
import { pollEvery } from '../streams/poll.ts';

/** Cumulative busy time of one QEMU's main thread at `time`. */
export interface MainLoopReading {
  /** Epoch ms at the read (the clock the controller runs on). */
  readonly time: number;
  readonly pid: number;
  /** On-CPU nanoseconds since the thread started. */
  readonly busyNs: number;
}

/** Parses a schedstat line; undefined if it is not one. */
export function parseSchedstat(text: string): { runNs: number; waitNs: number } | undefined {
  const m = /^(\d+) (\d+) \d+\s*$/.exec(text);
  if (!m) return undefined;
  return { runNs: Number(m[1]), waitNs: Number(m[2]) };
}

/** The main thread's on-CPU nanoseconds, or undefined when the process is gone or unreadable. */
export async function readMainLoopNs(pid: number, procRoot = '/proc'): Promise<number | undefined> {
  const text = await readFile(`${procRoot}/${pid}/task/${pid}/schedstat`, 'utf8').catch(() => undefined);
  const s = text === undefined ? undefined : parseSchedstat(text);
  return s ? s.runNs : undefined;
}

export interface MainLoopOptions {
  readonly pid: number;
  readonly intervalMs: number;
  readonly now?: () => number;
  readonly scheduler?: SchedulerLike;
  readonly procRoot?: string;
}

/** Readings every `intervalMs` (a read that fails, e.g. the process has exited, is skipped). */
export function mainLoop$(o: MainLoopOptions): Observable<MainLoopReading> {
  const now = o.now ?? Date.now;
  return pollEvery(
    o.intervalMs,
    () => defer(() => from(readMainLoopNs(o.pid, o.procRoot))).pipe(map((busyNs) => (busyNs === undefined ? undefined : { time: now(), pid: o.pid, busyNs }))),
    o.scheduler ?? asyncScheduler,
  ).pipe(filter((r): r is MainLoopReading => r !== undefined));
}
