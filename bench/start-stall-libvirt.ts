/**
 * Issue 9, point 4, through libvirt: does starting `idlecrypt encrypt --domain` stop the
 * guest's I/O? The longest gap in the guest's disk requests from the command's start until
 * its copy runs, against the same guest with no command over as long a stretch
 * (bench/start-stall.ts measures the QMP backend the same way).
 *
 * The guest, a libvirt domain (vm-images/libvirt.ts, TCG), runs the `disk` workload
 * (one-at-a-time 64 KiB O_DIRECT reads and writes, all the time) on a 64 GiB sparse raw disk
 * with cache=none. The harness reads the disk's request count through libvirt
 * (virDomainBlockStats, idlecrypt's helper) every 20 ms; a gap is the time between two reads
 * that saw the count move. Per round: each command given with --cmd, in an order that
 * rotates from round to round, each on a fresh domain, then the guest alone. A command's
 * copy is cancelled (SIGINT) once it runs.
 *
 *   node --import tsx bench/start-stall-libvirt.ts [--rounds 3] [--iter-time 2000]
 *        [--cmd NAME=PATH/bin/idlecrypt ...]   (default: this=bin/idlecrypt of this checkout)
 *
 * To compare with an earlier commit, give its checkout's bin/idlecrypt as a second --cmd.
 * Prints each run and a table of medians; writes bench/results/start-stall-libvirt-<time>.json.
 * Run nothing else meanwhile.
 */
import { spawn } from 'node:child_process';
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureImage, makeDiskImage } from '../vm-images/launch.ts';
import { ensureLibvirtd, TestDomain } from '../vm-images/libvirt.ts';
import { LibvirtClient } from '../src/libvirt/client.ts';
import { median, now, percentile } from '../test/helpers/moderation-lab.ts';
import { requestGaps } from './gaps.ts';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    'iter-time': { type: 'string', default: '2000' },
    cmd: { type: 'string', multiple: true },
    out: { type: 'string', default: 'bench/results' },
  },
});
const rounds = Number(values.rounds);
const iterTime = values['iter-time']!;
const here = fileURLToPath(new URL('..', import.meta.url));
const cmds = (values.cmd?.length ? values.cmd : [`this=${path.join(here, 'bin/idlecrypt')}`]).map((c) => {
  const i = c.indexOf('=');
  if (i < 1) throw new Error(`--cmd NAME=PATH, not ${c}`);
  return { name: c.slice(0, i), bin: path.resolve(c.slice(i + 1)) };
});
const POLL_MS = 20;

interface Result {
  readonly mode: string;
  readonly round: number;
  readonly spanMs: number;
  readonly longestGapMs: number;
  readonly p99GapMs: number;
  readonly requestsPerS: number;
}

/** The gaps in the guest's requests (bench/gaps.ts), its count read through libvirt (virDomainBlockStats). */
function gaps(client: LibvirtClient, domain: string, until: () => boolean): Promise<{ gaps: number[]; spanMs: number; requests: number }> {
  return requestGaps(async () => {
    const s = await client.call<{ rd_req: number; wr_req: number }>('block-stats', { domain, disk: 'vda' });
    return s.rd_req + s.wr_req;
  }, until, POLL_MS);
}

/** A fresh domain on a 64 GiB sparse raw disk doing one-at-a-time I/O; removed by `fn`'s end. */
async function withDomain<T>(work: string, name: string, fn: (d: TestDomain) => Promise<T>): Promise<T> {
  const dir = path.join(work, name);
  await mkdir(dir);
  const disk = path.join(dir, 'src.raw');
  await makeDiskImage(disk, { sizeMiB: 65536, format: 'raw', fill: 'sparse' });
  let d: TestDomain | undefined;
  try {
    d = await TestDomain.start({ name, dir, disk, cache: 'none', workload: 'disk', params: { bs_kb: 64, chunk_kb: 1024 }, persistent: false });
    await sleep(2000);
    return await fn(d);
  } finally {
    await d?.remove();
    await rm(dir, { recursive: true, force: true });
  }
}

ensureImage();
await ensureLibvirtd();
const client = await LibvirtClient.connect();
const work = await mkdtemp(path.join(tmpdir(), 'ic-bench-lvstall-'));
await chmod(work, 0o755); // QEMU runs as libvirt-qemu and must reach the disks
const keyFile = path.join(work, 'key');
await writeFile(keyFile, 'start-stall key', { mode: 0o600 });
const results: Result[] = [];
const record = (r: Result) => {
  results.push(r);
  process.stderr.write(`round ${r.round + 1} ${r.mode}: longest gap ${r.longestGapMs.toFixed(0)} ms, p99 ${r.p99GapMs.toFixed(0)} ms over ${(r.spanMs / 1000).toFixed(1)} s (${r.requestsPerS.toFixed(0)} requests/s)\n`);
};
try {
  for (let round = 0; round < rounds; round++) {
    let longestSpan = 0;
    const order = cmds.map((_, i) => cmds[(i + round) % cmds.length]!);
    for (const c of order) {
      const name = `ic-stall-${c.name}-${round}-${process.pid}`;
      await withDomain(work, name, async () => {
        const target = path.join(work, `${name}.luks`);
        const child = spawn(c.bin, ['encrypt', '--domain', name, '--disk', 'vda', '--target', target, '--key-file', keyFile, '--iter-time', iterTime, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
        let copying = false;
        let exited = false;
        let out = '';
        let err = '';
        child.stdout.on('data', (b: Buffer) => {
          out += b.toString();
          if (/"phase":"copying"/.test(out)) copying = true;
        });
        child.stderr.on('data', (b: Buffer) => (err += b.toString()));
        const done = new Promise<void>((r) => child.on('exit', () => ((exited = true), r())));
        const g = await gaps(client, name, () => copying || exited);
        if (!copying) throw new Error(`${c.name}: the command ended before copying:\n${err.slice(-2000)}`);
        child.kill('SIGINT');
        await done;
        longestSpan = Math.max(longestSpan, g.spanMs);
        record({ mode: c.name, round, spanMs: g.spanMs, longestGapMs: Math.max(...g.gaps), p99GapMs: percentile(g.gaps, 99), requestsPerS: g.requests / (g.spanMs / 1000) });
      });
    }
    // The guest alone, as long as the slowest command took.
    const name = `ic-stall-none-${round}-${process.pid}`;
    await withDomain(work, name, async () => {
      const end = now() + longestSpan;
      const g = await gaps(client, name, () => now() >= end);
      record({ mode: 'none', round, spanMs: g.spanMs, longestGapMs: Math.max(...g.gaps), p99GapMs: percentile(g.gaps, 99), requestsPerS: g.requests / (g.spanMs / 1000) });
    });
  }
} finally {
  await client.close();
  await rm(work, { recursive: true, force: true });
}

const modes = [...cmds.map((c) => c.name), 'none'];
const rows = modes.map((m) => {
  const rs = results.filter((r) => r.mode === m);
  return `| ${m} | ${median(rs.map((r) => r.spanMs / 1000)).toFixed(1)} | ${median(rs.map((r) => r.longestGapMs)).toFixed(0)} (${rs.map((r) => r.longestGapMs.toFixed(0)).join(', ')}) | ${median(rs.map((r) => r.p99GapMs)).toFixed(0)} | ${median(rs.map((r) => r.requestsPerS)).toFixed(0)} |`;
});
process.stdout.write(
  [
    `libvirt, ${rounds} round(s), --iter-time ${iterTime}, medians over rounds (each round's figure in brackets):`,
    '',
    '| run | s from the command to the copy | longest gap in the guest\'s requests, ms | 99th percentile gap, ms | requests/s |',
    '| --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n'),
);
await mkdir(values.out!, { recursive: true });
await writeFile(path.join(values.out!, `start-stall-libvirt-${new Date().toISOString().replace(/[:.]/g, '-')}.json`), JSON.stringify({ iterTime, cmds, results }, null, 2));
