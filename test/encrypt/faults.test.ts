/**
 * Bad input and faults: each gets one clear line, a non-zero exit, and leaves the guest
 * running on its original, unmodified disk, with nothing of ours left behind in QEMU.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile, readFile, readdir, stat, chmod, symlink } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { makeDiskImage, startTestVm, ensureImage, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { humanLines, runCli, startCli, type CliResult } from '../helpers/cli.ts';
import { sha256, writeKey } from '../helpers/images.ts';

let dir: string;
let key: string;
let src: string;
let srcSha: string;
let vm: TestVm;

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-faults-'));
  key = path.join(dir, 'key');
  await writeKey(key, 'fault-test-key');
  src = path.join(dir, 'src.raw');
  await makeDiskImage(src, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
  srcSha = await sha256(src);
  await mkdir(path.join(dir, 'vm1'));
  vm = await startTestVm({ name: 'faults', disk: src, dir: path.join(dir, 'vm1'), workload: 'idle' });
  await vm.ready;
});
after(async () => {
  await vm?.stop();
  await rm(dir, { recursive: true, force: true });
});

function encrypt(args: Record<string, string>, extra: string[] = []) {
  const a = { '--qmp': vm.toolQmpSocket, '--device': 'disk0', '--target': path.join(dir, 't.luks'), '--key-file': key, '--iter-time': '50', ...args };
  return ['encrypt', ...Object.entries(a).flat(), ...extra];
}

/** One line for the operator, the exit code, and nothing changed. */
async function assertRefused(r: CliResult, line: RegExp, code = 1, vmRef: TestVm = vm, sourceSha = srcSha, source = src) {
  assert.equal(r.code, code, `exit code; stderr: ${r.stderr}`);
  const lines = humanLines(r.stderr);
  assert.equal(lines.length, 1, `exactly one line, got: ${JSON.stringify(lines)}`);
  assert.match(lines[0]!, /^idlecrypt: /);
  assert.match(lines[0]!, line);
  await assertUntouched(vmRef, sourceSha, source);
}

async function assertUntouched(vmRef: TestVm, sourceSha: string, source: string) {
  assert.equal(existsSync(path.join(dir, 't.luks')), false, 'no target left behind');
  if (!isRunning(vmRef.pid)) {
    assert.equal(await sha256(source), sourceSha, 'the source is unmodified');
    return;
  }
  // The tool's socket is free once the CLI has exited; the test may hold the other one.
  const c = await QmpClient.connect(vmRef.toolQmpSocket);
  try {
    const blocks = await c.execute('query-block');
    const disk = blocks.find((b) => b.qdev?.includes('disk0'));
    assert.equal(disk?.inserted?.file, source, 'the guest still runs on its original disk');
    const nodes = await c.execute('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.map((n) => n['node-name'] ?? '').filter((n) => n.startsWith('idlecrypt')), [], 'no idlecrypt nodes left in QEMU');
    const objects = (await c.executeRaw('qom-list', { path: '/objects' })) as { name: string }[];
    assert.deepEqual(objects.filter((o) => o.name.startsWith('idlecrypt')).map((o) => o.name), [], 'no secret objects left in QEMU');
    const status = await c.execute('query-status');
    assert.equal(status.status, 'running');
  } finally {
    await c.close();
  }
  assert.equal(await sha256(source), sourceSha, 'the source is unmodified');
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('bad input', () => {
  test('a missing QMP socket is named', async () => {
    const r = await runCli(encrypt({ '--qmp': path.join(dir, 'nope.sock') }));
    await assertRefused(r, /QMP socket .*nope\.sock does not exist/);
  });

  test('a path that is not a socket is named', async () => {
    await writeFile(path.join(dir, 'plain.txt'), 'x');
    const r = await runCli(encrypt({ '--qmp': path.join(dir, 'plain.txt') }));
    await assertRefused(r, /plain\.txt is not a socket/);
  });

  test('a socket that does not speak QMP is named', async () => {
    const sockPath = path.join(dir, 'silent.sock');
    const server = createServer(() => {}); // accepts and never greets
    await new Promise<void>((r) => server.listen(sockPath, r));
    try {
      const r = await runCli(encrypt({ '--qmp': sockPath }));
      await assertRefused(r, /silent\.sock is not a QMP socket/);
    } finally {
      server.close();
    }
  });

  test('an unknown device is named with the disks the VM has', async () => {
    const r = await runCli(encrypt({ '--device': 'vdz' }));
    await assertRefused(r, new RegExp(`unknown device 'vdz'; this VM's disks: disk0 \\(${src}\\)`));
  });

  test('an existing target is refused and left as it was', async () => {
    const t = path.join(dir, 'exists.luks');
    await writeFile(t, 'precious');
    const r = await runCli(encrypt({ '--target': t }));
    await assertRefused(r, /exists\.luks already exists; refusing to overwrite it/);
    assert.equal(await readFile(t, 'utf8'), 'precious');
  });

  test('the guest\'s own disk as target is refused', async () => {
    const r = await runCli(encrypt({ '--target': src }));
    await assertRefused(r, /already exists; refusing to overwrite it|is the guest's own disk/);
  });

  test('a missing, empty or non-regular key file is named', async () => {
    await assertRefused(await runCli(encrypt({ '--key-file': path.join(dir, 'nokey') })), /key file .*nokey does not exist/);
    await writeFile(path.join(dir, 'empty'), '');
    await assertRefused(await runCli(encrypt({ '--key-file': path.join(dir, 'empty') })), /key file .*empty is empty/);
    await assertRefused(await runCli(encrypt({ '--key-file': dir })), /is not a regular file/);
  });

  test('an unreadable key file is named (run as an unprivileged user)', async () => {
    const secret = path.join(dir, 'rootonly');
    await writeKey(secret, 'x');
    await chmod(secret, 0o600);
    await chmod(dir, 0o755);
    const r = await new Promise<CliResult>((resolve) => {
      // setpriv drops to nobody; the key check runs before any QMP connection.
      const child = spawn('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, '--import', 'tsx', 'src/cli/main.ts', ...encrypt({ '--key-file': secret })]);
      let out = '';
      let err = '';
      child.stdout!.on('data', (d) => (out += d));
      child.stderr!.on('data', (d) => (err += d));
      child.on('close', (code, signal) => resolve({ code, signal, stdout: out, stderr: err }));
    });
    await assertRefused(r, /key file .*rootonly is not readable/);
  });

  test('bad flag values get a usage error (exit 2)', async () => {
    await assertRefused(await runCli(encrypt({ '--format': 'zip' })), /--format: 'zip' is not one of auto, luks, qcow2/, 2);
    await assertRefused(await runCli(encrypt({ '--speed': 'fast' })), /--speed: 'fast' is not a byte count/, 2);
    await assertRefused(await runCli(encrypt({ '--encrypter': 'gpu' })), /--encrypter: 'gpu' is not one of qemu, storage-daemon/, 2);
    await assertRefused(await runCli(encrypt({ '--encrypter': 'storage-daemon', '--format': 'qcow2' })), /--encrypter storage-daemon cannot make a qcow2 target yet .*: use --format luks, or --encrypter qemu/, 2);
    await assertRefused(
      await runCli(['encrypt', '--domain', 'd', '--disk', 'vda', '--target', '/tmp/never.luks', '--key-file', '/etc/hostname', '--encrypter', 'storage-daemon']),
      /--encrypter storage-daemon goes with --qmp/,
      2,
    );
    const r = await runCli(['encrypt', '--qmp', vm.toolQmpSocket]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /required option '--target <path>' not specified/);
    // --device is required with --qmp (--disk goes with --domain): said in one line.
    await assertRefused(await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--target', '/tmp/never.luks', '--key-file', '/etc/hostname']), /--qmp needs --device/, 2);
    await assertRefused(await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', '/tmp/never.luks']), /give the key as --key-file FILE/, 2);
  });

  test('without qemu-storage-daemon (the default encrypter) the run says so and how to go on, and leaves nothing', async () => {
    // PATH: every command of /usr/bin and /usr/sbin but the daemon.
    const bin = path.join(dir, 'bin-no-qsd');
    await mkdir(bin);
    for (const d of ['/usr/bin', '/usr/sbin']) {
      for (const f of await readdir(d)) if (f !== 'qemu-storage-daemon') await symlink(path.join(d, f), path.join(bin, f)).catch(() => undefined);
    }
    await assertRefused(
      await runCli(encrypt({ '--iter-time': '50' }), { PATH: bin }),
      /qemu-storage-daemon, which encrypts the copy \(--encrypter storage-daemon, the default\), is not on PATH: install it \(Debian: qemu-system-common\), or say --encrypter qemu/,
      2,
    );
  });

  test('a disk that already has a block job is refused', async () => {
    const c = await QmpClient.connect(vm.qmpSocket);
    try {
      await c.execute('blockdev-add', { driver: 'null-co', 'node-name': 'scratch', size: 64 * 1024 * 1024 } as never);
      await c.execute('blockdev-mirror', { 'job-id': 'backup-by-someone', device: 'disk0-fmt', target: 'scratch', sync: 'full', speed: 1024 });
      const r = await runCli(encrypt({}, ['--json']));
      await assertRefused(r, /another block job is already running on 'disk0' \(QEMU's jobs: mirror backup-by-someone\)/);
      assert.deepEqual(r.stdout.trim().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l)).filter((r) => r.event === 'phase').map((r) => r.phase), ['preflight'], 'refused before the target was created');
      const jobs = await c.execute('query-block-jobs');
      assert.deepEqual(jobs.map((j) => j.device), ['backup-by-someone'], 'the other job is left alone');
    } finally {
      await c.execute('job-cancel', { id: 'backup-by-someone' }).catch(() => {});
      await waitNoJobs(c);
      await c.execute('job-dismiss', { id: 'backup-by-someone' }).catch(() => {});
      await c.execute('blockdev-del', { 'node-name': 'scratch' }).catch(() => {});
      await c.close();
    }
  });

  test('a target filesystem without room is refused before anything is created', async () => {
    const small = path.join(dir, 'small');
    await mkdir(small);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', small]);
    try {
      const r = await runCli(encrypt({ '--target': path.join(small, 't.luks') }));
      await assertRefused(r, /not enough space for .*small\/t\.luks: needs 80\.0 MiB, .*small has 32\.0 MiB free/);
      assert.equal(existsSync(path.join(small, 't.luks')), false);
    } finally {
      execFileSync('umount', [small]);
    }
  });
});

describe('faults during a run', () => {
  test('Ctrl-C cancels the job, removes the partial target and leaves the guest on its disk', async () => {
    const cli = startCli(encrypt({ '--speed': '2M', '--json': '' }).filter((a) => a !== ''));
    await cli.waitForStdout(/"event":"progress".*"offset":[1-9]/);
    assert.equal(existsSync(path.join(dir, 't.luks')), true, 'the target exists while copying');
    cli.child.kill('SIGINT');
    const r = await cli.result;
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stderr, /SIGINT: cancelling the copy/);
    assert.match(r.stderr, /^idlecrypt: cancelled: the copy was stopped and .*t\.luks removed; the guest runs on its original disk .*src\.raw$/m);
    await assertUntouched(vm, srcSha, src);
  });

  test("an operator's pause (block-job-pause) holds until they resume: moderation does not undo it", async () => {
    const policy = path.join(dir, 'slow-idle.yaml');
    await writeFile(policy, 'speed:\n  idle: 2MiB\n'); // idle guest, slow copy: 32 s for 64 MiB
    const cli = startCli(encrypt({ '--policy': policy, '--json': '' }).filter((a) => a !== ''));
    const c = await QmpClient.connect(vm.qmpSocket);
    try {
      await cli.waitForStdout(/"event":"progress".*"offset":[1-9]/);
      const id = (await c.execute('query-block-jobs'))[0]!.device;
      await c.execute('block-job-pause', { device: id });
      await cli.waitForStderr(/paused by someone else/);
      // `paused` shows the request at once; the job stops at its next pause point, after
      // the copy operations in flight: from then on nothing may move.
      let before = (await c.execute('query-block-jobs'))[0]!;
      for (const t0 = Date.now(); before.status !== 'paused'; before = (await c.execute('query-block-jobs'))[0]!) {
        assert.ok(Date.now() - t0 < 5000, `the job stops after block-job-pause (status ${before.status})`);
        await new Promise((r) => setTimeout(r, 20));
      }
      await new Promise((r) => setTimeout(r, 1500)); // six reconciler passes
      const held = (await c.execute('query-block-jobs'))[0]!;
      assert.equal(held.paused, true, 'still paused');
      assert.equal(held.offset, before.offset, 'nothing copied while paused');
      assert.equal(held.speed, 2 * 1024 * 1024, 'the policy speed is kept for when it runs again');
      await c.execute('block-job-resume', { device: id });
      await cli.waitForStderr(/the job was resumed; moderating it again/);
      const t0 = Date.now();
      while ((await c.execute('query-block-jobs'))[0]!.offset === held.offset) {
        assert.ok(Date.now() - t0 < 5000, 'the copy runs again after the resume');
        await new Promise((r) => setTimeout(r, 100));
      }
      cli.child.kill('SIGINT');
      const r = await cli.result;
      assert.equal(r.code, 130, r.stderr);
      await assertUntouched(vm, srcSha, src);
    } finally {
      cli.child.kill('SIGINT'); // a failed assertion must not leave the copy to the next test
      await cli.result;
      await c.close();
    }
  });

  test('QEMU dying mid-job is reported with the original disk intact', async () => {
    const src2 = path.join(dir, 'dying.raw');
    await makeDiskImage(src2, { sizeMiB: 64, format: 'raw', fill: 'pattern' });
    const sha2 = await sha256(src2);
    await mkdir(path.join(dir, 'vm2'));
    const vm2 = await startTestVm({ name: 'dying', disk: src2, dir: path.join(dir, 'vm2'), workload: 'idle' });
    try {
      await vm2.ready;
      const cli = startCli(encrypt({ '--qmp': vm2.toolQmpSocket, '--speed': '2M', '--json': '' }).filter((a) => a !== ''));
      await cli.waitForStdout(/"event":"progress".*"offset":[1-9]/);
      process.kill(vm2.pid, 'SIGKILL');
      const r = await cli.result;
      assert.equal(r.code, 1, r.stderr);
      const lines = humanLines(r.stderr);
      assert.equal(lines.length, 1, JSON.stringify(lines));
      assert.match(lines[0]!, /^idlecrypt: QEMU exited during the copy; the original disk .*dying\.raw is intact \(the guest never ran on the target\) and the partial target was removed$/);
      assert.equal(existsSync(path.join(dir, 't.luks')), false);
      assert.equal(await sha256(src2), sha2);
      assert.ok((await stat(src2)).size === 64 * 1024 * 1024);
    } finally {
      await vm2.stop();
    }
  });
});

async function waitNoJobs(c: QmpClient) {
  for (let i = 0; i < 100; i++) {
    const jobs = await c.execute('query-block-jobs');
    if (jobs.every((j) => j.status === 'concluded')) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

