/**
 * Issue 10, point 5: does `protect: storage` protect a busy neighbour? Two test guests on
 * the same host filesystem:
 *   A  idle; its disk (--size-mib, pattern-filled raw) is what `idlecrypt agent` encrypts,
 *   B  bursty (--idle s idle / --busy s busy, 1 MiB O_DIRECT reads and writes), not in the
 *      agent's configuration: only a neighbour.
 * B's busy-phase throughput is measured under three modes, in rounds that rotate their order
 * (drift on these shared machines then hits every mode alike):
 *   (ref)      no copy: A idle beside B,
 *   (storage)  the agent encrypts A's disk with `protect: storage` (the default): A's copy
 *              runs at its idle speed only while every guest on the same storage is quiet,
 *   (vm)       the same with `protect: vm`: moderated by A's own activity alone (A is idle,
 *              so its copy runs flat out whatever B does).
 * The shipped default policy, max-jobs 1, no host ceiling. B keeps running through the whole
 * benchmark; A boots afresh on its source for each run (the agent pivots it onto the LUKS
 * image), with a fresh state directory.
 *
 * Measured from the host (test/helpers/moderation-lab.ts, as the acceptance tests do): B's
 * throughput by query-blockstats of its device (its own requests), over each busy phase
 * that lay wholly inside A's copy (from its first offset to READY); (ref) over the next
 * phases. A's copy speed by query-block-jobs offsets in B's idle phases, from 1.5 s in
 * (window + hold-off). Both polled every 100 ms.
 *
 *   node --import tsx bench/neighbours.ts [--rounds 2] [--size-mib 4096] [--phases 4]
 *        [--idle 4] [--busy 4] [--cache none] [--out bench/results]
 *
 * Prints the table and writes bench/results/neighbours-<time>.json.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ensureImage, makeDiskImage } from '../vm-images/launch.ts';
import { writeKey } from '../test/helpers/images.ts';
import { GuestLab, MiB, guestBytes, jobOffset, median, mibps, now, rateOver, sleepUntil, type GuestRecorder, type Phase } from '../test/helpers/moderation-lab.ts';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '2' },
    'size-mib': { type: 'string', default: '4096' },
    phases: { type: 'string', default: '4' },
    idle: { type: 'string', default: '4' },
    busy: { type: 'string', default: '4' },
    cache: { type: 'string', default: 'none' },
    out: { type: 'string', default: 'bench/results' },
  },
});
const ROUNDS = Number(values.rounds);
const SIZE_MIB = Number(values['size-mib']);
const PHASES = Number(values.phases);
const CACHE = values.cache as 'none' | 'writeback';
const BIN = path.resolve('bin/idlecrypt');
type Mode = 'ref' | 'storage' | 'vm';
const MODES: Mode[] = ['ref', 'storage', 'vm'];

interface RunResult {
  mode: Mode;
  round: number;
  /** B's busy-phase throughputs, bytes/s */
  busy: number[];
  /** A's copy speed in B's idle phases (after 1.5 s), bytes/s */
  copyIdle: number[];
  /** A's copy speed in B's busy phases, bytes/s */
  copyBusy: number[];
}

async function main(): Promise<void> {
  ensureImage();
  const dir = await mkdtemp(path.join(tmpdir(), 'ic-nb-'));
  const lab = new GuestLab();
  const results: RunResult[] = [];
  try {
    const srcA = path.join(dir, 'a.raw');
    const srcB = path.join(dir, 'b.raw');
    await makeDiskImage(srcA, { sizeMiB: SIZE_MIB, format: 'raw', fill: 'pattern' });
    await makeDiskImage(srcB, { sizeMiB: 256, format: 'raw', fill: 'pattern' });
    await writeKey(path.join(dir, 'nb-a.key'), 'neighbours bench key');
    const b = await lab.boot(dir, { name: 'nb-b', disk: srcB, cache: CACHE, workload: 'bursty', params: { idle: Number(values.idle), busy: Number(values.busy) } });
    await b.rec.poll({ intervalMs: 100, stats: true, jobs: false });
    for (let round = 0; round < ROUNDS; round++) {
      const order = MODES.map((_, i) => MODES[(i + round) % MODES.length]!);
      for (const mode of order) {
        const r = await run(dir, lab, b.rec, srcA, mode, round);
        results.push(r);
        console.log(`round ${round + 1} ${mode.padEnd(7)}: B busy ${r.busy.map((x) => mibps(x)).join(' ')} MiB/s; A's copy in B's idle phases ${r.copyIdle.map((x) => mibps(x)).join(' ') || '-'}, busy ${r.copyBusy.map((x) => mibps(x)).join(' ') || '-'} MiB/s`);
      }
    }
  } finally {
    await lab.stopAll();
    await rm(dir, { recursive: true, force: true });
  }

  // Per round: kept = median of the mode's busy phases / median of ref's in that round.
  const table = (['storage', 'vm'] as const).map((mode) => {
    const kept = [...Array(ROUNDS).keys()].map((round) => {
      const ref = median(results.find((r) => r.round === round && r.mode === 'ref')!.busy);
      return median(results.find((r) => r.round === round && r.mode === mode)!.busy) / ref;
    });
    const copy = results.filter((r) => r.mode === mode);
    return { mode, kept, keptMedian: median(kept), copyIdleMiBps: median(copy.flatMap((r) => r.copyIdle)) / MiB, copyBusyMiBps: median(copy.flatMap((r) => r.copyBusy)) / MiB };
  });
  const ref = median(results.filter((r) => r.mode === 'ref').flatMap((r) => r.busy));
  console.log(`\nB's busy-phase throughput without a copy beside it: ${mibps(ref)} MiB/s (median over ${ROUNDS} rounds)`);
  console.log('| protect | B keeps (median of rounds) | per round | A\'s copy in B\'s idle phases | in B\'s busy phases |');
  console.log('| --- | --- | --- | --- | --- |');
  for (const t of table) {
    console.log(`| ${t.mode} | ${(100 * t.keptMedian).toFixed(1)}% | ${t.kept.map((k) => `${(100 * k).toFixed(1)}%`).join(', ')} | ${t.copyIdleMiBps.toFixed(0)} MiB/s | ${t.copyBusyMiBps.toFixed(0)} MiB/s |`);
  }
  const time = new Date().toISOString();
  await mkdir(values.out!, { recursive: true });
  const out = path.join(values.out!, `neighbours-${time.replace(/[:.]/g, '-')}.json`);
  await writeFile(out, JSON.stringify({ time, sizeMiB: SIZE_MIB, cache: CACHE, phases: PHASES, rounds: ROUNDS, table, runs: results }, null, 2));
  console.log(`wrote ${out}`);
}

/** One mode: A boots on its source; with an agent, B's busy phases inside A's copy are measured. */
async function run(dir: string, lab: GuestLab, b: GuestRecorder, srcA: string, mode: Mode, round: number): Promise<RunResult> {
  const base = path.join(dir, `r${round}-${mode}`);
  await mkdir(base);
  const a = await lab.boot(base, { name: 'nb-a', disk: srcA, cache: CACHE, workload: 'idle' });
  await a.rec.poll({ intervalMs: 100, stats: false, jobs: true });
  let agent: ChildProcess | undefined;
  const target = path.join(base, 'nb-a.luks');
  try {
    let from: number;
    let until: () => number;
    if (mode === 'ref') {
      from = now();
      until = () => Infinity;
    } else {
      const cfg = path.join(base, 'agent.yaml');
      await writeFile(cfg, ['host:', '  max-jobs: 1', `  protect: ${mode}`, 'encrypt:', '  - vm: nb-a', '    disks: [disk0]', `    target: ${target}`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${a.vm.toolQmpSocket}`, ''].join('\n'));
      agent = spawn(BIN, ['agent', '--config', cfg, '--iter-time', '50', '--log-level', 'warn'], {
        env: { ...process.env, IDLECRYPT_RUN_DIR: path.join(base, 'run'), IDLECRYPT_STATE_DIR: path.join(base, 'state') },
        stdio: ['ignore', 'ignore', 'inherit'],
      });
      // From the copy's first progress to READY (or the end of the measurement).
      from = await waitFor(() => a.rec.samples.find((s) => s.job && s.job.offset > 0)?.t, 90_000, 'A\'s copy running');
      until = () => a.rec.samples.find((s) => s.t > from && (s.job === null || s.job?.ready))?.t ?? Infinity;
    }
    // PHASES whole busy phases of B after `from`, all before `until`.
    const busyInside = (): Phase[] => b.phases().filter((p) => p.kind === 'busy' && p.start >= from && p.end !== Infinity && p.end <= until());
    const deadline = now() + PHASES * 2 * 30_000;
    while (busyInside().length < PHASES && until() === Infinity && now() < deadline) await sleepUntil(now() + 200);
    const busy = busyInside().slice(0, PHASES);
    if (busy.length === 0) throw new Error(`${mode}: no busy phase of B lay inside A's copy; use a larger --size-mib`);
    const last = busy.at(-1)!.end;
    const idle = b.phases().filter((p) => p.kind === 'idle' && p.start >= from && p.end <= Math.min(last, until()));
    return {
      mode,
      round,
      busy: busy.map((p) => rateOver(b.samples, p.start, p.end, guestBytes)!).filter((x) => x !== undefined),
      copyIdle: mode === 'ref' ? [] : idle.map((p) => rateOver(a.rec.samples, p.start + 1500, p.end, jobOffset)).filter((x): x is number => x !== undefined),
      copyBusy: mode === 'ref' ? [] : busy.map((p) => rateOver(a.rec.samples, p.start, p.end, jobOffset)).filter((x): x is number => x !== undefined),
    };
  } finally {
    if (agent && agent.exitCode === null) {
      agent.kill('SIGTERM'); // leaves the copy paused; A's QEMU goes next, and the copy with it
      await new Promise((r) => agent!.once('exit', r));
    }
    await a.rec.stop();
    await a.vm.stop();
    await rm(target, { force: true });
  }
}

async function waitFor(fn: () => number | undefined, ms: number, what: string): Promise<number> {
  const end = now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (now() > end) throw new Error(`${what}: not within ${ms / 1000} s`);
    await sleepUntil(now() + 100);
  }
}

await main();
