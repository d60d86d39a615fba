/**
 * Which of idlecrypt's probes costs a busy real guest what: pgbench in the Debian test guest
 * (vm-images/debian/) alone, then with each bpftrace script of probes/ attached alone (at
 * the controller's 50 ms interval), then with all of them as `idlecrypt observe` attaches
 * them, alternating with runs alone so drift hits every case alike. One guest, one boot.
 *
 *   node --import tsx bench/probe-cost.ts [--seconds 30] [--rounds 2]
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { copyDebianDisk, startDebianVm } from '../vm-images/debian.ts';
import { startCli } from '../test/helpers/cli.ts';
import { median } from '../test/helpers/moderation-lab.ts';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '30' }, rounds: { type: 'string', default: '2' } } });
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);
const SCRIPTS = ['qemu-disk', 'qemu-irq', 'qemu-input', 'qemu-stall'];
const CASES = ['alone', ...SCRIPTS, 'observe'];

const work = await mkdtemp(path.join(tmpdir(), 'ic-probe-cost-'));
const g = await startDebianVm({ name: 'probe-cost', disk: await copyDebianDisk(work) });
const tps: Record<string, number[]> = Object.fromEntries(CASES.map((c) => [c, []]));
try {
  await g.vm.ready;
  await g.agent.ready;
  await g.agent.run('runuser -u postgres -- pgbench -i -q -s 10 postgres');
  for (let r = 0; r < rounds; r++) {
    for (const c of CASES.filter((x) => x !== 'alone')) {
      for (const which of ['alone', c]) {
        let stop: (() => Promise<void>) | undefined;
        if (which === 'observe') {
          const obs = startCli(['observe', '--pid', String(g.vm.pid), '--interval', '50', '--json']);
          await obs.waitForStdout(/"interval_s"/, 60_000);
          stop = async () => {
            obs.child.kill('SIGINT');
            await obs.result;
          };
        } else if (which !== 'alone') {
          const bt = spawn('bpftrace', [path.resolve('probes', `${which}.bt`), '50'], { stdio: ['ignore', 'ignore', 'inherit'] });
          await sleep(8000); // compiled and attached
          stop = async () => {
            bt.kill('SIGINT');
            await new Promise((res) => bt.once('close', res));
          };
        }
        const out = await g.agent.run(`runuser -u postgres -- pgbench -c 4 -j 2 -T ${seconds} postgres 2>&1`);
        await stop?.();
        const t = Number(/^tps = ([\d.]+)/m.exec(out.lines.join('\n'))?.[1]);
        tps[which]!.push(t);
        process.stderr.write(`round ${r + 1} ${which.padEnd(10)} ${t.toFixed(1)} TPS\n`);
      }
    }
  }
} finally {
  await g.stop();
  await rm(work, { recursive: true, force: true });
}
const base = median(tps.alone!);
for (const c of CASES) console.log(`${c.padEnd(10)} median ${median(tps[c]!).toFixed(1)} TPS (${((100 * median(tps[c]!)) / base).toFixed(0)}% of alone), runs ${tps[c]!.map((x) => x.toFixed(1)).join(' ')}`);
