/**
 * QmpClient against real QEMU 7.2 (`-machine none` under TCG: no guest image needed, starts
 * in well under a second). Every QEMU started here is SIGKILLed in an after hook or finally.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { firstValueFrom, filter, take, toArray, lastValueFrom } from 'rxjs';
import { QmpClient, type QmpEvent } from '../../src/qmp/client.ts';
import {
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpNotQmpError,
} from '../../src/qmp/errors.ts';
import type { BlockdevCreateOptions, JobStatus } from '../../src/qmp/schema.ts';

interface Qemu {
  proc: ChildProcess;
  dir: string;
  socketPath: string;
  stderr(): string;
  /** SIGKILL (if still running), wait for the exit, remove the temp dir. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();
process.once('exit', () => live.forEach((p) => p.kill('SIGKILL'))); // last resort if a hook never ran

async function startQemu(): Promise<Qemu> {
  const dir = await mkdtemp(join(tmpdir(), 'idlecrypt-qmp-qemu-'));
  const socketPath = join(dir, 'qmp.sock');
  const proc = spawn('qemu-system-x86_64', [
    '-machine', 'none', '-accel', 'tcg', '-display', 'none', '-nodefaults',
    '-qmp', `unix:${socketPath},server=on,wait=off`,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(proc);
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  const qemu: Qemu = {
    proc, dir, socketPath,
    stderr: () => stderr,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
      live.delete(proc);
      await rm(dir, { recursive: true, force: true });
    },
  };
  for (let i = 0; ; i++) {
    if (await stat(socketPath).then((s) => s.isSocket(), () => false)) return qemu;
    if (proc.exitCode !== null || i >= 200) {
      await qemu.stop();
      throw new Error(`QEMU did not create its QMP socket: ${stderr}`);
    }
    await sleep(25);
  }
}

/** Resolves to the rejection of `p` (fails the test if `p` resolves). */
async function rejectionOf(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof Error);
    return e;
  }
  assert.fail('expected a rejection');
}

describe('QmpClient against QEMU 7.2', () => {
  let qemu: Qemu;
  let client: QmpClient;
  before(async () => {
    qemu = await startQemu();
    client = await QmpClient.connect(qemu.socketPath);
  });
  after(async () => {
    await client?.close();
    await qemu?.stop();
  });

  it('greets as QEMU 7.2 with the oob capability, and query-version agrees with the greeting', async () => {
    assert.equal(client.state, 'running');
    const { version, capabilities } = client.greeting.QMP;
    assert.equal(version.qemu.major, 7);
    assert.equal(version.qemu.minor, 2);
    assert.equal(typeof version.qemu.micro, 'number');
    assert.deepEqual(capabilities, ['oob']);
    assert.deepEqual(await client.execute('query-version'), version);
  });

  it('returns typed results: query-status says running, and a machine without disks has no blocks or jobs', async () => {
    assert.deepEqual(await client.execute('query-status'), { running: true, singlestep: false, status: 'running' });
    assert.deepEqual(await client.execute('query-block'), []);
    assert.deepEqual(await client.execute('query-jobs'), []);
    assert.deepEqual(await client.execute('query-named-block-nodes', { flat: true }), []);
  });

  it('rejects a failing command with QmpCommandError of class GenericError that names the command', async () => {
    const err = await rejectionOf(client.execute('blockdev-del', { 'node-name': 'no-such-node' }));
    assert.ok(err instanceof QmpCommandError);
    assert.equal(err.code, 'QMP_COMMAND');
    assert.equal(err.errorClass, 'GenericError');
    assert.equal(err.command, 'blockdev-del');
    assert.equal(err.desc, "Failed to find node with node-name='no-such-node'");
    assert.equal(err.message, "blockdev-del: Failed to find node with node-name='no-such-node'");
    assert.equal(client.state, 'running');
  });

  it('delivers STOP and RESUME for stop and cont, each before its command resolves', async () => {
    const order: string[] = [];
    const sub = client.events('STOP', 'RESUME').subscribe((e) => order.push(e.event));
    try {
      await client.execute('stop').then(() => order.push('stop done'));
      assert.equal((await client.execute('query-status')).status, 'paused');
      await client.execute('cont').then(() => order.push('cont done'));
    } finally {
      sub.unsubscribe();
    }
    // QEMU emits the event while the command runs, so it precedes the reply on the wire.
    assert.deepEqual(order, ['STOP', 'stop done', 'RESUME', 'cont done']);
  });

  it('resolves many concurrent commands, each with its own reply', async () => {
    const names = ['query-version', 'query-status', 'query-block', 'query-commands', 'query-jobs'] as const;
    const calls = Array.from({ length: 20 }, (_, i) => names[i % names.length]!);
    const results = await Promise.all(calls.map((c) => client.executeRaw(c)));
    results.forEach((r, i) => {
      const c = calls[i];
      if (c === 'query-version') assert.deepEqual(r, client.greeting.QMP.version);
      else if (c === 'query-status') assert.equal((r as { status: string }).status, 'running');
      else if (c === 'query-commands') assert.ok((r as { name: string }[]).some((x) => x.name === 'blockdev-mirror'));
      else assert.deepEqual(r, []);
    });
  });

  it('drives blockdev-create, blockdev-add (file, luks), blockdev-mirror and job events with the typed schema', async () => {
    const size = 4 * 1024 * 1024;
    const jobEvents: QmpEvent<'JOB_STATUS_CHANGE'>[] = [];
    const sub = client.events('JOB_STATUS_CHANGE').subscribe((e) => jobEvents.push(e));
    const statusReached = (id: string, status: JobStatus) =>
      firstValueFrom(client.events('JOB_STATUS_CHANGE').pipe(filter((e) => e.data.id === id && e.data.status === status)));
    const create = async (jobId: string, options: BlockdevCreateOptions) => {
      const concluded = statusReached(jobId, 'concluded');
      await client.execute('blockdev-create', { 'job-id': jobId, options });
      await concluded;
      const [job] = await client.execute('query-jobs');
      await client.execute('job-dismiss', { id: jobId });
      return job;
    };
    try {
      for (const name of ['src', 'dst']) {
        const job = await create(`create-${name}`, { driver: 'file', filename: join(qemu.dir, `${name}.img`), size });
        assert.deepEqual(job, { id: `create-${name}`, type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 });
        await client.execute('blockdev-add', { driver: 'file', 'node-name': name, filename: join(qemu.dir, `${name}.img`) });
      }
      assert.deepEqual(
        jobEvents.filter((e) => e.data.id === 'create-src').map((e) => e.data.status),
        ['created', 'running', 'waiting', 'pending', 'concluded', 'null'],
      );

      // A LUKS passphrase must be valid UTF-8, so the key file holds text.
      await writeFile(join(qemu.dir, 'key'), 'correct horse battery staple');
      await client.execute('object-add', { 'qom-type': 'secret', id: 'sec0', file: join(qemu.dir, 'key'), format: 'raw' });
      let luksJob;
      for (let attempt = 0; attempt < 3; attempt++) {
        // Key-slot timing is sometimes refused on a VM ("Unable to get accurate CPU usage"): retry.
        luksJob = await create(`create-luks-${attempt}`, { driver: 'luks', file: 'dst', size, 'key-secret': 'sec0', 'iter-time': 10 });
        if (!luksJob?.error?.includes('accurate CPU usage')) break;
      }
      assert.equal(luksJob?.error, undefined);
      await client.execute('blockdev-add', { driver: 'luks', 'node-name': 'crypt', file: 'dst', 'key-secret': 'sec0' });
      const nodes = await client.execute('query-named-block-nodes', { flat: true });
      const crypt = nodes.find((n) => n['node-name'] === 'crypt');
      assert.equal(crypt?.drv, 'luks');
      assert.equal(crypt?.encrypted, true);
      assert.equal(crypt?.image['virtual-size'], size);

      const ready = firstValueFrom(client.events('BLOCK_JOB_READY'));
      const completed = firstValueFrom(client.events('BLOCK_JOB_COMPLETED'));
      await client.execute('blockdev-mirror', { 'job-id': 'mirror0', device: 'src', target: 'crypt', sync: 'full', speed: 1 << 20 });
      await client.execute('block-job-set-speed', { device: 'mirror0', speed: 0 });
      const readyEvent = await ready;
      assert.deepEqual(readyEvent.data, { device: 'mirror0', type: 'mirror', len: size, offset: size, speed: 0 });
      const [info] = await client.execute('query-block-jobs');
      assert.deepEqual(Object.keys(info ?? {}).sort(), [
        'auto-dismiss', 'auto-finalize', 'busy', 'device', 'io-status', 'len', 'offset', 'paused', 'ready', 'speed', 'status', 'type',
      ]);
      assert.equal(info?.status, 'ready');
      assert.equal(info?.ready, true);
      await client.execute('job-complete', { id: 'mirror0' });
      assert.deepEqual((await completed).data, { device: 'mirror0', type: 'mirror', len: size, offset: size, speed: 0 });
    } finally {
      sub.unsubscribe();
    }
    for (const node of ['crypt', 'dst', 'src']) await client.execute('blockdev-del', { 'node-name': node });
    await client.execute('object-del', { id: 'sec0' });
    assert.deepEqual(await client.execute('query-named-block-nodes', { flat: true }), []);
  });

  it('fails a second client on the same socket with QmpNotQmpError after the greeting timeout, leaving the first working', async () => {
    const started = Date.now();
    const err = await rejectionOf(QmpClient.connect(qemu.socketPath, { greetingTimeoutMs: 300 }));
    assert.ok(Date.now() - started >= 290);
    assert.ok(err instanceof QmpNotQmpError);
    assert.equal(err.code, 'QMP_NOT_QMP');
    assert.equal(err.message, `${qemu.socketPath} is not a QMP socket (no greeting within 0.3 s; is another client connected?)`);
    assert.equal((await client.execute('query-status')).status, 'running');
  });
});

describe('QmpClient connect failures', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'idlecrypt-qmp-connect-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('fails with QmpConnectError naming the path when the socket does not exist', async () => {
    const path = join(dir, 'missing.sock');
    const err = await rejectionOf(QmpClient.connect(path));
    assert.ok(err instanceof QmpConnectError);
    assert.equal(err.code, 'QMP_CONNECT');
    assert.equal(err.message, `QMP socket ${path} does not exist`);
    assert.equal(err.socketPath, path);
  });

  it('fails with QmpConnectError "is not a socket" for a regular file', async () => {
    const path = join(dir, 'regular-file');
    await writeFile(path, 'not a socket');
    const err = await rejectionOf(QmpClient.connect(path));
    assert.ok(err instanceof QmpConnectError);
    assert.equal(err.message, `${path} is not a socket`);
  });
});

describe('QmpClient when QEMU is killed', () => {
  it('rejects the pending command with QmpDisconnectedError, emits on closed$, and then refuses to connect', async () => {
    const qemu = await startQemu();
    try {
      const client = await QmpClient.connect(qemu.socketPath);
      const events = lastValueFrom(client.events$.pipe(toArray()));
      const closed = firstValueFrom(client.closed$.pipe(take(1)));
      process.kill(qemu.proc.pid!, 'SIGSTOP'); // so the command below cannot be answered
      const pending = client.execute('query-status');
      await sleep(50);
      process.kill(qemu.proc.pid!, 'SIGKILL');
      const err = await rejectionOf(pending);
      assert.ok(err instanceof QmpDisconnectedError, `pending command: ${String(err)}`);
      assert.equal(err.code, 'QMP_DISCONNECTED');
      assert.equal(err.command, 'query-status');
      assert.equal(err.message, 'QMP connection closed while waiting for query-status (did QEMU exit?)');
      const reason = await closed;
      assert.ok(reason instanceof QmpDisconnectedError, `closed$: ${String(reason)}`);
      assert.equal(reason.message, 'QMP connection closed (did QEMU exit?)');
      assert.deepEqual(await events, []);
      assert.equal(client.state, 'closed');

      // The dead QEMU left its socket file behind: once the process is gone (under load
      // its listening socket can outlive our connection by a moment, and a connect then is
      // accepted and dropped before the greeting), connecting is refused.
      if (qemu.proc.exitCode === null && qemu.proc.signalCode === null) await new Promise((r) => qemu.proc.once('exit', r));
      const refused = await rejectionOf(QmpClient.connect(qemu.socketPath));
      assert.ok(refused instanceof QmpConnectError, `reconnect: ${String(refused)}`);
      assert.equal(refused.message, `cannot connect to QMP socket ${qemu.socketPath}: connection refused (is QEMU running?)`);
    } finally {
      await qemu.stop();
    }
  });
});
