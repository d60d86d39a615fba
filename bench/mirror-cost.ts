/**
 * What one MiB of a mirror into LUKS costs QEMU's main loop, by the mirror's buffer size
 * (`buf-size`) and speed: the main thread's CPU time per MiB copied, from its scheduler
 * statistics (/proc/PID/task/PID/schedstat, as src/probes/mainloop.ts reads it).
 *
 * Each configuration runs in a fresh QEMU (no guest: `-S`, the disk on a virtio-blk device
 * as a guest's would be) with a fresh LUKS target made by qemu-img, so that no
 * configuration inherits another's heap: the cost depends on it (see docs/starvation.md,
 * "The idle copy on sparse disks").
 *
 *   node --import tsx bench/mirror-cost.ts [--source sparse|data] [--cache none|writeback]
 *        [--bufs 16,8,4,2] [--speed 0] [--rounds 2] [--seconds 6] [--data-mib 3072]
 *        [--target luks,nbd] [--daemon-heap kept|default]
 *
 * --source sparse: a 64 GiB raw file with no blocks (the mirror writes encrypted zeros,
 * QEMU's write-zeroes fallback: a zeroed bounce buffer per request); data: a raw file of
 * --data-mib random bytes (read, encrypted and written). --speed in MiB/s (0: unlimited).
 * --target luks: the LUKS node in the guest's QEMU, which encrypts in its main loop (what
 * idlecrypt does); nbd: the LUKS image opened in a qemu-storage-daemon of its own and
 * exported over NBD on a Unix socket, the guest's QEMU writing plaintext (and NBD
 * write-zeroes for holes) through a raw node over an nbd node; the daemon's CPU (all its
 * threads) is printed beside the main loop's. The daemon is started as idlecrypt starts it
 * (StorageDaemon, src/encrypt/storage-daemon.ts); --daemon-heap kept (default) keeps its
 * glibc heap settings (DAEMON_MALLOC_ENV), default runs it with glibc's own.
 * Prints one line per configuration and round, then the medians. About 10 s a
 * configuration and round. Run nothing else meanwhile.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { writeImageWithQemuImg } from '../src/encrypt/target.ts';
import { StorageDaemon } from '../src/encrypt/storage-daemon.ts';
import { silentLogger } from '../src/log.ts';
import { QmpClient } from '../src/qmp/client.ts';
import { median } from '../test/helpers/moderation-lab.ts';

const { values } = parseArgs({
  options: {
    source: { type: 'string', default: 'sparse' },
    cache: { type: 'string', default: 'none' },
    bufs: { type: 'string', default: '16,8,4,2' },
    speed: { type: 'string', default: '0' },
    rounds: { type: 'string', default: '2' },
    seconds: { type: 'string', default: '6' },
    'data-mib': { type: 'string', default: '3072' },
    target: { type: 'string', default: 'luks' },
    'daemon-heap': { type: 'string', default: 'kept' },
  },
});
const MiB = 1024 * 1024;
const direct = values.cache === 'none';
if (!direct && values.cache !== 'writeback') throw new Error(`--cache: none or writeback, not ${values.cache}`);
if (values.source !== 'sparse' && values.source !== 'data') throw new Error(`--source: sparse or data, not ${values.source}`);
const targets = values.target.split(',');
if (values['daemon-heap'] !== 'kept' && values['daemon-heap'] !== 'default') throw new Error(`--daemon-heap: kept or default, not ${values['daemon-heap']}`);
for (const t of targets) if (t !== 'luks' && t !== 'nbd') throw new Error(`--target: luks or nbd, not ${t}`);
const bufs = values.bufs.split(',').map(Number);
const speed = Number(values.speed) * MiB;
const seconds = Number(values.seconds);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const dir = await mkdtemp(path.join(tmpdir(), 'ic-mirror-cost-'));
const key = path.join(dir, 'key');
await writeFile(key, 'mirror cost key');
const source = path.join(dir, 'source.raw');
if (values.source === 'sparse') execFileSync('truncate', ['-s', '64G', source]);
else execFileSync('dd', ['if=/dev/urandom', `of=${source}`, 'bs=1M', `count=${values['data-mib']}`, 'status=none']);
const size = Number(execFileSync('stat', ['-c', '%s', source]).toString().trim());

async function measure(buf: number, n: number, kind: string): Promise<{ rate: number; load: number; encLoad: number }> {
  const sock = path.join(dir, `qmp-${n}.sock`);
  const target = path.join(dir, `target-${n}.luks`);
  const qemu = spawn(
    'qemu-system-x86_64',
    [
      '-S', '-nodefaults', '-display', 'none', '-accel', 'tcg', '-m', '256',
      '-qmp', `unix:${sock},server=on,wait=off`,
      '-object', `secret,id=sec0,file=${key}`,
      '-blockdev', JSON.stringify({ driver: 'file', filename: source, 'node-name': 'src-file', cache: { direct, 'no-flush': false } }),
      '-blockdev', JSON.stringify({ driver: 'raw', file: 'src-file', 'node-name': 'src' }),
      '-device', 'virtio-blk-pci,drive=src,id=disk0',
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  let qsd: StorageDaemon | undefined;
  try {
    // qemu-img as idlecrypt runs it, with its retry of the key-slot timing (host-facts.md).
    await writeImageWithQemuImg('qemu-img', { path: target, format: 'luks', size, keyFile: key, iterTimeMs: 50 }, silentLogger);
    // --target nbd: the LUKS image opened in a qemu-storage-daemon as idlecrypt starts it
    // (src/encrypt/storage-daemon.ts), exported over NBD on a Unix socket; the guest's QEMU
    // writes plaintext (and write-zeroes commands for holes) to it through a raw node over
    // an nbd node.
    if (kind === 'nbd') {
      qsd = await StorageDaemon.start(
        { path: target, format: 'luks', cache: { direct, noFlush: false }, tag: `cost${n}`, glibcHeap: values['daemon-heap'] === 'default' },
        { file: key },
        silentLogger,
      );
    }
    let client: QmpClient | undefined;
    for (let i = 0; !client; i++) {
      client = await QmpClient.connect(sock).catch(async (e) => {
        if (i > 50) throw e;
        await sleep(100);
        return undefined;
      });
    }
    try {
      const pid = qemu.pid!;
      const cpuNs = async () => Number((await readFile(`/proc/${pid}/task/${pid}/schedstat`, 'utf8')).split(' ')[0]);
      const offset = async () => (await client.execute('query-block-jobs'))[0]?.offset ?? 0;
      const qsdCpu = async () => {
        if (!qsd) return 0;
        const f = ((await readFile(`/proc/${qsd.record.pid}/stat`, 'utf8')).split(') ')[1] ?? '').split(' ');
        return (Number(f[11]) + Number(f[12])) * 1e7; // utime + stime, clock ticks (100/s) to ns
      };
      if (kind === 'nbd') {
        await client.execute('blockdev-add', { driver: 'nbd', 'node-name': 'tgt-nbd', server: qsd!.server, export: qsd!.record.exportName } as never);
        await client.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: 'tgt-nbd' } as never);
      } else {
        await client.execute('blockdev-add', { driver: 'file', 'node-name': 'tgt-file', filename: target, cache: { direct, 'no-flush': false } } as never);
        await client.execute('blockdev-add', { driver: 'luks', 'node-name': 'tgt', file: 'tgt-file', 'key-secret': 'sec0' } as never);
      }
      await client.execute('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync: 'full', 'buf-size': buf * MiB, speed } as never);
      await sleep(1500); // past the start
      const [o0, c0, q0, t0] = [await offset(), await cpuNs(), await qsdCpu(), performance.now()];
      await sleep(seconds * 1000);
      const [o1, c1, q1, t1] = [await offset(), await cpuNs(), await qsdCpu(), performance.now()];
      await client.execute('block-job-cancel', { device: 'm', force: true }).catch(() => {});
      return { rate: (o1 - o0) / MiB / ((t1 - t0) / 1000), load: (c1 - c0) / 1e6 / (t1 - t0), encLoad: (q1 - q0) / 1e6 / (t1 - t0) };
    } finally {
      await client.execute('quit').catch(() => {});
      await client.close().catch(() => {});
    }
  } finally {
    qemu.kill('SIGKILL');
    await qsd?.stop(1000);
    await rm(target, { force: true });
  }
}

const results = new Map<string, { rate: number; load: number; encLoad: number }[]>();
let n = 0;
try {
  for (let round = 1; round <= Number(values.rounds); round++) {
    for (const kind of targets) {
      for (const buf of bufs) {
        const r = await measure(buf, ++n, kind);
        const k = `${kind}, ${buf} MiB`;
        results.set(k, [...(results.get(k) ?? []), r]);
        console.log(`round ${round}, target ${kind}, buf-size ${buf} MiB, speed ${speed ? `${values.speed} MiB/s` : 'unlimited'}: ${r.rate.toFixed(0)} MiB/s, main loop ${(100 * r.load).toFixed(0)}% busy, ${((1000 * r.load) / r.rate).toFixed(2)} ms of CPU per MiB` + (kind === 'nbd' ? `; storage daemon ${(100 * r.encLoad).toFixed(0)}% of a CPU` : ''));
      }
    }
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
console.log(`\n${values.source} source, cache=${values.cache}, ${values.rounds} rounds, medians:`);
console.log('| target, buf-size | MiB/s | main loop busy | ms of CPU per MiB | storage daemon, all threads |\n| --- | --- | --- | --- | --- |');
for (const [k, rs] of results) {
  console.log(`| ${k} | ${median(rs.map((r) => r.rate)).toFixed(0)} | ${(100 * median(rs.map((r) => r.load))).toFixed(0)}% | ${median(rs.map((r) => (1000 * r.load) / r.rate)).toFixed(2)} | ${k.startsWith('nbd') ? `${(100 * median(rs.map((r) => r.encLoad))).toFixed(0)}%` : '-'} |`);
}
