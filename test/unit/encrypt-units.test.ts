/** The pure pieces of `encrypt`: option parsing, progress arithmetic, finding a disk. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { parseBytes, parseChoice, parsePositiveInt } from '../../src/cli/options.ts';
import { ProgressMeter } from '../../src/encrypt/progress.ts';
import { findDisk, formatUnderRaw, imagePath, qdevIdOf, type DiskInfo } from '../../src/encrypt/disks.ts';
import { fmtBytes, targetBytesNeeded, thinDiskNote } from '../../src/encrypt/preflight.ts';
import { targetFormatFor } from '../../src/encrypt/target.ts';
import { nbdSocketOf } from '../../src/encrypt/runs.ts';
import { qmpListening } from '../../src/encrypt/recover.ts';
import net from 'node:net';
import { existsSync } from 'node:fs';
import { copyCache, StorageDaemon } from '../../src/encrypt/storage-daemon.ts';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fmtEta } from '../../src/cli/progress-view.ts';
import { allocatedShare, moderatedBufSize, waitUntilReady } from '../../src/encrypt/encrypt.ts';
import type { RunModeration } from '../../src/encrypt/moderation.ts';
import type { JobSnapshot } from '../../src/jobs/types.ts';
import { Subject } from 'rxjs';
import { FakeJob, sleep } from '../controller/fake-job.ts';
import { pino } from 'pino';

const MiB = 1024 * 1024;
import { IdlecryptError } from '../../src/errors.ts';

describe('option parsing', () => {
  test('byte counts take plain integers and binary suffixes', () => {
    assert.equal(parseBytes('--speed', '0'), 0);
    assert.equal(parseBytes('--speed', '52428800'), 52428800);
    assert.equal(parseBytes('--speed', '50M'), 50 * 1024 * 1024);
    assert.equal(parseBytes('--speed', '50MiB/s'), 50 * 1024 * 1024);
    assert.equal(parseBytes('--speed', '1.5G'), 1.5 * 1024 ** 3);
    assert.equal(parseBytes('--speed', '16k'), 16384);
  });
  test('bad byte counts are usage errors naming the flag', () => {
    for (const bad of ['fast', '-1', '', '10X', '1e9']) {
      assert.throws(() => parseBytes('--speed', bad), (e: unknown) => e instanceof IdlecryptError && e.code === 'USAGE' && e.exitCode === 2 && e.message.startsWith('--speed: '));
    }
  });
  test('choices and whole numbers are checked', () => {
    assert.equal(parseChoice('--format', 'qcow2', ['luks', 'qcow2']), 'qcow2');
    assert.throws(() => parseChoice('--format', 'zip', ['luks', 'qcow2']), /--format: 'zip' is not one of luks, qcow2/);
    assert.equal(parsePositiveInt('--iter-time', '50', 10), 50);
    assert.throws(() => parsePositiveInt('--iter-time', '5', 10), /must be a whole number >= 10/);
    assert.throws(() => parsePositiveInt('--iter-time', '2.5'), /whole number/);
  });
});

describe('progress', () => {
  const snap = (offset: number, len: number) => ({ id: 'j', status: 'running' as const, offset, len, speed: 0, paused: false, ready: false });
  test('the rate is measured from the offset over the window, and the ETA from the work left', () => {
    const m = new ProgressMeter(2000);
    assert.equal(m.sample(snap(0, 1000), 0).etaS, null); // nothing moved yet
    const p = m.sample(snap(100, 1000), 1000);
    assert.equal(p.rate, 100);
    assert.equal(p.etaS, 9);
    assert.equal(p.percent, 10);
    // the window slides: samples older than 2 s stop counting
    m.sample(snap(200, 1000), 2000);
    const q = m.sample(snap(500, 1000), 3000);
    assert.equal(q.rate, 200); // (500-100)/2 s
  });
  test('a growing length (guest dirtied copied blocks) lengthens the ETA', () => {
    const m = new ProgressMeter(2000);
    m.sample(snap(0, 1000), 0);
    const p = m.sample(snap(500, 1500), 1000);
    assert.equal(p.etaS, 2);
  });
  test('a finished copy has ETA 0', () => {
    const m = new ProgressMeter();
    assert.equal(m.sample(snap(1000, 1000), 0).etaS, 0);
  });
  test('ETA and sizes read as a person writes them', () => {
    assert.equal(fmtEta(null), '--');
    assert.equal(fmtEta(4.2), '5s');
    assert.equal(fmtEta(125), '2m05s');
    assert.equal(fmtEta(7260), '2h01m');
    assert.equal(fmtBytes(512), '512 B');
    assert.equal(fmtBytes(80 * 1024 * 1024), '80.0 MiB');
  });
});

describe('finding a disk', () => {
  const disks: DiskInfo[] = [
    { qdevId: 'disk0', qdev: '/machine/peripheral/disk0/virtio-backend', device: '', nodeName: 'disk0-fmt', file: '/a.raw', driver: 'raw', virtualSize: 1, allocatedBytes: null, encrypted: false, cache: { direct: false, noFlush: false } },
    { qdevId: 'disk1', qdev: '/machine/peripheral/disk1/virtio-backend', device: 'drive1', nodeName: '#block123', file: '/b.qcow2', driver: 'qcow2', virtualSize: 1, allocatedBytes: null, encrypted: false, cache: { direct: false, noFlush: false } },
  ];
  test('by qdev id, drive name or node name', () => {
    assert.equal(findDisk(disks, 'disk0').file, '/a.raw');
    assert.equal(findDisk(disks, 'disk0-fmt').file, '/a.raw');
    assert.equal(findDisk(disks, 'drive1').file, '/b.qcow2');
    assert.equal(findDisk(disks, 'disk1').file, '/b.qcow2');
  });
  test('an unknown id lists the disks there are', () => {
    assert.throws(() => findDisk(disks, 'vdz'), { message: "unknown device 'vdz'; this VM's disks: disk0 (/a.raw), disk1 (/b.qcow2)" });
    assert.throws(() => findDisk([], 'vdz'), { message: "unknown device 'vdz'; this VM's disks: none" });
  });
  test('the qdev id is read from the QOM path', () => {
    assert.equal(qdevIdOf('/machine/peripheral/disk0/virtio-backend'), 'disk0');
    assert.equal(qdevIdOf('/machine/peripheral-anon/device[0]/virtio-backend'), '');
    assert.equal(qdevIdOf('ide0-hd0'), 'ide0-hd0');
    assert.equal(qdevIdOf(undefined), '');
  });
  test('the image path under a json: pseudo-filename is the protocol node\'s file', () => {
    assert.equal(imagePath('/x/d.raw'), '/x/d.raw');
    assert.equal(imagePath('json:{"driver": "luks", "file": {"driver": "file", "filename": "/t/a.luks"}, "key-secret": "k"}'), '/t/a.luks');
    assert.equal(imagePath('json:{"driver": "qcow2", "encrypt.key-secret": "k", "file": {"driver": "file", "filename": "/t/b.qcow2"}}'), '/t/b.qcow2');
    assert.equal(imagePath('json:{broken'), 'json:{broken');
  });
  test('a disk the storage daemon encrypted runs on raw over luks|qcow2: seen as that format, encrypted; any other raw root is raw', () => {
    // As QEMU 7.2 names the guest's root after the switch (target.ts beforePivot).
    const luks = 'json:{"driver": "raw", "file": {"driver": "luks", "file": {"driver": "file", "filename": "/t/a.luks"}, "key-secret": "idlecrypt-key-1"}}';
    assert.deepEqual(formatUnderRaw('raw', luks), { driver: 'luks', encrypted: true });
    assert.equal(imagePath(luks), '/t/a.luks');
    assert.deepEqual(formatUnderRaw('raw', 'json:{"driver": "raw", "file": {"driver": "qcow2", "encrypt.key-secret": "k", "file": {"driver": "file", "filename": "/t/b.qcow2"}}}'), { driver: 'qcow2', encrypted: true });
    assert.deepEqual(formatUnderRaw('raw', 'json:{"driver": "raw", "file": {"driver": "qcow2", "file": {"driver": "file", "filename": "/t/c.qcow2"}}}'), { driver: 'qcow2', encrypted: false });
    assert.equal(formatUnderRaw('raw', '/x/d.raw'), undefined, 'a plain raw file');
    assert.equal(formatUnderRaw('raw', 'json:{"driver": "raw", "offset": 512, "file": {"driver": "luks", "file": {"driver": "file", "filename": "/t/a.luks"}}}'), undefined, 'a window into it is not the image');
    assert.equal(formatUnderRaw('raw', 'json:{"driver": "raw", "file": {"driver": "file", "filename": "/t/e.raw", "aio": "native"}}'), undefined, 'raw over a file node');
    assert.equal(formatUnderRaw('luks', luks), undefined, 'only a raw root');
    assert.equal(formatUnderRaw('raw', 'json:{broken'), undefined);
  });
  test("an nbd node's filename names its daemon's socket", () => {
    // As QEMU 7.2 names it (block/nbd.c nbd_refresh_filename), and as a json: filename.
    assert.equal(nbdSocketOf('nbd+unix:///idlecrypt?socket=/tmp/idlecrypt-nbd-0123abcd-X1/nbd.sock'), '/tmp/idlecrypt-nbd-0123abcd-X1/nbd.sock');
    assert.equal(nbdSocketOf('nbd+unix://?socket=/run/s.sock'), '/run/s.sock', 'no export name');
    assert.equal(nbdSocketOf('json:{"driver": "nbd", "server": {"type": "unix", "path": "/run/t.sock"}, "export": "e"}'), '/run/t.sock');
    assert.equal(nbdSocketOf('nbd://127.0.0.1:10809/e'), undefined, 'TCP: not ours');
    assert.equal(nbdSocketOf('/var/lib/x.raw'), undefined);
    assert.equal(nbdSocketOf('json:{broken'), undefined);
  });
  test("a rollback's leftover socket directories: a dead daemon's go, a live one's and another run's stay", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'ic-nbd-'));
    const was = process.env.TMPDIR;
    process.env.TMPDIR = dir;
    try {
      const mk = async (name: string, pid: number | undefined) => {
        await mkdir(path.join(dir, name));
        if (pid !== undefined) await writeFile(path.join(dir, name, 'pid'), `${pid}\n`);
      };
      // A pid that ran and exited: a child of ours, waited for.
      const dead = Number(execFileSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }));
      await mk('idlecrypt-nbd-0123abcd-AAAAAA', dead);
      await mk('idlecrypt-nbd-0123abcd-BBBBBB', undefined);
      await mk('idlecrypt-nbd-0123abcd-CCCCCC', process.pid);
      await mk('idlecrypt-nbd-89abcdef-DDDDDD', dead);
      assert.equal(await StorageDaemon.removeDeadDirs('0123abcd'), 2);
      assert.deepEqual((await readdir(dir)).sort(), ['idlecrypt-nbd-0123abcd-CCCCCC', 'idlecrypt-nbd-89abcdef-DDDDDD']);
    } finally {
      if (was === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = was;
      await rm(dir, { recursive: true, force: true });
    }
  });
  test("a QMP socket is gone only when its file is missing or nobody listens on it", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'ic-qmp-'));
    try {
      const sock = path.join(dir, 'qmp.sock');
      assert.equal(await qmpListening(sock), false, 'no socket file');
      const server = net.createServer((c) => c.end());
      await new Promise<void>((r) => server.listen(sock, r));
      assert.equal(await qmpListening(sock), true, 'a listener');
      // A QEMU killed with SIGKILL leaves its socket file behind: connecting is refused.
      await new Promise<void>((r) => server.close(() => r()));
      assert.throws(() => execFileSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => process.kill(process.pid, 'SIGKILL'))`]));
      assert.ok(existsSync(sock), 'the killed listener left its socket file');
      assert.equal(await qmpListening(sock), false, 'a socket file nobody listens on');
      await rm(sock);
      await writeFile(sock, '');
      assert.equal(await qmpListening(sock), false, 'not a socket: refused');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
  test('a raw LUKS target needs the whole virtual size plus metadata; a qcow2 one what the source occupies', () => {
    const MiB = 1024 * 1024;
    assert.equal(targetBytesNeeded(64 * MiB, 'luks'), 80 * MiB);
    assert.equal(targetBytesNeeded(64 * MiB, 'luks', 1 * MiB), 80 * MiB, 'encrypted zeros are not zeros: a sparse source is no smaller');
    assert.ok(targetBytesNeeded(1024 ** 3, 'qcow2') > 1024 ** 3 + 16 * MiB, 'allocation unknown: the virtual size');
    const thin = targetBytesNeeded(64 * 1024 ** 3, 'qcow2', 768 * MiB);
    assert.ok(thin >= 768 * MiB + 16 * MiB && thin < 1100 * MiB, `a 64 GiB qcow2 holding 768 MiB: ${thin / MiB} MiB`);
    assert.equal(targetBytesNeeded(64 * MiB, 'qcow2', 1024 * MiB), targetBytesNeeded(64 * MiB, 'qcow2'), 'never more than the virtual size');
  });
  test('a mostly unallocated disk going into raw LUKS by default gets a note naming --format qcow2; a format named, a qcow2 target or a full disk none', () => {
    const GiB = 1024 ** 3;
    const n = thinDiskNote('auto', 'luks', 64 * GiB, 3 * GiB);
    assert.match(n?.text ?? '', /occupies 3\.0 GiB of its 64\.0 GiB; the raw LUKS image will hold all 64\.0 GiB.*--format qcow2 keeps it as thin/);
    assert.deepEqual(n?.record, { hint: 'format', allocated: 3 * GiB, virtual_size: 64 * GiB });
    assert.equal(thinDiskNote('luks', 'luks', 64 * GiB, 3 * GiB), null, 'luks named: the operator chose it');
    assert.equal(thinDiskNote('auto', 'qcow2', 64 * GiB, 3 * GiB), null);
    assert.equal(thinDiskNote('auto', 'luks', 64 * GiB, 40 * GiB), null, 'mostly allocated');
    assert.equal(thinDiskNote('auto', 'luks', 64 * GiB, null), null, 'allocation unknown (a block device)');
  });
  test("--format auto: a qcow2 disk's target is qcow2 (it stays thin), any other's raw LUKS; a format named is kept", () => {
    assert.equal(targetFormatFor('auto', 'qcow2'), 'qcow2');
    assert.equal(targetFormatFor('auto', 'raw'), 'luks');
    assert.equal(targetFormatFor('auto', 'host_device'), 'luks');
    assert.equal(targetFormatFor('luks', 'qcow2'), 'luks');
    assert.equal(targetFormatFor('qcow2', 'raw'), 'qcow2');
  });
});

describe("the moderated mirror's buffer", () => {
  const direct = { direct: true, noFlush: false };
  const cached = { direct: false, noFlush: false };
  test('8 MiB with O_DIRECT, 4 MiB through the page cache, for an allocated source or one whose allocation is unknown', () => {
    assert.equal(moderatedBufSize(direct, 1), 8 * MiB);
    assert.equal(moderatedBufSize(cached, 0.5), 4 * MiB);
    assert.equal(moderatedBufSize(direct, null), 8 * MiB);
    assert.equal(moderatedBufSize(cached), 4 * MiB);
  });

  test('2 MiB for a source that occupies under half its size on the host into raw LUKS, whatever the cache; into qcow2 the data decides', () => {
    assert.equal(moderatedBufSize(direct, 0.49), 2 * MiB);
    assert.equal(moderatedBufSize(cached, 0), 2 * MiB);
    assert.equal(moderatedBufSize(direct, 0.06, 'qcow2'), 8 * MiB, 'into qcow2 the holes are zero clusters: the data decides');
    assert.equal(moderatedBufSize(cached, 0, 'qcow2'), 4 * MiB);
    assert.equal(moderatedBufSize(direct, 0.06, 'luks'), 2 * MiB);
  });

  test('the share is known only where QEMU could say what the image holds', () => {
    assert.equal(allocatedShare({ allocatedBytes: 16 * MiB, virtualSize: 64 * MiB }), 0.25);
    assert.equal(allocatedShare({ allocatedBytes: null, virtualSize: 64 * MiB }), null);
    assert.equal(allocatedShare({ allocatedBytes: 0, virtualSize: 0 }), null);
  });
});

describe("a moderated run's progress loop takes the controller's readings", () => {
  /** A stand-in for RunModeration: only what the wait reads of it. */
  function controller() {
    return {
      decision: undefined,
      source: 'ebpf',
      reading: undefined as { snap: JobSnapshot; at: number } | undefined,
      taken: 0,
      /** The controller read the job: `snap`, now. */
      read(snap: JobSnapshot) {
        this.reading = { snap, at: performance.now() };
      },
      snapshotSince(after: number) {
        const r = this.reading;
        if (!r || r.at <= after) return undefined;
        this.taken++;
        return r;
      },
    };
  }
  const running = (offset: number, ready = false): JobSnapshot => ({ id: 'idlecrypt-vda', status: ready ? 'ready' : 'running', offset, len: 100 * MiB, speed: 0, paused: false, ready });
  const reads = (job: FakeJob) => job.calls.filter((c) => c === 'snapshot').length;

  test('on a timer tick it reads the job only when the controller has not since its last reading; after an event of the job it always reads', { timeout: 20_000 }, async () => {
    const job = new FakeJob(true, { offset: 0, len: 100 * MiB });
    const mod = controller();
    const wake$ = new Subject<unknown>();
    const seen: number[] = [];
    const done = waitUntilReady(job, wake$, new ProgressMeter(), { pollMs: 50, logger: pino({ level: 'silent' }), onProgress: (p) => seen.push(p.offset) }, mod as unknown as RunModeration);
    // the first reading is the loop's own
    await sleep(5);
    assert.equal(reads(job), 1);
    // ticks: the controller's readings are taken, the job is not read
    for (let i = 1; i <= 3; i++) {
      mod.read(running(i * MiB));
      while (mod.taken < i) await sleep(2);
    }
    assert.equal(reads(job), 1, 'no reading of its own while the controller reads');
    assert.deepEqual(seen, [0, MiB, 2 * MiB, 3 * MiB]);
    // an event (READY, a status change): the loop reads the job, though the controller's
    // newest reading has not been taken yet (it may be from before the event)
    mod.read(running(4 * MiB));
    job.state.offset = 50 * MiB;
    wake$.next('JOB_STATUS_CHANGE');
    while (reads(job) < 2) await sleep(2);
    assert.equal(seen.at(-1), 50 * MiB);
    // the controller's reading from before that read is not taken on the next tick: the loop reads again
    while (reads(job) < 3) await sleep(2);
    assert.equal(mod.taken, 3);
    assert.ok(!seen.includes(4 * MiB), 'a reading older than the loop\'s own is never shown');
    // the controller's reading shows READY: done without another read of the loop's
    const before = reads(job);
    mod.read(running(100 * MiB, true));
    assert.equal(await done, 'ready');
    assert.equal(reads(job), before);
  });
});

describe('rolling back a dead run whose VM is gone', () => {
  test('without QMP: its image file goes, and a dead storage daemon\'s socket directory with it', async () => {
    const { mkdtemp, mkdir, rm, writeFile } = await import('node:fs/promises');
    const { existsSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const path = await import('node:path');
    const { rollBack } = await import('../../src/encrypt/recover.ts');
    const { silentLogger } = await import('../../src/log.ts');
    const d = await mkdtemp(path.join(tmpdir(), 'ic-rollback-'));
    try {
      const target = path.join(d, 't.luks');
      await writeFile(target, 'not a real image');
      const sockDir = path.join(d, 'idlecrypt-nbd-x');
      await mkdir(sockDir);
      await writeFile(path.join(sockDir, 'pid'), '1');
      // A pid no process can have (Linux's pid_max is at most 2^22): the daemon is gone.
      const removed = await rollBack(
        undefined,
        {
          version: 1,
          tag: 'deadbeef',
          owner: { pid: 1, start: 0 },
          vm: 'v',
          qmp: path.join(d, 'gone.qmp'),
          device: 'disk0',
          source: path.join(d, 's.raw'),
          target,
          format: 'luks',
          keyFile: path.join(d, 'key'),
          phase: 'copying',
          createdAt: 0,
          encrypter: 'storage-daemon',
          daemon: { pid: 4194304, start: 1, socket: path.join(sockDir, 'nbd.sock'), exportName: 'idlecrypt' },
        },
        undefined,
        silentLogger,
      );
      assert.deepEqual(removed, [`file ${target}`]);
      assert.equal(existsSync(target), false);
      assert.equal(existsSync(sockDir), false, 'the dead daemon\'s socket directory is removed');
    } finally {
      await rm(d, { recursive: true, force: true });
    }
  });
});

describe("the storage daemon's cache mode for the copy", () => {
  test("O_DIRECT where the filesystem takes it (ext4 here), the guest's mode where it does not (ramfs), O_DIRECT always for a cache=none guest", async () => {
    // ramfs has no direct I/O (open with O_DIRECT: EINVAL); tmpfs has had it since Linux 6.6.
    const onDisk = await mkdtemp(path.join(tmpdir(), 'ic-direct-'));
    const onRam = await mkdtemp(path.join(tmpdir(), 'ic-ramfs-'));
    execFileSync('mount', ['-t', 'ramfs', 'ramfs', onRam]);
    try {
      for (const d of [onDisk, onRam]) await writeFile(path.join(d, 'img'), Buffer.alloc(1 << 20));
      const writeback = { direct: false, noFlush: false };
      assert.equal(await copyCache(path.join(onDisk, 'img'), writeback), true);
      assert.equal(await copyCache(path.join(onRam, 'img'), writeback), false, "no O_DIRECT on ramfs: the guest's writeback");
      assert.equal(await copyCache(path.join(onRam, 'img'), { direct: true, noFlush: false }), true, "the guest's own O_DIRECT is kept");
    } finally {
      execFileSync('umount', [onRam]);
      await rm(onDisk, { recursive: true, force: true });
      await rm(onRam, { recursive: true, force: true });
    }
  });
});
