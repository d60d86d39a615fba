/**
 * Issue 9, point 4: does starting `idlecrypt encrypt` stop the guest's I/O? The longest gap
 * in the guest's disk requests from the command's start until the copy runs, against the
 * same guest without the command over as long a stretch.
 *
 * The guest runs the `disk` workload (one-at-a-time 64 KiB O_DIRECT reads and writes, all
 * the time) on a sparse raw disk with cache=none. The harness polls the guest device's
 * request count (QMP query-blockstats, on its own monitor) every 20 ms; a gap is the time
 * between two polls that saw the count move. Per round, in this order:
 *   none        no command: the gaps of the guest alone, for as long as the slowest run
 *               below took to reach its copy
 *   qemu-img    `idlecrypt encrypt` as shipped: the LUKS header is written by qemu-img in a
 *               process of its own (--iter-time, default 2000 ms, as cryptsetup), and opened
 *               with the run's random opening key (key slot 0, a 10 ms PBKDF;
 *               src/encrypt/target.ts) since 2026-12-02; before, with the key file's key (the
 *               full iter-time in QEMU's main loop). Since 2026-12-05 the image is opened by
 *               a qemu-storage-daemon (the default encrypter), and the guest's QEMU opens an
 *               NBD client. Run this file from a checkout of an earlier commit for those figures.
 *   in-qemu     `--encrypter qemu` with no qemu-img on its PATH: the header is made by QMP
 *               blockdev-create in the guest's QEMU, as before issue 9 (the fallback)
 * The command's copy is cancelled once it runs (moderated: it is paused for this busy
 * guest anyway). Rounds alternate the order of the two commands.
 *
 *   node --import tsx bench/start-stall.ts [--rounds 3] [--iter-time 2000]
 *
 * Prints a table (median over rounds of each run's longest gap, and of its 99th percentile
 * gap) and writes bench/results/start-stall-<time>.json.
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { ensureImage, makeDiskImage, startTestVm } from '../vm-images/launch.ts';
import { QmpClient } from '../src/qmp/client.ts';
import { EncryptRun, median, now, percentile } from '../test/helpers/moderation-lab.ts';
import { requestGaps } from './gaps.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' }, 'iter-time': { type: 'string', default: '2000' }, out: { type: 'string', default: 'bench/results' } } });
const rounds = Number(values.rounds);
const iterTime = values['iter-time']!;
const POLL_MS = 20;

interface Result {
  mode: string;
  round: number;
  spanMs: number;
  longestGapMs: number;
  p99GapMs: number;
  requestsPerS: number;
}

/** The gaps in the guest's requests (bench/gaps.ts), its count read from QMP query-blockstats. */
function gaps(q: QmpClient, until: () => boolean): Promise<{ gaps: number[]; spanMs: number; requests: number }> {
  return requestGaps(async () => {
    const s = (await q.execute('query-blockstats')).find((x) => x.qdev?.includes('/disk0/'))!;
    return s.stats.rd_operations + s.stats.wr_operations + s.stats.flush_operations;
  }, until, POLL_MS);
}

ensureImage();
const work = await mkdtemp(path.join(tmpdir(), 'ic-bench-stall-'));
const keyFile = path.join(work, 'key');
await writeFile(keyFile, 'start-stall key', { mode: 0o600 });
// A PATH without qemu-img, for the in-QEMU fallback: links to the tools idlecrypt runs, nothing else.
const noQemuImg = path.join(work, 'bin');
await mkdir(noQemuImg);
for (const t of ['node', 'bpftrace']) {
  for (const d of (process.env.PATH ?? '').split(':')) {
    if (existsSync(path.join(d, t))) {
      await symlink(path.join(d, t), path.join(noQemuImg, t));
      break;
    }
  }
}
const results: Result[] = [];
try {
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? ['qemu-img', 'in-qemu'] : ['in-qemu', 'qemu-img'];
    let longestSpan = 0;
    for (const mode of order) {
      const dir = path.join(work, `${mode}-${round}`);
      await mkdir(dir);
      const disk = path.join(dir, 'src.raw');
      await makeDiskImage(disk, { sizeMiB: 65536, format: 'raw', fill: 'sparse' });
      const vm = await startTestVm({ name: `stall-${mode}-${round}`, disk, dir, cache: 'none', workload: 'disk', params: { bs_kb: 64, chunk_kb: 1024 } });
      try {
        await vm.ready;
        await sleep(2000);
        const q = await QmpClient.connect(vm.qmpSocket);
        const env: Record<string, string> = mode === 'in-qemu' ? { PATH: noQemuImg } : {};
        // The fallback is the guest's QEMU's: the storage daemon (the default) needs qemu-img's header.
        const encrypter = mode === 'in-qemu' ? ['--encrypter', 'qemu'] : [];
        const run = new EncryptRun(['--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', path.join(dir, 't.luks'), '--key-file', keyFile, '--iter-time', iterTime, ...encrypter], path.join(dir, 'm.lp'), env);
        const g = await gaps(q, () => run.phaseAt('copying') !== undefined || run.cli.child.exitCode !== null);
        if (run.phaseAt('copying') === undefined) throw new Error(`${mode}: the command ended before copying:\n${run.cli.stderr().slice(-2000)}`);
        run.cli.child.kill('SIGINT');
        await run.result(60_000);
        await q.close();
        longestSpan = Math.max(longestSpan, g.spanMs);
        results.push({ mode, round, spanMs: g.spanMs, longestGapMs: Math.max(...g.gaps), p99GapMs: percentile(g.gaps, 99), requestsPerS: g.requests / (g.spanMs / 1000) });
        process.stderr.write(`round ${round + 1} ${mode}: ${(g.spanMs / 1000).toFixed(1)} s to the copy, longest gap ${Math.max(...g.gaps).toFixed(0)} ms\n`);
      } finally {
        await vm.stop();
        await rm(dir, { recursive: true, force: true });
      }
    }
    // The guest alone, as long as the slower command took.
    const dir = path.join(work, `none-${round}`);
    await mkdir(dir);
    const disk = path.join(dir, 'src.raw');
    await makeDiskImage(disk, { sizeMiB: 65536, format: 'raw', fill: 'sparse' });
    const vm = await startTestVm({ name: `stall-none-${round}`, disk, dir, cache: 'none', workload: 'disk', params: { bs_kb: 64, chunk_kb: 1024 } });
    try {
      await vm.ready;
      await sleep(2000);
      const q = await QmpClient.connect(vm.qmpSocket);
      const end = now() + longestSpan;
      const g = await gaps(q, () => now() >= end);
      await q.close();
      results.push({ mode: 'none', round, spanMs: g.spanMs, longestGapMs: Math.max(...g.gaps), p99GapMs: percentile(g.gaps, 99), requestsPerS: g.requests / (g.spanMs / 1000) });
      process.stderr.write(`round ${round + 1} none: longest gap ${Math.max(...g.gaps).toFixed(0)} ms over ${(g.spanMs / 1000).toFixed(1)} s\n`);
    } finally {
      await vm.stop();
      await rm(dir, { recursive: true, force: true });
    }
  }
} finally {
  await rm(work, { recursive: true, force: true });
}

const rows = ['none', 'qemu-img', 'in-qemu'].map((mode) => {
  const rs = results.filter((r) => r.mode === mode);
  return { mode, longest: median(rs.map((r) => r.longestGapMs)), p99: median(rs.map((r) => r.p99GapMs)), span: median(rs.map((r) => r.spanMs)) / 1000, rps: median(rs.map((r) => r.requestsPerS)), all: rs.map((r) => r.longestGapMs.toFixed(0)).join(', ') };
});
const table = [
  `Start stall: guest doing one-at-a-time 64 KiB O_DIRECT I/O (64 GiB sparse raw, cache=none), iter-time ${iterTime} ms, ${rounds} rounds, medians`,
  '| run | longest gap in the guest\'s requests (ms) | every round | p99 gap (ms) | from the command to the copy (s) | guest requests/s |',
  '| --- | --- | --- | --- | --- | --- |',
  ...rows.map((r) => `| ${r.mode} | ${r.longest.toFixed(0)} | ${r.all} | ${r.p99.toFixed(0)} | ${r.span.toFixed(1)} | ${r.rps.toFixed(0)} |`),
].join('\n');
process.stdout.write(`${table}\n`);
await mkdir(values.out!, { recursive: true });
await writeFile(path.join(values.out!, `start-stall-${new Date().toISOString().replace(/[:.]/g, '-')}.json`), JSON.stringify({ iterTime, rounds, results }, null, 1));
