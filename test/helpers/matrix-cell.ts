/**
 * One cell of issue 9's matrix, side by side (test/moderation/starved.test.ts runs two cells;
 * bench/matrix.ts all eighteen). Three guests at once, as in test/moderation/moderation.test.ts:
 *   mod  the cell's disk and workload, encrypted by `idlecrypt encrypt` (the shipped default
 *        policy unless `modArgs` names another);
 *   ref  the same guest and workload with no job: the reference for its throughput;
 *   cmp  an idle guest on the same kind of disk (or one doing the trickle's background alone:
 *        `cmpBeside`), copied by `--no-moderation`: the unthrottled mirror the idle-phase speed
 *        is compared with, held paused by the harness except in
 *        one idle phase of mod's, during which keys typed into mod hold mod's job paused
 *        instead, so that the two copies never compete.
 * mod's phases from the job's start: idle A (measured), busy, idle C (keys from +1.8 s, the
 * pause they cause measured; cmp's window once mod's job has paused for them), busy,
 * idle D (measured), busy; then the copy is cancelled (Ctrl-C), which must leave mod on its
 * source disk with no target left. Nothing is asserted here: the caller judges the figures.
 */
import { execFileSync } from 'node:child_process';
import { access, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { makeDiskImage, type Workload } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import {
  GuestLab,
  GuestRecorder,
  MiB,
  firstRequestAt,
  guestBytes,
  jobOffset,
  measurable,
  median,
  mibps,
  now,
  parseActivity,
  rateOver,
  reactionAt,
  sampleDirty,
  sleepUntil,
  startSideBySide,
  typeKeys,
  type Phase,
  type Reaction,
  type Sample,
} from './moderation-lab.ts';

/**
 * The disks, all copied into raw LUKS (`--format luks`) but the thin qcow2 one: 64 GiB with
 * the allocated disk's data at its start (`rawMiB`), copied as `--format auto` copies a
 * qcow2 disk, into qcow2 with LUKS encryption, whose holes cost nothing (docs/starvation.md).
 */
export const CELL_DISKS = {
  'sparse-raw': { format: 'raw', fill: 'sparse', target: 'luks' },
  raw: { format: 'raw', fill: 'pattern', target: 'luks' },
  'sparse-qcow2': { format: 'qcow2', fill: 'sparse', target: 'luks' },
  'thin-qcow2': { format: 'qcow2', fill: 'thin', target: 'auto' },
} as const;
/** 8 s idle / 8 s busy; busy: 1 MiB O_DIRECT requests (bursty) or 64 KiB ones, one at a time; trickle: 15 flushed 4 KiB writes a second on top, all the time. */
export const CELL_WORKLOADS = {
  oneatatime: { workload: 'bursty', params: { idle: 8, busy: 8, bs_kb: 64, chunk_kb: 1024 } },
  bursty: { workload: 'bursty', params: { idle: 8, busy: 8 } },
  trickle: { workload: 'trickle', params: { idle: 8, busy: 8, bs_kb: 64, chunk_kb: 1024, wps: 15 } },
} as const;
/** A guest's disks in one iothread, as libvirt's `<iothreads>1</iothreads>` with `<driver iothread='1'/>` gives (thread name `IO iothread1`). */
export const IOTHREAD_ARGS = ['-object', 'iothread,id=iothread1', '-global', 'virtio-blk-pci.iothread=iothread1', '-name', 'debug-threads=on'] as const;
export type CellDisk = keyof typeof CELL_DISKS;
export type CellWorkload = keyof typeof CELL_WORKLOADS;

export interface CellSpec {
  readonly disk: CellDisk;
  readonly cache: 'writeback' | 'none';
  readonly workload: CellWorkload;
  readonly keyFile: string;
  /** Sparse and thin disks' size (default 64 GiB); the allocated raw disk is `rawMiB` (default 12 GiB: the copy is cancelled after ~50 s; 16 GiB with the trickle, whose cells run longer), and so is the thin qcow2's data (default 8 GiB: trickle cells run longer). */
  readonly sparseMiB?: number;
  readonly rawMiB?: number;
  /** More arguments of mod's `idlecrypt encrypt` (a --policy). */
  readonly modArgs?: readonly string[];
  /** More arguments of the unthrottled mirror's `idlecrypt encrypt --no-moderation` (an --encrypter). */
  readonly cmpArgs?: readonly string[];
  /** A run with modArgs for this long before the measured one, cancelled: what it learnt of the guest is there at the start (startSideBySide). */
  readonly warmUpMs?: number;
  /**
   * What cmp, the guest of the unthrottled mirror, does meanwhile: nothing (default), or with
   * the trickle its background alone (the same writes and flushes, no busy phases): the
   * mirror then runs beside what mod's idle phases hold, as an unthrottled copy of mod would.
   */
  readonly cmpBeside?: 'idle' | 'background';
  /**
   * How the trickle's writes are made (trickle cells): 'shell' (default) forks a `dd` for
   * each, which under TCG costs its vCPU about 16 ms a write (a guest a quarter busy on a
   * CPU as well); 'proc' writes the same blocks from one long-lived process
   * (vm-images/guest/icwriter.c), as a database's log writer does.
   */
  readonly writer?: 'shell' | 'proc';
  /** Every guest's disk in an iothread of its own (`-object iothread`, virtio-blk `iothread=`): QEMU then runs the disk's requests and the mirror there, not in the main loop. */
  readonly iothread?: boolean;
  /** Each figure as it is measured, as a line. */
  readonly note?: (line: string) => void;
}

export interface CellFigures {
  /** mod's run: exit code (130: cancelled, as asked), its target removed, the guest still on its source. */
  readonly code: number | null;
  readonly stderr: string;
  readonly targetGone: boolean;
  readonly guestOnSource: boolean;
  /** The unthrottled mirror, bytes/s, in its window. */
  readonly cmpBps: number | undefined;
  /** mod's job in idle phases A and D after the hold-off (1.5 s), bytes/s; their median against cmpBps. */
  readonly idle: ReadonlyArray<{ n: number; ms: number; bps: number | undefined }>;
  readonly idleBps: number;
  readonly idleRel: number;
  /** Busy phases while the copy ran: mod's and ref's guest throughput; the ratio of their medians. */
  readonly busy: ReadonlyArray<{ n: number; mod: number; ref: number }>;
  readonly kept: number;
  /** The trickle's rate (its flushes per second) over the copy, mod against ref over the same time; null without a trickle. */
  readonly trickleKept: number | null;
  /** The same in the trickle's worst phase of the copy (the bound holds "all the time"); null without a trickle. */
  readonly trickleWorstPhase: number | null;
  /** Each busy phase's start to the job slowed (from the guest's first request when the harness read the phase's line later). */
  readonly reactions: ReadonlyArray<{ n: number; r: Reaction }>;
  /** The first key typed into mod (in an idle phase) to the job paused; undefined when no key went. */
  readonly keyReaction: Reaction | undefined;
  /** The host's dirty + writeback memory, MiB: most over the copy, and at each busy phase's start (median). */
  readonly dirtyMaxMiB: number | null;
  readonly dirtyAtBusyMiB: number | null;
  /** Over time, for a report's plot. */
  readonly series: CellSeries;
  /** Everything above as lines, for a failure's message or a report. */
  readonly lines: readonly string[];
}

/**
 * A cell over time, from the moderated job's start to its cancel, in bins of `binS`: MiB/s
 * of mod's guest, ref's guest (its reference), mod's copy and the unthrottled mirror (in
 * its window only; null elsewhere); mod's busy phases and its keys, seconds from the start.
 */
export interface CellSeries {
  readonly binS: number;
  readonly spanS: number;
  readonly modGuest: readonly (number | null)[];
  readonly refGuest: readonly (number | null)[];
  readonly copy: readonly (number | null)[];
  readonly unthrottled: readonly (number | null)[];
  readonly busy: readonly { readonly from: number; readonly to: number }[];
  readonly keys: { readonly from: number; readonly to: number } | null;
}

const SERIES_BIN_MS = 500;

const POLL_MS = 100;
const AFTER_HOLDOFF_MS = 1500;
const s = (ms: number) => (ms / 1000).toFixed(2);
const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

/** Measures one cell in `base` (fresh) with guests booted by `lab` (stopped by the caller). */
export async function measureCell(lab: GuestLab, base: string, spec: CellSpec): Promise<CellFigures> {
  const lines: string[] = [];
  const note = (l: string) => {
    lines.push(l);
    spec.note?.(l);
  };
  const kind = CELL_DISKS[spec.disk];
  const ext = kind.format === 'qcow2' ? 'qcow2' : 'raw';
  const images = { mod: path.join(base, `mod.${ext}`), ref: path.join(base, `ref.${ext}`), cmp: path.join(base, `cmp.${ext}`) };
  // Allocated disks hold what the copy reaches in ~50 s (mod), in its 5 s window (cmp), and
  // the region the workload touches (ref); sparse ones cost nothing at any size.
  // A thin disk's data lasts longer than the allocated raw disk: past it the copy's offset
  // runs through zero clusters, and the idle phases' speed would be the holes'. So does the
  // trickle's allocated disk: beside it the copy ran at 200-370 MiB/s and finished 4 GiB
  // before the last idle phase, which then had no copy to measure. Through the storage
  // daemon the copy of data runs at 330-470 MiB/s, and reached READY in the third busy phase
  // of a 4 GiB disk (2026-12-05, evening: the guest's writes then went to both images, and
  // that phase kept 45%); 12 GiB, 16 with the trickle, and 3 GiB for the 4.2 s window.
  const data = { mod: spec.rawMiB ?? (kind.fill === 'thin' ? 8192 : spec.workload === 'trickle' ? 16384 : 12288), ref: 256, cmp: 3072 };
  const sparse = spec.sparseMiB ?? 65536;
  const sizes = kind.fill === 'pattern' ? data : { mod: sparse, ref: sparse, cmp: sparse };
  await Promise.all(
    (['mod', 'ref', 'cmp'] as const).map((k) =>
      makeDiskImage(images[k], { sizeMiB: sizes[k], format: kind.format, ...(kind.fill === 'thin' ? { fill: 'pattern', dataMiB: data[k] } : { fill: kind.fill }) }),
    ),
  );
  // Images just written, and earlier work's page cache: flush and drop it now, or reclaiming
  // it during a busy phase stalls QEMU.
  execFileSync('sync');
  await writeFile('/proc/sys/vm/drop_caches', '1').catch(() => note('could not drop the page cache (not root?)'));
  const writer: Record<string, string> = spec.workload === 'trickle' && spec.writer === 'proc' ? { writer: 'proc' } : {};
  const w = { workload: CELL_WORKLOADS[spec.workload].workload, params: { ...CELL_WORKLOADS[spec.workload].params, ...writer } };
  const qemuArgs = spec.iothread ? { qemuArgs: IOTHREAD_ARGS } : {};
  type Work = { readonly workload: Workload; readonly params?: Readonly<Record<string, number | string>> };
  const guest = (name: string, disk: string, work: Work) => ({ name, disk, cache: spec.cache, ...work, ...qemuArgs });
  const cmpWork: Work =
    spec.cmpBeside === 'background' && spec.workload === 'trickle' ? { workload: 'writer', params: { wps: CELL_WORKLOADS.trickle.params.wps, ...writer } } : { workload: 'idle' };
  const { mod, ref, cmp, cmpRun, cmpJob, run, target, done, jobStart } = await startSideBySide(lab, base, {
    mod: guest('mod', images.mod, w),
    ref: guest('ref', images.ref, w),
    cmp: guest('cmp', images.cmp, cmpWork),
    keyFile: spec.keyFile,
    pollMs: POLL_MS,
    runTimeoutMs: 400_000,
    format: kind.target,
    ...(spec.modArgs ? { modArgs: [...spec.modArgs] } : {}),
    ...(spec.cmpArgs ? { cmpArgs: [...spec.cmpArgs] } : {}),
    ...(spec.warmUpMs ? { warmUpMs: spec.warmUpMs } : {}),
  });

  // The host's dirty and under-writeback memory: what a writeback copy leaves for the kernel.
  const dirty = sampleDirty(250);
  const dirtyIn = (from: number, to: number) => dirty.samples.filter((d) => d.t >= from && d.t <= to).map((d) => d.mib);
  const dirtyOver = (from: number, to: number) => {
    const xs = dirtyIn(from, to);
    return xs.length ? `host dirty ${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)} MiB` : 'host dirty unknown';
  };

  let cancelAt: number;
  let cmpResumeSent = 0;
  let cmpPauseSent = 0;
  let result: Awaited<typeof done>;
  let idleA: number;
  let idleD: number;
  let keys: number[];
  try {
    idleA = await mod.rec.nextPhase('idle', jobStart);
    const idleC = await mod.rec.nextPhase('idle', idleA + 1000);
    // The keys begin once the job runs again after the busy phase's hold-off (1 s), so
    // that the pause they cause is measured (issue 12: within 250 ms); cmp runs once mod's
    // job has paused for them (at most +2.8 s), and stops before they end.
    const keysFrom = idleC + 1800;
    [keys] = await Promise.all([
      typeKeys(mod.rec.client, keysFrom, idleC + 7400),
      (async () => {
        await sleepUntil(keysFrom + 500);
        while (now() < idleC + 2800 && !mod.rec.jobEvents.some((e) => e.t > keysFrom && e.status === 'paused')) await sleepUntil(now() + 10);
        cmpResumeSent = now();
        await cmp.rec.client.execute('job-resume', { id: cmpJob });
        await sleepUntil(idleC + 6800);
        cmpPauseSent = now();
        await cmp.rec.client.execute('job-pause', { id: cmpJob });
      })(),
    ]);
    idleD = await mod.rec.nextPhase('idle', idleC + 1000);
    const busyLast = await mod.rec.nextPhase('busy', idleD);
    await sleepUntil(busyLast + 8500);
    cancelAt = now();
    run.cli.child.kill('SIGINT');
    result = await done;
  } finally {
    dirty.stop();
    await lab.stopRecorders();
    cmpRun.cli.child.kill('SIGINT');
    await cmpRun.result(60_000);
  }

  // The moderated run's progress records (its decisions, the headroom's cap and the main
  // loop's load) and its log, beside its metrics file: a report's plots and a diagnosis read them.
  await writeFile(path.join(base, 'mod.progress.ndjson'), run.cli.stdout());
  await writeFile(path.join(base, 'mod.log'), run.cli.stderr());
  const targetGone = await access(target).then(
    () => false,
    () => true,
  );
  const q = await QmpClient.connect(mod.vm.qmpSocket);
  let guestOnSource: boolean;
  try {
    const disk0 = (await q.execute('query-block')).find((b) => b.qdev?.includes('disk0'));
    guestOnSource = disk0?.inserted?.image.filename === images.mod;
  } finally {
    await q.close();
  }

  const mp = mod.rec.phases();
  const rp = ref.rec.phases();
  // The guest's phases on the host's clock (epoch ms), beside the records above: a diagnosis
  // lines them up with the decisions and the probes' samples.
  await writeFile(path.join(base, 'mod.phases.json'), JSON.stringify(mp) + '\n');
  const cmpRunning = cmp.rec.jobEvents.find((e) => e.t >= cmpResumeSent - 50 && e.status === 'running')?.t ?? cmpResumeSent;
  const cmpBps = rateOver(cmp.rec.samples, cmpRunning + 300, cmpPauseSent, jobOffset);
  note(`unthrottled mirror (cmp) in mod's idle phase: ${mibps(cmpBps)} MiB/s over ${s(cmpPauseSent - cmpRunning - 300)} s, ${dirtyOver(cmpRunning + 300, cmpPauseSent)}`);

  const idleWindows = [idleA, idleD]
    .map((start) => mp.find((p) => p.kind === 'idle' && p.start === start))
    .filter((p): p is Phase => p !== undefined)
    .map((p) => ({ p, from: p.start + AFTER_HOLDOFF_MS, to: Math.min(p.end, cancelAt) }))
    .filter((x) => x.to - x.from >= 1500);
  const idle = idleWindows.map((x) => ({ n: x.p.n, ms: x.to - x.from, bps: rateOver(mod.rec.samples, x.from, x.to, jobOffset) }));
  const idleBps = median(idle.map((x) => x.bps).filter((b): b is number => b !== undefined));
  const idleRel = cmpBps ? idleBps / cmpBps : NaN;
  idleWindows.forEach((x, i) => note(`idle phase ${x.p.n}: job ${mibps(idle[i]!.bps)} MiB/s = ${pct(idle[i]!.bps! / cmpBps!)} of unthrottled over ${s(x.to - x.from)} s (from +${s(AFTER_HOLDOFF_MS)} s), ${dirtyOver(x.from, x.to)}`));
  if (kind.fill === 'thin') {
    // Past the data, a qcow2 target's copy runs through zero clusters: not the data's speed.
    const last = mod.rec.samples.filter((x) => x.t <= cancelAt && jobOffset(x) !== undefined).at(-1);
    const reached = last ? jobOffset(last)! / MiB : NaN;
    note(`the copy reached ${reached.toFixed(0)} MiB of the ${data.mod} MiB of data${reached > data.mod ? ': past it, so the idle speeds include zero clusters' : ''}`);
  }

  const tput = (rec: GuestRecorder, p: Phase) => rateOver(rec.samples, p.start, p.end, guestBytes);
  /** ref's throughput over its phase of p's kind that began nearest to p. */
  const refTput = (p: Phase) => {
    const q2 = rp.filter((x) => x.kind === p.kind).sort((a, b) => Math.abs(a.start - p.start) - Math.abs(b.start - p.start))[0];
    return q2 ? tput(ref.rec, q2) : undefined;
  };
  const busy = mp
    .filter((p) => p.kind === 'busy' && p.start >= jobStart && p.end <= cancelAt)
    .map((p) => ({ p, mod: tput(mod.rec, p), ref: refTput(p) }))
    .filter((b): b is { p: Phase; mod: number; ref: number } => b.mod !== undefined && b.ref !== undefined);
  busy.forEach((b) => note(`busy phase ${b.p.n}: mod ${mibps(b.mod)} MiB/s, ref ${mibps(b.ref)} MiB/s (${pct(b.mod / b.ref)}), ${dirtyOver(b.p.start - 250, b.p.start + 250)} at its start`));
  const kept = median(busy.map((b) => b.mod)) / median(busy.map((b) => b.ref));
  note(`busy-phase throughput kept: ${pct(kept)} (ratio of the medians over ${busy.length} phases)`);

  let trickleKept: number | null = null;
  let trickleWorstPhase: number | null = null;
  if (spec.workload === 'trickle') {
    // The trickle's own rate: its flushes (the busy phases' requests have none), per second,
    // over the whole copy and over each phase, mod's against ref's over the same stretch.
    // Bytes would not do: beside the host's page cache the busy phases' last requests
    // complete seconds into the next idle phase, and they outweigh the trickle's 4 KiB.
    const flushes = (x: { guestWrites?: { flushes: number } }) => x.guestWrites?.flushes;
    const flushRate = (rec: GuestRecorder, from: number, to: number) => rateOver(rec.samples, from, to, flushes);
    const whole = { mod: flushRate(mod.rec, jobStart, cancelAt), ref: flushRate(ref.rec, jobStart, cancelAt) };
    trickleKept = whole.mod !== undefined && whole.ref ? whole.mod / whole.ref : null;
    const perPhase = mp
      .filter((p) => p.start >= jobStart && p.end <= cancelAt)
      .map((p) => ({ p, mod: flushRate(mod.rec, p.start, p.end), ref: flushRate(ref.rec, p.start, p.end) }))
      .filter((x): x is { p: Phase; mod: number; ref: number } => x.mod !== undefined && x.ref !== undefined && x.ref > 0);
    trickleWorstPhase = perPhase.length ? Math.min(...perPhase.map((x) => x.mod / x.ref)) : null;
    note(
      `trickle kept: ${trickleKept === null ? '-' : pct(trickleKept)} of its flushes over the copy (${whole.mod?.toFixed(1) ?? '-'}/s against ${whole.ref?.toFixed(1) ?? '-'}/s); by phase: ${perPhase.map((x) => `${x.p.kind} ${x.p.n} ${pct(x.mod / x.ref)}`).join(', ')}`,
    );
  }

  // From the PHASE line, or from the guest's first request when the harness read the line
  // later (the probe interval that holds it, from idlecrypt's metrics file).
  const activity = parseActivity(await readFile(path.join(base, 'mod.lp'), 'utf8').catch(() => ''));
  const reactions = busy.map(({ p }) => {
    const first = firstRequestAt(activity, p.start);
    return { n: p.n, r: reactionAt(mod.rec.samples, mod.rec.jobEvents, first !== undefined && first < p.start ? first : p.start) };
  });
  for (const { n, r } of reactions) note(`busy phase ${n} reaction: job ${r.before} at the phase start; slowed after ${r.ms?.toFixed(0)} ms`);
  // The keys: from the first key QEMU took to the job paused (issue 12: within 250 ms).
  const keyReaction = keys.length ? reactionAt(mod.rec.samples, mod.rec.jobEvents, keys[0]!) : undefined;
  if (keyReaction) note(`keys: ${keys.length} keystrokes in an idle phase; job ${keyReaction.before} at the first key; paused after ${keyReaction.ms?.toFixed(0)} ms`);

  const sec = (t: number) => (t - jobStart) / 1000;
  const binned = (rec: GuestRecorder, get: (x: Sample) => number | undefined, from = jobStart, to = cancelAt): (number | null)[] =>
    Array.from({ length: Math.floor((cancelAt - jobStart) / SERIES_BIN_MS) }, (_, i) => {
      const a = jobStart + i * SERIES_BIN_MS;
      const b = a + SERIES_BIN_MS;
      const r = a >= from && b <= to ? rateOver(rec.samples, a, b, get) : undefined;
      return r === undefined ? null : r / MiB;
    });
  const series: CellSeries = {
    binS: SERIES_BIN_MS / 1000,
    spanS: sec(cancelAt),
    modGuest: binned(mod.rec, guestBytes),
    refGuest: binned(ref.rec, guestBytes),
    copy: binned(mod.rec, jobOffset),
    unthrottled: binned(cmp.rec, jobOffset, cmpRunning, cmpPauseSent),
    busy: mp.filter((p) => p.kind === 'busy' && p.end > jobStart && p.start < cancelAt).map((p) => ({ from: Math.max(0, sec(p.start)), to: sec(Math.min(p.end, cancelAt)) })),
    keys: keys.length ? { from: sec(keys[0]!), to: sec(keys.at(-1)!) } : null,
  };

  const copyDirty = dirtyIn(jobStart, cancelAt);
  const atBusy = busy.map((b) => dirtyIn(b.p.start - 250, b.p.start + 250)[0]).filter((x): x is number => x !== undefined);
  return {
    code: result.code,
    stderr: result.stderr,
    targetGone,
    guestOnSource,
    cmpBps,
    idle,
    idleBps,
    idleRel,
    busy: busy.map((b) => ({ n: b.p.n, mod: b.mod, ref: b.ref })),
    kept,
    trickleKept,
    trickleWorstPhase,
    reactions,
    keyReaction,
    dirtyMaxMiB: copyDirty.length ? Math.max(...copyDirty) : null,
    dirtyAtBusyMiB: atBusy.length ? median(atBusy) : null,
    series,
    lines,
  };
}

/** Issue 9's bounds, as a cell meets them or not: kept >= 93% (trickle: its rate >= 90% over the copy and in every phase), every reaction <= 0.5 s, idle >= 80% of unthrottled. */
export function issue9Bounds(f: CellFigures): { kept: boolean; trickle: boolean | null; reaction: boolean; idle: boolean; all: boolean } {
  const running = f.reactions.filter((x) => measurable(x.r));
  const kept = f.kept >= 0.93;
  const trickle = f.trickleKept === null && f.trickleWorstPhase === null ? null : (f.trickleKept ?? 1) >= 0.9 && (f.trickleWorstPhase ?? 1) >= 0.9;
  const reaction = running.every(({ r }) => r.ms !== undefined && r.ms <= 500);
  const idle = f.idleRel >= 0.8;
  return { kept, trickle, reaction, idle, all: kept && trickle !== false && reaction && idle };
}

export { MiB };
