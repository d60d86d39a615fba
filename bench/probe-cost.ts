/**
 * Which of idlecrypt's probes costs a busy real guest what: pgbench or fio (4 KiB random
 * reads and writes, O_DIRECT, one at a time) in the Debian test guest (vm-images/debian/) alone, then with each bpftrace script of probes/ attached alone (at
 * the controller's 50 ms interval), then with all of them as `idlecrypt observe` attaches
 * them, alternating with runs alone so drift hits every case alike. One guest, one boot.
 *
 *   node --import tsx bench/probe-cost.ts [--workload pgbench|randrw-qd1] [--seconds 30] [--rounds 2]
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

const { values } = parseArgs({
  options: { seconds: { type: 'string', default: '30' }, rounds: { type: 'string', default: '2' }, workload: { type: 'string', default: 'pgbench' } },
});
const WORKLOADS: Record<string, { prepare: string; run: (s: number) => string; parse: (out: string) => number; unit: string }> = {
  pgbench: {
    prepare: 'runuser -u postgres -- pgbench -i -q -s 10 postgres',
    run: (s) => `runuser -u postgres -- pgbench -c 4 -j 2 -T ${s} postgres 2>&1`,
    parse: (out) => Number(/^tps = ([\d.]+)/m.exec(out)?.[1]),
    unit: 'TPS',
  },
  'randrw-qd1': {
    prepare: 'fio --name=layout --filename=/var/tmp/fio.dat --size=512M --rw=write --bs=1M --direct=1 --output-format=terse >/dev/null',
    run: (s) => `fio --name=q --filename=/var/tmp/fio.dat --size=512M --rw=randrw --bs=4k --ioengine=psync --iodepth=1 --direct=1 --runtime=${s} --time_based --output-format=json`,
    parse: (out) => {
      const j = (JSON.parse(out) as { jobs: { read: { iops: number }; write: { iops: number } }[] }).jobs[0]!;
      return j.read.iops + j.write.iops;
    },
    unit: 'IOPS',
  },
};
const w = WORKLOADS[values.workload!];
if (!w) throw new Error(`--workload ${Object.keys(WORKLOADS).join('|')}`);
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
  await g.agent.run(w.prepare);
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
        const out = await g.agent.run(w.run(seconds));
        await stop?.();
        const t = w.parse(out.lines.join('\n'));
        tps[which]!.push(t);
        process.stderr.write(`round ${r + 1} ${which.padEnd(10)} ${t.toFixed(1)} ${w.unit}\n`);
      }
    }
  }
} finally {
  await g.stop();
  await rm(work, { recursive: true, force: true });
}
const base = median(tps.alone!);
for (const c of CASES) console.log(`${c.padEnd(10)} median ${median(tps[c]!).toFixed(1)} ${w.unit} (${((100 * median(tps[c]!)) / base).toFixed(0)}% of alone), runs ${tps[c]!.map((x) => x.toFixed(1)).join(' ')}`);
