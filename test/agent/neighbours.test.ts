/** Neighbour protection's parts (src/agent/neighbours.ts): which files a process holds, and combined samples. */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Subject, toArray, firstValueFrom } from 'rxjs';
import { imageDevices, withNeighbours } from '../../src/agent/neighbours.ts';
import type { ActivitySample } from '../../src/streams/types.ts';

const zero = { diskReads: 0, diskWrites: 0, diskFlushes: 0, diskDiscards: 0, keyEvents: 0, pointerEvents: 0, interrupts: 0, vcpuWaitUs: 0, diskBusyUs: 0 };
const sample = (pid: number, time: number, counts: Partial<typeof zero> = {}, intervalS = 0.05): ActivitySample => ({ ...zero, ...counts, time, pid, vm: `vm${pid}`, intervalS, source: 'ebpf', final: false });

describe('neighbour protection', () => {
  it('finds the host devices of the files a process holds open for reading or writing, not its appended logs', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-nb-'));
    const img = await open(path.join(dir, 'disk.img'), 'w+');
    try {
      const devs = await imageDevices(process.pid);
      assert.ok(devs.has((await stat(path.join(dir, 'disk.img'))).dev));
      assert.equal((await imageDevices(2 ** 22 + 7)).size, 0, 'nothing for a process that is not there');
    } finally {
      await img.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('gives the job\'s VM the largest count (and time in flight) of itself and its neighbours in each report, its own stall, and ignores VMs elsewhere', async () => {
    const in$ = new Subject<ActivitySample>();
    const out = firstValueFrom(in$.pipe(withNeighbours(1, () => new Set([2])), toArray()));
    // one report: the neighbour (2) writes, a VM on other storage (3) reads a lot
    in$.next(sample(2, 1000, { diskWrites: 6, vcpuWaitUs: 40_000, diskBusyUs: 45_000 }));
    in$.next(sample(1, 1000, { diskReads: 1, vcpuWaitUs: 500, diskBusyUs: 2_000 }));
    in$.next(sample(3, 1000, { diskReads: 90, diskBusyUs: 50_000 }));
    await new Promise((r) => setImmediate(r));
    // the next: the neighbour's interval was twice as long
    in$.next(sample(1, 1050, { keyEvents: 0 }));
    in$.next(sample(2, 1050, { keyEvents: 4 }, 0.1));
    await new Promise((r) => setImmediate(r));
    in$.complete();
    const got = await out;
    assert.equal(got.length, 2, 'one sample per report, the job VM\'s');
    assert.deepEqual([got[0]!.pid, got[0]!.diskReads, got[0]!.diskWrites, got[0]!.vcpuWaitUs, got[0]!.diskBusyUs], [1, 1, 6, 500, 45_000]);
    assert.equal(got[1]!.keyEvents, 2, 'scaled to the job VM\'s interval');
  });
});
