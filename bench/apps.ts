/**
 * Issue 13's application benchmark: real applications in the Debian 12 test guest
 * (vm-images/debian/) while its disk is encrypted, as the source design measured itself on
 * application benchmarks. For each workload, in one run of this command, each of
 *   (a) no copy: the reference,
 *   (b) an unthrottled mirror: `idlecrypt encrypt --no-moderation`,
 *   (c) a fixed cap of 30 and 100 MiB/s, as `virsh blockcopy --bandwidth` gives: `--speed`,
 *   (d) idlecrypt's shipped default policy,
 * in rounds that alternate the order of the modes (drift on these shared machines hits every
 * mode alike); medians over rounds.
 *
 * Workloads (inside the guest, on its ext4 root, the disk being copied):
 *   pgbench      PostgreSQL 15, TPC-B-like, scale 10 (~150 MiB), 4 clients, 2 threads
 *   randrw-qd1   fio 4 KiB random reads and writes (50/50), O_DIRECT, queue depth 1
 *   randrw-qd32  the same at queue depth 32 (libaio)
 *   seq-1m       fio 1 MiB sequential reads and writes (50/50), O_DIRECT, queue depth 4
 *
 * Two designs (--design):
 *
 * one-boot (default): the harm. One guest per workload, booted once from a private copy of a
 *   prepared image (the database initialised and fio's file laid out once, by this command),
 *   warmed up by one unmeasured run of the workload (--warmup s), then every mode in turn in
 *   that same boot, the order alternating between rounds (ABC CBA ABC): the copy starts, the
 *   workload runs --seconds beside it, and the copy is then cancelled (idlecrypt's cancel: the
 *   guest stays on its source, the target is removed). So the modes differ only in the copy,
 *   not in the guest's boot, caches or database, which moved a mode's figures by up to 25%
 *   between fresh boots. The disk (--disk-gib, default 24) is big enough that no copy
 *   catches up within the workload, so the copy runs for all of it; time to encrypt is not
 *   measured here, the copy's speed during the workload is.
 * fresh-boot: the time to encrypt. Each run boots its own copy of the prepared image (disk
 *   --disk-gib, default 8), starts the copy, runs the workload --seconds from the moment it
 *   copies, then leaves the copy to finish (the guest idle) and pivot. A fixed-cap copy is
 *   cancelled --max-copy-s after its start and its time extrapolated from its average
 *   progress (marked ≈). Its workload figures carry the boot-to-boot noise above.
 *
 * In both, the disk beyond the 2 GiB filesystem is written (zeros, allocated), as a used disk
 * is: holes would copy at ≈1 GiB/s, allocated blocks copy at the host disk's speed.
 *
 * Measured: the workload's own figures (pgbench: transactions per second and each
 * transaction's latency from its per-transaction log; fio: IOPS or MiB/s and completion
 * latency percentiles from its JSON), per second for the plots (pgbench -P 1, fio's IOPS
 * log); the copy's progress; fresh-boot: the time to encrypt (the command's "copying"
 * record to its "completed" one).
 *
 *   node --import tsx bench/apps.ts [--design one-boot|fresh-boot] [--rounds 2]
 *        [--workloads pgbench,randrw-qd1,randrw-qd32,seq-1m] [--modes none,held,unthrottled,cap30,cap100,idlecrypt]
 *        [--seconds 60] [--warmup 60] [--max-copy-s 150] [--disk-gib N] [--out bench/results]
 *
 * Output: a table on stdout; bench/results/apps-report.md (tables, every run, an SVG of
 * each workload over time) and bench/results/apps-<time>.json.
 */
import { execFileSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { copyDebianDisk, debianManifest, startDebianVm, type DebianVm } from '../vm-images/debian.ts';
import { EncryptRun, mdTable, medianOf as med, now, percentile, textTable } from '../test/helpers/moderation-lab.ts';
import { startCli } from '../test/helpers/cli.ts';
import { xmlEscape } from './svg.ts';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '2' },
    workloads: { type: 'string', default: 'pgbench,randrw-qd1,randrw-qd32,seq-1m' },
    modes: { type: 'string', default: 'none,unthrottled,cap30,cap100,idlecrypt' },
    seconds: { type: 'string', default: '60' },
    'max-copy-s': { type: 'string', default: '150' },
    'disk-gib': { type: 'string' },
    design: { type: 'string', default: 'one-boot' },
    warmup: { type: 'string', default: '60' },
    out: { type: 'string', default: 'bench/results' },
  },
});
const rounds = Number(values.rounds);
const seconds = Number(values.seconds);
const maxCopyMs = Number(values['max-copy-s']) * 1000;
const design = values.design as 'one-boot' | 'fresh-boot';
if (design !== 'one-boot' && design !== 'fresh-boot') throw new Error('--design one-boot|fresh-boot');
const oneBoot = design === 'one-boot';
/**
 * The guest's disk grown to this size and written (zeros, but allocated) beyond its 2 GiB
 * filesystem, so that copies last as long as real disks' do: holes copy at ≈1 GiB/s,
 * allocated blocks unthrottled at ≈400 MiB/s here (read with O_DIRECT). one-boot: 24 GiB,
 * ≈60 s, so that no copy finishes within the workload; fresh-boot: 8 GiB.
 */
const diskGiB = Number(values['disk-gib'] ?? (oneBoot ? 24 : 8));
if (!(diskGiB >= 2)) throw new Error('--disk-gib >= 2');
const warmupS = Number(values.warmup);
if (!(rounds >= 1) || !(seconds >= 10) || !(maxCopyMs >= 20_000)) throw new Error('--rounds >= 1, --seconds >= 10, --max-copy-s >= 20');

interface Mode {
  readonly id: string;
  readonly label: string;
  readonly args: string[] | null;
  readonly capped?: boolean;
  /** no copy, but idlecrypt's probes attached (`idlecrypt observe`, as (d) attaches them): what observing costs */
  readonly observed?: boolean;
}
const ALL_MODES: Mode[] = [
  { id: 'none', label: '(a) no copy', args: null },
  { id: 'observed', label: "(a') no copy, observed by idlecrypt's probes", args: null, observed: true },
  /** a diagnostic: the mirror job in place (its filter node, its dirty bitmap) but copying next to nothing */
  { id: 'held', label: '(h) a mirror held at 1 byte/s (diagnostic)', args: ['--speed', '1'], capped: true },
  { id: 'unthrottled', label: '(b) unthrottled mirror', args: ['--no-moderation'] },
  { id: 'cap30', label: '(c) fixed cap 30 MiB/s', args: ['--speed', '30M'], capped: true },
  { id: 'cap100', label: '(c) fixed cap 100 MiB/s', args: ['--speed', '100M'], capped: true },
  { id: 'idlecrypt', label: '(d) idlecrypt, default policy', args: [] },
  /** diagnostics of (d): the pace its completion guarantee sets for a never-idle guest, and (d) without it */
  { id: 'cap3', label: "(c') fixed cap 3 MiB/s (diagnostic)", args: ['--speed', '3M'], capped: true },
  { id: 'nodeadline', label: "(d') idlecrypt without the guarantee's deadline (diagnostic)", args: ['--policy', fileURLToPath(new URL('policies/no-deadline.yaml', import.meta.url))] },
];
const modes = values.modes!.split(',').map((id) => {
  const m = ALL_MODES.find((x) => x.id === id.trim());
  if (!m) throw new Error(`unknown mode ${id} (known: ${ALL_MODES.map((x) => x.id).join(', ')})`);
  return m;
});

/** What one workload run reports. Throughput: tps, IOPS (read + write) or MiB/s. */
interface Figures {
  readonly throughput: number;
  readonly unit: string;
  readonly p50Ms: number;
  readonly p99Ms: number;
  /** per second, for the plots and the figures while the copy ran */
  readonly series: number[];
  /** pgbench: each transaction's start (s from the first) and latency (ms), for the latency while the copy ran */
  readonly txns?: readonly (readonly [number, number])[];
}

interface Workload {
  readonly id: string;
  readonly label: string;
  /** the guest commands that prepare the image once (the database, fio's file) */
  readonly prepare: string[];
  readonly run: (s: number) => string;
  readonly parse: (lines: readonly string[]) => Figures;
}

const PG = 'runuser -u postgres --';
const FIO_FILE = '/var/tmp/fio.dat';
const FIO_SIZE = '512M';

function fio(id: string, label: string, args: string, unit: 'IOPS' | 'MiB/s'): Workload {
  return {
    id,
    label,
    prepare: [`fio --name=layout --filename=${FIO_FILE} --size=${FIO_SIZE} --rw=write --bs=1M --direct=1 --output-format=terse >/dev/null`],
    run: (s) =>
      `cd /var/tmp && rm -f fio_iops*.log && fio --name=${id} --filename=${FIO_FILE} --size=${FIO_SIZE} ${args} --direct=1 --runtime=${s} --time_based ` +
      `--output-format=json --output=/var/tmp/fio.json --write_iops_log=fio --log_avg_msec=1000 >/dev/null && cat /var/tmp/fio.json && echo IOPS-LOG && cat fio_iops*.log`,
    parse: (lines) => {
      const at = lines.indexOf('IOPS-LOG');
      const json = JSON.parse(lines.slice(0, at).join('\n')) as { jobs: { read: FioDir; write: FioDir }[] };
      const j = json.jobs[0]!;
      const dirs = [j.read, j.write].filter((d) => d.total_ios > 0);
      const throughput = unit === 'IOPS' ? dirs.reduce((a, d) => a + d.iops, 0) : dirs.reduce((a, d) => a + d.bw_bytes, 0) / 2 ** 20;
      // Latency percentiles over both directions: weighted by their counts, the larger of the two is a fair summary.
      const pct = (p: string) => Math.max(...dirs.map((d) => (d.clat_ns.percentile?.[p] ?? 0) / 1e6));
      const perSec = new Map<number, number>();
      for (const l of lines.slice(at + 1)) {
        const [msec, value, , bs] = l.split(',').map((x) => Number(x.trim()));
        if (!Number.isFinite(msec) || !Number.isFinite(value)) continue;
        const sec = Math.round(msec! / 1000);
        perSec.set(sec, (perSec.get(sec) ?? 0) + (unit === 'IOPS' ? value! : (value! * (bs || 1 << 20)) / 2 ** 20));
      }
      const series = [...perSec.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v);
      return { throughput, unit, p50Ms: pct('50.000000'), p99Ms: pct('99.000000'), series };
    },
  };
}
interface FioDir {
  total_ios: number;
  iops: number;
  bw_bytes: number;
  clat_ns: { percentile?: Record<string, number> };
}

const ALL_WORKLOADS: Workload[] = [
  {
    id: 'pgbench',
    label: 'pgbench TPC-B-like, scale 10, 4 clients',
    prepare: [`${PG} pgbench -i -q -s 10 postgres`, `${PG} psql -X -q -c 'VACUUM ANALYZE' -c 'CHECKPOINT' postgres`],
    run: (s) => `cd /var/tmp && rm -f pgb.* && ${PG} pgbench -c 4 -j 2 -T ${s} -P 1 -l --log-prefix=/var/tmp/pgb postgres 2>&1 && echo TX-LOG && cat /var/tmp/pgb.*`,
    parse: (lines) => {
      const at = lines.indexOf('TX-LOG');
      const text = lines.slice(0, at).join('\n');
      const tps = Number(/^tps = ([\d.]+)/m.exec(text)?.[1]);
      const series = [...text.matchAll(/^progress: [\d.]+ s, ([\d.]+) tps/gm)].map((m) => Number(m[1]));
      // Per-transaction log: client_id transaction_no time(us) script_no time_epoch time_us ...
      const rows = lines
        .slice(at + 1)
        .map((l) => l.split(' ').map(Number))
        .filter((f) => f.length >= 6 && f.slice(0, 6).every(Number.isFinite))
        .map((f) => [f[4]! + f[5]! / 1e6 - f[2]! / 1e6, f[2]! / 1000] as const);
      if (!Number.isFinite(tps) || rows.length === 0) throw new Error(`pgbench: no result in\n${text.slice(-2000)}`);
      const first = Math.min(...rows.map((r) => r[0]));
      const txns = rows.map(([t, ms]) => [Math.round((t - first) * 1000) / 1000, ms] as const);
      const lat = rows.map((r) => r[1]);
      return { throughput: tps, unit: 'TPS', p50Ms: percentile(lat, 50), p99Ms: percentile(lat, 99), series, txns };
    },
  },
  fio('randrw-qd1', 'fio 4 KiB random read/write, QD1', '--rw=randrw --bs=4k --ioengine=psync --iodepth=1', 'IOPS'),
  fio('randrw-qd32', 'fio 4 KiB random read/write, QD32', '--rw=randrw --bs=4k --ioengine=libaio --iodepth=32', 'IOPS'),
  fio('seq-1m', 'fio 1 MiB sequential read/write, QD4', '--rw=rw --bs=1M --ioengine=libaio --iodepth=4', 'MiB/s'),
];
const workloads = values.workloads!.split(',').map((id) => {
  const w = ALL_WORKLOADS.find((x) => x.id === id.trim());
  if (!w) throw new Error(`unknown workload ${id} (known: ${ALL_WORKLOADS.map((x) => x.id).join(', ')})`);
  return w;
});

interface Run {
  workload: string;
  mode: string;
  round: number;
  figures: Figures;
  /** the copy's start to the guest on the LUKS image (s); null without a copy */
  totalS: number | null;
  extrapolated: boolean;
  /** share of the workload's time during which the copy had work left */
  overlap: number | null;
  /** the workload's throughput over its seconds while the copy had work left (all of them for (a)) */
  duringCopy: number | null;
  /** pgbench: the p99 latency of the transactions that began while the copy had work left */
  p99DuringCopyMs: number | null;
  /** copy progress (%), per second from the workload's start */
  progress: number[];
  /** one-boot: the copy's MiB/s over the workload (it is cancelled when the workload ends); null in fresh-boot */
  copyMiBs: number | null;
  loadavg: number;
}

async function powerOff(g: DebianVm): Promise<void> {
  await g.agent.run('systemctl --no-block poweroff').catch((e: Error) => {
    if (!/connection closed/.test(e.message)) throw e;
  });
  await Promise.race([g.vm.exited, sleep(120_000, undefined, { ref: false })]);
  await g.stop();
}

/** A run's own copy of the prepared image, grown to --disk-gib and written beyond its filesystem (allocated, as a used disk is). */
function privateDisk(prepared: string, disk: string): void {
  execFileSync('cp', ['--sparse=always', prepared, disk]);
  const imageMiB = Math.ceil(statSync(disk).size / 2 ** 20);
  execFileSync('dd', ['if=/dev/zero', `of=${disk}`, 'bs=1M', `seek=${imageMiB}`, `count=${diskGiB * 1024 - imageMiB}`, 'conv=notrunc', 'status=none']);
}

/** The pristine image with every workload's preparation done, once. */
async function prepareImage(work: string): Promise<string> {
  const disk = await copyDebianDisk(work, 'prepared.raw');
  const g = await startDebianVm({ name: 'bench-prepare', disk });
  try {
    await g.vm.ready;
    await g.agent.ready;
    for (const w of workloads) for (const c of w.prepare) await g.agent.run(c);
    await g.agent.run('sync');
    await powerOff(g);
  } finally {
    await g.stop();
  }
  return disk;
}

/** Starts `idlecrypt encrypt` in `mode` on the guest's disk; resolves once it copies. */
async function startCopy(g: DebianVm, mode: Mode, name: string, target: string, work: string, keyFile: string): Promise<{ enc: EncryptRun; copying: number }> {
  const enc = new EncryptRun(['--qmp', g.vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile, '--iter-time', '50', ...mode.args!], path.join(work, `${name}.lp`));
  const end = now() + 60_000;
  let copying: number | undefined;
  while ((copying = enc.phaseAt('copying')) === undefined) {
    if (now() > end || enc.cli.child.exitCode !== null) {
      if (enc.cli.child.exitCode === null) enc.cli.child.kill('SIGINT');
      throw new Error(`${name}: the copy did not start:\n${enc.cli.stderr().slice(-2000)}`);
    }
    await sleep(50);
  }
  return { enc, copying };
}

type ProgressRec = { time: string; offset: number; len: number; status: string };

/** The last progress record at or before `t` (epoch ms). */
function recordAt(recs: readonly ProgressRec[], t: number): ProgressRec | undefined {
  return recs.findLast((x) => Date.parse(x.time) <= t);
}

/** The copy's progress (%) at each second of the workload. */
function progressPerSecond(recs: ProgressRec[], start: number): number[] {
  const out: number[] = [];
  for (let s = 0; s <= seconds; s++) {
    const rec = recordAt(recs, start + s * 1000);
    out.push(rec && rec.len > 0 ? (100 * rec.offset) / rec.len : 0);
  }
  return out;
}

/** Each copy's records (stdout) and log (stderr: the moderation's decisions and reasons), for diagnosis. */
async function keepLog(name: string, enc: EncryptRun): Promise<void> {
  const dir = path.join(values.out!, 'logs');
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, `${name}.out.jsonl`), enc.cli.stdout());
  await writeFile(path.join(dir, `${name}.log.jsonl`), enc.cli.stderr());
}

/** The workload for --seconds; in mode (a') with the probes of (d) attached before it, every 50 ms as the controller samples. */
async function runWorkload(g: DebianVm, w: Workload, mode: Mode): Promise<{ figures: Figures; start: number; workEnd: number }> {
  const obs = mode.observed ? startCli(['observe', '--pid', String(g.vm.pid), '--interval', '50', '--json']) : undefined;
  if (obs) await obs.waitForStdout(/"interval_s"/, 60_000);
  const start = now();
  const out = await g.agent.run(w.run(seconds), { timeoutMs: seconds * 1000 + 300_000 });
  const workEnd = now();
  if (obs) {
    obs.child.kill('SIGINT');
    await obs.result;
  }
  return { figures: w.parse(out.lines), start, workEnd };
}

/** Runs the workload alone once, unmeasured: the database's and the page cache's warm-up. */
async function warmUp(g: DebianVm, w: Workload): Promise<void> {
  if (warmupS > 0) w.parse((await g.agent.run(w.run(warmupS), { timeoutMs: warmupS * 1000 + 300_000 })).lines);
}

/**
 * The one-boot design: every mode in the same booted, warmed-up guest, so that they differ only
 * in the copy. The copy starts, the workload runs --seconds beside it, and the copy is then
 * cancelled (the guest stays on its source: idlecrypt's cancel path), so the disk must be big
 * enough that no copy catches up within the workload. Time to encrypt is the fresh-boot design's.
 */
async function runInBoot(g: DebianVm, w: Workload, mode: Mode, round: number, work: string, keyFile: string): Promise<Run> {
  const name = `${w.id}-${mode.id}-${round}`;
  const target = path.join(work, `${name}.luks`);
  let enc: EncryptRun | undefined;
  try {
    let copying: number | null = null;
    if (mode.args) ({ enc, copying } = await startCopy(g, mode, name, target, work, keyFile));
    const { figures, start, workEnd } = await runWorkload(g, w, mode);
    let progress: number[] = [];
    let copyMiBs: number | null = null;
    if (enc && copying !== null) {
      const recs = enc.records().filter((x) => x.event === 'progress') as unknown as ProgressRec[];
      const caught = recs.find((x) => x.len > 0 && x.offset >= x.len);
      if (caught || enc.completed()) {
        throw new Error(`${name}: the copy caught up within the workload (${JSON.stringify(caught ?? enc.completed())}, copying since ${new Date(copying).toISOString()}); give a bigger --disk-gib`);
      }
      enc.cli.child.kill('SIGINT');
      const r = await enc.result(120_000);
      if (r.code === 0 || enc.completed()) throw new Error(`${name}: the copy completed instead of being cancelled`);
      progress = progressPerSecond(recs, start);
      const a = recordAt(recs, start);
      const b = recordAt(recs, workEnd);
      copyMiBs = b ? ((b.offset - (a?.offset ?? 0)) / 2 ** 20 / ((workEnd - start) / 1000)) : null;
    }
    const duringCopy = figures.series.length >= 3 ? figures.series.reduce((x, y) => x + y, 0) / figures.series.length : null;
    const lat = figures.txns?.map(([, ms]) => ms) ?? [];
    return { workload: w.id, mode: mode.id, round, figures, totalS: null, extrapolated: false, overlap: mode.args ? 1 : null, duringCopy, p99DuringCopyMs: lat.length >= 100 ? percentile(lat, 99) : null, progress, copyMiBs, loadavg: os.loadavg()[0]! };
  } finally {
    if (enc && enc.cli.child.exitCode === null) {
      enc.cli.child.kill('SIGINT');
      await enc.cli.result;
    }
    if (enc) await keepLog(name, enc);
    await rm(target, { force: true });
  }
}

async function runOne(w: Workload, mode: Mode, round: number, prepared: string, work: string, keyFile: string): Promise<Run> {
  const name = `${w.id}-${mode.id}-${round}`;
  const disk = path.join(work, `${name}.raw`);
  privateDisk(prepared, disk);
  const target = path.join(work, `${name}.luks`);
  const g = await startDebianVm({ name, disk });
  let enc: EncryptRun | undefined;
  try {
    await g.vm.ready;
    await g.agent.ready;
    await sleep(3000); // boot's tail (PostgreSQL's startup writes) settles
    let copying: number | null = null;
    if (mode.args) ({ enc, copying } = await startCopy(g, mode, name, target, work, keyFile));
    const { figures, start, workEnd } = await runWorkload(g, w, mode);

    let totalS: number | null = null;
    let extrapolated = false;
    let overlap: number | null = null;
    let progress: number[] = [];
    if (enc && copying !== null) {
      const limitAt = copying + (mode.capped ? maxCopyMs : 900_000);
      while (enc.cli.child.exitCode === null && now() < limitAt) await sleep(200);
      let cancelled = false;
      if (enc.cli.child.exitCode === null) {
        cancelled = true;
        enc.cli.child.kill('SIGINT');
      }
      const r = await enc.result(120_000);
      const recs = enc.records().filter((x) => x.event === 'progress') as unknown as ProgressRec[];
      const done = enc.completed();
      if (done && r.code === 0) {
        totalS = (Date.parse(String(done.time)) - copying) / 1000;
      } else if (cancelled) {
        const last = recs.at(-1);
        if (last && last.offset > 0) {
          const el = (Date.parse(last.time) - copying) / 1000;
          totalS = el + (last.len - last.offset) / (last.offset / el);
          extrapolated = true;
        }
      } else {
        throw new Error(`${name}: idlecrypt encrypt failed (${r.code}):\n${r.stderr.slice(-3000)}`);
      }
      const caughtUp = recs.find((x) => x.len > 0 && x.offset >= x.len)?.time;
      const copyEnd = caughtUp ? Date.parse(caughtUp) : done ? Date.parse(String(done.time)) : workEnd;
      overlap = Math.max(0, Math.min(1, (Math.min(copyEnd, workEnd) - start) / (workEnd - start)));
      progress = progressPerSecond(recs, start);
    }
    // While the copy had work left: the first `copyS` seconds of the workload (all of it for (a)).
    const copyS = overlap === null ? seconds : overlap * seconds;
    const during = figures.series.slice(0, Math.floor(copyS));
    const duringCopy = during.length >= 3 ? during.reduce((a, b) => a + b, 0) / during.length : null;
    const lat = figures.txns?.filter(([t]) => t < copyS).map(([, ms]) => ms) ?? [];
    const p99DuringCopyMs = lat.length >= 100 ? percentile(lat, 99) : null;
    return { workload: w.id, mode: mode.id, round, figures, totalS, extrapolated, overlap, duringCopy, p99DuringCopyMs, progress, copyMiBs: null, loadavg: os.loadavg()[0]! };
  } finally {
    if (enc && enc.cli.child.exitCode === null) {
      enc.cli.child.kill('SIGINT');
      await enc.cli.result;
    }
    if (enc) await keepLog(name, enc);
    await g.stop();
    await rm(disk, { force: true });
    await rm(target, { force: true });
  }
}

// ---------------------------------------------------------------- report

const f = (x: number | null, d = 0) => (x === null ? '-' : x.toFixed(d));
const pct = (x: number | null) => (x === null ? '-' : `${(100 * x).toFixed(0)}%`);

function rowsFor(w: Workload, runs: Run[]): string[][] {
  const rs = (m: string) => runs.filter((r) => r.workload === w.id && r.mode === m);
  const base = { t: med(rs('none').map((r) => r.figures.throughput)), during: med(rs('none').map((r) => r.duringCopy)), p99: med(rs('none').map((r) => r.figures.p99Ms)) };
  const unit = runs.find((r) => r.workload === w.id)?.figures.unit ?? '';
  const pg = w.id === 'pgbench';
  return [
    oneBoot
      ? ['mode', unit, 'vs (a)', 'p50 ms', 'p99 ms', 'p99 vs (a)', 'copy MiB/s during the workload']
      : ['mode', unit, 'vs (a)', `${unit} while copying`, 'vs (a)', 'p50 ms', 'p99 ms', 'p99 vs (a)', ...(pg ? ['p99 ms while copying', 'vs (a)'] : []), 'time to encrypt (s)', 'copy during the workload'],
    ...modes.map((m) => {
      const x = rs(m.id);
      const t = med(x.map((r) => r.figures.throughput));
      const during = med(x.map((r) => r.duringCopy));
      const p99 = med(x.map((r) => r.figures.p99Ms));
      const p99c = med(x.map((r) => r.p99DuringCopyMs));
      const total = med(x.map((r) => r.totalS));
      const d = unit === 'TPS' ? 1 : 0;
      if (oneBoot) {
        return [
          m.label,
          f(t, d),
          base.t && t !== null ? pct(t / base.t) : '-',
          f(med(x.map((r) => r.figures.p50Ms)), 2),
          f(p99, 2),
          base.p99 && p99 !== null ? `${(p99 / base.p99).toFixed(2)}x` : '-',
          m.args ? f(med(x.map((r) => r.copyMiBs)), 1) : '-',
        ];
      }
      return [
        m.label,
        f(t, d),
        base.t && t !== null ? pct(t / base.t) : '-',
        f(during, d),
        base.during && during !== null ? pct(during / base.during) : '-',
        f(med(x.map((r) => r.figures.p50Ms)), 2),
        f(p99, 2),
        base.p99 && p99 !== null ? `${(p99 / base.p99).toFixed(2)}x` : '-',
        ...(pg ? [f(p99c, 1), base.p99 && p99c !== null ? `${(p99c / base.p99).toFixed(2)}x` : '-'] : []),
        m.args ? `${x.some((r) => r.extrapolated) ? '≈' : ''}${f(total)}` : '-',
        m.args ? pct(med(x.map((r) => r.overlap))) : '-',
      ];
    }),
  ];
}

const COLORS: Record<string, string> = { none: '#444', observed: '#1f77b4', unthrottled: '#d62728', cap30: '#9467bd', cap100: '#ff7f0e', idlecrypt: '#2ca02c', held: '#8c564b', cap3: '#e377c2', nodeadline: '#17becf' };

/** The workload's throughput per second in each mode (last round), and each copy's progress. */
function svg(w: Workload, runs: Run[]): string {
  const last = modes.map((m) => runs.filter((r) => r.workload === w.id && r.mode === m.id).at(-1)).filter((r): r is Run => r !== undefined);
  const W = 900;
  const H = 200;
  const L = 60;
  const panel = (y0: number, title: string, series: { mode: string; ys: number[] }[], yMax: number, unit: string) => {
    const x = (i: number) => L + ((W - L - 130) * i) / seconds;
    const y = (v: number) => y0 + H - (H * Math.min(v, yMax)) / (yMax || 1);
    const lines = series
      .map((s) => `<polyline fill="none" stroke="${COLORS[s.mode]}" stroke-width="1.5" points="${s.ys.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}"/>`)
      .join('');
    const legend = series.map((s, i) => `<text x="${W - 120}" y="${y0 + 14 + 16 * i}" fill="${COLORS[s.mode]}" font-size="12">${xmlEscape(s.mode)}</text>`).join('');
    return (
      `<text x="${L}" y="${y0 - 6}" font-size="13">${xmlEscape(title)}</text>` +
      `<rect x="${L}" y="${y0}" width="${W - L - 130}" height="${H}" fill="none" stroke="#ccc"/>` +
      `<text x="4" y="${y0 + 10}" font-size="11">${f(yMax)} ${xmlEscape(unit)}</text><text x="4" y="${y0 + H}" font-size="11">0</text>` +
      `<text x="${W - 150}" y="${y0 + H + 14}" font-size="11">${seconds} s</text>` +
      lines +
      legend
    );
  };
  const tMax = Math.max(1, ...last.flatMap((r) => r.figures.series));
  const unit = last[0]?.figures.unit ?? '';
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${2 * H + 90}" font-family="sans-serif">` +
    panel(24, `${w.label}: ${unit} per second, from the copy's start`, last.map((r) => ({ mode: r.mode, ys: r.figures.series })), tMax * 1.05, unit) +
    panel(H + 64, 'copy progress (%)', last.filter((r) => r.progress.length).map((r) => ({ mode: r.mode, ys: r.progress })), 100, '%') +
    '</svg>'
  );
}

// ---------------------------------------------------------------- main

const work = await mkdtemp(path.join(tmpdir(), 'ic-bench-apps-'));
const keyFile = path.join(work, 'key');
await writeFile(keyFile, 'benchmark-key', { mode: 0o600 });
const startedAt = new Date();
const runs: Run[] = [];
let prepareS = 0;
try {
  const t0 = now();
  const prepared = await prepareImage(work);
  prepareS = (now() - t0) / 1000;
  process.stderr.write(`prepared image in ${prepareS.toFixed(0)} s; ${rounds} rounds of ${workloads.map((w) => w.id).join(', ')} x ${modes.map((m) => m.id).join(', ')}\n`);
  const say = (r: Run) =>
    process.stderr.write(
      `round ${r.round + 1}/${rounds} ${r.workload.padEnd(11)} ${r.mode.padEnd(11)} ${r.figures.throughput.toFixed(1)} ${r.figures.unit}, p50 ${r.figures.p50Ms.toFixed(2)} ms, p99 ${r.figures.p99Ms.toFixed(2)} ms, ` +
        (oneBoot
          ? `copy ${f(r.copyMiBs, 1)} MiB/s`
          : `while copying ${f(r.duringCopy, 1)}${r.p99DuringCopyMs === null ? '' : ` (p99 ${r.p99DuringCopyMs.toFixed(1)} ms)`}, encrypt ${r.totalS === null ? '-' : `${r.extrapolated ? '≈' : ''}${r.totalS.toFixed(0)} s`}, overlap ${pct(r.overlap)}`) +
        `, load ${r.loadavg.toFixed(1)}\n`,
    );
  if (oneBoot) {
    // One boot per workload; the modes' order alternates between rounds (ABC CBA ...), so a drift
    // within the boot (the database growing, caches) falls on every mode alike.
    for (const w of workloads) {
      const disk = path.join(work, `${w.id}.raw`);
      privateDisk(prepared, disk);
      const g = await startDebianVm({ name: `bench-${w.id}`, disk });
      try {
        await g.vm.ready;
        await g.agent.ready;
        await warmUp(g, w);
        for (let round = 0; round < rounds; round++) {
          for (const m of round % 2 === 0 ? modes : [...modes].reverse()) {
            const r = await runInBoot(g, w, m, round, work, keyFile);
            runs.push(r);
            say(r);
          }
        }
        await powerOff(g);
      } finally {
        await g.stop();
        await rm(disk, { force: true });
      }
    }
  } else {
    for (let round = 0; round < rounds; round++) {
      for (const w of workloads) {
        for (const m of round % 2 === 0 ? modes : [...modes].reverse()) {
          const r = await runOne(w, m, round, prepared, work, keyFile);
          runs.push(r);
          say(r);
        }
      }
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}

const qemuVersion = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0]!;
const manifest = debianManifest();
const pkg = (name: string) => new RegExp(`^  ${name} (\\S+)$`, 'm').exec(manifest)?.[1] ?? '?';
const diskSize = /^image_size=(\S+)/m.exec(manifest)?.[1] ?? '?';
const header = `Application benchmark: the Debian 12 test guest (1 vCPU under TCG, 1 GiB, PostgreSQL ${pkg('postgresql-15')}, fio ${pkg('fio')}), its root disk (${diskSize} filesystem on a ${diskGiB} GiB raw disk, cache=none) copied into LUKS; ${
  oneBoot
    ? `one boot per workload, warmed up by a ${warmupS} s run, then every mode in that boot (order alternating between rounds); the workload runs ${seconds} s beside the copy, which is then cancelled`
    : `a fresh boot per run; each workload runs ${seconds} s from the copy's start`
}; ${rounds} rounds, medians`;
let text = header + '\n';
let md = '';
for (const w of workloads) {
  const t = rowsFor(w, runs);
  text += `\n${w.label}\n${textTable(t)}\n`;
  md += `\n### ${w.label}\n\n${mdTable(t)}\n\n![${w.id}](apps-${w.id}.svg)\n`;
}
console.log(text);

await mkdir(values.out!, { recursive: true });
const stamp = startedAt.toISOString().replace(/[:.]/g, '-');
for (const w of workloads) await writeFile(path.join(values.out!, `apps-${w.id}.svg`), svg(w, runs));
await writeFile(path.join(values.out!, `apps-${stamp}.json`), JSON.stringify({ startedAt, seconds, rounds, maxCopyMs, runs }, null, 1));
const perRun = [
  ['round', 'workload', 'mode', 'throughput', 'while copying', 'p50 ms', 'p99 ms', 'p99 ms while copying', 'time to encrypt s', 'overlap', 'copy MiB/s', 'load'],
  ...runs.map((r) => [String(r.round + 1), r.workload, r.mode, `${r.figures.throughput.toFixed(1)} ${r.figures.unit}`, f(r.duringCopy, 1), r.figures.p50Ms.toFixed(2), r.figures.p99Ms.toFixed(2), f(r.p99DuringCopyMs, 1), r.totalS === null ? '-' : `${r.extrapolated ? '≈' : ''}${r.totalS.toFixed(0)}`, pct(r.overlap), f(r.copyMiBs, 1), r.loadavg.toFixed(1)]),
];
await writeFile(
  path.join(values.out!, 'apps-report.md'),
  `# Application benchmark (issue 13)

${startedAt.toISOString()}, ${os.hostname()}: ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${qemuVersion}.
Command: \`node --import tsx bench/apps.ts --rounds ${rounds} --workloads ${workloads.map((w) => w.id).join(',')} --modes ${modes.map((m) => m.id).join(',')} --seconds ${seconds} --design ${design}${oneBoot ? ` --warmup ${warmupS}` : ` --max-copy-s ${maxCopyMs / 1000}`} --disk-gib ${diskGiB}\`

${header}. Preparing the image (database and fio file) took ${prepareS.toFixed(0)} s.

- **vs (a)**: the median throughput against the median of (a), no copy.
- **p50/p99**: pgbench: each transaction's latency (its per-transaction log); fio: completion latency, the
  larger of reads' and writes'.
${
  oneBoot
    ? `- **copy MiB/s during the workload**: the copy's progress over the workload's ${seconds} s; the copy ran for all of
  them (none caught up) and was cancelled after. (h) is a diagnostic: the mirror job in place (its filter node and
  dirty bitmap on the guest's writes) but held at 1 byte/s.`
    : `- **time to encrypt**: the copy's start to the guest running on the LUKS image; ≈: a fixed-cap copy cancelled
  ${maxCopyMs / 1000} s after its start, its total extrapolated from its average progress.
- **while copying**: the workload's throughput over its seconds in which the copy still had work left (per second:
  pgbench -P 1, fio's IOPS log), against (a) over its whole run; for pgbench also the p99 latency of the
  transactions that began then. Where **copy during the workload** is below 100%, the rest of the workload ran
  with no copy: its whole-run figures flatter that mode, the figures while copying do not.`
}
${md}
## Every run

${mdTable(perRun)}
`,
);
process.stderr.write(`report: ${path.join(values.out!, 'apps-report.md')}\n`);
