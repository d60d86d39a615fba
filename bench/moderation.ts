/**
 * The evaluation of issue 4: the same guest and bursty workload (8 s idle / 8 s busy disk
 * phases) while its disk is encrypted
 *   (a) no job: the reference,
 *   (b) an unthrottled mirror: `idlecrypt encrypt --no-moderation`,
 *   (c) a fixed cap, as libvirt's `blockcopy --bandwidth` gives: `--speed 30M`, `--speed 100M`,
 *   (d) idlecrypt's moderation with the shipped default policy,
 * repeated in rounds that alternate the order of the modes (drift on these shared machines
 * then hits every mode alike). Medians over rounds are reported.
 *
 * Per run, one guest, alone (no other guest of ours): boot on the shared source image, start
 * the command 2 s into the guest's first idle phase, and measure from the host until the
 * copy has completed (the guest runs on the LUKS image). A fixed-cap copy runs for at most
 * --max-copy-s and is then cancelled, its total time extrapolated from its average progress
 * (marked ≈): at 30 MiB/s a 6 GiB disk would take minutes per run, and its progress is as
 * steady as its cap. For (a), the same stretch of the schedule is measured (2 cycles). The
 * source image is made once: the workload writes back the bytes it reads, so the image
 * never changes.
 *
 * What is measured (test/helpers/moderation-lab.ts, as the acceptance test does):
 *   guest throughput   query-blockstats of the guest's device (the guest's own requests,
 *                      never the mirror's), over the parts of busy phases while the copy
 *                      ran (for (a): the same stretch of the schedule)
 *   job speed          query-block-jobs offsets over the parts of idle (busy) phases while
 *                      the copy had work left; "after hold-off" leaves out each idle phase's
 *                      first 1.5 s (window + hold-off of the default policy, 1.25 s)
 *   total time         from the command's "copying" record to its "completed" record
 *   reaction           (d) only: busy-phase start (the guest's PHASE line arriving on the
 *                      host) to the job paused or throttled: the earlier of QEMU's
 *                      JOB_STATUS_CHANGE event and the first 100 ms poll showing it; only
 *                      phases that began while the job ran unthrottled, or that it slowed
 *                      for within 1 s before their line arrived (negative: the line waits
 *                      for QEMU's main loop like the guest's requests). "From the first
 *                      request": from the start of the probe interval that holds the
 *                      guest's first request of the phase (idlecrypt's own activity
 *                      samples, on bpftrace's clock): the issue's "within 250 ms"
 *
 * Output: a table on stdout, and bench/results/moderation-report.md with the table, every
 * run's numbers, the host's load, and SVG plots over time (guest throughput, job speed,
 * busy/idle state) of the last round; bench/results/moderation-<time>.json holds the data.
 *
 *   node --import tsx bench/moderation.ts [--rounds 3] [--size-mib 6144] [--max-copy-s 32]
 *        [--modes none,unthrottled,cap30,cap100,idlecrypt,idlecrypt-noflush] [--cache writeback|none] [--out bench/results]
 *
 * --cache: the guest's disk as `-drive cache=`; the target inherits it. writeback (QEMU's
 * default) goes through the host's page cache, none (O_DIRECT) as production hosts often run.
 *
 * About 13 minutes with the defaults on a 2-core machine.
 */
import { execFileSync } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { ensureImage, makeDiskImage, startTestVm } from '../vm-images/launch.ts';
import { ensureLibvirtd, TestDomain, virsh } from '../vm-images/libvirt.ts';
import { DomainRecorder } from '../test/helpers/domain-recorder.ts';
import { startCli } from '../test/helpers/cli.ts';
import {
  EncryptRun,
  GuestRecorder,
  MiB,
  counterAt,
  firstCaughtUp,
  phaseWindows,
  rateIn,
  firstRequestAt,
  guestBytes,
  jobOffset,
  mdTable,
  medianOf as med,
  textTable,
  now,
  otherQemus,
  parseActivity,
  percentile,
  measurable,
  reactionAt,
  sampleDirty,
  sleepUntil,
  type JobEvent,
  type Phase,
  type Sample,
} from '../test/helpers/moderation-lab.ts';
import { xmlEscape } from './svg.ts';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    'size-mib': { type: 'string', default: '6144' },
    'max-copy-s': { type: 'string', default: '32' },
    modes: { type: 'string', default: 'none,unthrottled,cap30,cap100,idlecrypt' },
    cache: { type: 'string', default: 'writeback' },
    disk: { type: 'string', default: 'raw' },
    /** every copy (not only the fixed caps) is cancelled after --max-copy-s: for disks too big to copy whole in each run */
    bounded: { type: 'boolean', default: false },
    /** a policy file for (d) instead of the shipped default */
    policy: { type: 'string' },
    workload: { type: 'string', default: 'bursty' },
    out: { type: 'string', default: 'bench/results' },
    /** qmp: a QEMU of our own; libvirt: a libvirt domain, copied with `encrypt --domain` */
    backend: { type: 'string', default: 'qmp' },
  },
});
// The command runs in a directory of its own (test/helpers/cli.ts): a relative path would not be found.
if (values.policy) values.policy = path.resolve(values.policy);
const backend = values.backend as 'qmp' | 'libvirt';
if (backend !== 'qmp' && backend !== 'libvirt') throw new Error('--backend qmp|libvirt');
const cache = values.cache as 'writeback' | 'none';
if (cache !== 'writeback' && cache !== 'none') throw new Error('--cache writeback|none');
/**
 * --disk: raw (pattern-filled, fully allocated), sparse-raw (a hole), sparse-qcow2 (no clusters).
 * --workload: the guest's busy phases: bursty (1 MiB O_DIRECT requests, 4 MiB per dd),
 * oneatatime (64 KiB O_DIRECT requests, one at a time), trickle (oneatatime's phases over a
 * constant 15/s of 4 KiB O_DIRECT writes, each followed by a flush).
 */
const DISKS = { raw: { format: 'raw', fill: 'pattern' }, 'sparse-raw': { format: 'raw', fill: 'sparse' }, 'sparse-qcow2': { format: 'qcow2', fill: 'sparse' } } as const;
const WORKLOADS = {
  bursty: { workload: 'bursty', params: {} },
  oneatatime: { workload: 'bursty', params: { bs_kb: 64, chunk_kb: 1024 } },
  trickle: { workload: 'trickle', params: { bs_kb: 64, chunk_kb: 1024, wps: 15 } },
} as const;
const diskKind = values.disk as keyof typeof DISKS;
const workloadKind = values.workload as keyof typeof WORKLOADS;
if (!DISKS[diskKind]) throw new Error(`--disk ${Object.keys(DISKS).join('|')}`);
if (!WORKLOADS[workloadKind]) throw new Error(`--workload ${Object.keys(WORKLOADS).join('|')}`);
const rounds = Number(values.rounds);
const sizeMiB = Number(values['size-mib']);
const maxCopyMs = Number(values['max-copy-s']) * 1000;
const outDir = values.out!;
const IDLE_S = 8;
const BUSY_S = 8;
const POLL_MS = 100;
const AFTER_HOLDOFF_MS = 1500;
/** Where the command starts, from the first idle phase; and, for (a), where measuring starts. */
const START_AT_MS = 2000;
const NO_JOB_FROM_MS = 5000;
const NO_JOB_FOR_MS = 2 * (IDLE_S + BUSY_S) * 1000;
/** A copy that is not capped runs to the end, but not for ever. */
const SAFETY_LIMIT_MS = 600_000;

interface Mode {
  readonly id: string;
  readonly label: string;
  /** no job, but idlecrypt's probes attached (`idlecrypt observe`): what observing costs the guest */
  readonly observed?: boolean;
  /** encrypt's options; null: no job */
  readonly args: string[] | null;
  /** a fixed cap: cancelled after --max-copy-s, total time extrapolated */
  readonly capped?: boolean;
  /** moderated: reaction times are measured */
  readonly moderated?: boolean;
}

/** The policy of mode idlecrypt-noflush: the default with target.flush off. */
const NOFLUSH_POLICY = fileURLToPath(new URL('policies/noflush.yaml', import.meta.url));
const ALL_MODES: Mode[] = [
  { id: 'none', label: '(a) no job', args: null },
  { id: 'observed', label: "(a') no job, observed (idlecrypt observe, the probes of (d))", args: null, observed: true },
  { id: 'unthrottled', label: '(b) unthrottled mirror (--no-moderation)', args: ['--no-moderation'] },
  { id: 'cap30', label: '(c) fixed cap 30 MiB/s (--speed 30M)', args: ['--speed', '30M'], capped: true },
  { id: 'cap100', label: '(c) fixed cap 100 MiB/s (--speed 100M)', args: ['--speed', '100M'], capped: true },
  { id: 'idlecrypt', label: values.policy ? `(d) idlecrypt, --policy ${values.policy}` : `(d) idlecrypt, default policy${backend === 'libvirt' ? ', pause = 1 byte/s' : ''}`, args: values.policy ? ['--policy', values.policy] : [], moderated: true },
  // (d) with the target left in the host's page cache (the kernel writes it back when it likes): what target.flush changes.
  { id: 'idlecrypt-noflush', label: '(d) idlecrypt, default policy, target.flush: off', args: ['--policy', NOFLUSH_POLICY], moderated: true },
  // libvirt only: the opt-in pause through QEMU's job-pause (libvirt's monitor pass-through).
  { id: 'idlecrypt-qemu', label: '(d) idlecrypt, default policy, --pause qemu', args: [...(values.policy ? ['--policy', values.policy] : []), '--pause', 'qemu'], moderated: true },
];
const hasObserved = values.modes!.split(',').some((m) => m.trim() === 'observed');
const modes = values.modes!.split(',').map((id) => {
  const m = ALL_MODES.find((x) => x.id === id.trim());
  if (!m) throw new Error(`unknown mode ${id} (known: ${ALL_MODES.map((x) => x.id).join(', ')})`);
  if (m.id === 'idlecrypt-qemu' && backend !== 'libvirt') throw new Error('mode idlecrypt-qemu needs --backend libvirt');
  if (m.id === 'idlecrypt-noflush' && values.policy) throw new Error('mode idlecrypt-noflush runs the default policy with target.flush: off; it takes no --policy');
  return m;
});
if (!(rounds >= 1) || !(sizeMiB >= 256) || !(maxCopyMs >= 16_000)) throw new Error('--rounds >= 1, --size-mib >= 256, --max-copy-s >= 16');

interface Run {
  mode: string;
  round: number;
  /** qemu-system processes of others at the start and end of the run */
  others: [number, number];
  loadavg: [number, number];
  /** the stretch measured: the copy (or, for (a), the same stretch of the schedule) */
  from: number;
  to: number;
  /** the job had nothing left to copy (READY) from here */
  caughtUp: number;
  /** the host's dirty and writeback memory (/proc/meminfo), MiB: most over the stretch measured, and the median at the busy phases' starts */
  dirtyMaxMiB: number | null;
  dirtyAtBusyMiB: number | null;
  completed: boolean;
  totalS: number | null;
  extrapolated: boolean;
  bytesCopied: number | null;
  guestBusyBps: number | null;
  /** the guest's own throughput in idle phases (the trickle's rate, for that workload) */
  guestIdleBps: number | null;
  jobIdleBps: number | null;
  jobIdleAfterHoldoffBps: number | null;
  jobBusyBps: number | null;
  reactionsMs: number[];
  /** the same reactions from the probe interval with the phase's first request (see above) */
  reactionsFromRequestMs: number[];
  /** busy phases that began while the job was already slowed, or had not started */
  reactionsSkipped: number;
  /** for the plots: 0.5 s bins from the first idle phase */
  series: { t0: number; binMs: number; guest: (number | null)[]; job: (number | null)[]; phases: { kind: string; from: number; to: number }[]; marks: { at: number; what: string }[] };
}

/** Σ counter increase / Σ time over the parts of `windows`; null if none. */
/** Counters at the ends of a run's windows may lie up to one poll's midpoint outside its samples. */
const EDGE_MS = 200;
/** Windows shorter than this (a phase the run's edge cuts) are left out of rates. */
const WINDOW = { edgeMs: EDGE_MS, minMs: 300 };

function binned(samples: readonly Sample[], get: (s: Sample) => number | undefined, t0: number, t1: number, binMs: number): (number | null)[] {
  const out: (number | null)[] = [];
  for (let t = t0; t + binMs <= t1; t += binMs) {
    const a = counterAt(samples, t, get, EDGE_MS);
    const b = counterAt(samples, t + binMs, get, EDGE_MS);
    out.push(a === undefined || b === undefined ? null : (b - a) / (binMs / 1000) / MiB);
  }
  return out;
}

async function runOne(mode: Mode, round: number, src: string, work: string, keyFile: string): Promise<Run> {
  const name = `bench-${mode.id}-${round}`;
  const vmDir = path.join(work, name);
  await mkdir(vmDir);
  const others0 = await otherQemus([]);
  const load0 = os.loadavg()[0]!;
  const params = { idle: IDLE_S, busy: BUSY_S, ...WORKLOADS[workloadKind].params };
  const guest = await bootGuest(mode, name, src, vmDir, params);
  const rec = guest.rec;
  const target = path.join(work, `${name}.luks`);
  let run: EncryptRun | undefined;
  const dirty = sampleDirty(250);
  try {
    const idle0 = await rec.nextPhase('idle', 0);
    await sleepUntil(idle0 + START_AT_MS);
    let from: number;
    let to: number;
    let completed = false;
    let cancelledAt: number | null = null;
    if (mode.args === null) {
      // (a') the probes of (d), every 50 ms as the controller samples, attached before measuring.
      const obs = mode.observed ? startCli(['observe', '--pid', String(guest.pid), '--interval', '50', '--json']) : undefined;
      if (obs) await obs.waitForStdout(/"interval_s"/, 30_000);
      from = Math.max(idle0 + NO_JOB_FROM_MS, now());
      to = from + NO_JOB_FOR_MS;
      await sleepUntil(to);
      if (obs) {
        obs.child.kill('SIGINT');
        await obs.result;
      }
    } else {
      // Raw LUKS for every disk: a sparse qcow2 disk's holes are then encrypted as a raw one's
      // (--format auto would make its target qcow2, whose holes cost no copy to measure).
      run = new EncryptRun([...guest.args, '--target', target, '--key-file', keyFile, '--iter-time', '50', '--format', 'luks', ...mode.args], path.join(work, `${name}.lp`));
      const limitMs = mode.capped || values.bounded ? maxCopyMs : SAFETY_LIMIT_MS;
      const result = run.result(limitMs + 120_000);
      const copying = await waitFor(() => run!.phaseAt('copying'), 60_000, `${name}: the copy did not start:\n${run.cli.stderr().slice(-2000)}${run.cli.stdout().slice(-1000)}`);
      // The limit's timer is cleared when the copy ends first: a pending 10-minute timer
      // would keep the benchmark from exiting for that long after its report.
      let limitTimer: NodeJS.Timeout | undefined;
      const limit = new Promise<'limit'>((resolve) => (limitTimer = setTimeout(() => resolve('limit'), Math.max(0, copying + limitMs - now()))));
      const outcome = await Promise.race([result.then(() => 'done' as const), limit]);
      clearTimeout(limitTimer);
      if (outcome === 'limit' && !run.phaseAt('completing')) {
        cancelledAt = now();
        run.cli.child.kill('SIGINT'); // cancels the copy and removes the target
      }
      const r = await result;
      completed = r.code === 0 && run.completed() !== undefined;
      if (!completed && cancelledAt === null) throw new Error(`${name}: idlecrypt encrypt failed (${r.code}):\n${r.stderr.slice(-3000)}`);
      from = copying;
      to = run.phaseAt('completing') ?? cancelledAt ?? now();
    }
    await sleep(2000); // a little of what follows, for the plots
    await rec.stop();
    dirty.stop();
    const dirtyIn = dirty.samples.filter((d) => d.t >= from && d.t <= to);
    const dirtyAt = (t: number) => dirty.samples.find((d) => d.t >= t)?.mib;
    const others1 = await otherQemus([guest.pid]);
    const phases = rec.phases();
    const caughtUp = Math.min(firstCaughtUp(rec.samples), to);
    const active = { from, to: mode.args === null ? to : caughtUp };

    // Total time: measured, or extrapolated from the average net progress (offset/len).
    let totalS: number | null = null;
    let extrapolated = false;
    let bytesCopied: number | null = null;
    if (run && completed) {
      totalS = (Date.parse(run.completed()!.time) - from) / 1000;
      bytesCopied = Number(run.completed()!.bytes_copied);
    } else if (run) {
      const last = [...rec.samples].reverse().find((s) => s.job && s.t <= (cancelledAt ?? to));
      if (last?.job && last.job.offset > 0) {
        const elapsed = (last.t - from) / 1000;
        totalS = elapsed + (last.job.len - last.job.offset) / (last.job.offset / elapsed);
        extrapolated = true;
        bytesCopied = last.job.offset;
      }
    }

    const activity = run && mode.moderated ? parseActivity(await readFile(path.join(work, `${name}.lp`), 'utf8').catch(() => '')) : [];
    const reactions = phases
      .filter((p) => p.kind === 'busy' && p.start > from && p.start < caughtUp && mode.moderated)
      .map((p) => ({ p, r: reactionAt(rec.samples, rec.jobEvents, p.start), first: firstRequestAt(activity, p.start) }));
    const measured = reactions.filter(({ r }) => measurable(r) && r.ms !== undefined);
    const reactionsMs = measured.map(({ r }) => r.ms!);
    const reactionsFromRequestMs = measured.filter(({ first }) => first !== undefined).map(({ p, r, first }) => p.start + r.ms! - first!);

    const t0 = idle0;
    const t1 = Math.max(to, from + 10_000) + 1800;
    const marks: { at: number; what: string }[] = [];
    if (run) {
      marks.push({ at: from, what: 'copy starts' });
      if (caughtUp < to) marks.push({ at: caughtUp, what: 'in sync' });
      if (completed) marks.push({ at: Date.parse(run.completed()!.time), what: 'pivot' });
      if (cancelledAt) marks.push({ at: cancelledAt, what: 'cancelled' });
    }
    return {
      mode: mode.id,
      round,
      others: [others0, others1],
      loadavg: [load0, os.loadavg()[0]!],
      from,
      to,
      caughtUp,
      dirtyMaxMiB: dirtyIn.length ? Math.max(...dirtyIn.map((d) => d.mib)) : null,
      dirtyAtBusyMiB: med(phases.filter((p) => p.kind === 'busy' && p.start > from && p.start < to).map((p) => dirtyAt(p.start) ?? null)),
      completed,
      totalS,
      extrapolated,
      bytesCopied,
      guestBusyBps: rateIn(rec.samples, phaseWindows(phases, 'busy', from, to), guestBytes, WINDOW),
      guestIdleBps: rateIn(rec.samples, phaseWindows(phases, 'idle', from, to), guestBytes, WINDOW),
      jobIdleBps: run ? rateIn(rec.samples, phaseWindows(phases, 'idle', active.from, active.to), jobOffset, WINDOW) : null,
      jobIdleAfterHoldoffBps: run ? rateIn(rec.samples, phaseWindows(phases, 'idle', active.from, active.to, AFTER_HOLDOFF_MS), jobOffset, WINDOW) : null,
      jobBusyBps: run ? rateIn(rec.samples, phaseWindows(phases, 'busy', active.from, active.to), jobOffset, WINDOW) : null,
      reactionsMs,
      reactionsFromRequestMs,
      reactionsSkipped: reactions.length - reactionsMs.length,
      series: {
        t0,
        binMs: 500,
        guest: binned(rec.samples, guestBytes, t0, t1, 500),
        job: run ? binned(rec.samples, jobOffset, t0, t1, 500) : [],
        phases: phases.filter((p) => p.start < t1).map((p) => ({ kind: p.kind, from: p.start - t0, to: Math.min(p.end, t1) - t0 })),
        marks: marks.map((m) => ({ at: m.at - t0, what: m.what })),
      },
    };
  } finally {
    dirty.stop();
    if (run && run.cli.child.exitCode === null) {
      run.cli.child.kill('SIGINT');
      await run.cli.result;
    }
    await rec.stop();
    await guest.stop();
    await rm(target, { force: true });
  }
}

/** The guest, booted as this backend's operators run it, and its recorder, polling. */
async function bootGuest(mode: Mode, name: string, src: string, vmDir: string, params: Record<string, number>) {
  const workload = WORKLOADS[workloadKind].workload;
  if (backend === 'libvirt') {
    const d = await TestDomain.start({ name: `${name}-${process.pid}`, dir: vmDir, disk: src, format: DISKS[diskKind].format, cache, workload, params, persistent: false, memoryMiB: 256 });
    const rec = new DomainRecorder(d);
    await rec.poll({ intervalMs: POLL_MS, qemuJobs: mode.id === 'idlecrypt-qemu' });
    const stop = async () => {
      await d.remove();
      // The secret a completed run defined for its image (usage volume under this run's folder): the domain is gone.
      for (const m of (await virsh('secret-list').catch(() => '')).matchAll(/^\s*([0-9a-f-]{36})\s+volume (\S+)/gm)) {
        if (m[2]!.startsWith(`${path.dirname(vmDir)}/`)) await virsh('secret-undefine', m[1]!).catch(() => undefined);
      }
    };
    return { rec, pid: await d.pid(), args: ['--domain', d.name, '--disk', 'vda'], stop };
  }
  const vm = await startTestVm({ name, disk: src, dir: vmDir, cache, workload, params });
  const rec = new GuestRecorder(vm);
  await vm.ready;
  await rec.poll({ intervalMs: POLL_MS, stats: true, jobs: true });
  return { rec, pid: vm.pid, args: ['--qmp', vm.toolQmpSocket, '--device', 'disk0'], stop: () => vm.stop() };
}

async function waitFor<T>(get: () => T | undefined, timeoutMs: number, why: string): Promise<T> {
  const end = now() + timeoutMs;
  for (;;) {
    const v = get();
    if (v !== undefined) return v;
    if (now() > end) throw new Error(why);
    await sleep(20);
  }
}

// ---------------------------------------------------------------- summary

interface Row {
  mode: Mode;
  runs: Run[];
  guestBusy: number | null;
  guestRel: number | null;
  /** against (a'): the same guest observed, no job; null when (a') was not run */
  guestRelObserved: number | null;
  jobIdle: number | null;
  jobIdleAfter: number | null;
  jobBusy: number | null;
  total: number | null;
  totalApprox: boolean;
  reactions: number[];
  reactionsFromRequest: number[];
  dirtyMax: number | null;
  dirtyAtBusy: number | null;
}

function summarise(runs: Run[]): Row[] {
  const base = med(runs.filter((r) => r.mode === 'none').map((r) => r.guestBusyBps));
  const observed = med(runs.filter((r) => r.mode === 'observed').map((r) => r.guestBusyBps));
  return modes.map((mode) => {
    const rs = runs.filter((r) => r.mode === mode.id);
    const guestBusy = med(rs.map((r) => r.guestBusyBps));
    return {
      mode,
      runs: rs,
      guestBusy,
      guestRel: guestBusy !== null && base ? guestBusy / base : null,
      guestRelObserved: guestBusy !== null && observed ? guestBusy / observed : null,
      jobIdle: med(rs.map((r) => r.jobIdleBps)),
      jobIdleAfter: med(rs.map((r) => r.jobIdleAfterHoldoffBps)),
      jobBusy: med(rs.map((r) => r.jobBusyBps)),
      total: med(rs.map((r) => r.totalS)),
      totalApprox: rs.some((r) => r.extrapolated),
      reactions: rs.flatMap((r) => r.reactionsMs),
      reactionsFromRequest: rs.flatMap((r) => r.reactionsFromRequestMs),
      dirtyMax: med(rs.map((r) => r.dirtyMaxMiB)),
      dirtyAtBusy: med(rs.map((r) => r.dirtyAtBusyMiB)),
    };
  });
}

const f0 = (x: number | null, d = 0) => (x === null ? '-' : x.toFixed(d));
const mib = (bps: number | null) => (bps === null ? '-' : (bps / MiB).toFixed(0));

function table(rows: Row[]): string[][] {
  return [
    ['mode', 'guest MiB/s in busy phases', 'vs (a)', ...(hasObserved ? ["vs (a')"] : []), 'job MiB/s in idle phases (after hold-off)', 'job MiB/s in busy phases', `time to encrypt ${sizeMiB} MiB (s)`, 'reaction p50 / p95 (ms)', 'from the first request p50 / p95 (ms)', 'host dirty MiB: most / at busy starts', 'runs beside others\' guests'],
    ...rows.map((r) => [
      r.mode.label,
      mib(r.guestBusy),
      r.guestRel === null ? '-' : `${(100 * r.guestRel).toFixed(0)}%`,
      ...(hasObserved ? [r.guestRelObserved === null ? '-' : `${(100 * r.guestRelObserved).toFixed(0)}%`] : []),
      r.mode.args === null ? '-' : `${mib(r.jobIdle)} (${mib(r.jobIdleAfter)})`,
      r.mode.args === null ? '-' : mib(r.jobBusy),
      r.mode.args === null ? '-' : `${r.totalApprox ? '≈' : ''}${f0(r.total)}`,
      r.reactions.length ? `${f0(percentile(r.reactions, 50))} / ${f0(percentile(r.reactions, 95))} (n=${r.reactions.length})` : '-',
      r.reactionsFromRequest.length ? `${f0(percentile(r.reactionsFromRequest, 50))} / ${f0(percentile(r.reactionsFromRequest, 95))} (n=${r.reactionsFromRequest.length})` : '-',
      `${f0(r.dirtyMax)} / ${f0(r.dirtyAtBusy)}`,
      `${r.runs.filter((x) => x.others[0] + x.others[1] > 0).length} of ${r.runs.length}`,
    ]),
  ];
}

// ---------------------------------------------------------------- SVG, by hand

/** Stacked panels, one per run: busy phases shaded, guest throughput and job speed as lines. */
function timelineSvg(runs: Run[], title: string): string {
  const W = 960;
  const PH = 150;
  const L = 60;
  const R = 20;
  const T = 40;
  const GAP = 38;
  const H = T + runs.length * (PH + GAP) + 30;
  const spanS = Math.max(...runs.map((r) => (r.series.guest.length * r.series.binMs) / 1000));
  const yMax = Math.max(100, ...runs.flatMap((r) => [...r.series.guest, ...r.series.job].filter((v): v is number => v !== null)));
  const yTop = Math.ceil(yMax / 100) * 100;
  const x = (s: number) => L + ((W - L - R) * s) / spanS;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="20" font-size="14" font-weight="bold">${xmlEscape(title)}</text>`,
    `<rect x="${W - 390}" y="10" width="12" height="12" fill="#f3d9b1"/><text x="${W - 374}" y="20">busy phase</text>`,
    `<line x1="${W - 300}" y1="16" x2="${W - 280}" y2="16" stroke="#1f77b4" stroke-width="2"/><text x="${W - 276}" y="20">guest disk MiB/s</text>`,
    `<line x1="${W - 170}" y1="16" x2="${W - 150}" y2="16" stroke="#d62728" stroke-width="2"/><text x="${W - 146}" y="20">copy job MiB/s</text>`,
  ];
  runs.forEach((r, i) => {
    const top = T + i * (PH + GAP) + 14;
    const y = (v: number) => top + PH - (PH * Math.min(v, yTop)) / yTop;
    const label = ALL_MODES.find((m) => m.id === r.mode)!.label;
    out.push(`<text x="${L}" y="${top - 6}" font-weight="bold">${xmlEscape(label)}${r.totalS !== null ? xmlEscape(`: encrypted in ${r.extrapolated ? '≈' : ''}${r.totalS.toFixed(0)} s`) : ''}</text>`);
    for (const p of r.series.phases) {
      if (p.kind !== 'busy') continue;
      const a = Math.max(0, p.from / 1000);
      const b = Math.min(spanS, p.to / 1000);
      if (b > a) out.push(`<rect x="${x(a).toFixed(1)}" y="${top}" width="${(x(b) - x(a)).toFixed(1)}" height="${PH}" fill="#f3d9b1"/>`);
    }
    out.push(`<rect x="${L}" y="${top}" width="${W - L - R}" height="${PH}" fill="none" stroke="#999"/>`);
    for (let v = 0; v <= yTop; v += yTop / 4) {
      out.push(`<line x1="${L - 4}" y1="${y(v).toFixed(1)}" x2="${L}" y2="${y(v).toFixed(1)}" stroke="#999"/><text x="${L - 6}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end">${v.toFixed(0)}</text>`);
    }
    for (let s = 0; s <= spanS; s += 8) {
      out.push(`<line x1="${x(s).toFixed(1)}" y1="${top + PH}" x2="${x(s).toFixed(1)}" y2="${top + PH + 4}" stroke="#999"/><text x="${x(s).toFixed(1)}" y="${top + PH + 15}" text-anchor="middle">${s}</text>`);
    }
    const line = (vals: (number | null)[], colour: string) => {
      const segs: string[] = [];
      let cur: string[] = [];
      vals.forEach((v, k) => {
        const px = x(((k + 0.5) * r.series.binMs) / 1000);
        if (v === null) {
          if (cur.length) segs.push(cur.join(' '));
          cur = [];
        } else cur.push(`${px.toFixed(1)},${y(Math.max(0, v)).toFixed(1)}`);
      });
      if (cur.length) segs.push(cur.join(' '));
      for (const sgm of segs) out.push(`<polyline points="${sgm}" fill="none" stroke="${colour}" stroke-width="1.5"/>`);
    };
    line(r.series.guest, '#1f77b4');
    line(r.series.job, '#d62728');
    r.series.marks.forEach((m, k) => {
      const px = x(m.at / 1000);
      if (px < L || px > W - R) return;
      const right = px > W - R - 70; // near the right edge: label to the left of the line
      out.push(`<line x1="${px.toFixed(1)}" y1="${top}" x2="${px.toFixed(1)}" y2="${top + PH}" stroke="#555" stroke-dasharray="3,3"/><text x="${(right ? px - 3 : px + 3).toFixed(1)}" y="${top + 11 + 12 * (k % 3)}" fill="#555"${right ? ' text-anchor="end"' : ''}>${xmlEscape(m.what)}</text>`);
    });
  });
  out.push(`<text x="${(W / 2).toFixed(0)}" y="${H - 6}" text-anchor="middle">seconds since the guest's first idle phase (MiB/s over 0.5 s)</text>`);
  out.push('</svg>');
  return out.join('\n');
}

/** Two bar charts side by side: guest throughput vs (a), and time to encrypt. */
function summarySvg(rows: Row[]): string {
  const W = 960;
  const H = 300;
  const panelW = (W - 60) / 2;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
  ];
  const bars = (x0: number, title: string, vals: { label: string; v: number | null; text: string }[], max: number) => {
    out.push(`<text x="${x0}" y="20" font-size="13" font-weight="bold">${xmlEscape(title)}</text>`);
    const top = 35;
    const bh = (H - top - 20) / vals.length;
    const lw = 250;
    vals.forEach((b, i) => {
      const y0 = top + i * bh;
      out.push(`<text x="${x0}" y="${(y0 + bh / 2 + 4).toFixed(1)}">${xmlEscape(b.label)}</text>`);
      const w = b.v === null ? 0 : ((panelW - lw - 50) * Math.min(b.v, max)) / max;
      out.push(`<rect x="${x0 + lw}" y="${(y0 + 4).toFixed(1)}" width="${w.toFixed(1)}" height="${(bh - 8).toFixed(1)}" fill="#4c78a8"/>`);
      out.push(`<text x="${(x0 + lw + w + 4).toFixed(1)}" y="${(y0 + bh / 2 + 4).toFixed(1)}">${xmlEscape(b.text)}</text>`);
    });
  };
  bars(20, 'guest throughput in busy phases, % of no job', rows.map((r) => ({ label: r.mode.label, v: r.guestRel, text: r.guestRel === null ? '-' : `${(100 * r.guestRel).toFixed(0)}%` })), 1.1);
  const jobs = rows.filter((r) => r.mode.args !== null);
  const tmax = Math.max(1, ...jobs.map((r) => r.total ?? 0));
  bars(40 + panelW, `time to encrypt ${sizeMiB} MiB (s; ≈ extrapolated)`, jobs.map((r) => ({ label: r.mode.label, v: r.total, text: r.total === null ? '-' : `${r.totalApprox ? '≈' : ''}${r.total.toFixed(0)} s` })), tmax);
  out.push('</svg>');
  return out.join('\n');
}

// ---------------------------------------------------------------- main

ensureImage();
const work = await mkdtemp(path.join(tmpdir(), 'ic-bench-mod-'));
if (backend === 'libvirt') {
  await ensureLibvirtd();
  await chmod(work, 0o755); // libvirt's QEMU runs as libvirt-qemu and must reach the images
}
const keyFile = path.join(work, 'key');
await writeFile(keyFile, 'benchmark-key', { mode: 0o600 });
const src = path.join(work, `src.${DISKS[diskKind].format}`);
const startedAt = new Date();
const tImage = now();
await makeDiskImage(src, { sizeMiB, ...DISKS[diskKind] });
process.stderr.write(`source image: ${sizeMiB} MiB ${diskKind} in ${((now() - tImage) / 1000).toFixed(1)} s; ${rounds} rounds of ${modes.map((m) => m.id).join(', ')}\n`);

const runs: Run[] = [];
try {
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? modes : [...modes].reverse();
    for (const mode of order) {
      const r = await runOne(mode, round, src, work, keyFile);
      runs.push(r);
      process.stderr.write(
        `round ${round + 1}/${rounds} ${mode.id.padEnd(11)} guest busy ${mib(r.guestBusyBps)} MiB/s, job idle ${mib(r.jobIdleBps)} (${mib(r.jobIdleAfterHoldoffBps)}) busy ${mib(r.jobBusyBps)} MiB/s, ` +
          `total ${r.totalS === null ? '-' : `${r.extrapolated ? '≈' : ''}${r.totalS.toFixed(1)} s`}, reactions ${r.reactionsMs.map((x) => x.toFixed(0)).join(' ') || '-'} ms; host dirty max ${f0(r.dirtyMaxMiB)} MiB, at busy starts ${f0(r.dirtyAtBusyMiB)} MiB; other qemus ${r.others.join('/')}, load ${r.loadavg.map((x) => x.toFixed(1)).join('/')}\n`,
      );
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}

const rows = summarise(runs);
const t = table(rows);
const header = `Moderation benchmark${backend === 'libvirt' ? ' through libvirt (encrypt --domain)' : ''}: ${workloadKind} guest (${IDLE_S} s idle / ${BUSY_S} s busy), ${sizeMiB} MiB ${diskKind} disk (cache=${cache}) into LUKS${values.bounded ? `, every copy stopped after ${maxCopyMs / 1000} s` : ''}, ${rounds} rounds, medians over rounds`;
console.log(`${header}\n${textTable(t)}`);

await mkdir(outDir, { recursive: true });
const stamp = startedAt.toISOString().replace(/[:.]/g, '-');
const lastRound = runs.filter((r) => r.round === rounds - 1);
const qemuVersion = (() => {
  try {
    return execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0]!;
  } catch {
    return 'unknown';
  }
})();
const prefix = backend === 'libvirt' ? 'moderation-libvirt' : 'moderation';
await writeFile(path.join(outDir, `${prefix}-timeline.svg`), timelineSvg(lastRound, `One run of each mode (round ${rounds}): busy phases shaded`));
await writeFile(path.join(outDir, `${prefix}-summary.svg`), summarySvg(rows));
await writeFile(path.join(outDir, `${prefix}-${stamp}.json`), JSON.stringify({ startedAt, backend, sizeMiB, cache, rounds, maxCopyMs, modes: modes.map((m) => m.id), runs }, null, 1));

const perRun = [
  ['round', 'mode', 'guest MiB/s busy', 'job MiB/s idle (after hold-off)', 'job MiB/s busy', 'total s', 'reactions ms (skipped)', 'from the first request ms', 'other qemus start/end', 'load 1 min start/end'],
  ...runs.map((r) => [
    String(r.round + 1),
    r.mode,
    mib(r.guestBusyBps),
    r.bytesCopied === null && r.jobIdleBps === null ? '-' : `${mib(r.jobIdleBps)} (${mib(r.jobIdleAfterHoldoffBps)})`,
    r.bytesCopied === null && r.jobIdleBps === null ? '-' : mib(r.jobBusyBps),
    r.totalS === null ? '-' : `${r.extrapolated ? '≈' : ''}${r.totalS.toFixed(1)}`,
    r.jobIdleBps === null ? '-' : `${r.reactionsMs.map((x) => x.toFixed(0)).join(' ') || '-'} (${r.reactionsSkipped})`,
    r.reactionsFromRequestMs.map((x) => x.toFixed(0)).join(' ') || '-',
    r.others.join(' / '),
    r.loadavg.map((x) => x.toFixed(1)).join(' / '),
  ]),
];
const report = `# Moderation benchmark (issue 4)

${startedAt.toISOString()}, ${os.hostname()}: ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${qemuVersion}, TCG guest (1 vCPU, 256 MiB).
Command: \`node --import tsx bench/moderation.ts --rounds ${rounds} --size-mib ${sizeMiB} --max-copy-s ${maxCopyMs / 1000} --modes ${modes.map((m) => m.id).join(',')} --cache ${cache} --disk ${diskKind} --workload ${workloadKind}${values.bounded ? ' --bounded' : ''}\`

${header}.

${mdTable(t)}

- **guest MiB/s in busy phases**: the guest's own disk throughput (read + write, query-blockstats) over the
  busy-phase time while the copy ran; for (a), over the same stretch of the schedule (${NO_JOB_FROM_MS / 1000}-${(NO_JOB_FROM_MS + NO_JOB_FOR_MS) / 1000} s).
- **job MiB/s in idle phases**: copy progress over the idle-phase time while there was work left; in
  brackets without each idle phase's first ${AFTER_HOLDOFF_MS / 1000} s (the default policy's window + hold-off is 1.25 s).
- **time to encrypt**: from the copy's start to the guest running on the LUKS image. ≈: a fixed-cap copy,
  cancelled after ${maxCopyMs / 1000} s, its total extrapolated from its average net progress.
- **reaction**: busy-phase start (the guest's PHASE line arriving on the host, before its first request) to
  the job paused or throttled (QEMU's JOB_STATUS_CHANGE event or a 100 ms poll, whichever came first), for
  phases that began while the job ran unthrottled; measured for (d) only (the others never slow down).
  p95 over fewer than 20 samples is their largest. **From the first request**: the same moment of the job
  slowing, measured from the start of the 50 ms probe interval that holds the guest's first request of the
  phase (idlecrypt's own activity samples, timed by bpftrace): an upper bound of the time from that request.
- Each run is one guest alone; rounds alternate the order of the modes. Other people's guests on this
  shared host are counted per run below: they take CPU and make single runs noisy.

![summary](${prefix}-summary.svg)

![timeline](${prefix}-timeline.svg)

## Every run

${mdTable(perRun)}

Raw data: \`${prefix}-${stamp}.json\`.
`;
await writeFile(path.join(outDir, `${prefix}-report.md`), report);
process.stderr.write(`report: ${path.join(outDir, `${prefix}-report.md`)}\n`);
