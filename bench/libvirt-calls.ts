/**
 * What one call to libvirt costs, the two ways idlecrypt could make it (docs/libvirt.md):
 * `virsh` per call (a process and a connection each time) and the long-lived helper on
 * python3-libvirt (src/libvirt/helper.py) that idlecrypt uses. Both read the same thing,
 * in rounds side by side: the block-job info of a running domain's disk, and its disks
 * (domain XML).
 *
 *   node --import tsx bench/libvirt-calls.ts [--calls 50] [--rounds 5]
 *
 * Boots the test guest as a transient libvirt domain (vm-images/libvirt.ts) and removes it
 * at the end. Prints per round the mean ms per call, then the medians.
 */
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { LibvirtClient } from '../src/libvirt/client.ts';
import { ensureImage, makeDiskImage } from '../vm-images/launch.ts';
import { ensureLibvirtd, TestDomain } from '../vm-images/libvirt.ts';

const execFileP = promisify(execFile);
const { values } = parseArgs({ options: { calls: { type: 'string', default: '50' }, rounds: { type: 'string', default: '5' } } });
const calls = Number(values.calls);
const rounds = Number(values.rounds);

async function timeEach(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) await fn();
  return (performance.now() - t0) / calls;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

ensureImage();
await ensureLibvirtd();
const dir = await mkdtemp(join(tmpdir(), 'ic-bench-libvirt-'));
await chmod(dir, 0o755);
const name = `ic-bench-${process.pid}`;
const disk = join(dir, 'disk.raw');
await makeDiskImage(disk, { sizeMiB: 64, format: 'raw', fill: 'sparse' });
const dom = await TestDomain.start({ name, dir, disk, persistent: false });
const client = await LibvirtClient.connect();
const virsh = (...args: string[]) => execFileP('virsh', ['-c', 'qemu:///system', ...args], { env: { ...process.env, LC_ALL: 'C' } });
const rows: { round: number; virshJob: number; helperJob: number; virshDisks: number; helperDisks: number }[] = [];
try {
  for (let r = 1; r <= rounds; r++) {
    const row = {
      round: r,
      virshJob: await timeEach(() => virsh('blockjob', name, 'vda', '--raw')),
      helperJob: await timeEach(() => client.jobInfo(name, 'vda')),
      virshDisks: await timeEach(() => virsh('domblklist', name, '--details')),
      helperDisks: await timeEach(() => client.disks(name)),
    };
    rows.push(row);
    console.log(`round ${r}: block job info virsh ${row.virshJob.toFixed(1)} ms, helper ${row.helperJob.toFixed(2)} ms; disks virsh ${row.virshDisks.toFixed(1)} ms, helper ${row.helperDisks.toFixed(2)} ms`);
  }
  const m = (k: keyof (typeof rows)[number]) => median(rows.map((x) => x[k])).toFixed(2);
  console.log(`\nmedians over ${rounds} rounds of ${calls} calls (ms per call):`);
  console.log(`| call | virsh | helper |\n| --- | --- | --- |\n| block job info | ${m('virshJob')} | ${m('helperJob')} |\n| disks (domain XML) | ${m('virshDisks')} | ${m('helperDisks')} |`);
} finally {
  await client.close();
  await dom.remove();
  await rm(dir, { recursive: true, force: true });
}
