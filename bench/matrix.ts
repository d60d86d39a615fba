/**
 * Issue 9's matrix: disk {64 GiB sparse raw, fully allocated raw, 64 GiB sparse qcow2} x host
 * cache {writeback, none} x guest workload {one-at-a-time 64 KiB direct I/O, the bursty 1 MiB
 * workload, a trickle of small synchronous writes with bursts}: 18 cells, judged against the
 * issue's bounds:
 *   kept      idlecrypt's guest throughput in busy phases against the same guest's without a
 *             copy: >= 93%
 *   trickle   the trickle's own rate (its flushes per second) over the copy and in its worst phase
 *             (side by side; the guest's throughput over idle phases in the sequential method)
 *             (trickle cells only): >= 90%
 *   reaction  busy-phase start to the job slowed, largest over the cell's phases: <= 500 ms
 *   idle      idlecrypt's job speed in idle phases after the hold-off against an unthrottled
 *             mirror's: >= 80%
 *
 * --method side-by-side (default): each cell and round is test/helpers/matrix-cell.ts, the
 *   measurement test/moderation/starved.test.ts makes of two cells: the moderated guest, the
 *   same guest without a copy and an idle guest whose unthrottled mirror runs in one of the
 *   moderated guest's idle phases, all three at once, so that they share the host's moment;
 *   the copy is cancelled after three busy phases. About 80 s a cell and round.
 * --method sequential: each cell is one run of bench/moderation.ts with the modes (a) no job,
 *   (b) an unthrottled mirror and (d) idlecrypt's default policy, one guest at a time, every
 *   copy stopped after --max-copy-s. Where (b) froze the guest (no phase line came while it
 *   ran) its idle-phase speed cannot be measured; its average over the whole copy stands in
 *   (marked ~). About 3.5 minutes a cell and round. Kept for comparison with the first run.
 *
 *   node --import tsx bench/matrix.ts [--method side-by-side|sequential] [--rounds 1]
 *        [--disks sparse-raw,raw,sparse-qcow2[,thin-qcow2]] [--caches writeback,none]
 *        [--workloads oneatatime,bursty,trickle] [--policy FILE] [--warm-up-s 0] [--iothread] [--cmp-beside idle|background]
 *        [--writer shell|proc] [--encrypter qemu|storage-daemon] [--cmp-encrypter qemu|storage-daemon]
 *        [--out bench/results/matrix]
 *        sequential only: [--max-copy-s 48] [--raw-mib 6144] [--sparse-mib 65536]
 *
 * --policy runs idlecrypt under that policy file instead of the shipped default (side by side
 * only): bench/policies/noflush.yaml, say, for writeback targets left to the kernel.
 * --warm-up-s N runs the moderated command for N s before each measured run and cancels it,
 * so that what `thresholds: auto` learns of the guest (kept per guest) is there from the
 * measured run's start, as for a guest the agent has watched (learning needs a minute).
 * --iothread gives every guest's disk an iothread (side by side only): QEMU then serves the
 * guest's requests and runs the mirror in that thread, not in its main loop.
 * --cmp-beside background (side by side only) gives the unthrottled mirror's guest the trickle's
 * background (its writes and flushes, no busy phases) in trickle cells, instead of nothing:
 * the mirror then runs beside what mod's idle phases hold, as an unthrottled copy of mod would.
 * --encrypter (side by side only) is idlecrypt's `--encrypter` for the moderated run and the
 * unthrottled mirror both (default storage-daemon, idlecrypt's own default; qemu: the guest's
 * QEMU encrypts); --cmp-encrypter gives the unthrottled mirror another. The sequential method
 * runs bench/moderation.ts, whose runs take idlecrypt's default.
 * --writer proc makes the trickle's writes from one long-lived process in the guest
 * (vm-images/guest/icwriter.c, as a database's log writer) instead of a shell loop forking `dd`
 * for each (shell, the default), which under TCG also keeps the guest's vCPU a quarter busy.
 * Every disk is copied into raw LUKS (--format luks): the sparse qcow2 one too, whose holes
 * are then encrypted as a sparse raw disk's are. The disk thin-qcow2 (side by side only) is
 * what `--format auto`, the default, makes of a qcow2 disk: 64 GiB holding 8 GiB of the
 * allocated disk's pattern at its start, copied into qcow2 with LUKS encryption (holes cost
 * nothing; the copy is cancelled before it reaches them).
 * Writes <out>/matrix-report.md (the table, each cell's figures), <out>/matrix-<time>.svg (side by side: each cell's last round over time) and <out>/matrix-<time>.json;
 * each cell's directory <out>/<disk>-<cache>-<workload>/ keeps every round's moderated run:
 * its progress records (decisions, the headroom's cap, the main loop's load), log, metrics and
 * the guest's phases on the host's clock (`round<N>-mod.phases.json`).
 * Run nothing else meanwhile.
 */
import { spawn } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { GuestLab, measurable, median, medianOf as med, type Reaction } from '../test/helpers/moderation-lab.ts';
import { CELL_DISKS, CELL_WORKLOADS, measureCell, type CellDisk, type CellFigures, type CellSeries, type CellWorkload } from '../test/helpers/matrix-cell.ts';
import { writeKey } from '../test/helpers/images.ts';
import { binnedSegments, polyline, xmlEscape } from './svg.ts';
import { ensureImage } from '../vm-images/launch.ts';

const { values } = parseArgs({
  options: {
    method: { type: 'string', default: 'side-by-side' },
    policy: { type: 'string' },
    'warm-up-s': { type: 'string', default: '0' },
    iothread: { type: 'boolean', default: false },
    'cmp-beside': { type: 'string', default: 'idle' },
    writer: { type: 'string', default: 'shell' },
    encrypter: { type: 'string', default: 'storage-daemon' },
    'cmp-encrypter': { type: 'string' },
    rounds: { type: 'string', default: '1' },
    'max-copy-s': { type: 'string', default: '48' },
    'sparse-mib': { type: 'string', default: '65536' },
    'raw-mib': { type: 'string', default: '6144' },
    disks: { type: 'string', default: 'sparse-raw,raw,sparse-qcow2' },
    caches: { type: 'string', default: 'writeback,none' },
    workloads: { type: 'string', default: 'oneatatime,bursty,trickle' },
    out: { type: 'string', default: 'bench/results/matrix' },
  },
});

const KEPT_MIN = 0.93;
const TRICKLE_MIN = 0.9;
const REACTION_MAX_MS = 500;
/** Issue 12's bound for the keyboard (bursty profile): the job paused within 250 ms of a key. */
const KEY_PAUSE_MAX_MS = 250;
const IDLE_MIN = 0.8;
const MiB = 1024 * 1024;

interface Run {
  mode: string;
  guestBusyBps: number | null;
  guestIdleBps?: number | null;
  jobIdleAfterHoldoffBps: number | null;
  bytesCopied: number | null;
  from: number;
  to: number;
  reactionsMs: number[];
  reactionsSkipped: number;
  totalS: number | null;
}

interface Cell {
  disk: string;
  cache: string;
  workload: string;
  dir: string;
  error?: string;
  kept?: number | null;
  trickle?: number | null;
  /** side by side: the trickle's worst phase over the rounds (the bound holds all the time) */
  trickleWorst?: number | null;
  reactionMaxMs?: number | null;
  reactionP50Ms?: number | null;
  reactions?: number;
  /** side by side: the first key typed to the job paused, ms, over the rounds where the job ran at that key (median / max) */
  keyPauseP50Ms?: number | null;
  keyPauseMaxMs?: number | null;
  keyPauses?: number;
  idle?: number | null;
  idleFromWholeCopy?: boolean;
  unthrottledBps?: number | null;
  idlecryptIdleBps?: number | null;
  referenceBusyBps?: number | null;
  /** side by side: the host's dirty + writeback memory, MiB, most over the copy and at busy phases' starts (medians over rounds) */
  dirtyMaxMiB?: number | null;
  dirtyAtBusyMiB?: number | null;
  /** side by side: each round's figures as lines */
  rounds?: string[][];
  /** side by side: the last round over time, for the report's plot */
  series?: CellSeries;
  met?: boolean;
}

const method = values.method === 'sequential' ? 'sequential' : values.method === 'side-by-side' ? 'side-by-side' : null;
if (!method) throw new Error('--method side-by-side|sequential');
if (values.policy && method === 'sequential') throw new Error('--policy is for --method side-by-side (bench/moderation.ts takes its own --policy)');
if (values.iothread && method === 'sequential') throw new Error('--iothread is for --method side-by-side');
const cmpBeside = values['cmp-beside'];
if (cmpBeside !== 'idle' && cmpBeside !== 'background') throw new Error('--cmp-beside idle|background');
if (cmpBeside === 'background' && method === 'sequential') throw new Error('--cmp-beside is for --method side-by-side');
const writer = values.writer;
if (writer !== 'shell' && writer !== 'proc') throw new Error('--writer shell|proc');
if (writer === 'proc' && method === 'sequential') throw new Error('--writer is for --method side-by-side');
if (method === 'sequential' && String(values.disks).split(',').includes('thin-qcow2')) throw new Error('the disk thin-qcow2 is for --method side-by-side');
const policy = values.policy ? path.resolve(values.policy) : undefined;
const encrypter = values.encrypter;
const cmpEncrypter = values['cmp-encrypter'] ?? encrypter;
for (const e of [encrypter, cmpEncrypter]) if (e !== 'qemu' && e !== 'storage-daemon') throw new Error(`--encrypter: qemu or storage-daemon, not ${e}`);
if ((encrypter !== 'storage-daemon' || cmpEncrypter !== 'storage-daemon') && method === 'sequential') throw new Error('--encrypter is for --method side-by-side');
const disks = values.disks!.split(',');
const caches = values.caches!.split(',');
const workloads = values.workloads!.split(',');
const outDir = values.out!;
const startedAt = new Date();

const ratio = (a: number | null, b: number | null): number | null => (a !== null && b ? a / b : null);

function runCell(disk: string, cache: string, workload: string, dir: string): Promise<void> {
  const size = disk === 'raw' ? values['raw-mib']! : values['sparse-mib']!;
  const args = ['--import', 'tsx', 'bench/moderation.ts', '--rounds', values.rounds!, '--size-mib', size, '--max-copy-s', values['max-copy-s']!, '--bounded', '--modes', 'none,unthrottled,idlecrypt', '--disk', disk, '--cache', cache, '--workload', workload, '--out', dir];
  process.stderr.write(`\n== ${disk} cache=${cache} ${workload}: node ${args.join(' ')}\n`);
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`bench/moderation.ts exited ${code}`))));
  });
}

function judge(cell: Cell, runs: Run[]): void {
  const of = (mode: string) => runs.filter((r) => r.mode === mode);
  const none = of('none');
  const unthrottled = of('unthrottled');
  const ic = of('idlecrypt');
  cell.referenceBusyBps = med(none.map((r) => r.guestBusyBps));
  cell.kept = ratio(med(ic.map((r) => r.guestBusyBps)), cell.referenceBusyBps);
  if (cell.workload === 'trickle') cell.trickle = ratio(med(ic.map((r) => r.guestIdleBps)), med(none.map((r) => r.guestIdleBps)));
  const reactions = ic.flatMap((r) => r.reactionsMs);
  cell.reactions = reactions.length;
  cell.reactionMaxMs = reactions.length ? Math.max(...reactions) : null;
  cell.reactionP50Ms = reactions.length ? median(reactions) : null;
  let unthrottledBps = med(unthrottled.map((r) => r.jobIdleAfterHoldoffBps));
  if (unthrottledBps === null) {
    unthrottledBps = med(unthrottled.map((r) => (r.bytesCopied !== null && r.to > r.from ? r.bytesCopied / ((r.to - r.from) / 1000) : null)));
    cell.idleFromWholeCopy = unthrottledBps !== null;
  }
  cell.unthrottledBps = unthrottledBps;
  cell.idlecryptIdleBps = med(ic.map((r) => r.jobIdleAfterHoldoffBps));
  cell.idle = ratio(cell.idlecryptIdleBps, unthrottledBps);
  cell.met = isMet(cell);
}

/** Side by side: medians over the cell's rounds; reactions pooled. */
function judgeSideBySide(cell: Cell, rounds: CellFigures[]): void {
  cell.kept = med(rounds.map((f) => f.kept));
  if (cell.workload === 'trickle') {
    cell.trickle = med(rounds.map((f) => f.trickleKept));
    const worst = rounds.flatMap((f) => (f.trickleWorstPhase === null ? [] : [f.trickleWorstPhase]));
    cell.trickleWorst = worst.length ? Math.min(...worst) : null;
  }
  /** The reactions that could be measured (the job ran at that moment): their ms. */
  const ms = (rs: (Reaction | undefined)[]) => rs.flatMap((r) => (r && measurable(r) && r.ms !== undefined ? [r.ms] : []));
  const reactions = ms(rounds.flatMap((f) => f.reactions.map((x) => x.r)));
  cell.reactions = reactions.length;
  cell.reactionMaxMs = reactions.length ? Math.max(...reactions) : null;
  cell.reactionP50Ms = reactions.length ? median(reactions) : null;
  const keyPauses = ms(rounds.map((f) => f.keyReaction));
  cell.keyPauses = keyPauses.length;
  cell.keyPauseP50Ms = keyPauses.length ? median(keyPauses) : null;
  cell.keyPauseMaxMs = keyPauses.length ? Math.max(...keyPauses) : null;
  cell.unthrottledBps = med(rounds.map((f) => f.cmpBps));
  cell.idlecryptIdleBps = med(rounds.map((f) => f.idleBps));
  cell.idle = med(rounds.map((f) => f.idleRel));
  cell.dirtyMaxMiB = med(rounds.map((f) => f.dirtyMaxMiB));
  cell.dirtyAtBusyMiB = med(rounds.map((f) => f.dirtyAtBusyMiB));
  cell.rounds = rounds.map((f) => [...f.lines]);
  cell.series = rounds.at(-1)?.series;
  cell.met = isMet(cell);
}

/** The trickle's rate over the copy, and in its worst phase where measured (side by side): both >= 90%. */
function trickleMet(cell: Cell): boolean {
  return cell.trickle != null && cell.trickle >= TRICKLE_MIN && (cell.trickleWorst == null || cell.trickleWorst >= TRICKLE_MIN);
}

function isMet(cell: Cell): boolean {
  return (
    cell.kept != null &&
    cell.kept >= KEPT_MIN &&
    (cell.workload !== 'trickle' || trickleMet(cell)) &&
    cell.reactionMaxMs != null &&
    cell.reactionMaxMs <= REACTION_MAX_MS &&
    cell.idle != null &&
    cell.idle >= IDLE_MIN
  );
}

const cells: Cell[] = [];
await mkdir(outDir, { recursive: true });
const lab = new GuestLab();
let keyFile = '';
if (method === 'side-by-side') {
  ensureImage();
  keyFile = path.join(await mkdtemp(path.join(tmpdir(), 'ic-matrix-key-')), 'key');
  await writeKey(keyFile, 'matrix key');
}
for (const disk of disks) {
  for (const cache of caches) {
    for (const workload of workloads) {
      const dir = path.join(outDir, `${disk}-${cache}-${workload}`);
      const cell: Cell = { disk, cache, workload, dir };
      cells.push(cell);
      try {
        if (method === 'sequential') {
          await mkdir(dir, { recursive: true });
          await runCell(disk, cache, workload, dir);
          const json = (await readdir(dir)).filter((f) => /^moderation-.*\.json$/.test(f)).sort().at(-1);
          if (!json) throw new Error('no results file');
          const data = JSON.parse(await readFile(path.join(dir, json), 'utf8')) as { runs: Run[] };
          judge(cell, data.runs);
        } else {
          if (!(disk in CELL_DISKS) || !(workload in CELL_WORKLOADS) || (cache !== 'writeback' && cache !== 'none')) throw new Error(`unknown cell ${disk} ${cache} ${workload}`);
          const figures: CellFigures[] = [];
          for (let round = 0; round < Number(values.rounds); round++) {
            process.stderr.write(`\n== ${disk} cache=${cache} ${workload}, round ${round + 1}/${values.rounds}\n`);
            const base = await mkdtemp(path.join(tmpdir(), 'ic-matrix-'));
            try {
              figures.push(
                await measureCell(lab, base, {
                  disk: disk as CellDisk,
                  cache,
                  workload: workload as CellWorkload,
                  keyFile,
                  modArgs: [...(policy ? ['--policy', policy] : []), '--encrypter', encrypter],
                  cmpArgs: ['--encrypter', cmpEncrypter],
                  ...(Number(values['warm-up-s']) > 0 ? { warmUpMs: Number(values['warm-up-s']) * 1000 } : {}),
                  ...(values.iothread ? { iothread: true } : {}),
                  ...(cmpBeside === 'background' ? { cmpBeside } : {}),
                  ...(writer === 'proc' ? { writer } : {}),
                  note: (l) => process.stderr.write(`   ${l}\n`),
                }),
              );
            } finally {
              await lab.stopAll();
              // Each round's moderated run, kept: its progress records, log, metrics file and phases.
              await mkdir(dir, { recursive: true });
              for (const f of ['mod.progress.ndjson', 'mod.log', 'mod.lp', 'mod.phases.json']) await copyFile(path.join(base, f), path.join(dir, `round${round + 1}-${f}`)).catch(() => {});
              await rm(base, { recursive: true, force: true });
            }
          }
          judgeSideBySide(cell, figures);
        }
      } catch (e) {
        cell.error = (e as Error).message.split('\n')[0]!;
        process.stderr.write(`${(e as Error).message}\n`);
        await lab.stopAll();
      }
      process.stderr.write(`== ${line(cell)}\n`);
      await writeReport();
    }
  }
}
if (keyFile) await rm(path.dirname(keyFile), { recursive: true, force: true });
process.stderr.write(`report: ${path.join(outDir, 'matrix-report.md')}\n`);

function pct(x: number | null | undefined): string {
  return x === null || x === undefined ? '-' : `${(100 * x).toFixed(0)}%`;
}

function line(c: Cell): string {
  if (c.error) return `${c.disk} ${c.cache} ${c.workload}: failed: ${c.error}`;
  return `${c.disk} ${c.cache} ${c.workload}: kept ${pct(c.kept)}${c.workload === 'trickle' ? `, trickle ${pct(c.trickle)}` : ''}, reaction max ${c.reactionMaxMs?.toFixed(0) ?? '-'} ms, idle ${pct(c.idle)}${c.met ? ', met' : ''}`;
}

async function writeReport(): Promise<void> {
  const mark = (ok: boolean | null) => (ok === null ? '' : ok ? '' : ' ✗');
  const rows = cells.map((c) =>
    c.error
      ? [c.disk, c.cache, c.workload, `failed: ${c.error}`, '', '', '', '', '', '']
      : [
          c.disk,
          c.cache,
          c.workload,
          `${pct(c.kept)}${mark(c.kept == null ? null : c.kept >= KEPT_MIN)}`,
          c.workload === 'trickle'
            ? `${pct(c.trickle)}${c.trickleWorst == null ? '' : `, worst phase ${pct(c.trickleWorst)}`}${mark(c.trickle == null ? null : trickleMet(c))}`
            : '',
          c.reactionMaxMs == null ? `- (n=0)` : `${c.reactionP50Ms!.toFixed(0)} / ${c.reactionMaxMs.toFixed(0)} (n=${c.reactions})${mark(c.reactionMaxMs <= REACTION_MAX_MS)}`,
          c.keyPauseMaxMs == null ? `- (n=${c.keyPauses ?? 0})` : `${c.keyPauseP50Ms!.toFixed(0)} / ${c.keyPauseMaxMs.toFixed(0)} (n=${c.keyPauses})${mark(c.keyPauseMaxMs <= KEY_PAUSE_MAX_MS)}`,
          `${pct(c.idle)}${c.idleFromWholeCopy ? ' ~' : ''}${mark(c.idle == null ? null : c.idle >= IDLE_MIN)}`,
          `${c.idlecryptIdleBps == null ? '-' : (c.idlecryptIdleBps / MiB).toFixed(0)} / ${c.unthrottledBps == null ? '-' : (c.unthrottledBps / MiB).toFixed(0)}`,
          method === 'sequential' ? `[report](${path.relative(outDir, c.dir)}/moderation-report.md)` : `${c.dirtyMaxMiB == null ? '-' : c.dirtyMaxMiB.toFixed(0)} / ${c.dirtyAtBusyMiB == null ? '-' : c.dirtyAtBusyMiB.toFixed(0)}`,
        ],
  );
  const head = ['disk', 'cache', 'workload', `busy kept (>= ${KEPT_MIN * 100}%)`, `trickle kept (>= ${TRICKLE_MIN * 100}%)`, `reaction p50 / max ms (<= ${REACTION_MAX_MS})`, `key pause p50 / max ms (<= ${KEY_PAUSE_MAX_MS})`, `idle copy vs unthrottled (>= ${IDLE_MIN * 100}%)`, 'idle copy / unthrottled MiB/s', method === 'sequential' ? 'cell' : 'host dirty MiB: most / at busy starts'];
  const table = [head, head.map(() => '---'), ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
  const met = cells.filter((c) => c.met).length;
  const plotted = cells.filter((c): c is Cell & { series: CellSeries } => c.series !== undefined);
  const svgName = `matrix-${startedAt.toISOString().replace(/[:.]/g, '-')}.svg`;
  const report = `# Issue 9's matrix

${startedAt.toISOString()}, ${os.hostname()}: ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB.
Command: \`node --import tsx bench/matrix.ts --method ${method} --rounds ${values.rounds}${method === 'sequential' ? ` --max-copy-s ${values['max-copy-s']} --sparse-mib ${values['sparse-mib']} --raw-mib ${values['raw-mib']}` : ''}${policy ? ` --policy ${values.policy}` : ''}${Number(values['warm-up-s']) > 0 ? ` --warm-up-s ${values['warm-up-s']}` : ''}${values.iothread ? ' --iothread' : ''}${cmpBeside === 'background' ? ' --cmp-beside background' : ''}${writer === 'proc' ? ' --writer proc' : ''}${method === 'side-by-side' ? ` --encrypter ${encrypter}` : ''}${cmpEncrypter !== encrypter ? ` --cmp-encrypter ${cmpEncrypter}` : ''} --disks ${values.disks} --caches ${values.caches} --workloads ${values.workloads}\`

${
  method === 'sequential'
    ? `Each cell: bench/moderation.ts with (a) no job, (b) an unthrottled mirror and (d) idlecrypt's default
policy, one guest at a time, ${values.rounds} round(s), every copy stopped after ${values['max-copy-s']} s. Sparse disks are
${Number(values['sparse-mib']) / 1024} GiB, the allocated raw disk ${Number(values['raw-mib']) / 1024} GiB.`
    : `Each cell, side by side (test/helpers/matrix-cell.ts): the guest encrypted by idlecrypt (${policy ? `policy ${values.policy}` : 'the shipped default policy'}), the same
guest without a copy, and ${cmpBeside === 'background' ? "a guest doing the trickle's background alone (in trickle cells; else idle)" : 'an idle guest'} whose unthrottled mirror runs in one idle phase of the first
(keys typed into it hold its copy meanwhile), all at once; ${values.rounds} round(s), medians over rounds,
the copy cancelled after three busy phases. Sparse disks are 64 GiB, the allocated raw disk 12 GiB (16 GiB with the trickle).`
} Workloads (8 s idle / 8 s busy): oneatatime, 64 KiB
O_DIRECT requests one at a time; bursty, 1 MiB O_DIRECT requests; trickle, oneatatime's phases over 15
4 KiB O_DIRECT writes a second, each flushed${writer === 'proc' ? ', from one long-lived process (--writer proc)' : ', a `dd` forked for each'}. ✗: outside issue 9's bound.${
  method === 'sequential' ? ' ~: (b) froze the guest, so\nits idle-phase speed could not be measured, and its average over the whole copy stands in.' : ' A negative reaction: the copy had\nslowed before the phase line reached the host (the guest\'s first requests came first).'
}

${met} of ${cells.length} cells meet every bound.

${table}
${plotted.length ? `\n![each cell's last round over time](${svgName})\n\nEach cell's last round over time (${svgName}): MiB/s of the moderated guest (blue) and of the same guest without a copy (grey), idlecrypt's copy (red) and the unthrottled mirror in its window (red, dashed); busy phases shaded, the keys' stretch in green.\n` : ''}
- **busy kept**: the guest's throughput over busy phases while idlecrypt's copy ran, against the same
  guest's without a copy (side by side: the nearest phase of the reference guest, at the same moment;
  sequential: (a) over the same stretch of the schedule); the ratio of the medians over phases.
  **trickle kept**: side by side, the trickle's flushes per second over the whole copy against the
  reference guest's over the same time (its 4 KiB writes are each flushed; the bursts' requests are
  not), and the same in its worst phase over the rounds (the bound holds all the time: a guest
  that loses its rate in an idle phase and catches up in the next busy one misses it); sequential,
  the guest's throughput over idle phases.
- **reaction**: from a busy phase's start (its PHASE line on the host, or the guest's first request when
  the line came later) to the job paused or slowed, for phases that began while the job ran at full speed.
- **key pause**: side by side, from the first key typed into the moderated guest (in an idle phase; the
  moment QEMU took it) to its job paused, in the rounds where the job ran at that moment (issue 12's
  bound, 250 ms; not part of issue 9's, so it does not decide "meets every bound").
- **idle copy**: idlecrypt's job speed in idle phases without each phase's first 1.5 s (window and
  hold-off), against the unthrottled mirror's (side by side: in the moderated guest's keyboard phase).
${
  method === 'side-by-side'
    ? `\n## Each cell's rounds\n\n${cells
        .filter((c) => c.rounds)
        .map((c) => `### ${c.disk}, cache=${c.cache}, ${c.workload}\n\n${c.rounds!.map((r, i) => `Round ${i + 1}:\n${r.map((l) => `- ${l}`).join('\n')}`).join('\n\n')}`)
        .join('\n\n')}\n`
    : ''
}`;
  if (plotted.length) await writeFile(path.join(outDir, svgName), cellsSvg(plotted));
  await writeFile(path.join(outDir, 'matrix-report.md'), report);
  await writeFile(path.join(outDir, `matrix-${startedAt.toISOString().replace(/[:.]/g, '-')}.json`), JSON.stringify({ startedAt, values, cells }, null, 1));
}

/** One panel per cell: its last round's guest and copy speeds over time (see the report's caption). */
function cellsSvg(plotted: readonly (Cell & { series: CellSeries })[]): string {
  const W = 960;
  const L = 50;
  const R = 20;
  const PH = 110;
  const GAP = 34;
  const H = 40 + plotted.length * (PH + GAP);
  const spanS = Math.max(1, ...plotted.map((c) => c.series.spanS));
  const x = (t: number) => L + ((W - L - R) * Math.max(0, Math.min(spanS, t))) / spanS;
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="20" font-size="14" font-weight="bold">${xmlEscape(`Issue 9's matrix, each cell's last round: MiB/s over seconds from the copy's start`)}</text>`,
  ];
  plotted.forEach((c, i) => {
    const s = c.series;
    const top = 44 + i * (PH + GAP);
    const all = [...s.modGuest, ...s.refGuest, ...s.copy, ...s.unthrottled].filter((v): v is number => v !== null);
    const yMax = Math.max(10, ...all);
    const y = (v: number) => top + PH - (PH * Math.min(Math.max(v, 0), yMax)) / yMax;
    const band = (b: { from: number; to: number }, fill: string) =>
      out.push(`<rect x="${x(b.from).toFixed(1)}" y="${top}" width="${Math.max(0, x(b.to) - x(b.from)).toFixed(1)}" height="${PH}" fill="${fill}"/>`);
    s.busy.forEach((b) => band(b, '#f3e3c8'));
    if (s.keys) band(s.keys, '#d8f0d8');
    out.push(`<rect x="${L}" y="${top}" width="${W - L - R}" height="${PH}" fill="none" stroke="#999"/>`);
    out.push(`<text x="${L}" y="${top - 6}" font-weight="bold">${xmlEscape(`${c.disk}, cache=${c.cache}, ${c.workload}: kept ${pct(c.kept)}, idle copy ${pct(c.idle)} of unthrottled`)}</text>`);
    out.push(`<text x="${L - 6}" y="${top + 10}" text-anchor="end">${yMax.toFixed(0)}</text><text x="${L - 6}" y="${top + PH}" text-anchor="end">0</text>`);
    out.push(`<text x="${x(s.spanS)}" y="${top + PH + 12}" text-anchor="end" fill="#666">${s.spanS.toFixed(0)} s</text>`);
    const line = (vals: readonly (number | null)[], colour: string, dash = '') => {
      for (const seg of binnedSegments(vals, s.binS)) if (seg.length > 1) out.push(polyline(seg, x, y, colour, dash));
    };
    line(s.refGuest, '#999');
    line(s.modGuest, '#1f77b4');
    line(s.copy, '#d62728');
    line(s.unthrottled, '#d62728', '5,3');
  });
  out.push('</svg>');
  return out.join('\n');
}
