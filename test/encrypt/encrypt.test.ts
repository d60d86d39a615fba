/**
 * Acceptance: `idlecrypt encrypt` against real QEMU guests under TCG. The guest keeps
 * running and keeps writing while its disk is copied; afterwards it runs on the encrypted
 * image, and decrypting that image with the same key gives exactly the original data plus
 * every block the guest wrote before, during and after the copy.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, open, rm, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { makeDiskImage, startTestVm, ensureImage, writerBlock, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { listDisks } from '../../src/encrypt/disks.ts';
import { jsonLines, loggedBufSize, runCli, startCli } from '../helpers/cli.ts';
import { IOTHREAD_ARGS } from '../helpers/matrix-cell.ts';
import { activeKeySlots, compareWithEncrypted, decryptToRaw, fileContains, imageInfo, sha256, writeKey } from '../helpers/images.ts';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';

const KEY = 'correct horse battery staple 42';
const MiB = 1024 * 1024;

let dir: string;
const vms: TestVm[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-enc-'));
  await writeKey(path.join(dir, 'key'), KEY);
});
stopGuestsAfterEachTest(vms);
after(async () => {
  await Promise.all(vms.map((vm) => vm.stop()));
  await rm(dir, { recursive: true, force: true });
});

async function boot(opts: Parameters<typeof startTestVm>[0]): Promise<TestVm> {
  const vmDir = path.join(dir, `vm-${opts.name}`); // each VM's sockets in a folder of its own
  await mkdir(vmDir);
  const vm = await startTestVm({ dir: vmDir, ...opts });
  vms.push(vm);
  await vm.ready;
  return vm;
}

async function diskNow(vm: TestVm, id = 'disk0') {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return (await listDisks(c)).find((d) => d.qdevId === id)!;
  } finally {
    await c.close();
  }
}

interface Wrote {
  seq: number;
  off: number;
  line: number;
}
function writes(vm: TestVm): Wrote[] {
  const out: Wrote[] = [];
  vm.lines.forEach((l, i) => {
    const m = /^WROTE seq=(\d+) off=(\d+)/.exec(l);
    if (m) out.push({ seq: Number(m[1]), off: Number(m[2]), line: i });
  });
  return out;
}

describe('encrypt', () => {
  test('a raw disk the guest keeps writing to is encrypted with every write kept, and the guest runs on the LUKS image', async () => {
    const src = path.join(dir, 'writer.raw');
    const target = path.join(dir, 'writer.luks');
    await makeDiskImage(src, { sizeMiB: 128, format: 'raw', fill: 'pattern' });
    // cache=unsafe: the target must inherit the host-cache mode (here: no flushes).
    const vm = await boot({ name: 'writer', disk: src, diskStyle: 'drive', cache: 'unsafe', workload: 'writer', params: { wps: 40 } });
    const d0 = await diskNow(vm);
    assert.deepEqual(d0.cache, { direct: false, noFlush: true });
    assert.equal(d0.allocatedBytes, 128 * MiB, 'a written raw file occupies its whole size on the host');
    await vm.waitForLine(/^WROTE seq=20 /, 30_000); // writes before the copy

    // 128 MiB at 16 MiB/s: ~8 s of copying while the guest writes 40 blocks/s.
    const run = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', path.join(dir, 'key'), '--speed', '16M', '--iter-time', '50', '--json']);
    assert.equal(run.code, 0, run.stderr);
    const records = run.stdout.trim().split('\n').map((l) => JSON.parse(l));
    const progress = records.filter((r) => r.event === 'progress');
    assert.ok(progress.length >= 10, `expected a progress record every 250 ms, got ${progress.length}`);
    for (const p of progress) {
      for (const k of ['time', 'status', 'offset', 'len', 'percent', 'rate_bps', 'speed_limit_bps', 'eta_s']) assert.ok(k in p, `progress lacks ${k}`);
    }
    const done = records.at(-1);
    assert.equal(done.event, 'completed');
    assert.equal(done.target, target);
    assert.ok(done.bytes_copied >= 128 * MiB, `copied ${done.bytes_copied}`);

    // The guest now runs on the encrypted image and keeps working.
    const disk = await diskNow(vm);
    assert.equal(disk.file, target);
    assert.equal(disk.driver, 'luks');
    assert.equal(disk.encrypted, true);
    assert.deepEqual(disk.cache, { direct: false, noFlush: true }, 'the target kept the source\'s cache mode');
    const lastBefore = writes(vm).at(-1)!.seq;
    await vm.waitForLine(new RegExp(`^WROTE seq=${lastBefore + 40} `), 30_000);
    await vm.stop();

    const all = writes(vm);
    assert.ok(all.length > 300, `the guest wrote ${all.length} blocks`);
    const plain = path.join(dir, 'writer.dec.raw');
    await decryptToRaw(target, 'luks', path.join(dir, 'key'), plain);
    assert.equal((await imageInfo(plain))['virtual-size'], 128 * MiB);

    // Every block the guest reported: its latest content is in the encrypted image.
    const latest = new Map<number, number>();
    for (const w of all) latest.set(w.off, w.seq);
    const fd = await open(plain, 'r');
    try {
      for (const [off, seq] of latest) {
        const { buffer } = await fd.read(Buffer.alloc(4096), 0, 4096, off);
        assert.ok(buffer.equals(writerBlock(seq, off)), `block at ${off} is not seq ${seq}: ${buffer.subarray(0, 48).toString('latin1')}`);
      }
    } finally {
      await fd.close();
    }
    // Every other block is the original data: equal to the source, where the guest wrote
    // only before the pivot and only at the reported offsets.
    const srcBuf = await readFile(src);
    const decBuf = await readFile(plain);
    let compared = 0;
    for (let off = 0; off < srcBuf.length; off += 4096) {
      if (latest.has(off)) continue;
      if (!srcBuf.subarray(off, off + 4096).equals(decBuf.subarray(off, off + 4096))) assert.fail(`block at ${off} differs from the original`);
      compared++;
    }
    assert.ok(compared > 30_000);

    // No plaintext in the raw target: neither the original data nor the guest's writes.
    assert.equal(await fileContains(target, 'IDLECRYPT-DATA'), false);
    assert.equal(await fileContains(target, 'IDLECRYPT-BLOCK'), false);
    assert.equal(await fileContains(src, 'IDLECRYPT-DATA'), true); // the check can see plaintext
    // The key never appears in anything the tool printed.
    assert.ok(!run.stdout.includes(KEY) && !run.stderr.includes(KEY));
    // One key slot: the key file's, in slot 1; QEMU's random opening key (slot 0) is erased.
    assert.deepEqual((await activeKeySlots(target)).map((k) => k.slot), [1]);
  });

  test('a sparse qcow2 disk with cache.direct (cache=none) is encrypted by default into qcow2 with LUKS encryption that stays as thin, identical to the source, and keeps O_DIRECT', async () => {
    const src = path.join(dir, 'sparse.qcow2');
    const target = path.join(dir, 'sparse-enc.qcow2');
    await makeDiskImage(src, { sizeMiB: 256, format: 'qcow2', fill: 'sparse' });
    // cache.direct on the file node only: listDisks must read it there, not at the root.
    const vm = await boot({ name: 'sparse', disk: src, diskStyle: 'blockdev', cache: 'none', workload: 'idle' });
    const d0 = await diskNow(vm);
    assert.deepEqual(d0.cache, { direct: true, noFlush: false });
    assert.ok(d0.allocatedBytes !== null && d0.allocatedBytes < d0.virtualSize / 100, `a sparse image occupies almost nothing on the host: ${d0.allocatedBytes} of ${d0.virtualSize} bytes`);
    const before = await sha256(src);
    const run = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0-fmt', '--target', target, '--key-file', path.join(dir, 'key'), '--iter-time', '50']);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(loggedBufSize(run.stderr), 8 * MiB, 'into qcow2 the holes are zero clusters: the data decides the buffer (8 MiB with O_DIRECT), not the 2 MiB of a sparse source into raw LUKS');
    assert.match(run.stdout, /now runs on the encrypted image .*sparse-enc\.qcow2 \(qcow2/);
    const disk = await diskNow(vm);
    assert.equal(disk.file, target);
    assert.equal(disk.driver, 'qcow2');
    assert.equal(disk.encrypted, true);
    assert.deepEqual(disk.cache, { direct: true, noFlush: false }, 'the target is opened with O_DIRECT, as the source was');
    await vm.stop();
    assert.equal(await sha256(src), before, 'the source is unmodified');
    const info = await imageInfo(target);
    assert.equal(info.format, 'qcow2', '--format auto: a qcow2 disk stays qcow2');
    assert.equal(info.encrypted, true);
    // Its holes became zero clusters, not encrypted zeros: the LUKS header (~2 MiB) and the
    // tables, where a raw LUKS target would hold all 256 MiB.
    const held = (await stat(target)).blocks * 512;
    assert.ok(held < 16 * MiB, `the encrypted image occupies ${(held / MiB).toFixed(1)} MiB of its 256 MiB on the host`);
    assert.deepEqual((await activeKeySlots(target)).map((k) => k.slot), [1], 'the key file\'s slot alone: the opening key\'s is erased');
    const plainSrc = path.join(dir, 'sparse.src.raw');
    await (await import('node:child_process')).execFileSync('qemu-img', ['convert', '-O', 'raw', src, plainSrc]);
    const cmp = await compareWithEncrypted(plainSrc, target, 'qcow2', path.join(dir, 'key'));
    assert.ok(cmp.same, cmp.output);
  });

  test('a 1 GiB disk copies at full speed with --speed 0 and decrypts to exactly the original', async () => {
    const src = path.join(dir, 'big.raw');
    const target = path.join(dir, 'big.luks');
    await makeDiskImage(src, { sizeMiB: 1024, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'big', disk: src, workload: 'idle' });
    const run = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', path.join(dir, 'key'), '--speed', '0', '--iter-time', '50', '--json']);
    assert.equal(run.code, 0, run.stderr);
    const done = JSON.parse(run.stdout.trim().split('\n').at(-1)!);
    assert.equal(done.event, 'completed');
    assert.equal(done.virtual_size, 1024 * MiB);
    const status = await runCli(['status', '--qmp', vm.toolQmpSocket, '--json']);
    assert.equal(status.code, 0, status.stderr);
    const st = JSON.parse(status.stdout);
    assert.deepEqual(
      st.disks.map((d: { device: string; image: string; format: string; encrypted: boolean }) => [d.device, d.image, d.format, d.encrypted]),
      [['disk0', target, 'luks', true]],
    );
    assert.deepEqual(st.jobs, []);
    assert.deepEqual((await diskNow(vm)).cache, { direct: false, noFlush: false }, 'writeback, as the source');
    await vm.stop();
    const cmp = await compareWithEncrypted(src, target, 'luks', path.join(dir, 'key'));
    assert.ok(cmp.same, cmp.output);
    assert.equal(await fileContains(target, 'IDLECRYPT-DATA'), false);
  });

  test("a disk with an iothread: the moderated copy runs in that thread, the headroom reads its load there, and the image decrypts to exactly the original; a SCSI disk's copy reads its controller's iothread, and goes through the storage daemon in it", async (t) => {
    // As libvirt's <driver iothread='1'/> gives: QEMU serves the disk and runs the mirror in
    // the thread `IO iothread1`, and its main loop stays nearly idle (src/probes/mainloop.ts).
    const src = path.join(dir, 'io.raw');
    const target = path.join(dir, 'io.luks');
    await makeDiskImage(src, { sizeMiB: 512, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'io', disk: src, cache: 'none', workload: 'idle', qemuArgs: IOTHREAD_ARGS });
    const c = await QmpClient.connect(vm.qmpSocket);
    const threads = await c.execute('query-iothreads').finally(() => c.close());
    assert.equal(threads.length, 1);
    // The guest's QEMU encrypts (--encrypter qemu), in the iothread: the load the headroom
    // must see there. Through the daemon (the default) the thread only forwards plaintext.
    const run = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', path.join(dir, 'key'), '--iter-time', '50', '--encrypter', 'qemu', '--json']);
    assert.equal(run.code, 0, run.stderr);
    // The loads it read are the copy's: read at the main loop they were 0.00-0.01 throughout
    // (measured before the iothread was looked for: the headroom never bound), while the
    // iothread copying reached the headroom's 0.9 (1 GiB; 512 MiB here, for the suite's time).
    const loads = jsonLines<{ event?: string; mode?: string; main_loop_load?: number | null }>(run.stdout)
      .filter((r) => r.event === 'progress' && r.mode === 'full')
      .map((r) => r.main_loop_load ?? 0);
    t.diagnostic(`the headroom's loads at full speed: ${loads.map((l) => l.toFixed(2)).join(' ')}`);
    assert.ok(loads.length >= 2 && Math.max(...loads) >= 0.25, `the headroom's loads while the copy ran at full speed: ${loads.map((l) => l.toFixed(2)).join(' ')}`);
    const read = jsonLines<{ msg?: string; iothread?: string; tid?: number }>(run.stderr).find((l) => l.iothread !== undefined);
    assert.deepEqual([read?.iothread, read?.tid], ['iothread1', threads[0]!['thread-id']], 'the headroom reads the disk\'s iothread');
    assert.equal(jsonLines<{ event?: string }>(run.stdout).at(-1)?.event, 'completed');
    assert.equal((await diskNow(vm)).file, target, 'the guest runs on the LUKS image');

    // A SCSI disk (scsi-hd) has no iothread link of its own: its virtio-scsi controller's
    // iothread serves it, found through the disk's parent_bus. Hot-plugged into the running
    // guest, which has no SCSI driver and leaves it alone. Copied through the storage daemon
    // (the default): its nbd and raw nodes run in that iothread, and the switch too.
    const scsiSrc = path.join(dir, 'io-sda.raw');
    const scsiTarget = path.join(dir, 'io-sda.luks');
    await makeDiskImage(scsiSrc, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const h = await QmpClient.connect(vm.qmpSocket);
    let scsiTid: number | undefined;
    try {
      await h.executeRaw('object-add', { 'qom-type': 'iothread', id: 'iothread2' });
      await h.executeRaw('device_add', { driver: 'virtio-scsi-pci', id: 'scsi0', iothread: 'iothread2' });
      await h.executeRaw('blockdev-add', { driver: 'raw', 'node-name': 'sda-fmt', file: { driver: 'file', 'node-name': 'sda-file', filename: scsiSrc, cache: { direct: true } } });
      await h.executeRaw('device_add', { driver: 'scsi-hd', id: 'sda', drive: 'sda-fmt', bus: 'scsi0.0' });
      scsiTid = (await h.execute('query-iothreads')).find((x) => x.id === 'iothread2')?.['thread-id'];
    } finally {
      await h.close();
    }
    const scsiRun = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'sda', '--target', scsiTarget, '--key-file', path.join(dir, 'key'), '--iter-time', '50', '--json']);
    assert.equal(scsiRun.code, 0, scsiRun.stderr);
    const readScsi = jsonLines<{ iothread?: string; tid?: number }>(scsiRun.stderr).find((l) => l.iothread !== undefined);
    assert.deepEqual([readScsi?.iothread, readScsi?.tid], ['iothread2', scsiTid], "the headroom reads the SCSI controller's iothread");
    assert.match(scsiRun.stderr, /target switched from qemu-storage-daemon to the guest's QEMU/);
    await vm.stop();
    for (const [plain, image] of [[src, target], [scsiSrc, scsiTarget]] as const) {
      const cmp = await compareWithEncrypted(plain, image, 'luks', path.join(dir, 'key'));
      assert.ok(cmp.same, cmp.output);
    }
  });

  test('status shows the disks, their images and a running job with its progress', async () => {
    const src = path.join(dir, 'status.raw');
    await makeDiskImage(src, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'status', disk: src, workload: 'idle' });
    let st = await runCli(['status', '--qmp', vm.toolQmpSocket]);
    assert.equal(st.code, 0, st.stderr);
    assert.match(st.stdout, /^DEVICE\s+NODE\s+FORMAT\s+SIZE\s+ENCRYPTED\s+IMAGE$/m);
    assert.match(st.stdout, new RegExp(`^disk0\\s+disk0-fmt\\s+raw\\s+64\\.0 MiB\\s+no\\s+${src.replace(/[.]/g, '\\.')}$`, 'm'));
    assert.match(st.stdout, /^no block jobs$/m);

    const target = path.join(dir, 'status.luks');
    const cli = startCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', path.join(dir, 'key'), '--speed', '4M', '--iter-time', '50', '--json']);
    await cli.waitForStdout(/"event":"progress".*"offset":[1-9]/);
    st = await runCli(['status', '--qmp', vm.qmpSocket]);
    assert.match(st.stdout, /^JOB\s+TYPE\s+STATUS\s+PROGRESS\s+SPEED LIMIT$/m);
    assert.match(st.stdout, /^idlecrypt-[0-9a-f]{8}\s+mirror\s+running\s+\d+\.\d% [\d.]+ MiB \/ 64\.0 MiB\s+4\.0 MiB\/s$/m);
    cli.child.kill('SIGINT');
    const res = await cli.result;
    assert.equal(res.code, 130);
  });
});
