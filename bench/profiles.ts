/**
 * The evaluation of issue 12: three guest profiles, each under
 *   (a) no job: the reference,
 *   (b) the fixed thresholds (the shipped policy),
 *   (c) the learnt thresholds (`thresholds: auto`),
 *   (d) the latency-driven speed (`latency.margin: 15%`, fixed thresholds),
 *   (e) both (`thresholds: auto` and `latency.margin: 15%`): the learnt thresholds call the
 *       trickle idle, and the latency grades the idle copy beside it,
 * every policy without a deadline (`guarantee.deadline: none`), so that what the copy gets
 * is moderation's alone.
 *
 * Profiles (the busybox test guest, 1 vCPU, TCG, cache=none, a 12 GiB allocated disk):
 *   bursty       8 s idle / 8 s busy phases of 1 MiB reads and writes (the suite's guest)
 *   noisy        a trickle of 20 small synchronous writes a second (each 4 KiB, flushed:
 *                40 requests/s) all the time, with the bursty phases on top
 *   never-idle   the 1 MiB read/write loop all the time
 *
 * Design, as bench/apps.ts's one-boot design (these machines drift by ±25% between boots,
 * less within one): one guest per profile; a warm-up (30 s, then an unmeasured copy under
 * (c) for 75 s, so that the learnt thresholds exist, as for a guest the agent has watched;
 * they are kept in this run's state directory); then rounds of every mode in the same boot,
 * the order reversed every other round, each copy cancelled after --window-s (the guest
 * stays on its source, whose contents the workloads do not change). Medians over rounds.
 *
 * Beside each profile's guest runs a second one, the same guest and workload on a disk of its
 * own, never copied (--reference guest, the default): "kept" is each run's figure against the
 * reference guest's in the same window, as the suite and bench/matrix.ts measure. Against
 * (a)'s window of the same round instead (--reference window, the design before 2026-12-02),
 * the drift within a boot outweighed the copy: (b), which never copied beside the noisy
 * trickle, kept 77-106% of (a) over four rounds. With a reference guest, (a)'s row says how
 * far the two guests differ without any copy.
 *
 * Measured on the harness's own QMP socket every 250 ms (test/helpers/moderation-lab.ts):
 *   busy MiB/s       the guest's bytes (query-blockstats) over its busy phases in the window
 *                    (never-idle: the whole window); "kept" is against (a) in the same round
 *   trickle /s, ms   noisy: the guest's flushes per second and the mean time QEMU took for
 *                    its writes and flushes, over the idle phases (only the trickle runs)
 *   trickle p50/p90  noisy: the median and 90th percentile of its writes' latency in QEMU,
 *                    and the median of its flushes', over the idle phases, from the latency
 *                    histograms QEMU keeps on the guest's disk from boot (block-latency-
 *                    histogram-set, 10% buckets, interpolated)
 *   quiet MiB/s      the copy's speed over the idle phases, each from 1.5 s in (after the
 *                    window and hold-off); never-idle has none
 *   copy MiB/s       the copy's average over the window; "≈ time" = disk / that
 *
 * The report (bench/results/profiles-report-<stamp>.md) has the table, every run, and per
 * profile a plot of the last round over time (profiles-<profile>-<stamp>.svg): each copy's
 * speed beside the guest's throughput, the guest's write latency in QEMU (its median per
 * second from the harness's histograms, and what the latency control judged with its
 * limit, from the job's metrics file), and the guest's disk requests/s with the threshold
 * in force and the learnt level.
 *
 *   node --import tsx bench/profiles.ts [--rounds 2] [--window-s 40] [--size-mib 12288]
 *        [--profiles bursty,noisy,never-idle] [--modes none,fixed,learnt,latency,both] [--out bench/results]
 *        [--finish 5m] [--reference guest|window]
 *
 * --finish: after each profile's rounds, one more copy under (e)'s policy with that deadline
 * (relative to the copy's start), run to completion (or 1.5x the deadline): whether a copy
 * beside this guest finishes before its deadline, and what the guest keeps meanwhile.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { makeDiskImage, type Workload } from '../vm-images/launch.ts';
import { histogramQuantile } from '../src/controller/latency.ts';
import { parseDuration as parsePolicyDuration } from '../src/policy/units.ts';
import { binnedSegments, polyline, xmlEscape } from './svg.ts';
import { EncryptRun, GuestLab, MiB, guestBytes, histIn, jobOffset, parseActivity, mdTable, medianOf, now, phaseWindows, rateIn, textTable, type Phase, type Sample } from '../test/helpers/moderation-lab.ts';

const { values: args } = parseArgs({
  options: {
    rounds: { type: 'string', default: '2' },
    'window-s': { type: 'string', default: '40' },
    'size-mib': { type: 'string', default: '12288' },
    profiles: { type: 'string', default: 'bursty,noisy,never-idle' },
    modes: { type: 'string', default: 'none,fixed,learnt,latency,both' },
    out: { type: 'string', default: 'bench/results' },
    /** After the rounds, one copy under (e)'s policy with this deadline (e.g. 5m), run to completion. */
    finish: { type: 'string', default: '' },
    /** `guest`: a second guest beside the first, never copied, is what "kept" compares with; `window`: (a)'s window of the same round. */
    reference: { type: 'string', default: 'guest' },
  },
});

type Mode = 'none' | 'fixed' | 'learnt' | 'latency' | 'both';
type ProfileName = 'bursty' | 'noisy' | 'never-idle';
const PROFILES: Record<ProfileName, { workload: Workload; params: Record<string, number>; phased: boolean }> = {
  bursty: { workload: 'bursty', params: { idle: 8, busy: 8 }, phased: true },
  noisy: { workload: 'trickle', params: { wps: 20, idle: 8, busy: 8 }, phased: true },
  'never-idle': { workload: 'disk', params: {}, phased: false },
};
const POLICY: Record<Exclude<Mode, 'none'>, string> = {
  fixed: 'guarantee:\n  deadline: none\n',
  learnt: 'thresholds: auto\nguarantee:\n  deadline: none\n',
  latency: 'latency:\n  margin: 15%\nguarantee:\n  deadline: none\n',
  both: 'thresholds: auto\nlatency:\n  margin: 15%\nguarantee:\n  deadline: none\n',
};
const LABEL: Record<Mode, string> = { none: '(a) no job', fixed: '(b) fixed', learnt: '(c) learnt', latency: '(d) latency', both: '(e) learnt + latency' };

const rounds = Number(args.rounds);
if (args.reference !== 'guest' && args.reference !== 'window') throw new Error(`--reference: guest or window, not ${args.reference}`);
const besideRef = args.reference === 'guest';
const windowMs = Number(args['window-s']) * 1000;
const sizeMiB = Number(args['size-mib']);
const profiles = args.profiles.split(',') as ProfileName[];
const modes = args.modes.split(',') as Mode[];
for (const p of profiles) if (!(p in PROFILES)) throw new Error(`unknown profile ${p}`);
for (const m of modes) if (!(m in LABEL)) throw new Error(`unknown mode ${m}`);

/** A copy run to completion under a deadline (--finish). */
interface Finish {
  profile: ProfileName;
  deadline: string;
  deadlineS: number;
  /** From the copy's start to its completion; null if it did not complete within 1.5x the deadline. */
  tookS: number | null;
  busyMiBs: number | null;
  /** the reference guest's over the same time (--reference guest) */
  refBusyMiBs?: number | null;
  copyMiBs: number | null;
  decisions: Record<string, number>;
}

/** What the reference guest (--reference guest) did in a run's window. */
interface RefFigures {
  busyMiBs: number | null;
  trickleFlushesPerS: number | null;
  writeP50: number | null;
  flushP50: number | null;
}

interface RunResult {
  profile: ProfileName;
  mode: Mode;
  round: number;
  from: number;
  to: number;
  /** the reference guest in the same window (--reference guest) */
  ref?: RefFigures;
  busyMiBs: number | null;
  trickleFlushesPerS: number | null;
  trickleMs: number | null;
  /** the trickle's write latency in QEMU, median and p90, and its flushes' median, ms */
  writeP50: number | null;
  writeP90: number | null;
  flushP50: number | null;
  quietMiBs: number | null;
  copyMiBs: number | null;
  /** the copy's decisions, as the --json records said them: "mode reason" -> count */
  decisions?: Record<string, number>;
  /** the last round's runs: what the report plots */
  series?: Series;
}

/** A window's ends lie within a poll of the samples around them; parts under 0.5 s are left out. */
const WINDOW = { edgeMs: 1000, minMs: 500 };
const mib = (bps: number | null): number | null => (bps === null ? null : bps / MiB);

/** A job's copied bytes in a poll, that job's only (any idlecrypt job without an id). */
const offsetOf =
  (jobId?: string) =>
  (s: Sample): number | undefined =>
    jobId === undefined || s.job?.id === jobId ? jobOffset(s) : undefined;

/** The job a run started (its log's "mirror started"). */
function jobOf(run: EncryptRun): string | undefined {
  const job = run.log().find((x) => x.msg === 'mirror started')?.job;
  return typeof job === 'string' ? job : undefined;
}

/**
 * `jobId`: the window's own job. The polls before a window's start still hold the previous
 * window's job, and a copy's offset read at the start was interpolated between that job's
 * last offset and this one's first: a copy that stood still read as -0.3 to -1.3 MiB/s.
 */
function measure(samples: readonly Sample[], phases: readonly Phase[], phased: boolean, from: number, to: number, jobId?: string) {
  const offset = offsetOf(jobId);
  const busy = phased ? phaseWindows(phases, 'busy', from, to) : [{ from, to }];
  const idle = phased ? phaseWindows(phases, 'idle', from, to) : [];
  const quiet = phased ? phaseWindows(phases, 'idle', from, to, 1500) : [];
  const flushes = rateIn(samples, idle, (s) => s.guestWrites?.flushes, WINDOW);
  const ns = rateIn(samples, idle, (s) => s.guestWrites?.ns, WINDOW);
  const ops = rateIn(samples, idle, (s) => (s.guestWrites ? s.guestWrites.ops + s.guestWrites.flushes : undefined), WINDOW);
  const wh = histIn(samples, idle, 'write');
  const fh = histIn(samples, idle, 'flush');
  const q = (h: typeof wh, p: number) => {
    const x = h ? histogramQuantile(h.boundaries, h.bins, p) : undefined;
    return x === undefined ? null : x / 1e6;
  };
  return {
    busyMiBs: mib(rateIn(samples, busy, guestBytes, WINDOW)),
    trickleFlushesPerS: flushes,
    trickleMs: ns !== null && ops ? ns / ops / 1e6 : null,
    writeP50: q(wh, 0.5),
    writeP90: q(wh, 0.9),
    flushP50: q(fh, 0.5),
    quietMiBs: phased ? mib(rateIn(samples, quiet, offset, WINDOW)) : null,
    copyMiBs: mib(rateIn(samples, [{ from, to }], offset, WINDOW)),
  };
}

async function main(): Promise<void> {
  const base = await mkdtemp(path.join(os.tmpdir(), 'ic-profiles-'));
  const results: RunResult[] = [];
  const finishes: Finish[] = [];
  const lab = new GuestLab();
  const started = new Date();
  try {
    const disk = path.join(base, 'disk.raw');
    const refDisk = path.join(base, 'disk-ref.raw');
    process.stderr.write(`making a ${sizeMiB} MiB allocated disk${besideRef ? ', and one for the reference guest' : ''}...\n`);
    await makeDiskImage(disk, { sizeMiB, format: 'raw', fill: 'pattern' });
    if (besideRef) await makeDiskImage(refDisk, { sizeMiB, format: 'raw', fill: 'pattern' });
    const keyFile = path.join(base, 'key');
    await writeFile(keyFile, 'bench-passphrase\n', { mode: 0o600 });
    for (const [m, text] of Object.entries(POLICY)) await writeFile(path.join(base, `${m}.yaml`), text);

    for (const profile of profiles) {
      const prof = PROFILES[profile];
      const dir = path.join(base, profile);
      await mkdir(dir);
      // A state directory per profile: what (c) learns of this guest, and nothing else.
      const stateDir = path.join(dir, 'state');
      await mkdir(stateDir);
      process.stderr.write(`${profile}: booting\n`);
      const { vm, rec } = await lab.boot(dir, { name: `prof-${profile}`, disk, workload: prof.workload, params: prof.params, cache: 'none' });
      await rec.poll({ intervalMs: 250, stats: true, jobs: true, histograms: true });
      // The reference: the same guest and workload beside it, never copied, measured in the
      // same windows. These hosts drift by more than a copy's harm within one boot (issue
      // 12's noisy profile, four rounds: (a) 241-304 MiB/s, and (b), which never copied,
      // 77-106% of it); two guests side by side see the same minutes.
      let refRec: typeof rec | undefined;
      if (besideRef) {
        const refDir = path.join(dir, 'ref');
        await mkdir(refDir);
        ({ rec: refRec } = await lab.boot(refDir, { name: `prof-${profile}-ref`, disk: refDisk, workload: prof.workload, params: prof.params, cache: 'none' }));
        await refRec.poll({ intervalMs: 250, stats: true, jobs: false, histograms: true });
      }
      const refIn = (from: number, to: number): { ref?: RefFigures } => {
        if (!refRec) return {};
        const m = measure(refRec.samples, refRec.phases(), prof.phased, from, to);
        return { ref: { busyMiBs: m.busyMiBs, trickleFlushesPerS: m.trickleFlushesPerS, writeP50: m.writeP50, flushP50: m.flushP50 } };
      };
      await sleep(30_000);
      const copy = async (mode: Exclude<Mode, 'none'>, ms: number, tag: string) => {
        const target = path.join(dir, `${tag}.luks`);
        const run = new EncryptRun(
          ['--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile, '--iter-time', '50', '--policy', path.join(base, `${mode}.yaml`)],
          path.join(dir, `${tag}.lp`),
          { IDLECRYPT_STATE_DIR: stateDir },
        );
        // the window starts when the copy does (its "copying" record)
        const from = await copyingAt(run);
        await sleep(Math.max(0, from + ms - now()));
        const to = now();
        run.cli.child.kill('SIGINT');
        const r = await run.result(60_000);
        if (run.completed()) throw new Error(`${tag}: the copy completed within its window; use a larger --size-mib`);
        await rm(target, { force: true });
        const decisions = decisionsOf(run);
        await writeFile(path.join(dir, `${tag}.log`), run.cli.stdout() + run.cli.stderr());
        process.stderr.write(`  ${tag}: exit ${r.code}\n`);
        const lp = await readFile(path.join(dir, `${tag}.lp`), 'utf8').catch(() => '');
        return { from, to, decisions, lp, jobId: jobOf(run) };
      };
      const finish = async (deadline: string): Promise<Finish> => {
        const deadlineS = finishSeconds(deadline);
        const policy = path.join(base, 'finish.yaml');
        await writeFile(policy, `${POLICY.both.replace(/deadline: none/, `deadline: ${deadline}`)}`);
        const target = path.join(dir, 'finish.luks');
        const run = new EncryptRun(
          ['--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile, '--iter-time', '50', '--policy', policy],
          path.join(dir, 'finish.lp'),
          { IDLECRYPT_STATE_DIR: stateDir },
        );
        const from = await copyingAt(run);
        while (!run.completed() && run.cli.child.exitCode === null && now() - from < deadlineS * 1500) await sleep(500);
        const done = run.completed();
        const to = done ? Date.parse(String(done.time)) : now();
        if (!done) run.cli.child.kill('SIGINT');
        await run.result(120_000);
        await rm(target, { force: true });
        await writeFile(path.join(dir, 'finish.log'), run.cli.stdout() + run.cli.stderr());
        await sleep(1000);
        const m = measure(rec.samples, rec.phases(), prof.phased, from, to, jobOf(run));
        const decisions = decisionsOf(run);
        const r = refIn(from, to);
        return { profile, deadline, deadlineS, tookS: done ? (to - from) / 1000 : null, busyMiBs: m.busyMiBs, ...(r.ref ? { refBusyMiBs: r.ref.busyMiBs } : {}), copyMiBs: m.copyMiBs, decisions };
      };
      process.stderr.write(`${profile}: warm-up under (c), 75 s\n`);
      await copy('learnt', 75_000, 'warmup');
      await sleep(5000);
      for (let round = 1; round <= rounds; round++) {
        const order = round % 2 === 1 ? modes : [...modes].reverse();
        for (const mode of order) {
          const tag = `${mode}-r${round}`;
          let from: number;
          let to: number;
          let decisions: Record<string, number> | undefined;
          let lp = '';
          let jobId: string | undefined;
          if (mode === 'none') {
            from = now();
            await sleep(windowMs);
            to = now();
          } else {
            ({ from, to, decisions, lp, jobId } = await copy(mode, windowMs, tag));
          }
          await sleep(1000); // the polls just after the window, which its end is read between
          const m = measure(rec.samples, rec.phases(), prof.phased, from, to, jobId);
          const series = round === rounds ? seriesOf(rec.samples, rec.phases(), lp, from, to, jobId) : undefined;
          const r = refIn(from, to);
          results.push({ profile, mode, round, from, to, ...m, ...r, ...(decisions ? { decisions } : {}), ...(series ? { series } : {}) });
          process.stderr.write(
            `  ${profile} ${tag}: busy ${m.busyMiBs?.toFixed(1)} MiB/s${r.ref ? ` (the reference guest ${r.ref.busyMiBs?.toFixed(1)})` : ''}, copy ${m.copyMiBs?.toFixed(1)} MiB/s, quiet ${m.quietMiBs?.toFixed(1) ?? '-'}\n`,
          );
          await sleep(4000);
        }
      }
      if (args.finish) {
        process.stderr.write(`${profile}: (e) with a deadline of ${args.finish}, to completion\n`);
        const f = await finish(args.finish);
        finishes.push(f);
        process.stderr.write(`  ${profile} finish: ${f.tookS === null ? 'not done' : `${f.tookS.toFixed(0)} s`} of ${f.deadlineS} s, busy ${f.busyMiBs?.toFixed(1)} MiB/s\n`);
      }
      await lab.stopAll();
    }
  } finally {
    await lab.stopAll();
    await rm(base, { recursive: true, force: true });
  }
  await report(results, finishes, started);
}

/** When the copy started (its "copying" record), waiting up to a minute for it; else now. */
async function copyingAt(run: EncryptRun): Promise<number> {
  const t0 = now();
  while (run.phaseAt('copying') === undefined && now() - t0 < 60_000) await sleep(100);
  return run.phaseAt('copying') ?? t0;
}

/** The copy's decisions, as its --json records said them: "mode reason" (numbers as #) -> count. */
function decisionsOf(run: EncryptRun): Record<string, number> {
  const decisions: Record<string, number> = {};
  for (const x of run.records()) {
    if (x.event !== 'progress' || typeof x.mode !== 'string') continue;
    const key = `${x.mode} ${String(x.reason ?? '').replace(/[\d.]+/g, '#')}`;
    decisions[key] = (decisions[key] ?? 0) + 1;
  }
  return decisions;
}

/** The three most frequent decisions, for a table cell. */
function topDecisions(d: Record<string, number>): string {
  return Object.entries(d)
    .sort((a, b) => b[1] - a[1])
    .slice(0, 3)
    .map(([k, n]) => `${n}× ${k.slice(0, 70)}`)
    .join('; ');
}

/** --finish's duration ("5m", "90s", "1h30m", as the policy writes them): seconds. */
function finishSeconds(d: string): number {
  const r = parsePolicyDuration(d);
  if (!r.ok) throw new Error(`--finish: ${r.problem}`);
  return r.value / 1000;
}

function pct(x: number | null, ref: number | null): string {
  return x === null || ref === null || ref === 0 ? '-' : `${Math.round((100 * x) / ref)}%`;
}
const f1 = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : x.toFixed(1));
const f2 = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : x.toFixed(2));

// ---------------------------------------------------------------- plots over time

/** One run's course, in seconds from its window's start. */
interface Series {
  spanS: number;
  busy: { from: number; to: number }[];
  /** 0.5 s bins: the guest's MiB/s, the copy's MiB/s */
  guest: (number | null)[];
  copy: (number | null)[];
  /** 1 s bins: the median of the guest's writes in QEMU (the harness's histograms), ms */
  writeP50: (number | null)[];
  /** the job's moderation records (its metrics file), as steps */
  moderation: { t: number; latencyMs?: number; limitMs?: number; threshold?: number; level?: number }[];
  /** the guest's disk requests/s as the job's probes counted them */
  requests: { t: number; perS: number }[];
}

/** The numeric fields of the job's idlecrypt_moderation points (string fields skipped). */
function parseModeration(lp: string): { t: number; f: Record<string, number> }[] {
  const out: { t: number; f: Record<string, number> }[] = [];
  for (const line of lp.split('\n')) {
    if (!line.startsWith('idlecrypt_moderation,')) continue;
    const last = line.lastIndexOf(' ');
    const body = line.slice(line.indexOf(' ') + 1, last);
    const f: Record<string, number> = {};
    for (const m of body.matchAll(/(\w+)=("(?:[^"\\]|\\.)*"|[^,]*)/g)) if (!m[2]!.startsWith('"')) f[m[1]!] = Number(m[2]!.replace(/i$/, ''));
    out.push({ t: Number(BigInt(line.slice(last + 1)) / 1000n) / 1000, f });
  }
  return out.sort((a, b) => a.t - b.t);
}

function seriesOf(samples: readonly Sample[], phases: readonly Phase[], lp: string, from: number, to: number, jobId?: string): Series {
  const spanS = (to - from) / 1000;
  const bins = (ms: number) => Array.from({ length: Math.floor((to - from) / ms) }, (_, i) => ({ from: from + i * ms, to: from + (i + 1) * ms }));
  const rate = (ms: number, get: (s: Sample) => number | undefined) => bins(ms).map((b) => mib(rateIn(samples, [b], get, { edgeMs: 300, minMs: 200 })));
  return {
    spanS,
    busy: phaseWindows(phases, 'busy', from, to).map((w) => ({ from: (w.from - from) / 1000, to: (w.to - from) / 1000 })),
    guest: rate(500, guestBytes),
    copy: rate(500, offsetOf(jobId)),
    writeP50: bins(1000).map((b) => {
      const h = histIn(samples, [b], 'write');
      const x = h ? histogramQuantile(h.boundaries, h.bins) : undefined;
      return x === undefined ? null : x / 1e6;
    }),
    moderation: parseModeration(lp)
      .filter((p) => p.t >= from - 5000 && p.t <= to)
      .map((p) => ({
        t: (p.t - from) / 1000,
        ...(p.f.latency_ms !== undefined ? { latencyMs: p.f.latency_ms } : {}),
        ...(p.f.latency_limit_ms !== undefined ? { limitMs: p.f.latency_limit_ms } : {}),
        ...(p.f.threshold_disk_requests_per_s !== undefined ? { threshold: p.f.threshold_disk_requests_per_s } : {}),
        ...(p.f.learnt_disk_level_per_s !== undefined ? { level: p.f.learnt_disk_level_per_s } : {}),
      })),
    requests: parseActivity(lp)
      .filter((a) => a.t >= from && a.t <= to)
      .map((a) => ({ t: (a.t - from) / 1000, perS: (a.disk * 1000) / a.intervalMs })),
  };
}

/**
 * One profile's last round, a group of three panels per mode: the guest's and the copy's
 * MiB/s; the guest's write latency in QEMU (its median per second, and what the latency
 * control judged and its limit); the guest's disk requests/s with the threshold in force
 * and the learnt level.
 */
function profileSvg(profile: ProfileName, runs: RunResult[]): string {
  const W = 960;
  const L = 60;
  const R = 20;
  const PH = 80;
  const GAP = 22;
  const GROUP = 3 * (PH + GAP) + 24;
  const withSeries = runs.filter((r) => r.series);
  const H = 50 + withSeries.length * GROUP;
  const spanS = Math.max(1, ...withSeries.map((r) => r.series!.spanS));
  const x = (t: number) => L + ((W - L - R) * Math.max(0, Math.min(spanS, t))) / spanS;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="20" font-size="14" font-weight="bold">${xmlEscape(`${profile}: the last round, seconds from each window's start (busy phases shaded)`)}</text>`,
  ];
  const finite = (xs: (number | null | undefined)[]) => xs.filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
  const panel = (top: number, title: string, yMax: number, draw: (y: (v: number) => number) => void, r: RunResult) => {
    const y = (v: number) => top + PH - (PH * Math.min(Math.max(v, 0), yMax)) / yMax;
    for (const b of r.series!.busy) out.push(`<rect x="${x(b.from).toFixed(1)}" y="${top}" width="${(x(b.to) - x(b.from)).toFixed(1)}" height="${PH}" fill="#f3e3c8"/>`);
    out.push(`<rect x="${L}" y="${top}" width="${W - L - R}" height="${PH}" fill="none" stroke="#999"/>`);
    out.push(`<text x="${L - 6}" y="${top + 10}" text-anchor="end">${yMax.toFixed(yMax < 10 ? 1 : 0)}</text><text x="${L - 6}" y="${top + PH}" text-anchor="end">0</text>`);
    out.push(`<text x="${W - R - 4}" y="${top + 12}" text-anchor="end" fill="#333">${xmlEscape(title)}</text>`);
    draw(y);
  };
  const poly = (pts: [number, number][], colour: string, y: (v: number) => number, dash = '') => (pts.length > 1 ? out.push(polyline(pts, x, y, colour, dash)) : 0);
  const steps = (pts: { t: number; v: number | undefined }[]): [number, number][] => {
    const out2: [number, number][] = [];
    let last: number | undefined;
    for (const p of pts) {
      if (p.v === undefined) continue;
      if (last !== undefined) out2.push([Math.max(0, p.t), last]);
      out2.push([Math.max(0, p.t), p.v]);
      last = p.v;
    }
    if (last !== undefined) out2.push([spanS, last]);
    return out2;
  };
  withSeries.forEach((r, i) => {
    const s = r.series!;
    const top = 40 + i * GROUP;
    out.push(`<text x="${L}" y="${top + 10}" font-weight="bold">${xmlEscape(LABEL[r.mode])}</text>`);
    const mbMax = Math.max(50, ...finite([...s.guest, ...s.copy]));
    panel(top + 16, 'MiB/s: guest (blue), copy (red)', mbMax, (y) => {
      for (const seg of binnedSegments(s.guest, 0.5)) poly(seg, '#1f77b4', y);
      for (const seg of binnedSegments(s.copy, 0.5)) poly(seg, '#d62728', y);
    }, r);
    const msMax = Math.max(1, ...finite([...s.writeP50, ...s.moderation.map((m) => m.latencyMs), ...s.moderation.map((m) => m.limitMs)]).map((v) => Math.min(v, 20)));
    panel(top + 16 + PH + GAP, 'ms: guest write p50 in QEMU (grey); judged latency (green), limit (red dashed)', msMax, (y) => {
      for (const seg of binnedSegments(s.writeP50, 1)) poly(seg, '#888', y);
      poly(steps(s.moderation.map((m) => ({ t: m.t, v: m.latencyMs }))), '#2ca02c', y);
      poly(steps(s.moderation.map((m) => ({ t: m.t, v: m.limitMs }))), '#d62728', y, '5,3');
    }, r);
    const reqMax = Math.max(10, ...finite([...s.requests.map((q) => q.perS), ...s.moderation.map((m) => m.threshold)]));
    panel(top + 16 + 2 * (PH + GAP), 'disk requests/s (grey); threshold in force (black), learnt level (purple)', reqMax, (y) => {
      poly(s.requests.map((q) => [q.t, q.perS]), '#aaa', y);
      poly(steps(s.moderation.map((m) => ({ t: m.t, v: m.threshold }))), '#000', y);
      poly(steps(s.moderation.map((m) => ({ t: m.t, v: m.level }))), '#9467bd', y, '4,2');
    }, r);
  });
  out.push('</svg>');
  return out.join('\n');
}

async function report(results: RunResult[], finishes: Finish[], started: Date): Promise<void> {
  const vs = besideRef ? 'vs ref' : 'vs a';
  const rows = [
    [
      'profile',
      'mode',
      `busy MiB/s (kept${besideRef ? ' vs ref' : ''})`,
      `trickle flushes/s (kept${besideRef ? ' vs ref' : ''})`,
      'trickle mean ms (vs a)',
      `write p50 ms (${vs})`,
      `write p90 ms (${besideRef ? 'vs -' : 'vs a'})`,
      `flush p50 ms (${vs})`,
      'quiet copy MiB/s',
      'copy MiB/s',
      `≈ time to ${+(Number(args['size-mib']) / 1024).toFixed(1)} GiB`,
    ],
  ];
  for (const profile of profiles) {
    const of = (mode: Mode) => results.filter((r) => r.profile === profile && r.mode === mode);
    // "kept": each run against the reference guest in the same window (--reference guest), or
    // against (a) of its own round (--reference window); then the median of those ratios
    const kept = (mode: Mode, get: (r: RunResult | RefFigures) => number | null) =>
      medianOf(of(mode).map((r) => {
        const ref = besideRef ? r.ref : results.find((x) => x.profile === profile && x.mode === 'none' && x.round === r.round);
        const a = get(r);
        const b = ref ? get(ref) : null;
        return a === null || b === null || b === 0 ? null : a / b;
      }));
    for (const mode of modes) {
      const rs = of(mode);
      const busy = medianOf(rs.map((r) => r.busyMiBs));
      const copy = medianOf(rs.map((r) => r.copyMiBs));
      // Beside a reference guest, (a) too: how far two identical guests differ at all.
      const judged = besideRef || mode !== 'none';
      const keptBusy = judged ? kept(mode, (r) => r.busyMiBs) : null;
      const keptTrickle = judged ? kept(mode, (r) => r.trickleFlushesPerS) : null;
      const trickleRise = mode === 'none' || besideRef ? null : kept(mode, (r) => ('trickleMs' in r ? r.trickleMs : null));
      const lat = (get: (r: RunResult) => number | null, refGet: ((r: RunResult | RefFigures) => number | null) | null) => {
        const vs = judged && refGet ? kept(mode, refGet) : null;
        return profile === 'noisy' ? `${f2(medianOf(rs.map(get)))}${vs === null ? '' : ` (${pct(vs, 1)})`}` : '-';
      };
      const size = Number(args['size-mib']);
      rows.push([
        profile,
        LABEL[mode],
        `${f1(busy)}${keptBusy === null ? '' : ` (${pct(keptBusy, 1)})`}`,
        profile === 'noisy' ? `${f1(medianOf(rs.map((r) => r.trickleFlushesPerS)))}${keptTrickle === null ? '' : ` (${pct(keptTrickle, 1)})`}` : '-',
        profile === 'noisy' ? `${f2(medianOf(rs.map((r) => r.trickleMs)))}${trickleRise === null ? '' : ` (${pct(trickleRise, 1)})`}` : '-',
        lat((r) => r.writeP50, (r) => r.writeP50),
        // the reference guest's p90 is not kept: against (a) only
        lat((r) => r.writeP90, besideRef ? null : (r) => ('writeP90' in r ? r.writeP90 : null)),
        lat((r) => r.flushP50, (r) => r.flushP50),
        mode === 'none' ? '-' : f1(medianOf(rs.map((r) => r.quietMiBs))),
        mode === 'none' ? '-' : f1(copy),
        // under 0.1 MiB/s (a window's offsets read as -0.3 to 0.1 when the copy never ran)
        mode === 'none' || copy === undefined || copy === null || Number.isNaN(copy) ? '-' : copy < 0.1 ? 'never' : `${Math.round(size / copy / 60)} min`,
      ]);
    }
  }
  console.log(textTable(rows));
  const finishRows = [['profile', 'deadline', 'completed in', `guest busy MiB/s (${vs})`, 'copy MiB/s', 'decisions (progress records)']];
  for (const f of finishes) {
    const a = besideRef ? (f.refBusyMiBs ?? null) : medianOf(results.filter((r) => r.profile === f.profile && r.mode === 'none').map((r) => r.busyMiBs));
    finishRows.push([
      f.profile,
      f.deadline,
      f.tookS === null ? `not within ${(1.5 * f.deadlineS).toFixed(0)} s` : `${f.tookS.toFixed(0)} s (${pct(f.tookS, f.deadlineS)} of it)`,
      `${f1(f.busyMiBs)}${a === null || f.busyMiBs === null ? '' : ` (${pct(f.busyMiBs, a)})`}`,
      f1(f.copyMiBs),
      topDecisions(f.decisions),
    ]);
  }
  if (finishes.length) console.log(textTable(finishRows));
  await mkdir(args.out, { recursive: true });
  const stamp = started.toISOString().replace(/[:.]/g, '-');
  await writeFile(path.join(args.out, `profiles-${stamp}.json`), JSON.stringify({ args, results, finishes }, null, 2));
  const md = [
    `# Three guest profiles under idlecrypt's moderation (issue 12)`,
    '',
    `Run ${started.toISOString()} on ${os.hostname()} (${os.cpus().length} CPUs): ${rounds} rounds of ${windowMs / 1000} s windows, ${sizeMiB} MiB disk, cache=none, TCG.`,
    besideRef
      ? '"kept" and "vs ref": each run against a second guest beside it (the same guest and workload, never copied) in the same window, then the median over rounds; (a)\'s row is how far the two differ without a copy.'
      : '"kept" and "vs a": each run against (a) of the same round, then the median over rounds.',
    `Command: \`node --import tsx bench/profiles.ts ${process.argv.slice(2).join(' ')}\``,
    '',
    mdTable(rows),
    '',
    ...profiles.flatMap((p) => [`![${p}](profiles-${p}-${stamp}.svg)`, '']),
    ...(finishes.length
      ? [`## Run to completion under a deadline (--finish ${args.finish}, (e)'s policy)`, '', "Guest throughput over the copy's whole run (busy phases), against (a)'s median in the rounds.", '', mdTable(finishRows), '']
      : []),
    '## Every run',
    '',
    mdTable([
      ['profile', 'mode', 'round', 'busy MiB/s (ref)', 'trickle flushes/s (ref)', 'trickle ms', 'write p50 / p90, flush p50 ms (ref p50)', 'quiet copy MiB/s', 'copy MiB/s', 'decisions (progress records)'],
      ...results.map((r) => [
        r.profile,
        r.mode,
        String(r.round),
        `${f1(r.busyMiBs)}${r.ref ? ` (${f1(r.ref.busyMiBs)})` : ''}`,
        `${f1(r.trickleFlushesPerS)}${r.ref ? ` (${f1(r.ref.trickleFlushesPerS)})` : ''}`,
        r.trickleMs === null ? '-' : r.trickleMs.toFixed(2),
        `${f2(r.writeP50)} / ${f2(r.writeP90)}, ${f2(r.flushP50)}${r.ref ? ` (${f2(r.ref.writeP50)})` : ''}`,
        f1(r.quietMiBs),
        f1(r.copyMiBs),
        r.decisions ? topDecisions(r.decisions) : '',
      ]),
    ]),
    '',
  ].join('\n');
  for (const p of profiles) {
    try {
      await writeFile(path.join(args.out, `profiles-${p}-${stamp}.svg`), profileSvg(p, results.filter((r) => r.profile === p && r.round === rounds && r.mode !== 'none')));
    } catch (err) {
      process.stderr.write(`plot of ${p} failed: ${String(err)}\n`); // the table stands without it
    }
  }
  const file = path.join(args.out, `profiles-report-${stamp}.md`);
  await writeFile(file, md);
  process.stderr.write(`wrote ${file}\n`);
}

await main();
