/**
 * `encrypt --encrypter storage-daemon` against real QEMU guests (TCG) and a real
 * qemu-storage-daemon: the image is encrypted by a daemon of idlecrypt's own, which the
 * guest's QEMU writes to over NBD; before the pivot the guest's QEMU opens the image itself
 * and the daemon goes (src/encrypt/storage-daemon.ts, target.ts).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { makeDiskImage, startTestVm, ensureImage, writerBlock, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { listDisks } from '../../src/encrypt/disks.ts';
import { cliStateDir, jsonLines, runCli, startCli } from '../helpers/cli.ts';
import { activeKeySlots, createLuksImage, decryptToRaw, fileContains, writeKey } from '../helpers/images.ts';
import { StorageDaemon } from '../../src/encrypt/storage-daemon.ts';
import { pino } from 'pino';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';
import { daemonsOn } from '../helpers/daemons.ts';

const KEY = 'storage daemon test key 9';

let dir: string;
let key: string;
const vms: TestVm[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-qsd-'));
  key = path.join(dir, 'key');
  await writeKey(key, KEY);
});
stopGuestsAfterEachTest(vms);
after(async () => {
  await Promise.all(vms.map((vm) => vm.stop()));
  // A test that failed midway may have left a daemon (it outlives idlecrypt by design).
  for (const d of await daemonsOn(dir)) process.kill(d.pid, 'SIGKILL');
  await rm(dir, { recursive: true, force: true });
});

async function boot(opts: Parameters<typeof startTestVm>[0]): Promise<TestVm> {
  const vmDir = path.join(dir, `vm-${opts.name}`);
  await mkdir(vmDir);
  const vm = await startTestVm({ dir: vmDir, ...opts });
  vms.push(vm);
  await vm.ready;
  return vm;
}

/** What of ours is in QEMU: jobs and nodes named idlecrypt-*, and the disk. */
async function inQemu(vm: TestVm) {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    const jobs = (await c.execute('query-block-jobs')).filter((j) => j.device.startsWith('idlecrypt'));
    const nodes = (await c.execute('query-named-block-nodes', { flat: true })).map((n) => n['node-name'] ?? '').filter((n) => n.startsWith('idlecrypt'));
    const disk = (await listDisks(c)).find((d) => d.qdevId === 'disk0')!;
    return { jobs, nodes, disk };
  } finally {
    await c.close();
  }
}

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function args(vm: TestVm, target: string, extra: string[]): string[] {
  return ['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', key, '--iter-time', '50', '--encrypter', 'storage-daemon', '--json', ...extra];
}

/** The guest's WROTE lines: the last sequence number written at each offset. */
function latestWrites(vm: TestVm): Map<number, number> {
  const latest = new Map<number, number>();
  for (const l of vm.lines) {
    const m = /^WROTE seq=(\d+) off=(\d+)/.exec(l);
    if (m) latest.set(Number(m[2]), Number(m[1]));
  }
  return latest;
}

/**
 * The image decrypted (after the guest stopped): each block the guest wrote holds its last
 * write, every other block the source's original data.
 */
async function assertEveryWriteKept(vm: TestVm, src: string, target: string): Promise<void> {
  const plain = `${target}.dec.raw`;
  await decryptToRaw(target, 'luks', key, plain);
  const latest = latestWrites(vm);
  const fd = await open(plain, 'r');
  try {
    for (const [off, seq] of latest) {
      const { buffer } = await fd.read(Buffer.alloc(4096), 0, 4096, off);
      assert.ok(buffer.equals(writerBlock(seq, off)), `block at ${off} is not seq ${seq}`);
    }
  } finally {
    await fd.close();
  }
  const [srcBuf, decBuf] = [await readFile(src), await readFile(plain)];
  assert.equal(decBuf.length, srcBuf.length);
  for (let off = 0; off < srcBuf.length; off += 4096) {
    if (latest.has(off)) continue;
    if (!srcBuf.subarray(off, off + 4096).equals(decBuf.subarray(off, off + 4096))) assert.fail(`block at ${off} differs from the original`);
  }
  await rm(plain);
}

describe('encrypt --encrypter storage-daemon', () => {
  test('a guest writing all along, cache=none: the daemon encrypts, the guest switches onto its own node over the image with every write kept, and the daemon is gone', async () => {
    const src = path.join(dir, 'w.raw');
    const target = path.join(dir, 'w.luks');
    await makeDiskImage(src, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'qsd-writer', disk: src, cache: 'none', workload: 'writer', params: { wps: 40 } });
    await vm.waitForLine(/^WROTE seq=10 /, 30_000);

    // 64 MiB at 16 MiB/s: ~4 s of copying through the daemon while the guest writes.
    const run = startCli(args(vm, target, ['--speed', '16M']));
    await run.waitForStdout(/"event":"progress".*"offset":[1-9]/, 60_000);
    const daemons = await daemonsOn(target);
    assert.equal(daemons.length, 1, `one qemu-storage-daemon on ${target}: ${JSON.stringify(daemons)}`);
    // The key reaches the daemon through a pipe: its command line names no key file and holds no key.
    assert.match(daemons[0]!.cmdline, /secret,id=key,file=\/dev\/stdin/);
    assert.ok(!daemons[0]!.cmdline.includes(KEY) && !daemons[0]!.cmdline.includes(key), daemons[0]!.cmdline);
    const mid = await inQemu(vm);
    assert.equal(mid.disk.file, src, 'the guest runs on its source during the copy');
    assert.deepEqual(mid.nodes.map((n) => n.replace(/-[0-9a-f]{8}$/, '')).sort(), ['idlecrypt', 'idlecrypt-file', 'idlecrypt-fmt', 'idlecrypt-nbd'], JSON.stringify(mid.nodes));

    const r = await run.result;
    assert.equal(r.code, 0, r.stderr);
    const ev = jsonLines(r.stdout);
    assert.equal(ev.at(-1)?.event, 'completed', r.stdout.slice(-500));
    assert.match(r.stderr, /target switched from qemu-storage-daemon to the guest's QEMU/);
    assert.ok(!r.stdout.includes(KEY) && !r.stderr.includes(KEY));

    // The guest runs on the image through its own QEMU; nothing of the daemon is left.
    const now = await inQemu(vm);
    assert.equal(now.disk.file, target);
    assert.equal(now.disk.driver, 'luks', 'a raw node over luks is shown as luks');
    assert.equal(now.disk.encrypted, true);
    assert.deepEqual(now.disk.cache, { direct: true, noFlush: false }, 'the image is opened with the source\'s cache mode');
    assert.deepEqual(now.jobs, []);
    assert.ok(!now.nodes.some((n) => n.startsWith('idlecrypt-nbd')), `nbd node left: ${now.nodes}`);
    assert.deepEqual(await daemonsOn(target), [], 'the daemon has exited');
    assert.equal(existsSync(path.dirname(daemons[0]!.cmdline.match(/"path":"([^"]+)"/)![1]!)), false, 'its socket directory is gone');
    assert.deepEqual((await activeKeySlots(target)).map((s) => s.slot), [1], 'only the key file\'s slot is left');
    // A second run refuses: the disk is already encrypted.
    const again = await runCli(args(vm, path.join(dir, 'again.luks'), ['--speed', '16M']));
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /already runs on an encrypted image/);

    const seqNow = Math.max(...latestWrites(vm).values());
    await vm.waitForLine(new RegExp(`^WROTE seq=${seqNow + 40} `), 30_000); // it keeps writing, on the target
    await vm.stop();

    assert.ok(latestWrites(vm).size > 100, `the guest wrote ${latestWrites(vm).size} blocks`);
    await assertEveryWriteKept(vm, src, target);
    assert.equal(await fileContains(target, 'IDLECRYPT-DATA'), false, 'no plaintext in the image');
  });

  // One guest for both (a boot saved): the first run leaves it on its source.
  test('the daemon killed mid-copy fails the run with one line, leaving the guest on its source and nothing of the run; idlecrypt killed mid-copy leaves the daemon running, and the same command run again adopts the copy and switches with the daemon gone', async () => {
    const src = path.join(dir, 'k.raw');
    const target = path.join(dir, 'k.luks');
    await makeDiskImage(src, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'qsd-kill', disk: src, workload: 'writer', params: { wps: 20 } });

    // The daemon killed.
    const run = startCli(args(vm, target, ['--speed', '4M']));
    await run.waitForStdout(/"event":"progress".*"offset":[1-9]/, 60_000);
    const killed = await until('the daemon', async () => (await daemonsOn(target))[0]);
    process.kill(killed.pid, 'SIGKILL');
    const r = await run.result;
    assert.notEqual(r.code, 0);
    const errors = jsonLines(r.stdout).filter((e) => e.event === 'error');
    assert.equal(errors.length, 1, r.stdout.slice(-800));
    assert.match(String(errors[0]!.message), /qemu-storage-daemon.*(exited|no longer runs)/, String(errors[0]!.message));
    const failed = await inQemu(vm);
    assert.equal(failed.disk.file, src, 'the guest runs on its original disk');
    assert.deepEqual(failed.jobs, []);
    assert.deepEqual(failed.nodes, [], 'no node of the run is left');
    assert.equal(existsSync(target), false, 'the partial image is removed');
    const recs = existsSync(path.join(cliStateDir(), 'runs')) ? (await readdir(path.join(cliStateDir(), 'runs'))).filter((f) => f.endsWith('.json')) : [];
    assert.deepEqual(recs, [], 'no run record is left');
    const seqAfterFail = Math.max(...latestWrites(vm).values());
    await vm.waitForLine(new RegExp(`^WROTE seq=${seqAfterFail + 20} `), 30_000); // and keeps writing

    // idlecrypt killed, into the same target path (free again).
    const first = startCli(args(vm, target, ['--speed', '8M']));
    await first.waitForStdout(/"event":"progress".*"offset":[1-9]/, 60_000);
    first.child.kill('SIGKILL');
    await first.result;
    const [d] = await daemonsOn(target);
    assert.ok(d, 'the daemon runs on after idlecrypt died');
    await new Promise((r) => setTimeout(r, 2000)); // the copy goes on meanwhile

    // Run again saying --encrypter qemu: an adopted run keeps its own (the record's).
    const again = await runCli(args(vm, target, ['--speed', '16M']).map((a) => (a === 'storage-daemon' ? 'qemu' : a)));
    assert.equal(again.code, 0, again.stderr);
    const ev = jsonLines(again.stdout);
    assert.equal(ev.find((e) => e.event === 'note')?.resumed, 'adopted', again.stdout.slice(0, 800));
    assert.equal(ev.at(-1)?.event, 'completed');
    const now = await inQemu(vm);
    assert.equal(now.disk.file, target);
    assert.equal(now.disk.encrypted, true);
    assert.deepEqual(await daemonsOn(target), [], 'the adopting run stopped the daemon');
    assert.ok(!now.nodes.some((n) => n.startsWith('idlecrypt-nbd')), `nbd node left: ${now.nodes}`);
    const before = Math.max(...latestWrites(vm).values());
    await vm.waitForLine(new RegExp(`^WROTE seq=${before + 20} `), 30_000);
    await vm.stop();
    await assertEveryWriteKept(vm, src, target);
  });
});

describe('a storage daemon no record names', () => {
  test('is found beside its socket and by its run tag, and only a qemu-storage-daemon naming that socket is', async () => {
    // A run killed after its daemon listened but before the record named it, or an orphan
    // whose nbd node names the socket: recover.ts stops such a daemon through these.
    const image = path.join(dir, 'find.luks');
    await createLuksImage(image, '16M', key);
    const log = pino({ level: 'silent' });
    const tag = 'f1adbeef';
    const d = await StorageDaemon.start({ path: image, format: 'luks', cache: { direct: false, noFlush: false }, tag }, { file: key }, log);
    try {
      assert.equal((await StorageDaemon.find(d.record.socket, log))?.record.pid, d.record.pid);
      assert.equal((await StorageDaemon.findByTag(tag, log))?.record.pid, d.record.pid);
      assert.equal(await StorageDaemon.findByTag('0123abcd', log), undefined, 'another tag');
      // A pid file naming a process that is not that daemon (this one) is not taken for it.
      const fake = await mkdtemp(path.join(tmpdir(), `idlecrypt-nbd-${tag}-`));
      await writeFile(path.join(fake, 'pid'), `${process.pid}\n`);
      assert.equal(await StorageDaemon.find(path.join(fake, 'nbd.sock'), log), undefined);
      await rm(fake, { recursive: true });
      assert.equal(await StorageDaemon.find('/tmp/elsewhere/nbd.sock', log), undefined, 'a socket not in a directory of ours');
    } finally {
      await d.stop();
    }
    assert.equal(await StorageDaemon.find(d.record.socket, log), undefined, 'stopped: gone');
    assert.deepEqual(await daemonsOn(image), []);
  });
});
