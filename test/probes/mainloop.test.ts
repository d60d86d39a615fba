/**
 * The main loop's load for the headroom: the main thread's on-CPU time from schedstat
 * (src/probes/mainloop.ts), and the busy share of each interval (src/streams/load.ts).
 */
import { deepStrictEqual, equal } from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { of, toArray, firstValueFrom } from 'rxjs';
import { iothreadTidByName, parseSchedstat, readMainLoopNs } from '../../src/probes/mainloop.ts';
import { mainLoopLoad } from '../../src/streams/load.ts';

describe('main-loop load', () => {
  it('reads the main thread\'s (or an iothread\'s) on-CPU nanoseconds from schedstat, finds an iothread by its name, and reads nothing from a process that is gone', async () => {
    equal(parseSchedstat('123456789 5000 42\n')?.runNs, 123456789);
    equal(parseSchedstat('not schedstat'), undefined);
    const root = await mkdtemp(path.join(tmpdir(), 'idlecrypt-proc-'));
    try {
      await mkdir(path.join(root, '77', 'task', '77'), { recursive: true });
      await writeFile(path.join(root, '77', 'task', '77', 'schedstat'), '2500000000 900000000 310\n');
      equal(await readMainLoopNs(77, root), 2_500_000_000, 'runqueue wait is not counted');
      equal(await readMainLoopNs(78, root), undefined);
      // The disk's iothread: another task of the process, read by its tid; found by its name
      // (QEMU's `IO <id>`, which the kernel cuts to 15 bytes) and by nothing else.
      for (const [tid, comm] of [[80, 'qemu-system-x86'], [81, 'IO iothread1'], [82, 'IO a-long-iothre'.slice(0, 15)], [83, 'CPU 0/TCG']] as const) {
        await mkdir(path.join(root, '77', 'task', String(tid)), { recursive: true });
        await writeFile(path.join(root, '77', 'task', String(tid), 'comm'), `${comm}\n`);
      }
      await writeFile(path.join(root, '77', 'task', '81', 'schedstat'), '700000000 1 5\n');
      equal(await readMainLoopNs(77, root, 81), 700_000_000);
      equal(await iothreadTidByName(77, 'iothread1', root), 81);
      equal(await iothreadTidByName(77, 'a-long-iothread-name', root), 82);
      equal(await iothreadTidByName(77, 'iothread2', root), undefined);
      equal(await iothreadTidByName(78, 'iothread1', root), undefined, 'no such process');
    } finally {
      await rm(root, { recursive: true, force: true });
    }
    // This process's own main thread has run for some time.
    const own = await readMainLoopNs(process.pid);
    equal(typeof own === 'number' && own > 0, true);
  });

  it('turns cumulative readings into the busy share of each interval, skipping a restarted process or a clock going back', async () => {
    const ms = 1e6;
    const loads = await firstValueFrom(
      of(
        { time: 1000, pid: 5, tid: 5, busyNs: 0 },
        { time: 1250, pid: 5, tid: 5, busyNs: 200 * ms }, // 200 ms busy in 250 ms
        { time: 1500, pid: 5, tid: 5, busyNs: 225 * ms }, // 25 ms in 250 ms
        { time: 1600, pid: 5, tid: 9, busyNs: 900 * ms }, // another thread (the disk's iothread): no interval
        { time: 1750, pid: 6, tid: 6, busyNs: 10 * ms }, // another process: no interval
        { time: 2000, pid: 6, tid: 6, busyNs: 260 * ms }, // all of it
        { time: 1900, pid: 6, tid: 6, busyNs: 300 * ms }, // the clock went back: skipped
      ).pipe(mainLoopLoad(), toArray()),
    );
    deepStrictEqual(loads, [
      { time: 1250, load: 0.8 },
      { time: 1500, load: 0.1 },
      { time: 2000, load: 1 },
    ]);
  });
});
