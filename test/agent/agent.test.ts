/**
 * The host agent (issue 10) against real QEMU guests under TCG, the real command
 * (`idlecrypt agent`), real bpftrace: one agent and one configuration encrypt every
 * configured disk, never more copies at once than max-jobs (read from QEMU), a disk whose
 * key is missing fails alone; SIGTERM leaves every copy paused and the next start resumes
 * it; a second agent refuses; `kill -9` mid-copy and a restart: the copy is adopted and
 * finished. `idlecrypt status` asks the agent over its socket.
 */
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ensureImage, makeDiskImage, startTestVm, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { listDisks } from '../../src/encrypt/disks.ts';
import { cliStateDir, humanLines, jsonLines, runCli, startCli, type RunningCli } from '../helpers/cli.ts';
import { checkWriterBlocks, compareWithEncrypted, writeKey } from '../helpers/images.ts';
import type { AgentStatus } from '../../src/agent/agent.ts';
import { tagsInQemu } from '../../src/agent/orphans.ts';
import { askAgent } from '../../src/agent/status-server.ts';
import { median } from '../helpers/moderation-lab.ts';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';
import { daemonsOn } from '../helpers/daemons.ts';
import { processStart } from '../../src/encrypt/runs.ts';

const execFileP = promisify(execFile);
let dir: string;
let runDir: string;
const vms: TestVm[] = [];
const agents: RunningCli[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-agent-'));
  runDir = path.join(dir, 'run');
});
// Each test's agents, then its guests, stop when it ends.
afterEach(killLeftAgents);
stopGuestsAfterEachTest(vms);
after(async () => {
  // IDLECRYPT_TEST_DUMP=DIR keeps each agent's log (JSON lines) for a post-mortem.
  const dump = process.env.IDLECRYPT_TEST_DUMP;
  if (dump) await Promise.all(agents.map((a, i) => writeFile(path.join(dump, `agent-${i + 1}.log`), a.stderr())));
  for (const a of agents) if (a.child.exitCode === null && a.child.signalCode === null) a.child.kill('SIGKILL');
  await Promise.all(vms.map((vm) => vm.stop()));
  // A copy SIGTERM left paused keeps its storage daemon (by design: the next agent adopts
  // it); with the guest gone here, nothing ever will.
  for (const d of await daemonsOn(dir)) process.kill(d.pid, 'SIGKILL');
  await rm(dir, { recursive: true, force: true });
});

async function boot(name: string, sizeMiB: number, workload: 'idle' | 'writer' | 'bursty', params?: Record<string, number>, extraMiB: number[] = []): Promise<{ vm: TestVm; disk: string; extra: string[] }> {
  const disk = path.join(dir, `${name}.raw`);
  const extra = extraMiB.map((_, i) => path.join(dir, `${name}-${i + 1}.raw`));
  await makeDiskImage(disk, { sizeMiB, format: 'raw', fill: 'pattern' });
  for (const [i, f] of extra.entries()) await makeDiskImage(f, { sizeMiB: extraMiB[i]!, format: 'raw', fill: 'pattern' });
  const vmDir = path.join(dir, `vm-${name}`);
  await mkdir(vmDir);
  const vm = await startTestVm({ name, disk, dir: vmDir, workload, extraDisks: extra, ...(params ? { params } : {}) });
  vms.push(vm);
  await vm.ready;
  return { vm, disk, extra };
}

/**
 * A configuration for the guests named `prefix-*`: its agent talks to each on its second
 * monitor. The policy, inline, calls the writer guests (15 requests/s, ~1000 interrupts/s) idle, so that their
 * copies run while they write.
 */
async function config(file: string, prefix: string, host: string): Promise<string> {
  await writeFile(
    file,
    [
      host,
      'policy:',
      '  thresholds:',
      '    disk: 100',
      '    interrupts: 5000',
      'encrypt:',
      `  - vm: "${prefix}-*"`,
      '    disks: [disk0]',
      `    target: ${dir}/{vm}-{disk}.luks`,
      `    key-file: ${dir}/{vm}.key`,
      `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`,
      '',
    ].join('\n'),
  );
  return file;
}

/** Kills the agents an earlier test left running (it failed before stopping them): they hold the lock. */
async function killLeftAgents(): Promise<void> {
  for (const a of agents) {
    if (a.child.exitCode === null && a.child.signalCode === null) {
      a.child.kill('SIGKILL');
      await a.result;
    }
  }
}

function startAgent(cfg: string): RunningCli {
  const a = startCli(['agent', '--config', cfg, '--iter-time', '50'], { IDLECRYPT_RUN_DIR: runDir });
  agents.push(a);
  return a;
}

async function status(): Promise<AgentStatus> {
  const r = await runCli(['status', '--json'], { IDLECRYPT_RUN_DIR: runDir });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as AgentStatus;
}

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`${what}: not within ${timeoutMs / 1000} s${last ? ` (${String(last)})` : ''}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function jobsOf(vm: TestVm): Promise<{ device: string; status: string; paused: boolean; offset: number; len: number; ready: boolean }[]> {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return (await c.execute('query-block-jobs')).filter((j) => j.device.startsWith('idlecrypt'));
  } finally {
    await c.close();
  }
}

async function diskOf(vm: TestVm, id = 'disk0') {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return (await listDisks(c)).find((d) => d.qdevId === id)!;
  } finally {
    await c.close();
  }
}

describe('idlecrypt agent', () => {
  test('encrypts every configured disk of every matching VM, never more than max-jobs at once; a VM whose key is missing fails alone; status asks the agent', async () => {
    const a = await boot('web-a', 96, 'writer', { wps: 30 });
    const b = await boot('web-b', 96, 'idle', undefined, [48]); // two disks
    const c = await boot('web-c', 32, 'idle');
    await writeKey(path.join(dir, 'web-a.key'), 'key of web-a');
    await writeKey(path.join(dir, 'web-b.key'), 'key of web-b');
    // web-c.key is missing
    const cfg = await config(path.join(dir, 'agent.yaml'), 'web', 'host:\n  max-jobs: 1\n  max-speed: 48M\n  protect: vm');
    // web-b: every disk (the first entry that matches a VM is its entry).
    const text0 = await readFile(cfg, 'utf8');
    await writeFile(cfg, text0.replace('encrypt:\n', ['encrypt:', '  - vm: web-b', '    disks: all', `    target: ${dir}/{vm}-{disk}.luks`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`, ''].join('\n')));
    const agent = startAgent(cfg);

    // Read from QEMU, not from the agent: how many of our jobs run at once.
    let most = 0;
    let polling = true;
    const poller = (async () => {
      while (polling) {
        const n = (await Promise.all([a.vm, b.vm].map((vm) => jobsOf(vm).catch(() => [])))).reduce((s, j) => s + j.length, 0);
        most = Math.max(most, n);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    const mid = await until('a copy in the agent\'s status', async () => {
      const st = await status();
      return st.disks.some((d) => d.state === 'copying') ? st : undefined;
    }, 60_000);
    assert.equal(mid.vms.filter((v) => v.name.startsWith('web-')).length, 3);
    // The table, while a copy runs (a 96 MiB copy may be over in seconds: asked until seen).
    const text = await until('the status table showing a copy', async () => {
      const r = await runCli(['status'], { IDLECRYPT_RUN_DIR: runDir });
      assert.equal(r.code, 0, r.stderr);
      return /web-[ab]\s+disk0\s+copying\s+\d+\.\d% /.test(r.stdout) ? r.stdout : undefined;
    }, 60_000);
    assert.match(text, /^agent pid \d+ on .*: \d+ VMs watched, 1\/1 copies running\n/);
    assert.match(text, /^VM +DISK +STATE +PROGRESS +SPEED +ETA +WHY +TARGET$/m);

    const done = await until('the three disks encrypted', async () => {
      const st = await status();
      const by = (vm: string, disk = 'disk0') => st.disks.find((d) => d.vm === vm && d.disk === disk);
      return by('web-a')?.state === 'encrypted' && by('web-b')?.state === 'encrypted' && by('web-b', 'disk1')?.state === 'encrypted' && by('web-c')?.state === 'failed' ? st : undefined;
    }, 240_000);
    polling = false;
    await poller;
    assert.equal(most, 1, 'never more than max-jobs copies at once in QEMU');
    const failed = done.disks.find((d) => d.vm === 'web-c')!;
    assert.match(failed.reason ?? '', /web-c\.key/, 'the failed disk says why');
    assert.equal((await diskOf(c.vm)).file, c.disk, 'web-c stays on its source');

    for (const [g, id] of [[a, 'disk0'], [b, 'disk0'], [b, 'disk1']] as const) {
      const d = await diskOf(g.vm, id);
      assert.equal(d.file, path.join(dir, `${g.vm.name}-${id}.luks`));
      assert.equal(d.encrypted, true);
      assert.deepEqual(await jobsOf(g.vm), []);
    }
    // The status socket is root's: anyone else gets one line.
    const denied = await execFileP('runuser', ['-u', 'nobody', '--', 'env', `IDLECRYPT_RUN_DIR=${runDir}`, path.join(process.cwd(), 'bin/idlecrypt'), 'status']).then(
      () => assert.fail('status answered a non-root user'),
      (e: { code: number; stderr: string }) => e,
    );
    assert.equal(denied.code, 1);
    assert.deepEqual(humanLines(denied.stderr), [`idlecrypt: permission denied on ${runDir}/agent.sock: the agent's status is for root`]);
    agent.child.kill('SIGTERM');
    const r = await agent.result;
    assert.equal(r.code, 0, r.stderr.slice(-2000));
    assert.ok(!r.stderr.includes('key of web-'), 'no key in the logs');
    const logs = jsonLines(r.stderr);
    assert.ok(logs.some((l) => l.msg === 'web-a/disk0: encrypted'), 'JSON logs name each disk\'s state');
    assert.equal(existsSync(path.join(runDir, 'agent.sock')), false, 'the socket is removed at exit');
    // Its own points (idlecrypt_agent), in the state directory without influx:.
    const metricsDir = path.join(cliStateDir(), 'metrics');
    const own = (await readdir(metricsDir)).filter((f) => f.startsWith('agent-'));
    assert.equal(own.length, 1, own.join(', '));
    const points = (await readFile(path.join(metricsDir, own[0]!), 'utf8')).split('\n').filter((l) => l.startsWith('idlecrypt_agent,'));
    assert.ok(points.length >= 2, `${points.length} agent points (one at start, one at exit, and every 10 s)`);
    assert.match(points.at(-1)!, /^idlecrypt_agent,host=\S+ .*encrypted=3i,failed=1i,max_jobs=1i,.*vms_watched=([3-9]|\d\d+)i/);

    await b.vm.stop();
    for (const [src, id] of [[b.disk, 'disk0'], [b.extra[0]!, 'disk1']] as const) {
      const cmp = await compareWithEncrypted(src, path.join(dir, `web-b-${id}.luks`), 'luks', path.join(dir, 'web-b.key'));
      assert.ok(cmp.same, `web-b/${id}: ${cmp.output}`);
    }
    await a.vm.stop();
    await checkWriterBlocks(a.vm.lines, path.join(dir, 'web-a-disk0.luks'), path.join(dir, 'web-a.key'));
    await c.vm.stop();
  });

  test('kill -9 at 10 moments (target creation, copying, paused, READY, the pivot) and a restart after each: both disks of a two-disk guest end encrypted with every write kept, nothing of ours left in QEMU; SIGTERM leaves the copy paused and the next start resumes it; a second agent refuses', async (t) => {
    // A writer guest (30 writes/s) with a second disk. The policy calls it busy (30 > 5
    // requests/s) and copies at 8 MiB/s, busy or not (a killed agent leaves the copy at its
    // last speed), so each stretch lasts seconds; at READY the agent waits up to 4 s for a
    // quiet moment that never comes, then pivots anyway.
    const k = await boot('k-a', 128, 'writer', { wps: 30 }, [48]);
    await writeKey(path.join(dir, 'k-a.key'), 'key of k-a');
    const cfg = path.join(dir, 'kill.yaml');
    await writeFile(cfg, [
      'host:', '  max-jobs: 1', '  protect: vm',
      'policy:', '  thresholds:', '    disk: 5', '    interrupts: 100000', '  speed:', '    idle: 8M', '    busy: 8M', '  pivot:', '    quiet-wait: 4s',
      'encrypt:', '  - vm: k-a', '    disks: [disk0, disk1]', `    target: ${dir}/{vm}-{disk}.luks`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`, '',
    ].join('\n'));
    const job = async () => {
      const all = await jobsOf(k.vm);
      assert.ok(all.length <= 1, `${all.length} copies at once (max-jobs 1)`);
      return all[0];
    };
    /** The run tags our job, node and secret names carry in this QEMU. */
    const ours = async () => {
      const c = await QmpClient.connect(k.vm.qmpSocket);
      try {
        return await tagsInQemu(c);
      } finally {
        await c.close();
      }
    };
    const poll = async <T,>(what: string, fn: () => Promise<T | undefined>, ms = 60_000): Promise<T> => {
      const end = Date.now() + ms;
      for (;;) {
        const v = await fn();
        if (v !== undefined) return v;
        if (Date.now() > end) throw new Error(`${what}: not within ${ms / 1000} s`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    let agent = startAgent(cfg);
    let startedAt = Date.now();
    const kills: { moment: string; found: string; heldMs?: number; adoptedMs?: number }[] = [];
    // The agent's socket directly: `idlecrypt status` starts a process per question.
    const state = async (disk: string) => ((await askAgent(path.join(runDir, 'agent.sock'))) as AgentStatus).disks.find((d) => d.vm === 'k-a' && d.disk === disk)?.state;
    /** kill -9, then a new agent; returns what QEMU held at the kill. */
    const killAndRestart = async (moment: string): Promise<void> => {
      agent.child.kill('SIGKILL');
      await agent.result;
      const j = await job();
      const left = await ours();
      const found = j ? `job ${j.status}${j.ready ? ' (ready)' : ''} at ${((100 * j.offset) / Math.max(1, j.len)).toFixed(0)}%` : `no job; ${left.size} run tags of ours in QEMU`;
      agent = startAgent(cfg);
      startedAt = Date.now();
      const entry: { moment: string; found: string; heldMs?: number; adoptedMs?: number } = { moment, found };
      kills.push(entry);
      if (j) {
        // A copy of ours in QEMU: the new agent holds it at once (1 byte/s: whatever the dead
        // agent left it at, the guest is not disturbed from here), then steers it once the
        // probes are attached.
        await agent.waitForStderr(/"msg":"mirror adopted"/, 30_000);
        const logs = jsonLines(agent.stderr());
        entry.heldMs = (logs.find((l) => l.msg === 'mirror held until the probes attach')!.time as number) - startedAt;
        entry.adoptedMs = (logs.find((l) => l.msg === 'mirror adopted')!.time as number) - startedAt;
      }
    };
    const progress = async (disk: string, share: number) =>
      poll(`${disk} copied past ${share * 100}%`, async () => {
        const j = await job();
        return j && j.len > 0 && j.offset >= share * j.len && !j.ready ? j : undefined;
      });

    for (const disk of ['disk0', 'disk1']) {
      // 1. Target creation: 150 ms after the run began (LUKS header, key slot, nodes).
      await agent.waitForStderr(new RegExp(`"msg":"k-a/${disk}: creating-target"`), 60_000);
      await new Promise((r) => setTimeout(r, 150));
      await killAndRestart(`${disk}: creating the target`);
      // 2. Copying.
      await progress(disk, 0.1);
      await killAndRestart(`${disk}: copying, 10%`);
      if (disk === 'disk0') {
        await progress(disk, 0.4);
        await killAndRestart(`${disk}: copying, 40%`);
        // 3. Paused: SIGTERM detaches (the copy is left paused, and does not move), a second
        // agent refuses, and the next agent is killed before it resumes the copy.
        await progress(disk, 0.6);
        const second = await runCli(['agent', '--config', cfg], { IDLECRYPT_RUN_DIR: runDir });
        assert.equal(second.code, 1);
        assert.deepEqual(humanLines(second.stderr), [`idlecrypt: another idlecrypt agent (pid ${agent.child.pid}) is running on this host (${runDir}/agent.pid)`]);
        agent.child.kill('SIGTERM');
        const r = await agent.result;
        assert.equal(r.code, 0, r.stderr.slice(-2000));
        // QEMU reports 'paused' once the job reaches its next pause point.
        const left = await poll('the copy paused after SIGTERM', async () => {
          const j = (await job())!;
          assert.ok(j.paused, 'SIGTERM leaves the copy paused: nobody moderates it now');
          return j.status === 'paused' ? j : undefined;
        }, 2000);
        await new Promise((res) => setTimeout(res, 1000));
        assert.equal((await job())!.offset, left.offset, 'and it does not move');
        agent = startAgent(cfg);
        startedAt = Date.now();
        await agent.waitForStderr(/"msg":"agent started"/, 30_000);
        assert.equal((await job())!.status, 'paused');
        await killAndRestart(`${disk}: paused (left by SIGTERM), the next agent just started`);
        await poll('the paused copy moving again', async () => ((await job())!.offset > left.offset ? true : undefined), 30_000);
        kills.at(-1)!.found += `; moving again ${((Date.now() - startedAt) / 1000).toFixed(1)} s after the restart`;
      }
      // 4. READY: the guest stays busy, so the agent waits there.
      await poll(`${disk} READY`, async () => ((await job())?.ready ? true : undefined), 90_000);
      await killAndRestart(`${disk}: READY, waiting for a quiet guest`);
      // 5. The pivot.
      await agent.waitForStderr(new RegExp(`"msg":"k-a/${disk}: completing"`), 60_000);
      await killAndRestart(`${disk}: the pivot`);
      await poll(`${disk} encrypted`, async () => ((await state(disk).catch(() => undefined)) === 'encrypted' ? true : undefined), 60_000);
    }
    for (const x of kills) {
      const adopted = x.adoptedMs !== undefined ? `; the next agent held the copy ${(x.heldMs! / 1000).toFixed(2)} s and moderated it ${(x.adoptedMs / 1000).toFixed(2)} s after its start` : '';
      t.diagnostic(`kill -9 at ${x.moment}: ${x.found}${adopted}`);
    }
    assert.equal(kills.length, 10);

    // Nothing of ours left in QEMU or in the state directory; both disks on their targets.
    assert.equal(await job(), undefined, 'no job left');
    // Our names in QEMU: only those of the two targets the guest now runs on.
    const inUse: string[] = [];
    for (const id of ['disk0', 'disk1']) inUse.push(/^idlecrypt-([0-9a-f]{8})$/.exec((await diskOf(k.vm, id)).nodeName)?.[1] ?? `(disk ${id} is not on a node of ours)`);
    assert.deepEqual([...(await ours())].sort(), inUse.sort(), 'no job, node or secret of ours left beyond the targets in use');
    agent.child.kill('SIGTERM');
    const last = await agent.result;
    assert.equal(last.code, 0);
    const runs = path.join(cliStateDir(), 'runs');
    assert.deepEqual(existsSync(runs) ? (await readdir(runs)).filter((f) => f.endsWith('.json')) : [], [], 'no run record left');
    assert.deepEqual((await readdir(dir)).filter((f) => f.startsWith('k-a-') && f.endsWith('.luks')).sort(), ['k-a-disk0.luks', 'k-a-disk1.luks'], 'no stray target');
    assert.deepEqual(await daemonsOn(path.join(dir, 'k-a-')), [], 'no qemu-storage-daemon left (each copy went through one)');
    for (const id of ['disk0', 'disk1']) {
      const d = await diskOf(k.vm, id);
      assert.equal(d.file, path.join(dir, `k-a-${id}.luks`));
      assert.equal(d.encrypted, true);
    }
    await k.vm.stop();
    await checkWriterBlocks(k.vm.lines, path.join(dir, 'k-a-disk0.luks'), path.join(dir, 'k-a.key'));
    const cmp = await compareWithEncrypted(k.extra[0]!, path.join(dir, 'k-a-disk1.luks'), 'luks', path.join(dir, 'k-a.key'));
    assert.ok(cmp.same, cmp.output);
    const found = kills.filter((x) => x.adoptedMs !== undefined);
    const held = found.map((x) => x.heldMs!);
    const adopted = found.map((x) => x.adoptedMs!);
    const s2 = (xs: number[]) => `median ${(median(xs) / 1000).toFixed(2)} s, max ${(Math.max(...xs) / 1000).toFixed(2)} s`;
    t.diagnostic(`after kill -9, from the new agent's start (its process start included) over ${found.length} restarts that found a copy: held ${s2(held)}; moderated (probes attached) ${s2(adopted)}`);
    // The issue's bound: found and moderated again within 2 s. The hold is the moderation
    // that needs no probe; the controller's own decisions follow once bpftrace is attached.
    assert.ok(Math.max(...held) < 2000, `held within 2 s of the restart (max ${Math.max(...held)} ms)`);
    assert.ok(Math.max(...adopted) < 5000, 'moderated by the controller within 5 s');
  });

  test('faults: a full target filesystem fails that disk alone; a VM killed mid-copy loses only its partial target; a VM that exits while no agent runs has its copy and daemon removed by the next; a corrupt run record is said and its copy rolled back from QEMU alone, then done again', async (t) => {
    const full = path.join(dir, 'full');
    await mkdir(full);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=80m', 'tmpfs', full]);
    t.after(() => execFileSync('umount', ['-l', full]));
    const f1 = await boot('f-1', 160, 'idle');
    const f2 = await boot('f-2', 64, 'idle');
    const f3 = await boot('f-3', 64, 'idle');
    const f4 = await boot('f-4', 160, 'idle');
    for (const n of ['f-1', 'f-2', 'f-3', 'f-4']) await writeKey(path.join(dir, `${n}.key`), `key of ${n}`);
    const cfg = path.join(dir, 'faults.yaml');
    const entry = (vm: string, target: string) => [`  - vm: ${vm}`, '    disks: [disk0]', `    target: ${target}`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`];
    await writeFile(
      cfg,
      ['host:', '  max-jobs: 4', '  max-speed: 16M', '  protect: vm', 'encrypt:', ...entry('f-1', `${dir}/{vm}-{disk}.luks`), ...entry('f-2', `${full}/{vm}-{disk}.luks`), ...entry('f-3', `${dir}/{vm}-{disk}.luks`), ...entry('f-4', `${dir}/{vm}-{disk}.luks`), ''].join('\n'),
    );
    const a = startAgent(cfg);
    const copying = (vm: TestVm) => until(`${vm.name} copying`, async () => ((await jobsOf(vm)).some((j) => j.offset > 0) ? true : undefined), 60_000);
    await Promise.all([copying(f1.vm), copying(f2.vm), copying(f3.vm), copying(f4.vm)]);

    // The target's filesystem fills up under f-2's copy.
    await writeFile(path.join(full, 'filler'), Buffer.alloc(60 * 1024 * 1024));
    const st = await until('f-2 failed', async () => {
      const s = await status();
      return s.disks.find((d) => d.vm === 'f-2')?.state === 'failed' ? s : undefined;
    }, 60_000);
    t.diagnostic(`f-2: ${st.disks.find((d) => d.vm === 'f-2')!.reason}`);
    assert.equal((await diskOf(f2.vm)).file, f2.disk, 'f-2 stays on its source');
    assert.equal(existsSync(path.join(full, 'f-2-disk0.luks')), false, 'its partial target is removed');
    assert.deepEqual(await jobsOf(f2.vm), []);

    // f-3's QEMU is killed mid-copy.
    process.kill(f3.vm.pid, 'SIGKILL');
    await f3.vm.exited;
    await until('f-3\'s partial target removed', async () => (existsSync(path.join(dir, 'f-3-disk0.luks')) ? undefined : true), 30_000);

    // kill -9 of the agent while f-1 copies, and its run record corrupted.
    assert.equal((await jobsOf(f1.vm)).length, 1, 'f-1 still copying, the others did not disturb it');
    // A failed run removes its target, then its record: wait for the records of f-2 and f-3
    // to go too (the kill once came between the two for f-3, CI rehearsal 2026-12-04).
    const runs = path.join(cliStateDir(), 'runs');
    const records = async () => (await readdir(runs)).filter((f) => f.endsWith('.json'));
    await until("only f-1's and f-4's run records left", async () => ((await records()).length === 2 ? true : undefined), 30_000).catch(() => undefined);
    a.child.kill('SIGKILL');
    await a.result;
    const recs = await records();
    assert.equal(recs.length, 2, `two records left, f-1's and f-4's: ${recs.join(', ')}`);
    const recOf = async (vm: string) => {
      for (const f of recs) if ((JSON.parse(await readFile(path.join(runs, f), 'utf8')) as { vm: string }).vm === vm) return f;
      throw new Error(`no run record for ${vm} among ${recs.join(', ')}`);
    };
    const [rec1, rec4] = [await recOf('f-1'), await recOf('f-4')];
    // f-4's VM exits while no agent runs: its copy's daemon (which outlives the agent, as a
    // paused copy's must) still holds its target and key.
    const daemon4 = (JSON.parse(await readFile(path.join(runs, rec4), 'utf8')) as { daemon?: { pid: number } }).daemon;
    assert.ok(daemon4 && processStart(daemon4.pid) !== undefined, "f-4's qemu-storage-daemon runs after the agent's kill -9");
    process.kill(f4.vm.pid, 'SIGKILL');
    await f4.vm.exited;
    await writeFile(path.join(runs, rec1), '{"version": 1, "tag": ');
    // The next agent copies f-1 again from the start, alone: at 64M over 4 jobs, not the
    // 16M that kept four copies going while the others failed (13 s of the test's time).
    const raised = (await readFile(cfg, 'utf8')).replace('max-speed: 16M', 'max-speed: 64M');
    assert.match(raised, /max-speed: 64M/);
    await writeFile(cfg, raised);
    const b = startAgent(cfg);
    await b.waitForStderr(/ignoring run record .*not JSON/, 30_000);
    // The next agent rolls f-4's copy back at its first pass: the daemon stopped, the partial
    // target and the record removed; the disk waits for its VM.
    await b.waitForStderr(/VM 'f-4' exited while its copy into \S+f-4-disk0\.luks had no run: rolled back \(removed .*qemu-storage-daemon/, 30_000);
    assert.equal(processStart(daemon4.pid), undefined, "f-4's daemon stopped");
    assert.equal(existsSync(path.join(dir, 'f-4-disk0.luks')), false, "f-4's partial target removed");
    assert.equal(existsSync(path.join(runs, rec4)), false, "f-4's record removed");
    await until('f-4 waiting for its VM', async () => ((await status()).disks.find((d) => d.vm === 'f-4')?.state === 'waiting-for-vm' ? true : undefined), 30_000);
    await b.waitForStderr(/rolled back a copy of ours in VM 'f-1' that no readable run record describes: removed job idlecrypt-[0-9a-f]{8}/, 30_000);
    await until('f-1 encrypted', async () => ((await status()).disks.find((d) => d.vm === 'f-1')?.state === 'encrypted' ? true : undefined), 120_000);
    assert.deepEqual(await jobsOf(f1.vm), []);
    const d1 = await diskOf(f1.vm);
    assert.equal(d1.file, path.join(dir, 'f-1-disk0.luks'));
    b.child.kill('SIGTERM');
    assert.equal((await b.result).code, 0);
    await f1.vm.stop();
    const cmp = await compareWithEncrypted(f1.disk, d1.file, 'luks', path.join(dir, 'f-1.key'));
    assert.ok(cmp.same, cmp.output);
    assert.equal((await diskOf(f2.vm)).file, f2.disk);
    await f2.vm.stop();
    // Each copy went through a qemu-storage-daemon: the failed one's, the dead VM's and the
    // orphan's (found beside the socket its nbd node names) were all stopped.
    assert.deepEqual(await daemonsOn(dir), [], 'no qemu-storage-daemon left');
  });

  test('neighbours: with protect: storage a copy pauses while a guest on the same storage is busy; a reload to protect: vm lets it run', async (t) => {
    const a = await boot('nb-a', 1024, 'idle');
    const b = await boot('nb-b', 64, 'bursty', { idle: 3, busy: 3 });
    await writeKey(path.join(dir, 'nb-a.key'), 'key of nb-a');
    const cfg = path.join(dir, 'nb.yaml');
    const write = (protect: string) =>
      writeFile(cfg, ['host:', '  max-speed: 16M', `  protect: ${protect}`, 'encrypt:', '  - vm: nb-a', '    disks: [disk0]', `    target: ${dir}/{vm}-{disk}.luks`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`, ''].join('\n'));
    await write('storage');
    const agent = startAgent(cfg);
    await agent.waitForStderr(/neighbours on the same storage: (.*, )?nb-b\b/, 60_000);
    await until('nb-a copying', async () => ((await jobsOf(a.vm)).length > 0 ? true : undefined), 60_000);

    /** The share of polls in b's busy phases (from 0.5 s in, by our clock) that found a's job paused, over `ms`. */
    const pausedWhileBusy = async (ms: number): Promise<number> => {
      const end = Date.now() + ms;
      let phase: string | undefined;
      let since = 0;
      let seen = b.vm.lines.length;
      let busy = 0;
      let paused = 0;
      while (Date.now() < end) {
        for (const l of b.vm.lines.slice(seen)) {
          const m = /^PHASE (busy|idle)/.exec(l);
          if (m) [phase, since] = [m[1], Date.now()];
        }
        seen = b.vm.lines.length;
        const j = (await jobsOf(a.vm))[0];
        assert.ok(j, 'a\'s copy is still running');
        if (phase === 'busy' && Date.now() - since > 500) {
          busy++;
          if (j.paused) paused++;
        }
        await new Promise((r) => setTimeout(r, 200));
      }
      assert.ok(busy >= 10, `${busy} polls in b's busy phases`);
      return paused / busy;
    };
    const withStorage = await pausedWhileBusy(12_000);
    t.diagnostic(`protect: storage: a's copy paused in ${(100 * withStorage).toFixed(0)}% of the polls during b's busy phases`);
    assert.ok(withStorage >= 0.7, `paused in ${(100 * withStorage).toFixed(0)}% of b's busy time (need >= 70%)`);

    await write('vm');
    await agent.waitForStderr(/configuration reloaded/, 10_000);
    const withVm = await pausedWhileBusy(12_000);
    t.diagnostic(`protect: vm: a's copy paused in ${(100 * withVm).toFixed(0)}% of the polls during b's busy phases`);
    assert.ok(withVm <= 0.3, `paused in ${(100 * withVm).toFixed(0)}% of b's busy time with protect: vm (need <= 30%)`);
    agent.child.kill('SIGTERM');
    assert.equal((await agent.result).code, 0);
    await Promise.all([a.vm.stop(), b.vm.stop()]);
  });

  test('a bad configuration: one line with file:line:column and the key, exit 1; --check says valid', async () => {
    const bad = path.join(dir, 'bad.yaml');
    await writeFile(bad, 'host:\n  max-jobs: 0\n');
    const r = await runCli(['agent', '--config', bad], { IDLECRYPT_RUN_DIR: runDir });
    assert.equal(r.code, 1);
    assert.deepEqual(humanLines(r.stderr), [`idlecrypt: ${bad}:2:13: host.max-jobs: must be at least 1`]);
    const good = await config(path.join(dir, 'good.yaml'), 'x', 'host:\n  max-jobs: 2');
    const ok = await runCli(['agent', '--config', good, '--check']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, `${good}: valid; 1 entry, max-jobs 2, protect storage\n`);
    const none = await runCli(['status'], { IDLECRYPT_RUN_DIR: path.join(dir, 'nowhere') });
    assert.equal(none.code, 1);
    assert.match(humanLines(none.stderr)[0]!, /^idlecrypt: no idlecrypt agent is running \(no socket at .*nowhere\/agent\.sock\)/);
  });
});
