/**
 * What a paused mirror costs its guest's disk requests: one guest, its busy phases
 * alternately with no job and beside a mirror that is started in the idle phase before and
 * paused at once (as idlecrypt's copy sits through a busy phase), and per busy phase the
 * guest's MiB/s and its QEMU's CPU time (every thread's /proc/PID/task/TID/schedstat), so
 * MiB per CPU-second. bench/README.md, "The sparse qcow2 writeback cell: two guests on two
 * cores", found the moderated guest ~5% less productive per CPU-second than its reference
 * beside a paused copy; this isolates the job from everything else of a copy (no daemon, no
 * idlecrypt, no probes: the mirror's target is a null-co node of the source's size).
 *
 * While paused a mirror keeps its filter node (mirror_top) above the guest's format node and
 * a dirty bitmap, set by every guest write (block/mirror.c bdrv_mirror_top_do_write).
 *
 *   node --import tsx bench/paused-mirror-cost.ts [--pairs 4] [--disk sparse-qcow2|sparse-raw]
 *        [--cache writeback|none]
 *
 * The guest runs the matrix's one-at-a-time workload (64 KiB O_DIRECT requests, 8 s idle /
 * 8 s busy). Phases alternate none, paused, paused, none, ... (ABBA), measured from 0.5 s
 * into each busy phase to its end. Prints one line per phase and the medians.
 */
import { readdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ensureImage, makeDiskImage, startTestVm } from '../vm-images/launch.ts';
import { QmpClient } from '../src/qmp/client.ts';
import { readMainLoopNs } from '../src/probes/mainloop.ts';
import { GuestRecorder, MiB, guestBytes, medianOf, now, rateOver, sleepUntil } from '../test/helpers/moderation-lab.ts';

const { values } = parseArgs({ options: { pairs: { type: 'string', default: '4' }, disk: { type: 'string', default: 'sparse-qcow2' }, cache: { type: 'string', default: 'writeback' } } });
const pairs = Number(values.pairs);
const format = values.disk === 'sparse-qcow2' ? 'qcow2' : 'raw';
const cache = values.cache as 'writeback' | 'none';

/** Every thread's time on a CPU, ns (a thread gone meanwhile counts 0). */
async function cpuNs(pid: number): Promise<number> {
  let ns = 0;
  for (const tid of await readdir(`/proc/${pid}/task`)) ns += (await readMainLoopNs(pid, '/proc', Number(tid))) ?? 0;
  return ns;
}

ensureImage();
const dir = await mkdtemp(path.join(tmpdir(), 'ic-bench-pmc-'));
const disk = path.join(dir, `src.${format}`);
await makeDiskImage(disk, { sizeMiB: 65536, format, fill: 'sparse' });
const vm = await startTestVm({ name: 'pmc', disk, dir, cache, workload: 'bursty', params: { bs_kb: 64, chunk_kb: 1024 } });
const rows: { mode: 'none' | 'paused'; mibps: number; cpu: number }[] = [];
const rec = new GuestRecorder(vm);
try {
  await vm.ready;
  void rec.poll({ intervalMs: 250, stats: true, jobs: false });
  const q = await QmpClient.connect(vm.toolQmpSocket);
  const size = 65536 * MiB;
  let t = now();
  for (let i = 0; i < 2 * pairs; i++) {
    const mode = [0, 3].includes(i % 4) ? 'none' : 'paused';
    const idle = await rec.nextPhase('idle', t);
    await sleepUntil(idle + 1000);
    if (mode === 'paused') {
      await q.execute('blockdev-add', { driver: 'null-co', 'node-name': 'pmc-null', size } as never);
      await q.execute('blockdev-mirror', { 'job-id': 'pmc', device: 'disk0-fmt', target: 'pmc-null', sync: 'full', speed: 1, 'auto-dismiss': false } as never);
      await q.execute('job-pause', { id: 'pmc' } as never);
    }
    const busy = await rec.nextPhase('busy', idle + 1000);
    await sleepUntil(busy + 500);
    const from = now();
    const cpu0 = await cpuNs(vm.pid);
    const end = await rec.nextPhase('idle', busy + 1000);
    const cpu1 = await cpuNs(vm.pid);
    const to = now();
    await sleepUntil(to + 300); // a poll after the window
    const bps = rateOver(rec.samples, from, end, guestBytes);
    if (bps === undefined) throw new Error(`busy phase ${i + 1}: the polls do not cover it`);
    const row = { mode, mibps: bps / MiB, cpu: (cpu1 - cpu0) / 1e6 / (to - from) } as const;
    rows.push(row);
    process.stdout.write(`busy phase ${i + 1} (${mode}): ${row.mibps.toFixed(0)} MiB/s, QEMU on a CPU ${(100 * row.cpu).toFixed(0)}%, ${(row.mibps / row.cpu).toFixed(0)} MiB per CPU-second\n`);
    if (mode === 'paused') {
      await q.execute('block-job-cancel', { device: 'pmc', force: true } as never);
      for (let k = 0; k < 100; k++) {
        const jobs = (await q.execute('query-jobs' as never)) as unknown as { id: string; status: string }[];
        if (jobs.find((j) => j.id === 'pmc')?.status === 'concluded') break;
        await sleepUntil(now() + 50);
      }
      await q.execute('job-dismiss', { id: 'pmc' } as never);
      await q.execute('blockdev-del', { 'node-name': 'pmc-null' } as never);
    }
    t = end;
  }
  await q.close();
} finally {
  await rec.stop();
  await vm.stop();
  await rm(dir, { recursive: true, force: true });
}
for (const mode of ['none', 'paused'] as const) {
  const r = rows.filter((x) => x.mode === mode);
  const med = (xs: number[]) => medianOf(xs) ?? NaN;
  process.stdout.write(
    `${mode}: median ${med(r.map((x) => x.mibps)).toFixed(0)} MiB/s, QEMU on a CPU ${(100 * med(r.map((x) => x.cpu))).toFixed(0)}%, ${med(r.map((x) => x.mibps / x.cpu)).toFixed(0)} MiB per CPU-second (${r.length} phases)\n`,
  );
}
