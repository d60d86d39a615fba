/**
 * The host agent (issue 10) against real QEMU guests under TCG, the real command
 * (`idlecrypt agent`), real bpftrace: one agent and one configuration encrypt every
 * configured disk, never more copies at once than max-jobs (read from QEMU), a disk whose
 * key is missing fails alone; SIGTERM leaves every copy paused and the next start resumes
 * it; a second agent refuses; `kill -9` mid-copy and a restart: the copy is adopted and
 * finished. `idlecrypt status` asks the agent over its socket.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ensureImage, makeDiskImage, startTestVm, writerBlock, type TestVm } from '../../vm-images/launch.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { listDisks } from '../../src/encrypt/disks.ts';
import { cliStateDir, humanLines, runCli, startCli, type RunningCli } from '../helpers/cli.ts';
import { compareWithEncrypted, decryptToRaw, writeKey } from '../helpers/images.ts';
import type { AgentStatus } from '../../src/agent/agent.ts';

let dir: string;
let runDir: string;
const vms: TestVm[] = [];
const agents: RunningCli[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-agent-'));
  runDir = path.join(dir, 'run');
});
after(async () => {
  // IDLECRYPT_TEST_DUMP=DIR keeps each agent's log (JSON lines) for a post-mortem.
  const dump = process.env.IDLECRYPT_TEST_DUMP;
  if (dump) await Promise.all(agents.map((a, i) => writeFile(path.join(dump, `agent-${i + 1}.log`), a.stderr())));
  for (const a of agents) if (a.child.exitCode === null && a.child.signalCode === null) a.child.kill('SIGKILL');
  await Promise.all(vms.map((vm) => vm.stop()));
  await rm(dir, { recursive: true, force: true });
});

async function boot(name: string, sizeMiB: number, workload: 'idle' | 'writer' | 'bursty', params?: Record<string, number>): Promise<{ vm: TestVm; disk: string }> {
  const disk = path.join(dir, `${name}.raw`);
  await makeDiskImage(disk, { sizeMiB, format: 'raw', fill: 'pattern' });
  const vmDir = path.join(dir, `vm-${name}`);
  await mkdir(vmDir);
  const vm = await startTestVm({ name, disk, dir: vmDir, workload, ...(params ? { params } : {}) });
  vms.push(vm);
  await vm.ready;
  return { vm, disk };
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

function logsOf(stderr: string): Record<string, unknown>[] {
  return stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function jobsOf(vm: TestVm): Promise<{ device: string; status: string; paused: boolean; offset: number; len: number }[]> {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return (await c.execute('query-block-jobs')).filter((j) => j.device.startsWith('idlecrypt'));
  } finally {
    await c.close();
  }
}

async function diskOf(vm: TestVm) {
  const c = await QmpClient.connect(vm.qmpSocket);
  try {
    return (await listDisks(c)).find((d) => d.qdevId === 'disk0')!;
  } finally {
    await c.close();
  }
}

/** Every block the writer guest reported is in the decrypted image with its latest content. */
async function checkWrites(vm: TestVm, target: string, key: string): Promise<void> {
  const latest = new Map<number, number>();
  for (const l of vm.lines) {
    const m = /^WROTE seq=(\d+) off=(\d+)/.exec(l);
    if (m) latest.set(Number(m[2]), Number(m[1]));
  }
  assert.ok(latest.size > 10, 'the guest wrote during the test');
  const lastSeq = Math.max(...latest.values());
  const plain = `${target}.dec`;
  await decryptToRaw(target, 'luks', key, plain);
  const fd = await open(plain, 'r');
  try {
    const wrong: number[] = [];
    for (const [off, seq] of latest) {
      const { buffer } = await fd.read(Buffer.alloc(4096), 0, 4096, off);
      if (!buffer.equals(writerBlock(seq, off)) && !buffer.equals(writerBlock(lastSeq + 1, off))) wrong.push(off);
    }
    assert.deepEqual(wrong, [], `${wrong.length} of ${latest.size} written blocks lack the guest's last write`);
  } finally {
    await fd.close();
    await rm(plain, { force: true });
  }
}

describe('idlecrypt agent', () => {
  test('encrypts every configured disk of every matching VM, never more than max-jobs at once; a VM whose key is missing fails alone; status asks the agent', async () => {
    await killLeftAgents();
    const a = await boot('web-a', 96, 'writer', { wps: 30 });
    const b = await boot('web-b', 96, 'idle');
    const c = await boot('web-c', 32, 'idle');
    await writeKey(path.join(dir, 'web-a.key'), 'key of web-a');
    await writeKey(path.join(dir, 'web-b.key'), 'key of web-b');
    // web-c.key is missing
    const cfg = await config(path.join(dir, 'agent.yaml'), 'web', 'host:\n  max-jobs: 1\n  max-speed: 48M\n  protect: vm');
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

    const done = await until('both disks encrypted', async () => {
      const st = await status();
      const by = (vm: string) => st.disks.find((d) => d.vm === vm);
      return by('web-a')?.state === 'encrypted' && by('web-b')?.state === 'encrypted' && by('web-c')?.state === 'failed' ? st : undefined;
    }, 240_000);
    polling = false;
    await poller;
    assert.equal(most, 1, 'never more than max-jobs copies at once in QEMU');
    const failed = done.disks.find((d) => d.vm === 'web-c')!;
    assert.match(failed.reason ?? '', /web-c\.key/, 'the failed disk says why');
    assert.equal((await diskOf(c.vm)).file, c.disk, 'web-c stays on its source');

    for (const g of [a, b]) {
      const d = await diskOf(g.vm);
      assert.equal(d.file, path.join(dir, `${g.vm.name}-disk0.luks`));
      assert.equal(d.encrypted, true);
      assert.deepEqual(await jobsOf(g.vm), []);
    }
    agent.child.kill('SIGTERM');
    const r = await agent.result;
    assert.equal(r.code, 0, r.stderr.slice(-2000));
    assert.ok(!r.stderr.includes('key of web-'), 'no key in the logs');
    const logs = logsOf(r.stderr);
    assert.ok(logs.some((l) => l.msg === 'web-a/disk0: encrypted'), 'JSON logs name each disk\'s state');
    assert.equal(existsSync(path.join(runDir, 'agent.sock')), false, 'the socket is removed at exit');
    // Its own points (idlecrypt_agent), in the state directory without influx:.
    const metricsDir = path.join(cliStateDir(), 'metrics');
    const own = (await readdir(metricsDir)).filter((f) => f.startsWith('agent-'));
    assert.equal(own.length, 1, own.join(', '));
    const points = (await readFile(path.join(metricsDir, own[0]!), 'utf8')).split('\n').filter((l) => l.startsWith('idlecrypt_agent,'));
    assert.ok(points.length >= 2, `${points.length} agent points (one at start, one at exit, and every 10 s)`);
    assert.match(points.at(-1)!, /^idlecrypt_agent,host=\S+ .*encrypted=2i,failed=1i,max_jobs=1i,.*vms_watched=([3-9]|\d\d+)i/);

    await b.vm.stop();
    const cmp = await compareWithEncrypted(b.disk, path.join(dir, 'web-b-disk0.luks'), 'luks', path.join(dir, 'web-b.key'));
    assert.ok(cmp.same, cmp.output);
    await a.vm.stop();
    await checkWrites(a.vm, path.join(dir, 'web-a-disk0.luks'), path.join(dir, 'web-a.key'));
    await c.vm.stop();
  });

  test('SIGTERM leaves every copy paused and the next start resumes it; a second agent refuses; kill -9 mid-copy and a restart: the copy is adopted and finished', async (t) => {
    await killLeftAgents();
    const d = await boot('db-d', 192, 'writer', { wps: 30 });
    await writeKey(path.join(dir, 'db-d.key'), 'key of db-d');
    // 192 MiB at 8 MiB/s: the copy lasts long enough to be interrupted twice.
    const cfg = await config(path.join(dir, 'db.yaml'), 'db', 'host:\n  max-jobs: 1\n  max-speed: 8M\n  protect: storage');
    const first = startAgent(cfg);
    await until('the copy running', async () => ((await jobsOf(d.vm)).some((j) => j.offset > 0) ? true : undefined), 60_000);

    const second = await runCli(['agent', '--config', cfg], { IDLECRYPT_RUN_DIR: runDir });
    assert.equal(second.code, 1);
    assert.deepEqual(humanLines(second.stderr), [`idlecrypt: another idlecrypt agent (pid ${first.child.pid}) is running on this host (${runDir}/agent.pid)`]);

    first.child.kill('SIGTERM');
    const r1 = await first.result;
    assert.equal(r1.code, 0, r1.stderr.slice(-2000));
    const left = await jobsOf(d.vm);
    assert.equal(left.length, 1, 'the copy stays in QEMU');
    assert.equal(left[0]!.status, 'paused', 'left paused: nobody moderates it now');
    assert.ok(left[0]!.offset < left[0]!.len);
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal((await jobsOf(d.vm))[0]!.offset, left[0]!.offset, 'and it does not move');

    // The next start resumes it: the same job, from where it was.
    const restart = startAgent(cfg);
    const resumedAt = Date.now();
    await until('the same job running again', async () => {
      const j = (await jobsOf(d.vm))[0];
      return j && j.device === left[0]!.device && j.offset > left[0]!.offset ? true : undefined;
    }, 30_000);
    const resumeS = (Date.now() - resumedAt) / 1000;

    // kill -9 mid-copy: the job stays (running or paused), a new agent adopts it.
    const before = (await jobsOf(d.vm))[0]!;
    restart.child.kill('SIGKILL');
    await restart.result;
    const orphan = await jobsOf(d.vm);
    assert.equal(orphan.length, 1);
    assert.equal(orphan[0]!.device, before.device);
    const third = startAgent(cfg);
    const st = await until('encrypted', async () => {
      const s = await status();
      return s.disks.find((x) => x.vm === 'db-d')?.state === 'encrypted' ? s : undefined;
    }, 180_000);
    assert.ok(st);
    const disk = await diskOf(d.vm);
    assert.equal(disk.file, path.join(dir, 'db-d-disk0.luks'));
    assert.deepEqual(await jobsOf(d.vm), [], 'no job left orphaned');
    third.child.kill('SIGTERM');
    const r3 = await third.result;
    assert.equal(r3.code, 0);
    assert.match(r3.stderr, /resuming the copy into .*db-d-disk0\.luks/, 'the third agent adopted the killed one\'s copy');
    const runs = path.join(cliStateDir(), 'runs');
    assert.deepEqual(existsSync(runs) ? (await readdir(runs)).filter((f) => f.endsWith('.json')) : [], [], 'no run record left');
    await d.vm.stop();
    await checkWrites(d.vm, path.join(dir, 'db-d-disk0.luks'), path.join(dir, 'db-d.key'));
    t.diagnostic(`after SIGTERM: the restarted agent had the copy moving again ${resumeS.toFixed(1)} s after it started`);
    const started = logsOf(r3.stderr).find((l) => l.msg === 'agent started')?.time as number;
    const adopted = logsOf(r3.stderr).find((l) => l.msg === 'mirror adopted')?.time as number;
    t.diagnostic(`after kill -9: the next agent adopted the copy ${((adopted - started) / 1000).toFixed(1)} s after it started`);
    assert.ok(adopted - started < 10_000, 'adopted promptly');
  });

  test('faults: a full target filesystem fails that disk alone; a VM killed mid-copy loses only its partial target; a corrupt run record is said and its copy rolled back from QEMU alone, then done again', async (t) => {
    await killLeftAgents();
    const full = path.join(dir, 'full');
    await mkdir(full);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=80m', 'tmpfs', full]);
    t.after(() => execFileSync('umount', ['-l', full]));
    const f1 = await boot('f-1', 160, 'idle');
    const f2 = await boot('f-2', 64, 'idle');
    const f3 = await boot('f-3', 64, 'idle');
    for (const n of ['f-1', 'f-2', 'f-3']) await writeKey(path.join(dir, `${n}.key`), `key of ${n}`);
    const cfg = path.join(dir, 'faults.yaml');
    const entry = (vm: string, target: string) => [`  - vm: ${vm}`, '    disks: [disk0]', `    target: ${target}`, `    key-file: ${dir}/{vm}.key`, `    qmp: ${dir}/vm-{vm}/tool-qmp.sock`];
    await writeFile(
      cfg,
      ['host:', '  max-jobs: 3', '  max-speed: 12M', '  protect: vm', 'encrypt:', ...entry('f-1', `${dir}/{vm}-{disk}.luks`), ...entry('f-2', `${full}/{vm}-{disk}.luks`), ...entry('f-3', `${dir}/{vm}-{disk}.luks`), ''].join('\n'),
    );
    const a = startAgent(cfg);
    const copying = (vm: TestVm) => until(`${vm.name} copying`, async () => ((await jobsOf(vm)).some((j) => j.offset > 0) ? true : undefined), 60_000);
    await Promise.all([copying(f1.vm), copying(f2.vm), copying(f3.vm)]);

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
    a.child.kill('SIGKILL');
    await a.result;
    const runs = path.join(cliStateDir(), 'runs');
    const recs = (await readdir(runs)).filter((f) => f.endsWith('.json'));
    assert.equal(recs.length, 1, `one record left, f-1's: ${recs.join(', ')}`);
    await writeFile(path.join(runs, recs[0]!), '{"version": 1, "tag": ');
    const b = startAgent(cfg);
    await b.waitForStderr(/ignoring run record .*not JSON/, 30_000);
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
  });

  test('neighbours: with protect: storage a copy pauses while a guest on the same storage is busy; a reload to protect: vm lets it run', async (t) => {
    await killLeftAgents();
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
