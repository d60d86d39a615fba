/**
 * A run killed with `kill -9` at any point can be finished or undone (issue 10, item 4):
 * `idlecrypt encrypt` run again with the same arguments adopts the job its dead run left in
 * QEMU (and resumes it if it was left paused), or rolls back what cannot be continued and
 * starts again; `idlecrypt cancel` removes a dead run's job, nodes, secret and target.
 * Real QEMU guests under TCG, the real command.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { makeDiskImage, startTestVm, ensureImage, writerBlock, writerOffset, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { listDisks } from '../../src/encrypt/disks.ts';
import { cliStateDir, humanLines, jsonLines, runCli, startCli, type RunningCli } from '../helpers/cli.ts';
import { checkWriterBlocks, compareWithEncrypted, decryptToRaw, sha256, writeKey } from '../helpers/images.ts';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';
import { daemonsOn } from '../helpers/daemons.ts';

const KEY = 'resume-test-key 7';
const MiB = 1024 * 1024;

let dir: string;
let key: string;
const vms: TestVm[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-resume-'));
  key = path.join(dir, 'key');
  await writeKey(key, KEY);
});
stopGuestsAfterEachTest(vms);
after(async () => {
  await Promise.all(vms.map((vm) => vm.stop()));
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

async function withQmp<T>(vm: TestVm, fn: (c: QmpClient) => Promise<T>): Promise<T> {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}

/** What of ours is in QEMU: jobs, nodes, objects named idlecrypt-*, and the disk's image. */
async function inQemu(vm: TestVm) {
  return withQmp(vm, async (c) => {
    const jobs = (await c.execute('query-block-jobs')).filter((j) => j.device.startsWith('idlecrypt'));
    const nodes = (await c.execute('query-named-block-nodes', { flat: true })).map((n) => n['node-name'] ?? '').filter((n) => n.startsWith('idlecrypt'));
    const objects = ((await c.executeRaw('qom-list', { path: '/objects' })) as { name: string }[]).map((o) => o.name).filter((n) => n.startsWith('idlecrypt'));
    const disk = (await listDisks(c)).find((d) => d.qdevId === 'disk0')!;
    return { jobs, nodes, objects, disk };
  });
}

function encryptArgs(vm: TestVm, target: string, extra: string[]): string[] {
  return ['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', key, '--iter-time', '50', '--json', ...extra];
}

/** Starts a run, waits until its copy has made some progress, and kills it with SIGKILL. */
async function killMidCopy(vm: TestVm, target: string, extra: string[]): Promise<RunningCli> {
  const run = startCli(encryptArgs(vm, target, extra));
  await run.waitForStdout(/"event":"progress".*"offset":[1-9]/, 60_000);
  await new Promise((r) => setTimeout(r, 1000));
  run.child.kill('SIGKILL');
  await run.result;
  return run;
}

/** Run records left in the state directory the CLI helper gives this process's commands. */
async function records(): Promise<string[]> {
  const d = path.join(cliStateDir(), 'runs');
  return existsSync(d) ? (await readdir(d)).filter((f) => f.endsWith('.json')) : [];
}

describe('a run killed with kill -9', () => {
  test('run again, it adopts the job its dead run left paused, resumes it, and pivots with every guest write kept', async (t) => {
    const src = path.join(dir, 'w.raw');
    const target = path.join(dir, 'w.luks');
    await makeDiskImage(src, { sizeMiB: 128, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'resume-writer', disk: src, workload: 'writer', params: { wps: 40 } });
    await vm.waitForLine(/^WROTE seq=10 /, 30_000);

    // 128 MiB at 8 MiB/s: the copy is mid-way when the run dies.
    const first = await killMidCopy(vm, target, ['--speed', '8M']);
    const copyStart = Date.parse(String(jsonLines(first.stdout()).find((e) => e.phase === 'copying')!.time));
    const left = await inQemu(vm);
    assert.equal(left.jobs.length, 1, 'the dead run left its job in QEMU');
    assert.ok(left.jobs[0]!.offset < left.jobs[0]!.len, 'mid-copy');
    assert.equal(left.disk.file, src);
    // What a moderated run leaves when it dies while the guest is busy: a paused job.
    await withQmp(vm, (c) => c.execute('job-pause', { id: left.jobs[0]!.device }));
    assert.equal(existsSync(target), true);

    // Nobody runs for a while; the guest goes on writing.
    await new Promise((r) => setTimeout(r, 8000));

    // The same command again, moderated this time, under a policy with a deadline: the
    // guest writes all the time, so the job stays paused until the guarantee runs it, and
    // the deadline counts from the copy's first start, not from this run's.
    const policy = path.join(dir, 'deadline.yaml');
    await writeFile(policy, 'guarantee:\n  deadline: 30s\n');
    const seqBefore = Number(/seq=(\d+)/.exec(vm.lines.filter((l) => l.startsWith('WROTE')).at(-1)!)![1]);
    const again = await runCli(encryptArgs(vm, target, ['--policy', policy]));
    assert.equal(again.code, 0, again.stderr);
    const ev = jsonLines(again.stdout);
    const note = ev.find((e) => e.event === 'note');
    assert.equal(note?.resumed, 'adopted', JSON.stringify(note));
    assert.equal(note?.job, left.jobs[0]!.device);
    assert.equal(note?.paused, true);
    assert.equal(ev.at(-1)?.event, 'completed', again.stdout.slice(-500));
    const finished = Date.parse(String(ev.at(-1)!.time));
    assert.ok(finished <= copyStart + 31_000, `finished ${((finished - copyStart) / 1000).toFixed(1)} s after the copy first started (deadline 30 s)`);
    assert.ok(!again.stdout.includes(KEY) && !again.stderr.includes(KEY));

    const now = await inQemu(vm);
    assert.equal(now.disk.file, target, 'the guest runs on the encrypted image');
    assert.equal(now.disk.encrypted, true);
    assert.deepEqual(now.jobs, [], 'no job left');
    assert.deepEqual(await records(), [], 'the run record is gone');
    await vm.waitForLine(new RegExp(`^WROTE seq=${seqBefore + 80} `), 30_000); // it keeps writing, on the target
    await vm.stop();

    // Every block the guest reported, before the kill, while nobody ran, and after: its
    // latest content is in the image; every other block is the original's.
    const latest = new Map<number, number>();
    for (const l of vm.lines) {
      const m = /^WROTE seq=(\d+) off=(\d+)/.exec(l);
      if (m) latest.set(Number(m[2]), Number(m[1]));
    }
    const lastSeq = Math.max(...latest.values());
    const plain = path.join(dir, 'w.dec.raw');
    await decryptToRaw(target, 'luks', key, plain);
    const fd = await open(plain, 'r');
    try {
      // The guest reports a block once it is on the disk; the VM may stop between the
      // write of the block after the last one reported and its report: that block may
      // hold the unreported write instead (the writer writes one block at a time).
      const wrong: string[] = [];
      for (const [off, seq] of latest) {
        const { buffer } = await fd.read(Buffer.alloc(4096), 0, 4096, off);
        if (buffer.equals(writerBlock(seq, off))) continue;
        if (buffer.equals(writerBlock(lastSeq + 1, off))) {
          t.diagnostic(`block at ${off} holds seq ${lastSeq + 1}, written but not reported before the VM stopped`);
          continue;
        }
        wrong.push(`${off}: seq ${seq} expected, found ${JSON.stringify(buffer.subarray(0, 40).toString('latin1'))}`);
      }
      assert.deepEqual(wrong, [], `${wrong.length} of ${latest.size} blocks lack the guest's last write (last seq ${lastSeq}, before the second run ${seqBefore})`);
    } finally {
      await fd.close();
    }
    const srcBuf = await readFile(src);
    const decBuf = await readFile(plain);
    const unreported = writerOffset(lastSeq + 1, srcBuf.length);
    for (let off = 0; off < srcBuf.length; off += 4096) {
      if (latest.has(off)) continue;
      if (off === unreported && decBuf.subarray(off, off + 4096).equals(writerBlock(lastSeq + 1, off))) continue;
      if (!srcBuf.subarray(off, off + 4096).equals(decBuf.subarray(off, off + 4096))) assert.fail(`block at ${off} differs from the original`);
    }
  });

  test('idlecrypt cancel refuses while the run lives, then removes its job, nodes, secret and target; a run whose job is gone is rolled back and started again', async () => {
    const src = path.join(dir, 'c.raw');
    const target = path.join(dir, 'c.luks');
    await makeDiskImage(src, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const srcSha = await sha256(src);
    const vm = await boot({ name: 'resume-cancel', disk: src, workload: 'idle' });

    // While the run lives: a second encrypt into the same target and cancel both refuse.
    const live = startCli(encryptArgs(vm, target, ['--speed', '4M']));
    await live.waitForStdout(/"event":"progress".*"offset":[1-9]/, 60_000);
    const second = await runCli(encryptArgs(vm, target, ['--speed', '4M']));
    assert.equal(second.code, 1);
    assert.deepEqual(humanLines(second.stderr).length, 1, second.stderr);
    assert.match(humanLines(second.stderr)[0]!, new RegExp(`^idlecrypt: idlecrypt \\(pid ${live.child.pid}\\) is already encrypting VM 'resume-cancel' disk disk0 into ${target}$`));
    const refused = await runCli(['cancel', '--target', target]);
    assert.equal(refused.code, 1);
    assert.match(humanLines(refused.stderr)[0]!, new RegExp(`pid ${live.child.pid}\\) is still running this copy`));
    live.child.kill('SIGKILL');
    await live.result;

    const left = await inQemu(vm);
    assert.equal(left.jobs.length, 1);
    const tag = left.jobs[0]!.device.slice('idlecrypt-'.length);
    // The default encrypter's layout: raw over nbd (to the storage daemon), and the guest's
    // own format node over the file, unattached until the switch.
    assert.deepEqual(left.nodes.sort(), [`idlecrypt-${tag}`, `idlecrypt-file-${tag}`, `idlecrypt-fmt-${tag}`, `idlecrypt-nbd-${tag}`].sort());
    assert.deepEqual(left.objects, [`idlecrypt-key-${tag}`]);
    const daemon = (await daemonsOn(target))[0];
    assert.ok(daemon, 'the storage daemon outlives the killed run');

    const c = await runCli(['cancel', '--target', target]);
    assert.equal(c.code, 0, c.stderr);
    assert.equal(
      c.stdout.trim(),
      `idlecrypt: removed job idlecrypt-${tag}, node idlecrypt-${tag}, node idlecrypt-nbd-${tag}, qemu-storage-daemon (pid ${daemon.pid}), node idlecrypt-fmt-${tag}, node idlecrypt-file-${tag}, secret idlecrypt-key-${tag}, file ${target}; VM 'resume-cancel' disk disk0 runs on ${src}`,
    );
    assert.deepEqual(await daemonsOn(target), [], 'cancel stopped the daemon');
    const after1 = await inQemu(vm);
    assert.deepEqual([after1.jobs, after1.nodes, after1.objects], [[], [], []], 'nothing of ours left in QEMU');
    assert.equal(after1.disk.file, src);
    assert.equal(existsSync(target), false);
    assert.deepEqual(await records(), []);
    const none = await runCli(['cancel', '--target', target]);
    assert.equal(none.code, 2);
    assert.match(humanLines(none.stderr)[0]!, /^idlecrypt: no unfinished idlecrypt run writes /);

    // A dead run whose job then ended (an operator cancelled it in QEMU): its nodes, secret
    // and target cannot be continued. Run again, encrypt removes them and starts afresh.
    await killMidCopy(vm, target, ['--speed', '4M']);
    const jobId = (await inQemu(vm)).jobs[0]!.device;
    await withQmp(vm, async (q) => {
      await q.execute('job-cancel', { id: jobId });
      for (let i = 0; i < 100 && (await q.execute('query-block-jobs')).find((j) => j.device === jobId)?.status !== 'concluded'; i++) await new Promise((r) => setTimeout(r, 100));
      await q.execute('job-dismiss', { id: jobId });
    });
    const again = await runCli(encryptArgs(vm, target, ['--speed', '0']));
    assert.equal(again.code, 0, again.stderr);
    const note = jsonLines(again.stdout).find((e) => e.event === 'note');
    assert.equal(note?.resumed, 'rolled-back', JSON.stringify(note));
    const oldTag = jobId.slice('idlecrypt-'.length);
    const removed = (note?.removed as string[] | undefined) ?? [];
    assert.match(removed.find((x) => x.startsWith('qemu-storage-daemon')) ?? '', /^qemu-storage-daemon \(pid \d+\)$/, JSON.stringify(removed));
    assert.deepEqual(
      removed.filter((x) => !x.startsWith('qemu-storage-daemon')),
      [`node idlecrypt-${oldTag}`, `node idlecrypt-nbd-${oldTag}`, `node idlecrypt-fmt-${oldTag}`, `node idlecrypt-file-${oldTag}`, `secret idlecrypt-key-${oldTag}`, `file ${target}`],
    );
    const done = await inQemu(vm);
    assert.equal(done.disk.file, target);
    assert.deepEqual(done.jobs, []);
    assert.deepEqual(await records(), []);
    assert.deepEqual(await daemonsOn(target), [], 'no storage daemon left');
    await vm.stop();
    assert.equal(await sha256(src), srcSha, 'the source was never written');
    const cmp = await compareWithEncrypted(src, target, 'luks', key);
    assert.ok(cmp.same, cmp.output);
  });
  test('killed while creating the target, at READY and at the pivot: each time the same command run again finishes or undoes what the dead run left, and the last run pivots with every guest write kept', async (t) => {
    const src = path.join(dir, 'k.raw');
    const target = path.join(dir, 'k.luks');
    await makeDiskImage(src, { sizeMiB: 48, format: 'raw', fill: 'pattern' });
    const vm = await boot({ name: 'resume-kill', disk: src, workload: 'writer', params: { wps: 30 } });
    // The guest is busy (30 writes/s > 5): the copy runs at 8 MiB/s, and at READY the run
    // waits 4 s for a quiet moment that never comes before it pivots anyway.
    const policy = path.join(dir, 'kill.yaml');
    await writeFile(policy, 'speed:\n  idle: 8M\n  busy: 8M\npivot:\n  quiet-wait: 4s\n');
    const args = encryptArgs(vm, target, ['--policy', policy]);
    const found: string[] = [];
    const killAndLook = async (run: RunningCli, moment: string) => {
      run.child.kill('SIGKILL');
      await run.result;
      const q = await inQemu(vm);
      const j = q.jobs[0];
      found.push(`${moment}: ${j ? `job ${j.status}${j.ready ? ' (ready)' : ''} at ${((100 * j.offset) / Math.max(1, j.len)).toFixed(0)}%` : `no job, ${q.nodes.length} nodes, ${q.objects.length} secrets, target ${existsSync(target) ? 'present' : 'absent'}`}`);
      return q;
    };

    // 1. While the target is made (the LUKS header, the key slot, then its nodes in QEMU).
    const first = startCli(args);
    await first.waitForStdout(/"phase":"creating-target"/, 60_000);
    await new Promise((r) => setTimeout(r, 150));
    await killAndLook(first, 'creating the target');
    // 2. At READY.
    const second = startCli(args);
    // One connection for the polling: QEMU greets a new client on a socket only once the
    // last one has gone, and polls 50 ms apart outran that.
    await withQmp(vm, async (c) => {
      const readyAt = Date.now() + 90_000;
      while (!(await c.execute('query-block-jobs')).find((j) => j.device.startsWith('idlecrypt'))?.ready) {
        assert.ok(Date.now() < readyAt && second.child.exitCode === null, `no READY: ${second.stderr().slice(-1000)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    });
    const atReady = await killAndLook(second, 'READY');
    assert.equal(atReady.jobs.length, 1, 'the job stays at READY in QEMU');
    assert.equal(atReady.disk.file, src, 'the guest is still on its source');
    // 3. At the pivot: the run has asked QEMU to complete the job.
    const third = startCli(args);
    await third.waitForStdout(/"phase":"completing"/, 60_000);
    await killAndLook(third, 'the pivot');
    // 4. The same command again finishes: adopts a job at READY, or finds the pivot done.
    const last = await runCli(args);
    assert.equal(last.code, 0, last.stderr);
    const ev = jsonLines(last.stdout);
    assert.equal(ev.at(-1)?.event, 'completed', last.stdout.slice(-500));
    for (const f of found) t.diagnostic(`kill -9 ${f}`);
    const notes = [third, { stdout: () => last.stdout }].flatMap((r) => jsonLines(r.stdout()).filter((e) => e.event === 'note').map((e) => String(e.resumed)));
    t.diagnostic(`the runs after the kills: ${notes.join(', ')}`);

    const done = await inQemu(vm);
    assert.equal(done.disk.file, target, 'the guest runs on the encrypted image');
    assert.deepEqual(done.jobs, [], 'no job left');
    // Our names in QEMU: only those of the target the guest now runs on.
    const tag = /^idlecrypt-([0-9a-f]{8})$/.exec(done.disk.nodeName)?.[1];
    assert.ok(tag, `the disk runs on a node of ours: ${done.disk.nodeName}`);
    // raw → luks → file: the layout the storage daemon's switch leaves (target.ts).
    assert.deepEqual([...done.nodes].sort(), [`idlecrypt-${tag}`, `idlecrypt-file-${tag}`, `idlecrypt-fmt-${tag}`].sort(), 'no node of a dead run left');
    assert.deepEqual(await daemonsOn(target), [], 'no storage daemon left');
    assert.deepEqual(done.objects, [`idlecrypt-key-${tag}`], 'no secret of a dead run left');
    assert.deepEqual(await records(), [], 'no run record left');
    await vm.stop();
    await checkWriterBlocks(vm.lines, target, key);
  });
});
