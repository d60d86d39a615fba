/**
 * The job's own speed limit against pacing by a throttle filter below the target, at the same
 * speeds, beside a guest that trickles: what each costs the guest's vCPU in waits for QEMU's
 * big lock, and what the copy makes. An experiment, not what idlecrypt does: it paces with the
 * job's speed (docs/starvation.md, "Paced, not sliced: tried").
 *
 * The job's limit is kept in 100 ms slices (`ratelimit_calculate_delay`,
 * include/qemu/ratelimit.h): the mirror copies a slice's worth flat out, then sleeps, and
 * into LUKS without an iothread every MiB is encrypted in the main loop holding the big lock.
 * A `throttle` node (a `throttle-group` object's `bps-write`, set with qom-set) between the
 * LUKS node and its file node delays each write instead (util/throttle.c,
 * `throttle_compute_wait`), so the encryption of the next 1 MiB waits for it.
 *
 * One guest (the busybox test guest, workload `writer`: 4 KiB O_DIRECT writes, each
 * flushed, --wps a second, all the time) on a 64 GiB sparse raw disk, one mirror into LUKS
 * (2 MiB buffer, as a moderated copy of a mostly unallocated source gets) whose target has
 * the pacing filter below its format node. The copy is switched between the two limits in
 * windows (--window-s each, 2 s to settle first), paused between them, in the order given by
 * --steps: `base` (paused), `jN` (the job's speed N MiB/s, the filter unlimited), `pN` (the
 * filter N MiB/s, the job unlimited), `bN` (both N MiB/s), `u` (both unlimited). Per window:
 * the copy's MiB/s (query-block-jobs offsets), the guest's writes a second (its WROTE lines)
 * and its vCPU's wait for a lock (probes/qemu-stall.bt, ms/s: mean and largest second).
 *
 * Then --cycles N moderation-like cycles per mode at --cycle-speed MiB/s: the copy runs
 * 600 ms, is paused (job-pause) until QEMU says paused, rests 400 ms, and runs again, as
 * moderation pauses and resumes it around a busy spell. Modes: `job` (the job's speed), `pace`
 * (the filter), `pace-flush` (the filter, lifted at each pause so that what it holds goes at
 * once, and set again before each resume). Per cycle: the vCPU's wait over the 300 ms after
 * the resume (ms/s), the time from job-pause to paused, and what the copy made meanwhile.
 *
 *   node --import tsx bench/pacing.ts [--cache none|writeback] [--wps 15]
 *        [--steps base,j150,p150,j180,p180,j200,p200,u] [--rounds 2] [--window-s 15]
 *        [--cycles 6] [--cycle-speed 150] [--cycle-modes job,pace,pace-flush]
 *
 * Prints a line per window and cycle, then the medians. About 20 s a window and 1.2 s a
 * cycle. Run nothing else meanwhile.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { startTestVm, ensureImage } from '../vm-images/launch.ts';
import { QmpClient } from '../src/qmp/client.ts';
import { median } from '../test/helpers/moderation-lab.ts';
import { createLuksImage } from '../test/helpers/images.ts';

const { values } = parseArgs({
  options: {
    cache: { type: 'string', default: 'none' },
    wps: { type: 'string', default: '15' },
    steps: { type: 'string', default: 'base,j150,p150,j180,p180,j200,p200,u' },
    rounds: { type: 'string', default: '2' },
    'window-s': { type: 'string', default: '15' },
    cycles: { type: 'string', default: '6' },
    'cycle-speed': { type: 'string', default: '150' },
    'cycle-modes': { type: 'string', default: 'job,pace,pace-flush' },
  },
});
const MiB = 1024 * 1024;
const cache = values.cache as 'none' | 'writeback';
if (cache !== 'none' && cache !== 'writeback') throw new Error(`--cache: none or writeback, not ${values.cache}`);
const steps = values.steps.split(',');
for (const s of steps) if (!/^(base|u|[jpb]\d+)$/.test(s)) throw new Error(`--steps: base, u, jN, pN or bN, not ${s}`);
const windowMs = Number(values['window-s']) * 1000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

ensureImage();
const dir = await mkdtemp('/var/tmp/ic-pacing-');
const disk = path.join(dir, 'source.raw');
execFileSync('truncate', ['-s', '64G', disk]);
const key = path.join(dir, 'key');
await writeFile(key, 'pacing bench key', { mode: 0o600 });
const target = path.join(dir, 'target.luks');
// Through the helper that retries qemu-img's spurious 'Unable to get accurate CPU usage'.
await createLuksImage(target, '64G', key, 1000);
const vm = await startTestVm({ name: 'pacing', disk, format: 'raw', cache, dir, workload: 'writer', params: { wps: Number(values.wps), flush: 1 } });
const rows: { step: string; copy: number; writes: number; waitMean: number; waitMax: number }[] = [];
const cycleRows: { mode: string; waitAfterResume: number; pauseMs: number; madeMiB: number }[] = [];
let bt: ReturnType<typeof spawn> | undefined;
try {
  await vm.ready;
  const q = await QmpClient.connect(vm.toolQmpSocket);
  const x = (c: string, a?: Record<string, unknown>) => q.executeRaw(c, a as never);
  const group = '/objects/pace';
  const setPace = (bps: number) => x('qom-set', { path: group, property: 'limits', value: { 'bps-write': bps } });
  const fileCache = { direct: cache === 'none', 'no-flush': false };
  await x('object-add', { 'qom-type': 'secret', id: 'key', file: key, format: 'raw' });
  await x('blockdev-add', { driver: 'file', 'node-name': 't-file', filename: target, cache: fileCache });
  await x('object-add', { 'qom-type': 'throttle-group', id: 'pace', limits: {} });
  await x('blockdev-add', { driver: 'throttle', 'node-name': 't-paced', 'throttle-group': 'pace', file: 't-file' });
  await x('blockdev-add', { driver: 'luks', 'node-name': 't-luks', file: 't-paced', 'key-secret': 'key', cache: fileCache });

  const wrote: number[] = [];
  vm.lines$.subscribe((l) => {
    if (l.startsWith('WROTE')) wrote.push(Date.now());
  });
  const waits: { t: number; ms: number }[] = [];
  // Every 50 ms: the cycles look at 300 ms; the windows sum each second's reports.
  bt = spawn('bpftrace', [path.resolve('probes/qemu-stall.bt'), '50'], { stdio: ['ignore', 'pipe', 'ignore'] });
  let buf = '';
  bt.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const m = /@vcpu_wait_us\[(\d+)\]: (\d+)/.exec(buf.slice(0, i));
      buf = buf.slice(i + 1);
      if (m && Number(m[1]) === vm.pid) waits.push({ t: Date.now(), ms: Number(m[2]) / 1000 });
    }
  });
  await sleep(3000);
  await x('blockdev-mirror', { 'job-id': 'copy', device: 'disk0-fmt', target: 't-luks', sync: 'full', 'buf-size': 2 * MiB, speed: 0 });
  await x('job-pause', { id: 'copy' });
  const offset = async () => ((await x('query-block-jobs')) as { offset: number }[])[0]?.offset ?? 0;
  console.log(`guest pid ${vm.pid}, cache=${cache}, ${values.wps} flushed writes/s; windows of ${windowMs / 1000} s`);
  for (let round = 1; round <= Number(values.rounds); round++) {
    for (const step of steps) {
      const mib = Number(step.slice(1)) * MiB;
      if (step !== 'base') {
        // Each limit set before the other is lifted, as the pacer's job does.
        if (step[0] === 'j') await x('block-job-set-speed', { device: 'copy', speed: mib }), await setPace(0);
        else if (step[0] === 'p') await setPace(mib), await x('block-job-set-speed', { device: 'copy', speed: 0 });
        else if (step[0] === 'b') await setPace(mib), await x('block-job-set-speed', { device: 'copy', speed: mib });
        else await setPace(0), await x('block-job-set-speed', { device: 'copy', speed: 0 });
        await x('job-resume', { id: 'copy' });
      }
      await sleep(2000);
      const t0 = Date.now();
      const o0 = await offset();
      await sleep(windowMs);
      const t1 = Date.now();
      const o1 = await offset();
      if (step !== 'base') await x('job-pause', { id: 'copy' });
      // Per second: the 50 ms reports summed in whole seconds from t0.
      const ws: number[] = [];
      for (let a = t0; a + 1000 <= t1; a += 1000) ws.push(waits.filter((w) => w.t > a && w.t <= a + 1000).reduce((x, w) => x + w.ms, 0));
      const row = {
        step,
        copy: (o1 - o0) / MiB / ((t1 - t0) / 1000),
        writes: wrote.filter((t) => t >= t0 && t < t1).length / ((t1 - t0) / 1000),
        waitMean: ws.length ? ws.reduce((a, b) => a + b, 0) / ws.length : NaN,
        waitMax: ws.length ? Math.max(...ws) : NaN,
      };
      rows.push(row);
      console.log(`round ${round} ${step.padEnd(5)} copy ${row.copy.toFixed(0).padStart(4)} MiB/s  guest ${row.writes.toFixed(1)} writes/s  vCPU lock wait ${row.waitMean.toFixed(0)} ms/s (largest second ${row.waitMax.toFixed(0)})`);
      await sleep(1000);
    }
  }
  const cycleBps = Number(values['cycle-speed']) * MiB;
  const jobSpeed = (bps: number) => x('block-job-set-speed', { device: 'copy', speed: bps });
  const status = async () => ((await x('query-block-jobs')) as { status: string; offset: number }[])[0]!;
  for (const mode of Number(values.cycles) > 0 ? values['cycle-modes'].split(',') : []) {
    if (mode === 'job') await jobSpeed(cycleBps), await setPace(0);
    else if (mode === 'pace' || mode === 'pace-flush') await setPace(cycleBps), await jobSpeed(0);
    else throw new Error(`--cycle-modes: job, pace or pace-flush, not ${mode}`);
    for (let c = 1; c <= Number(values.cycles); c++) {
      if (mode === 'pace-flush') await setPace(cycleBps);
      const r0 = Date.now();
      await x('job-resume', { id: 'copy' });
      await sleep(600);
      const p0 = Date.now();
      const o0 = (await status()).offset;
      await x('job-pause', { id: 'copy' });
      if (mode === 'pace-flush') await setPace(0);
      while ((await status()).status !== 'paused') await sleep(5);
      const pauseMs = Date.now() - p0;
      const madeMiB = ((await status()).offset - o0) / MiB;
      await sleep(400);
      const w = waits.filter((v) => v.t > r0 && v.t <= r0 + 300).reduce((a, v) => a + v.ms, 0) / 0.3;
      cycleRows.push({ mode, waitAfterResume: w, pauseMs, madeMiB });
      console.log(`cycle ${mode.padEnd(10)} ${c}: vCPU lock wait ${w.toFixed(0).padStart(4)} ms/s over the 300 ms after the resume; job-pause to paused ${String(pauseMs).padStart(4)} ms, the copy made ${madeMiB.toFixed(1)} MiB meanwhile`);
    }
  }
  await x('block-job-cancel', { device: 'copy', force: true }).catch(() => {});
  await q.close();
} finally {
  bt?.kill('SIGINT');
  await vm.stop();
  await rm(dir, { recursive: true, force: true });
}
console.log('\nmedians per step:');
for (const step of steps) {
  const r = rows.filter((x) => x.step === step);
  const m = (f: (x: (typeof r)[number]) => number) => median(r.map(f)).toFixed(0);
  console.log(`${step.padEnd(5)} copy ${m((x) => x.copy).padStart(4)} MiB/s  guest ${median(r.map((x) => x.writes)).toFixed(1)} writes/s  vCPU lock wait ${m((x) => x.waitMean)} ms/s (largest second ${m((x) => x.waitMax)})`);
}
const modes = [...new Set(cycleRows.map((r) => r.mode))];
if (modes.length) console.log('\nmedians per cycle mode:');
for (const mode of modes) {
  const r = cycleRows.filter((x) => x.mode === mode);
  console.log(`${mode.padEnd(10)} vCPU lock wait ${median(r.map((x) => x.waitAfterResume)).toFixed(0)} ms/s after the resume; job-pause to paused ${median(r.map((x) => x.pauseMs)).toFixed(0)} ms, ${median(r.map((x) => x.madeMiB)).toFixed(1)} MiB copied meanwhile`);
}
process.exit(0);
