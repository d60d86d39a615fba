/**
 * Issue 10, point 7: what `idlecrypt agent` costs while it watches many VMs, and how fast
 * it still reacts. Starts N light QEMU processes (`-machine none`, TCG, 16 MiB, a QMP
 * socket and a 1 MiB raw node each: nothing to emulate, so they cost the host next to
 * nothing), one agent whose configuration names them all (`vm: "scale-*"`, `disks: all`:
 * one QMP session per VM, disks listed on every pass; a node without a device is no disk,
 * so none is copied), and measures over --seconds
 *   the agent's CPU (its own process, from /proc/PID/stat) and resident memory, and the
 *   same for its bpftrace (one for the host, started with the first copy: none while idle),
 * then boots one real test guest (`scale-busy`, bursty: 4 s idle / 4 s busy, 1 MiB
 * O_DIRECT requests) whose disk the agent encrypts, and measures the reaction: from the
 * guest's PHASE busy line to the first poll (every 20 ms, on the guest's other monitor)
 * that finds the job paused, over --phases busy phases, all N VMs still watched.
 *
 *   node --import tsx bench/agent-scale.ts [--vms 100] [--seconds 60] [--phases 6] [--out bench/results]
 *
 * Prints the figures and writes bench/results/agent-scale-<time>.json.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { ensureImage, makeDiskImage, startTestVm, type TestVm } from '../vm-images/launch.ts';
import { QmpClient } from '../src/qmp/client.ts';
import { askAgent } from '../src/agent/status-server.ts';
import type { AgentStatus } from '../src/agent/agent.ts';
import { writeKey } from '../test/helpers/images.ts';

const { values } = parseArgs({
  options: {
    vms: { type: 'string', default: '100' },
    seconds: { type: 'string', default: '60' },
    phases: { type: 'string', default: '6' },
    out: { type: 'string', default: 'bench/results' },
  },
});
const N = Number(values.vms);
const SECONDS = Number(values.seconds);
const PHASES = Number(values.phases);
const BIN = path.resolve('bin/idlecrypt');
const TICK = 100; // USER_HZ

const cpuTicks = (pid: number): number => {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]); // utime + stime
};
const rssBytes = (pid: number): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function childrenOf(pid: number): Promise<number[]> {
  const out: number[] = [];
  for (const t of await readdir(`/proc/${pid}/task`)) {
    const c = readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').trim();
    if (c) out.push(...c.split(/\s+/).map(Number));
  }
  return out;
}

async function main(): Promise<void> {
  ensureImage();
  const dir = await mkdtemp(path.join(tmpdir(), 'ic-scale-'));
  const light: ChildProcess[] = [];
  let agent: ChildProcess | undefined;
  let busy: TestVm | undefined;
  try {
    // N light VMs.
    for (let i = 0; i < N; i++) {
      const disk = path.join(dir, `disk-${i}.raw`);
      await writeFile(disk, '');
      await truncate(disk, 1024 * 1024);
      const qmp = path.join(dir, `scale-${i}.qmp`);
      light.push(
        spawn('qemu-system-x86_64', [
          '-name', `guest=scale-${i}`, '-machine', 'none', '-accel', 'tcg', '-m', '16', '-nodefaults', '-display', 'none',
          '-qmp', `unix:${qmp},server=on,wait=off`,
          '-blockdev', `driver=file,filename=${disk},node-name=f${i}`, '-blockdev', `driver=raw,file=f${i},node-name=d${i}`,
        ], { stdio: 'ignore' }),
      );
    }
    for (let i = 0; i < N; i++) while (!existsSync(path.join(dir, `scale-${i}.qmp`))) await sleep(50);
    const hostLoad = readFileSync('/proc/loadavg', 'utf8').trim();

    const runDir = path.join(dir, 'run');
    const cfg = path.join(dir, 'agent.yaml');
    await writeKey(path.join(dir, 'scale-busy.key'), 'scale bench key');
    await mkdir(path.join(dir, 'vm-busy'));
    await writeFile(
      cfg,
      [
        'host:',
        '  max-jobs: 1',
        'encrypt:',
        '  - vm: scale-busy',
        '    disks: [disk0]',
        `    target: ${dir}/{vm}.luks`,
        `    key-file: ${dir}/{vm}.key`,
        `    qmp: ${dir}/vm-busy/tool-qmp.sock`,
        '  - vm: "scale-*"',
        '    disks: all',
        `    target: ${dir}/{vm}-{disk}.luks`,
        `    key-file: ${dir}/{vm}.key`,
        '',
      ].join('\n'),
    );
    const env = { ...process.env, IDLECRYPT_RUN_DIR: runDir, IDLECRYPT_STATE_DIR: path.join(dir, 'state') };
    const startedAt = performance.now();
    agent = spawn(BIN, ['agent', '--config', cfg, '--iter-time', '50', '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
    const sock = path.join(runDir, 'agent.sock');
    let st: AgentStatus | undefined;
    while (!st || st.vms.length < N) {
      await sleep(200);
      st = (await askAgent(sock).catch(() => undefined)) as AgentStatus | undefined;
    }
    const watchingAfterS = (performance.now() - startedAt) / 1000;
    await sleep(5000); // sessions opened, a few passes done
    const bpftrace = (await childrenOf(agent.pid!)).find((p) => readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'bpftrace');
    const a0 = cpuTicks(agent.pid!);
    const b0 = bpftrace ? cpuTicks(bpftrace) : 0;
    const t0 = performance.now();
    // Also in 10 s slices: a slice that stands out is an event (a pass, a GC), not a level.
    const slices: number[] = [];
    for (let at = 0, a = a0, t = t0; at < SECONDS; at += 10) {
      await sleep(Math.min(10, SECONDS - at) * 1000);
      const [a1, t1] = [cpuTicks(agent.pid!), performance.now()];
      slices.push(((a1 - a) / TICK / ((t1 - t) / 1000)) * 100);
      [a, t] = [a1, t1];
    }
    const elapsedS = (performance.now() - t0) / 1000;
    const idle = {
      agentCpuSlicesPercent: slices,
      agentCpuPercent: ((cpuTicks(agent.pid!) - a0) / TICK / elapsedS) * 100,
      agentRssMiB: rssBytes(agent.pid!) / 2 ** 20,
      bpftraceCpuPercent: bpftrace ? ((cpuTicks(bpftrace) - b0) / TICK / elapsedS) * 100 : null,
      bpftraceRssMiB: bpftrace ? rssBytes(bpftrace) / 2 ** 20 : null,
    };
    console.log(`${N} VMs watched (all listed ${watchingAfterS.toFixed(1)} s after the start), none copying, over ${elapsedS.toFixed(0)} s:`);
    console.log(`  agent     ${idle.agentCpuPercent.toFixed(2)}% of one core, ${idle.agentRssMiB.toFixed(0)} MiB resident (10 s slices: ${slices.map((x) => x.toFixed(1)).join(' ')} %)`);
    console.log(bpftrace ? `  bpftrace  ${idle.bpftraceCpuPercent?.toFixed(2)}% of one core, ${idle.bpftraceRssMiB?.toFixed(0)} MiB resident` : '  bpftrace  not running (it starts with the first copy)');

    // The reaction, with all N still watched.
    const disk = path.join(dir, 'busy.raw');
    await makeDiskImage(disk, { sizeMiB: 4096, format: 'raw', fill: 'pattern' });
    busy = await startTestVm({ name: 'scale-busy', disk, dir: path.join(dir, 'vm-busy'), workload: 'bursty', params: { idle: 4, busy: 4 } });
    await busy.ready;
    const q = await QmpClient.connect(busy.qmpSocket);
    const reactions: number[] = [];
    let seen = busy.lines.length;
    let busyAt: number | undefined;
    let phases = 0;
    const deadline = performance.now() + 180_000;
    while (phases < PHASES && performance.now() < deadline) {
      const jobs = (await q.execute('query-block-jobs')).filter((j) => j.device.startsWith('idlecrypt'));
      const t = performance.now();
      for (const l of busy.lines.slice(seen)) {
        if (l.startsWith('PHASE busy')) busyAt = t;
        if (l.startsWith('PHASE idle')) busyAt = undefined;
      }
      seen = busy.lines.length;
      const job = jobs[0];
      if (job && job.ready) break;
      if (busyAt !== undefined && job) {
        if (job.paused) {
          reactions.push(t - busyAt);
          phases++;
          busyAt = undefined;
        }
      }
      await sleep(20);
    }
    await q.close();
    console.log(`reaction over ${reactions.length} busy phases (PHASE line to job paused): median ${median(reactions).toFixed(0)} ms, max ${Math.max(...reactions).toFixed(0)} ms`);
    const result = { vms: N, seconds: elapsedS, watchingAfterS, idle, reactionsMs: reactions, hostLoadBefore: hostLoad, time: new Date().toISOString() };
    await mkdir(values.out!, { recursive: true });
    const out = path.join(values.out!, `agent-scale-${result.time.replace(/[:.]/g, '-')}.json`);
    await writeFile(out, JSON.stringify(result, null, 2));
    console.log(`wrote ${out}`);
  } finally {
    if (agent && agent.exitCode === null) {
      agent.kill('SIGTERM');
      await new Promise((r) => agent!.once('exit', r));
    }
    await busy?.stop();
    for (const p of light) p.kill('SIGKILL');
    await sleep(500);
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
