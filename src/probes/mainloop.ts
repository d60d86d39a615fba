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
 * The thread id of the main thread is the process id.
 *
 * A disk with an iothread (`-object iothread,id=io0` and `iothread=io0` on its virtio-blk
 * device or virtio-scsi controller; libvirt's `<driver iothread='1'/>`) is served by that
 * thread's event loop instead, and a block job on it runs there too (the mirror's coroutines
 * run in the source node's AioContext, block/mirror.c; the target is moved into it). Then
 * that thread is the one to read (LoopThread): the main thread no longer sees the copy.
 */
import { readdir, readFile } from 'node:fs/promises';
import { defer, from, map, filter, type Observable, type SchedulerLike, asyncScheduler } from 'rxjs';
import { pollEvery } from '../streams/poll.ts';

/** The thread that serves a disk and runs its block jobs: QEMU's main thread, or the disk's iothread. */
export interface LoopThread {
  readonly tid: number;
  /** The iothread's id (QEMU's object id) when the disk has one. */
  readonly iothread?: string;
}

/**
 * An iothread's host thread by its name: QEMU names it `IO <id>` (iothread.c) when it runs
 * with `-name ...,debug-threads=on`, as libvirt starts every domain; without it every thread
 * is `qemu-system-x86` and this finds nothing. The kernel keeps 15 bytes of a name.
 */
export async function iothreadTidByName(pid: number, id: string, procRoot = '/proc'): Promise<number | undefined> {
  const want = `IO ${id}`.slice(0, 15);
  const tids = await readdir(`${procRoot}/${pid}/task`).catch(() => [] as string[]);
  for (const t of tids) {
    const comm = await readFile(`${procRoot}/${pid}/task/${t}/comm`, 'utf8').catch(() => '');
    if (comm.replace(/\n$/, '') === want) return Number(t);
  }
  return undefined;
}

/** Cumulative busy time of one QEMU's main thread (or the disk's iothread) at `time`. */
export interface MainLoopReading {
  /** Epoch ms at the read (the clock the controller runs on). */
  readonly time: number;
  readonly pid: number;
  /** The thread read: the main thread (= pid) or the disk's iothread. */
  readonly tid: number;
  /** On-CPU nanoseconds since the thread started. */
  readonly busyNs: number;
}

/** Parses a schedstat line; undefined if it is not one. */
export function parseSchedstat(text: string): { runNs: number; waitNs: number } | undefined {
  const m = /^(\d+) (\d+) \d+\s*$/.exec(text);
  if (!m) return undefined;
  return { runNs: Number(m[1]), waitNs: Number(m[2]) };
}

/** The main thread's (or thread `tid`'s) on-CPU nanoseconds, or undefined when it is gone or unreadable. */
export async function readMainLoopNs(pid: number, procRoot = '/proc', tid = pid): Promise<number | undefined> {
  const text = await readFile(`${procRoot}/${pid}/task/${tid}/schedstat`, 'utf8').catch(() => undefined);
  const s = text === undefined ? undefined : parseSchedstat(text);
  return s ? s.runNs : undefined;
}

export interface MainLoopOptions {
  readonly pid: number;
  /** The thread to read, when not the main thread: the disk's iothread (LoopThread). */
  readonly tid?: number;
  readonly intervalMs: number;
  readonly now?: () => number;
  readonly scheduler?: SchedulerLike;
  readonly procRoot?: string;
}

/** Readings every `intervalMs` (a read that fails, e.g. the process has exited, is skipped). */
export function mainLoop$(o: MainLoopOptions): Observable<MainLoopReading> {
  const now = o.now ?? Date.now;
  const tid = o.tid ?? o.pid;
  return pollEvery(
    o.intervalMs,
    () => defer(() => from(readMainLoopNs(o.pid, o.procRoot, tid))).pipe(map((busyNs) => (busyNs === undefined ? undefined : { time: now(), pid: o.pid, tid, busyNs }))),
    o.scheduler ?? asyncScheduler,
  ).pipe(filter((r): r is MainLoopReading => r !== undefined));
}
