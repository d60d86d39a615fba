/**
 * The test guest and its launcher, run for real: each workload boots under TCG and is held
 * to what vm-images/README.md promises, with numbers from the guest's own serial lines and
 * from QEMU's block statistics.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import {
  IMAGE_DIR,
  ensureImage,
  latestWrites,
  makeDiskImage,
  parseGuestLine,
  patternMiB,
  startTestVm,
  writerBlock,
  writerOffset,
  type GuestRecord,
  type TestVm,
  type TestVmOptions,
} from '../../vm-images/launch.ts';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Just enough QMP for these tests: greeting, capabilities, commands matched by id. */
class MiniQmp {
  private buf = '';
  private nextId = 0;
  private pending = new Map<string, { res: (v: unknown) => void; rej: (e: Error) => void }>();
  private greeted!: Promise<void>;
  private constructor(private readonly sock: Socket) {}

  static async open(path: string): Promise<MiniQmp> {
    const sock = connect(path);
    const q = new MiniQmp(sock);
    q.greeted = new Promise((res, rej) => {
      sock.once('error', rej);
      sock.setEncoding('utf8');
      sock.on('data', (d: string) => {
        q.buf += d;
        let nl: number;
        while ((nl = q.buf.indexOf('\n')) >= 0) {
          const msg = JSON.parse(q.buf.slice(0, nl)) as Record<string, unknown>;
          q.buf = q.buf.slice(nl + 1);
          if ('QMP' in msg) res();
          const id = msg.id as string | undefined;
          const p = id === undefined ? undefined : q.pending.get(id);
          if (!p) continue; // events
          q.pending.delete(id!);
          if ('error' in msg) p.rej(new Error(JSON.stringify(msg.error)));
          else p.res(msg.return);
        }
      });
    });
    await q.greeted;
    await q.cmd('qmp_capabilities');
    return q;
  }

  cmd<T = unknown>(execute: string, args?: Record<string, unknown>): Promise<T> {
    const id = `t${this.nextId++}`;
    return new Promise<T>((res, rej) => {
      this.pending.set(id, { res: res as (v: unknown) => void, rej });
      this.sock.write(JSON.stringify({ execute, id, ...(args ? { arguments: args } : {}) }) + '\n');
    });
  }

  close(): void {
    this.sock.destroy();
  }
}

type IoRecord = Extract<GuestRecord, { kind: 'io' }>;

interface BlockStats {
  rd_operations: number;
  wr_operations: number;
  flush_operations: number;
  rd_bytes: number;
  wr_bytes: number;
}
async function diskStats(q: MiniQmp): Promise<BlockStats> {
  const all = await q.cmd<{ qdev?: string; stats: BlockStats }[]>('query-blockstats');
  const s = all.find((e) => e.qdev?.includes('disk0'));
  assert.ok(s, 'query-blockstats has the guest disk');
  return s.stats;
}

/** Serial records after READY. */
function records(vm: TestVm): GuestRecord[] {
  const i = vm.lines.findIndex((l) => l.startsWith('IDLECRYPT-GUEST READY'));
  return vm.lines.slice(i + 1).map((l) => parseGuestLine(l) ?? assert.fail(`unparsable serial line: ${JSON.stringify(l)}`));
}

let work: string;
const vms: TestVm[] = [];
async function boot(opts: TestVmOptions): Promise<TestVm> {
  const vm = await startTestVm(opts);
  vms.push(vm);
  return vm;
}

before(async () => {
  ensureImage();
  work = await mkdtemp(join(tmpdir(), 'idlecrypt-guest-test-'));
});
stopGuestsAfterEachTest(vms);
after(async () => {
  await Promise.all(vms.map((vm) => vm.stop()));
  await rm(work, { recursive: true, force: true });
});

describe('image files', () => {
  test('IMAGE_DIR is absolute and holds a built kernel and initramfs', async () => {
    assert.ok(isAbsolute(IMAGE_DIR));
    const initrd = await stat(join(IMAGE_DIR, 'initrd.img'));
    assert.ok(initrd.size > 100_000 && initrd.size < 4 * MiB, `initrd is ${initrd.size} bytes`);
    assert.ok((await stat(join(IMAGE_DIR, 'vmlinuz'))).size > MiB);
  });
});

describe('makeDiskImage', () => {
  test('raw sparse: right size, zeros, no blocks allocated', async () => {
    const p = join(work, 'sparse.raw');
    await makeDiskImage(p, { sizeMiB: 16, format: 'raw', fill: 'sparse' });
    const st = await stat(p);
    assert.equal(st.size, 16 * MiB);
    assert.equal(st.blocks, 0);
    assert.ok((await readFile(p)).every((b) => b === 0));
  });

  test('raw pattern: every MiB is its own IDLECRYPT-DATA pattern', async () => {
    const p = join(work, 'pattern.raw');
    await makeDiskImage(p, { sizeMiB: 8, format: 'raw', fill: 'pattern' });
    const data = await readFile(p);
    assert.equal(data.length, 8 * MiB);
    for (let i = 0; i < 8; i++) assert.ok(data.subarray(i * MiB, (i + 1) * MiB).equals(patternMiB(i)), `MiB ${i}`);
    assert.equal(data.subarray(5 * MiB + 512, 5 * MiB + 544).toString(), 'IDLECRYPT-DATA mib=00000005    \n');
  });

  test('qcow2 sparse allocates no data; qcow2 pattern has the same content as raw pattern', async () => {
    const sparse = join(work, 'sparse.qcow2');
    await makeDiskImage(sparse, { sizeMiB: 16, format: 'qcow2', fill: 'sparse' });
    const map = JSON.parse((await execFileP('qemu-img', ['map', '--output=json', sparse])).stdout) as { data: boolean }[];
    assert.deepEqual(map.filter((e) => e.data), []);
    const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', sparse])).stdout) as Record<string, unknown>;
    assert.equal(info['virtual-size'], 16 * MiB);
    assert.equal(info.format, 'qcow2');

    const pat = join(work, 'pattern.qcow2');
    await makeDiskImage(pat, { sizeMiB: 8, format: 'qcow2', fill: 'pattern' });
    await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', pat, join(work, 'pattern.raw')]);
    assert.deepEqual((await execFileP('ls', [work])).stdout.split('\n').filter((f) => f.includes('.tmp-')), []);
  });

  test('a thin disk (dataMiB): the pattern in its first MiBs, nothing allocated after them, raw and qcow2 alike', async () => {
    for (const format of ['raw', 'qcow2'] as const) {
      const p = join(work, `thin.${format}`);
      await makeDiskImage(p, { sizeMiB: 64, format, fill: 'pattern', dataMiB: 4 });
      const map = JSON.parse((await execFileP('qemu-img', ['map', '--output=json', '-f', format, p])).stdout) as { start: number; length: number; data: boolean }[];
      const data = map.filter((e) => e.data);
      assert.deepEqual([data.at(0)?.start, data.reduce((n, e) => n + e.length, 0)], [0, 4 * MiB], `${format}: ${JSON.stringify(map)}`);
      const plain = join(work, `thin-${format}.raw`);
      await execFileP('qemu-img', ['convert', '-f', format, '-O', 'raw', p, plain]);
      const bytes = await readFile(plain);
      assert.equal(bytes.length, 64 * MiB);
      for (let i = 0; i < 4; i++) assert.ok(bytes.subarray(i * MiB, (i + 1) * MiB).equals(patternMiB(i)), `${format}: MiB ${i}`);
      assert.ok(bytes.subarray(4 * MiB).every((b) => b === 0), `${format}: zeros after the data`);
    }
  });

  test('refuses to overwrite an existing file and leaves it alone', async () => {
    const p = join(work, 'pattern.raw');
    const before = await stat(p);
    await assert.rejects(makeDiskImage(p, { sizeMiB: 1, format: 'raw', fill: 'sparse' }), /refusing to overwrite/);
    await assert.rejects(makeDiskImage(p, { sizeMiB: 1, format: 'qcow2', fill: 'pattern' }), /refusing to overwrite/);
    assert.equal((await stat(p)).size, before.size);
  });
});

describe('test guest', () => {
  test('idle (blockdev, raw): READY with the disk size, then no serial lines and no disk requests for 3 s', async (t) => {
    const disk = join(work, 'idle.raw');
    await makeDiskImage(disk, { sizeMiB: 32, format: 'raw', fill: 'sparse' });
    const t0 = Date.now();
    const vm = await boot({ name: 'idle', disk });
    assert.ok(existsSync(vm.qmpSocket) && existsSync(vm.toolQmpSocket));
    await vm.ready;
    t.diagnostic(`boot to READY: ${Date.now() - t0} ms`);
    assert.equal(vm.lines.at(-1), `IDLECRYPT-GUEST READY workload=idle disk_bytes=${32 * MiB}`);

    const q = await MiniQmp.open(vm.qmpSocket);
    try {
      const pci = await q.cmd<{ devices: { qdev_id: string }[] }[]>('query-pci');
      const ids = pci.flatMap((b) => b.devices.map((d) => d.qdev_id)).filter(Boolean).sort();
      assert.deepEqual(ids, ['disk0', 'keyboard0', 'tablet0']);
      // Input events have targets (and cause no disk I/O).
      await q.cmd('input-send-event', {
        events: [
          { type: 'key', data: { down: true, key: { type: 'qcode', data: 'shift' } } },
          { type: 'key', data: { down: false, key: { type: 'qcode', data: 'shift' } } },
          { type: 'abs', data: { axis: 'x', value: 1000 } },
        ],
      });
      const s0 = await diskStats(q);
      const n0 = vm.lines.length;
      await sleep(3000);
      const s1 = await diskStats(q);
      assert.deepEqual(vm.lines.slice(n0), []);
      assert.equal(s1.rd_operations - s0.rd_operations, 0);
      assert.equal(s1.wr_operations - s0.wr_operations, 0);
      assert.equal(s1.flush_operations - s0.flush_operations, 0);
    } finally {
      q.close();
    }

    const dir = vm.dir;
    await vm.stop();
    await vm.stop(); // idempotent
    assert.equal(await vm.exited, 0); // SIGTERM: QEMU exits cleanly
    assert.throws(() => process.kill(vm.pid, 0), { code: 'ESRCH' });
    assert.equal(existsSync(dir), false, 'the launcher removes the directory it created');
  });

  test('disk: IO lines about once a second with equal rd and wr, all of it reaching the device, and only the region written', async (t) => {
    const disk = join(work, 'disk.qcow2');
    await makeDiskImage(disk, { sizeMiB: 64, format: 'qcow2', fill: 'pattern' });
    const dir = join(work, 'disk-vm');
    const vm = await boot({ name: 'disk', disk, dir, workload: 'disk', params: { region_off_mb: 16, region_mb: 8 } });
    await vm.ready;
    const q = await MiniQmp.open(vm.qmpSocket);
    try {
      await q.cmd('block-dirty-bitmap-add', { node: 'disk0-fmt', name: 'written', granularity: 65536 });
      const s0 = await diskStats(q);
      await vm.waitForLine(/^IO /);
      const n0 = vm.lines.length; // whole intervals that start after s0
      const ioSince = () => vm.lines.slice(n0).map((l) => parseGuestLine(l)).filter((r): r is IoRecord => r?.kind === 'io');
      while (ioSince().length < 3) await sleep(100);
      const io = ioSince();
      const s1 = await diskStats(q);
      const blocks = await q.cmd<{ inserted?: { 'dirty-bitmaps'?: { name: string; count: number }[] } }[]>('query-block');
      const written = blocks.flatMap((b) => b.inserted?.['dirty-bitmaps'] ?? []).find((b) => b.name === 'written');

      for (const r of io) {
        t.diagnostic(`IO t=${r.t} rd=${r.rd} wr=${r.wr} ms=${r.ms}: ${((r.rd / r.ms) * 1000 / MiB).toFixed(0)} MiB/s each way`);
        assert.ok(r.rd > 0 && r.wr === r.rd, 'reads and writes move the same bytes');
        assert.equal(r.rd % MiB, 0, 'whole 1 MiB requests');
        assert.ok(r.ms >= 1000 && r.ms < 2000, `interval ${r.ms} ms`);
        assert.ok(r.rd / r.ms > 5 * MiB / 1000, 'at least 5 MiB/s');
      }
      const rdSum = io.reduce((a, r) => a + r.rd, 0);
      const wrSum = io.reduce((a, r) => a + r.wr, 0);
      assert.ok(s1.rd_bytes - s0.rd_bytes >= rdSum, 'every byte the guest read was a device read (O_DIRECT)');
      assert.ok(s1.wr_bytes - s0.wr_bytes >= wrSum, 'every byte the guest wrote was a device write');
      assert.ok(s1.wr_operations - s0.wr_operations >= wrSum / MiB);
      // 8 MiB region, wrapped many times over: exactly 8 MiB of the disk was written.
      assert.equal(written?.count, 8 * MiB);
      assert.deepEqual(records(vm)[0], {
        kind: 'config',
        fields: { workload: 'disk', region_off: String(16 * MiB), region_bytes: String(8 * MiB), bs: String(MiB), chunk: String(4 * MiB) },
      });
    } finally {
      q.close();
    }
    await vm.stop();
    assert.ok(existsSync(vm.serialLog), 'a dir passed in is kept, with its serial log');
    const logged = (await readFile(vm.serialLog, 'utf8')).split('\n').slice(0, -1);
    assert.deepEqual(logged, vm.lines);
    // The loop writes back what it read: the pattern is intact everywhere.
    await execFileP('qemu-img', ['convert', '-O', 'raw', disk, join(work, 'disk-after.raw')]);
    const after = await readFile(join(work, 'disk-after.raw'));
    for (let i = 0; i < 64; i++) assert.ok(after.subarray(i * MiB, (i + 1) * MiB).equals(patternMiB(i)), `MiB ${i}`);
  });

  test('bursty idle=2 busy=2 cycles=2: phases of 2 s, IO lines only in busy phases, then BURSTY DONE', async () => {
    const disk = join(work, 'bursty.raw');
    await makeDiskImage(disk, { sizeMiB: 32, format: 'raw', fill: 'sparse' });
    const vm = await boot({ name: 'bursty', disk, workload: 'bursty', params: { idle: 2, busy: 2, cycles: 2, region_mb: 8 } });
    await vm.ready;
    await vm.waitForLine(/^BURSTY DONE /, 20_000);
    const phases: { phase: 'idle' | 'busy'; t: number; io: IoRecord[] }[] = [];
    let doneAt = NaN;
    for (const r of records(vm)) {
      if (r.kind === 'phase') phases.push({ phase: r.phase, t: r.t, io: [] });
      else if (r.kind === 'io') phases.at(-1)!.io.push(r);
      else if (r.kind === 'bursty-done') doneAt = r.t;
      else assert.equal(r.kind, 'config');
    }
    assert.deepEqual(phases.map((p) => p.phase), ['idle', 'busy', 'idle', 'busy']);
    // Phases keep to an absolute schedule from the first: phase k starts at t0 + 2000 k
    // (a little later if the previous busy phase's last dd ran over), lasting about 2 s.
    // The guest reads its clock from /proc/uptime in 10 ms ticks, and the schedule starts
    // at a reading taken just before phase 0's line: a phase may look a tick or two "early".
    const t0 = phases[0]!.t;
    const ends = phases.map((p, i) => phases[i + 1]?.t ?? doneAt);
    phases.forEach((p, k) => {
      const late = p.t - (t0 + 2000 * k);
      const ms = ends[k]! - p.t;
      assert.ok(late >= -20 && late <= 200, `phase ${k} starts ${late} ms after its slot`);
      assert.ok(ms >= 1800 && ms <= 2200, `phase ${k} (${p.phase}) lasts ${ms} ms`);
      if (p.phase === 'idle') {
        assert.deepEqual(p.io, [], 'no IO lines in an idle phase');
      } else {
        // The IO lines of a busy phase cover it, the last one being the partial interval.
        const ioMs = p.io.reduce((a, r) => a + r.ms, 0);
        assert.ok(Math.abs(ioMs - ms) <= 30, `IO lines cover ${ioMs} ms of a ${ms} ms busy phase`);
        assert.ok(p.io.length >= 2 && p.io.every((r) => r.rd > 0 && r.wr === r.rd));
      }
    });
    await vm.stop();
  });

  // writer=shell forks dd for each block; writer=proc is vm-images/guest/icwriter.c, one
  // process: the same blocks at the same offsets, paced alike.
  for (const writer of ['shell', 'proc'] as const)
  test(`writer=${writer} (drive, qcow2): WROTE lines in seq order at the documented offsets, and each block is in the image`, async () => {
    const disk = join(work, `writer-${writer}.qcow2`);
    await makeDiskImage(disk, { sizeMiB: 16, format: 'qcow2', fill: 'pattern' });
    const vm = await boot({ name: 'writer', disk, diskStyle: 'drive', workload: 'writer', params: { wps: 40, count: 60, writer } });
    const seen: number[] = []; // host time of each WROTE line
    vm.lines$.subscribe((l) => l.startsWith('WROTE ') && seen.push(Date.now()));
    await vm.ready;
    const q = await MiniQmp.open(vm.qmpSocket);
    const done = await vm.waitForLine(/^WRITER DONE count=(\d+) t=(\d+)$/, 20_000);
    const stats = await diskStats(q);
    q.close();
    await vm.stop();

    assert.equal(done[1], '60');
    const wrote = records(vm).filter((r): r is Extract<GuestRecord, { kind: 'wrote' }> => r.kind === 'wrote');
    assert.deepEqual(wrote.map((r) => r.seq), [...Array(60).keys()]);
    for (const r of wrote) assert.equal(r.off, writerOffset(r.seq, 16 * MiB), `seq ${r.seq}`);
    assert.ok(stats.wr_operations >= 60 && stats.flush_operations >= 60, 'one write and one flush per block');
    // 40 blocks/s: 59 intervals after the first block take about 1.475 s.
    const span = seen.at(-1)! - seen[0]!;
    assert.ok(span >= 1400 && span <= 2500, `60 blocks at 40/s took ${span} ms`);
    // Every fourth block rewrites an earlier block's slot; the latest seq is what counts.
    const latest = latestWrites(vm.lines);
    assert.equal(writerOffset(3, 16 * MiB), writerOffset(1, 16 * MiB));
    assert.ok(latest.get(writerOffset(1, 16 * MiB))! >= 3);
    assert.ok(latest.size <= 45, `${latest.size} distinct offsets for 60 blocks`);

    const raw = join(work, `writer-${writer}-after.raw`);
    await execFileP('qemu-img', ['convert', '-O', 'raw', disk, raw]);
    const image = await readFile(raw);
    for (let off = 0; off < image.length; off += 4096) {
      const seq = latest.get(off);
      const want = seq === undefined ? patternMiB(Math.floor(off / MiB)).subarray(off % MiB, (off % MiB) + 4096) : writerBlock(seq, off);
      if (!image.subarray(off, off + 4096).equals(want)) assert.fail(`block at ${off}: want ${seq === undefined ? 'pattern' : `seq ${seq}`}, got ${JSON.stringify(image.subarray(off, off + 48).toString('latin1'))}`);
    }
  });

  test('a bad workload parameter fails the boot: ready rejects with the guest error and QEMU exits', async () => {
    const disk = join(work, 'bad.raw');
    await makeDiskImage(disk, { sizeMiB: 8, format: 'raw', fill: 'sparse' });
    const vm = await boot({ name: 'bad', disk, workload: 'disk', params: { bs_kb: 6 } });
    await assert.rejects(vm.ready, /IDLECRYPT-GUEST ERROR reason=bad-param workload=disk key=bs_kb value=6 multiple_of=4/);
    assert.equal(await vm.exited, 0); // guest poweroff with -no-reboot
    await vm.stop();
    const vm2 = await boot({ name: 'bad2', disk, workload: 'writer', params: { writer: 'fork' } });
    await assert.rejects(vm2.ready, /IDLECRYPT-GUEST ERROR reason=bad-param workload=writer key=writer value=fork/);
    await vm2.stop();
    await assert.rejects(startTestVm({ name: 'x', disk, params: { 'Bad Key': 1 } }), /bad guest parameter name/);
    await assert.rejects(startTestVm({ name: 'x', disk, params: { region_mb: '1 2' } }), /bad value/);
  });
});
