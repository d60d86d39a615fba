/**
 * What the eBPF probes cost the guest: its disk throughput with the probes attached versus
 * without, side by side in one run, alternating (without, with, with, without, ...) so that
 * drift hits both alike, repeated; medians and their ratio are reported, with the bpftrace
 * process's own CPU use (utime + stime from /proc/<pid>/stat) and the event rates it saw.
 *
 * "With" is the whole production path: activity$ (bpftrace -f json, every probe script,
 * the JSON parsing, the samples) at the controller's sampling interval.
 * Throughput comes from the guest's own `IO t= rd= wr= ms=` lines (the disk workload:
 * O_DIRECT reads and writes of bs_kb each); a line counts for a phase only if the whole
 * second it covers lies inside the phase. Also reported per second of CPU the QEMU process
 * got (MiB per QEMU CPU-s), which other load on the host (these machines are shared)
 * disturbs less, and per pair of adjacent phases, which slow drift disturbs less.
 * The cost of one uprobe hit is measured first, on a libc function (see uprobeHitCostUs).
 *
 *   node --import tsx bench/probes-overhead.ts [--phase-s 8] [--pairs 4] [--interval-ms 100] [--bs-kb 64] [--no-interrupts]
 */
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Subject, lastValueFrom, tap } from 'rxjs';
import { activity$ } from '../src/streams/activity.ts';
import type { ActivitySample } from '../src/streams/types.ts';
import { ensureImage, makeDiskImage, parseGuestLine, startTestVm } from '../vm-images/launch.ts';

const { values } = parseArgs({
  options: {
    'phase-s': { type: 'string', default: '8' },
    pairs: { type: 'string', default: '4' },
    'interval-ms': { type: 'string', default: '100' },
    'bs-kb': { type: 'string', default: '64' },
    'no-interrupts': { type: 'boolean', default: false },
  },
});
const phaseMs = Number(values['phase-s']) * 1000;
const pairs = Number(values.pairs);
const intervalMs = Number(values['interval-ms']);
const bsKb = Number(values['bs-kb']);
const interrupts = !values['no-interrupts'];

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MiB = 1024 * 1024;
const TICKS_PER_S = 100; // getconf CLK_TCK on Linux/x86

async function cpuTicks(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]); // fields 14 utime, 15 stime
}

/**
 * What one uprobe hit costs on this host, for the two kinds of first instruction: a loop
 * of libc calls from Node, without and with a counting uprobe on the called function.
 *   gethostname (os.hostname()) starts with `push %r13`, like the three QEMU functions
 *   the probes use (push %rbp / push %r15): a kernel that emulates push needs one trap.
 *   getppid (process.ppid) starts with `mov $0x6e,%eax`: executed out of line, single-
 *   stepped, two traps.
 * Platform-dependent: nested virtualisation makes traps far dearer than on bare metal.
 */
async function uprobeHitCostUs(fn: 'gethostname' | 'getppid'): Promise<number> {
  const libc = (await readFile('/proc/self/maps', 'utf8')).split('\n').map((l) => l.split(/\s+/)[5] ?? '').find((p) => /\/libc\.so\.6$/.test(p));
  if (!libc) return NaN;
  const call = fn === 'gethostname' ? () => os.hostname().length : () => process.ppid;
  const loop = () => {
    const n = 100_000;
    let x = 0;
    const t = performance.now();
    for (let i = 0; i < n; i++) x += call();
    return ((performance.now() - t) * 1000) / n + x * 0;
  };
  const bare = Math.min(loop(), loop());
  const bt = spawn('bpftrace', ['-e', `uprobe:${libc}:${fn} { @hits = count(); }`], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, __BPFTRACE_NOTIFY_PROBES_ATTACHED: '1' },
  });
  await new Promise<void>((resolve, reject) => {
    bt.stderr!.on('data', (d: Buffer) => d.toString().includes('__BPFTRACE_NOTIFY_PROBES_ATTACHED') && resolve());
    bt.once('exit', () => reject(new Error('bpftrace exited')));
  });
  const probed = Math.min(loop(), loop());
  bt.kill('SIGINT');
  await new Promise((r) => bt.once('close', r));
  return probed - bare;
}

ensureImage();
const hitUs = await uprobeHitCostUs('gethostname');
const steppedHitUs = await uprobeHitCostUs('getppid');
console.log(`one uprobe hit on this host: ${hitUs.toFixed(2)} us on a leading push (as on the QEMU functions probed), ` +
  `${steppedHitUs.toFixed(1)} us on an instruction that must be single-stepped`);
const dir = await mkdtemp(path.join(tmpdir(), 'ic-bench-probes-'));
const disk = path.join(dir, 'disk.raw');
await makeDiskImage(disk, { sizeMiB: 128, format: 'raw', fill: 'pattern' });
const vm = await startTestVm({ name: 'bench-probes', disk, dir: path.join(dir, 'vm'), workload: 'disk', params: { region_mb: 64, bs_kb: bsKb, chunk_kb: 4096 } });

/** IO lines with the host time they arrived. */
const io: { at: number; bytes: number; ms: number }[] = [];
vm.lines$.subscribe((line) => {
  const r = parseGuestLine(line);
  if (r?.kind === 'io') io.push({ at: performance.now(), bytes: r.rd + r.wr, ms: r.ms });
});

interface Phase {
  probes: boolean;
  mibPerS: number;
  /** Guest MiB moved per second of CPU the QEMU process got: insensitive to CPU stolen by other load. */
  mibPerCpuS: number;
  lines: number;
  bpftraceCpuPct?: number;
  qemuCpuPct: number;
  requestsPerS?: number;
  interruptsPerS?: number;
}

function throughput(start: number, end: number): { mibPerS: number; lines: number } {
  // a line covers the ~1 s before it arrived: keep those whose whole span is in the phase
  const inside = io.filter((l) => l.at - l.ms - 100 >= start && l.at <= end);
  const bytes = inside.reduce((t, l) => t + l.bytes, 0);
  const ms = inside.reduce((t, l) => t + l.ms, 0);
  return { mibPerS: ms ? bytes / MiB / (ms / 1000) : NaN, lines: inside.length };
}

async function phase(probes: boolean): Promise<Phase> {
  if (!probes) {
    const q0 = await cpuTicks(vm.pid);
    const start = performance.now();
    await sleep(phaseMs);
    const end = performance.now();
    const qemuCpuPct = ((await cpuTicks(vm.pid)) - q0) / TICKS_PER_S / ((end - start) / 1000) * 100;
    const t = throughput(start, end);
    return { probes, ...t, mibPerCpuS: t.mibPerS / (qemuCpuPct / 100), qemuCpuPct };
  }
  const stop$ = new Subject<void>();
  let bpftracePid = 0;
  let attached!: () => void;
  const ready = new Promise<void>((r) => (attached = r));
  const samples: ActivitySample[] = [];
  const done = lastValueFrom(
    activity$({
      intervalMs,
      pids: [vm.pid],
      source: 'ebpf',
      interrupts,
      stop$,
      onStatus: (s) => {
        if (s.type === 'probes-spawned') bpftracePid = s.pid;
        if (s.type === 'probes-attached') attached();
      },
    }).pipe(tap((s) => samples.push(s))),
    { defaultValue: undefined },
  );
  await ready;
  await sleep(500); // let the first reports settle
  const b0 = await cpuTicks(bpftracePid);
  const q0 = await cpuTicks(vm.pid);
  const start = performance.now();
  const from = samples.length;
  await sleep(phaseMs);
  const end = performance.now();
  const seconds = (end - start) / 1000;
  const bpftraceCpuPct = ((await cpuTicks(bpftracePid)) - b0) / TICKS_PER_S / seconds * 100;
  const qemuCpuPct = ((await cpuTicks(vm.pid)) - q0) / TICKS_PER_S / seconds * 100;
  const window = samples.slice(from);
  const span = window.reduce((t, s) => t + s.intervalS, 0);
  const requestsPerS = window.reduce((t, s) => t + (s.diskReads ?? 0) + (s.diskWrites ?? 0) + (s.diskFlushes ?? 0), 0) / span;
  const interruptsPerS = interrupts ? window.reduce((t, s) => t + (s.interrupts ?? 0), 0) / span : NaN;
  stop$.next();
  await done;
  const t = throughput(start, end);
  return { probes, ...t, mibPerCpuS: t.mibPerS / (qemuCpuPct / 100), bpftraceCpuPct, qemuCpuPct, requestsPerS, interruptsPerS };
}

try {
  await vm.ready;
  await vm.waitForLine(/^IO /); // the loop is running
  await sleep(2000); // past its first, warm-up second
  const phases: Phase[] = [];
  for (let i = 0; i < pairs; i++) {
    // ABBA order: each pair starts with the other kind than the last pair ended with
    const order = i % 2 === 0 ? [false, true] : [true, false];
    for (const p of order) {
      const r = await phase(p);
      phases.push(r);
      console.log(`${p ? 'with probes   ' : 'without probes'}  ${r.mibPerS.toFixed(1).padStart(6)} MiB/s  (${r.lines} IO lines)` +
        `  ${r.mibPerCpuS.toFixed(1).padStart(6)} MiB per QEMU CPU-s` +
        `  qemu ${r.qemuCpuPct.toFixed(0)}% CPU` +
        (p ? `  bpftrace ${r.bpftraceCpuPct!.toFixed(2)}% CPU  ${r.requestsPerS!.toFixed(0)} req/s  ${r.interruptsPerS!.toFixed(0)} irq/s` : ''));
    }
  }
  const without = median(phases.filter((p) => !p.probes).map((p) => p.mibPerS));
  const withP = median(phases.filter((p) => p.probes).map((p) => p.mibPerS));
  // each pair's with/without ratio: adjacent phases share the host's conditions, so this
  // is less sensitive to slow drift (and to other load on the host) than the ratio of medians
  const pairRatio = (k: 'mibPerS' | 'mibPerCpuS') => Array.from({ length: pairs }, (_, i) => {
    const [a, b] = [phases[2 * i]!, phases[2 * i + 1]!];
    return (a.probes ? a[k] : b[k]) / (a.probes ? b[k] : a[k]);
  });
  const pairRatios = pairRatio('mibPerS');
  const cpuPairRatios = pairRatio('mibPerCpuS');
  const summary = {
    phaseS: phaseMs / 1000,
    pairs,
    intervalMs,
    bsKb,
    interrupts,
    medianMiBPerSWithout: without,
    medianMiBPerSWith: withP,
    ratio: withP / without,
    costPct: (1 - withP / without) * 100,
    medianPairRatio: median(pairRatios),
    pairRatios,
    medianMiBPerCpuSWithout: median(phases.filter((p) => !p.probes).map((p) => p.mibPerCpuS)),
    medianMiBPerCpuSWith: median(phases.filter((p) => p.probes).map((p) => p.mibPerCpuS)),
    medianCpuPairRatio: median(cpuPairRatios),
    cpuPairRatios,
    medianBpftraceCpuPct: median(phases.filter((p) => p.probes).map((p) => p.bpftraceCpuPct!)),
    medianRequestsPerS: median(phases.filter((p) => p.probes).map((p) => p.requestsPerS!)),
    medianInterruptsPerS: median(phases.filter((p) => p.probes).map((p) => p.interruptsPerS!)),
    uprobeHitUs: hitUs,
    uprobeSteppedHitUs: steppedHitUs,
    phases,
  };
  console.log(
    `\nmedian guest throughput: ${without.toFixed(1)} MiB/s without, ${withP.toFixed(1)} MiB/s with probes: ` +
      `ratio ${summary.ratio.toFixed(3)} (cost ${summary.costPct.toFixed(1)}%); ` +
      `median of the ${pairs} pairs' ratios ${summary.medianPairRatio.toFixed(3)} (range ${Math.min(...pairRatios).toFixed(3)}-${Math.max(...pairRatios).toFixed(3)})\n` +
      `per QEMU CPU-second: ${median(phases.filter((p) => !p.probes).map((p) => p.mibPerCpuS)).toFixed(1)} MiB without, ` +
      `${median(phases.filter((p) => p.probes).map((p) => p.mibPerCpuS)).toFixed(1)} MiB with probes; median pair ratio ${median(cpuPairRatios).toFixed(3)} ` +
      `(range ${Math.min(...cpuPairRatios).toFixed(3)}-${Math.max(...cpuPairRatios).toFixed(3)})\n` +
      `bpftrace's own CPU: median ${summary.medianBpftraceCpuPct.toFixed(2)}% of one core, at ${summary.medianRequestsPerS.toFixed(0)} disk requests/s ` +
      `and ${summary.medianInterruptsPerS.toFixed(0)} interrupts/s, sampled every ${intervalMs} ms\n` +
      `guest time lost per probe hit: ${((summary.costPct / 100 / (summary.medianRequestsPerS + (interrupts ? summary.medianInterruptsPerS : 0))) * 1e6).toFixed(1)} us ` +
      `(a uprobe hit costs ${hitUs.toFixed(1)} us here)`,
  );
  console.log(`host load average at the end: ${(await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')}`);
  const out = path.join(path.dirname(new URL(import.meta.url).pathname), 'results');
  await mkdir(out, { recursive: true });
  const file = path.join(out, `probes-overhead-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  await writeFile(file, JSON.stringify(summary, null, 2));
  console.log(`results: ${file}`);
} finally {
  await vm.stop();
  await rm(dir, { recursive: true, force: true });
}
