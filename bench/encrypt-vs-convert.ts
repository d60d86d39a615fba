/**
 * Encrypting a 1 GiB disk: online with `idlecrypt encrypt --speed 0` (the guest running,
 * idle) versus offline `qemu-img convert -O luks` of the same image. Both create a LUKS
 * header with the same iter-time. Rounds alternate the order so drift hits both alike;
 * medians are reported (these machines vary about ±5%).
 *
 *   node --import tsx bench/encrypt-vs-convert.ts [--rounds 5] [--size-mib 1024]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { makeDiskImage, startTestVm, ensureImage } from '../vm-images/launch.ts';
import { BIN } from '../test/helpers/cli.ts';
import { encryptImage } from '../test/helpers/images.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '5' }, 'size-mib': { type: 'string', default: '1024' }, 'iter-time': { type: 'string', default: '2000' } } });
const rounds = Number(values.rounds);
const sizeMiB = Number(values['size-mib']);
const iterTime = values['iter-time']!;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

ensureImage();
const dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-bench-'));
const src = path.join(dir, 'src.raw');
const key = path.join(dir, 'key');
await writeFile(key, 'benchmark-key', { mode: 0o600 });
await makeDiskImage(src, { sizeMiB, format: 'raw', fill: 'pattern' });

async function online(round: number) {
  const target = path.join(dir, `online-${round}.luks`);
  const vm = await startTestVm({ name: `bench-${round}`, disk: src, dir, workload: 'idle' });
  try {
    await vm.ready;
    const t0 = performance.now();
    const r = spawnSync(BIN, ['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', key, '--speed', '0', '--iter-time', iterTime, '--json'], { encoding: 'utf8' });
    const total = (performance.now() - t0) / 1000;
    if (r.status !== 0) throw new Error(`encrypt failed: ${r.stderr}`);
    const recs = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
    const at = (phase: string) => Date.parse(recs.find((x) => x.event === 'phase' && x.phase === phase).time);
    const copy = (at('completing') - at('copying')) / 1000;
    return { total, copy };
  } finally {
    await vm.stop();
    await rm(target, { force: true });
  }
}

// qemu-img convert, retried on LUKS's spurious "Unable to get accurate CPU usage" as the
// online run's target creation is (test/helpers/images.ts encryptImage).
async function offline(round: number) {
  const target = path.join(dir, `offline-${round}.luks`);
  const t0 = performance.now();
  await encryptImage(src, target, 'luks', key, Number(iterTime));
  const total = (performance.now() - t0) / 1000;
  execFileSync('rm', ['-f', target]);
  return { total };
}

const on: { total: number; copy: number }[] = [];
const off: { total: number }[] = [];
for (let i = 0; i < rounds; i++) {
  if (i % 2 === 0) {
    on.push(await online(i));
    off.push(await offline(i));
  } else {
    off.push(await offline(i));
    on.push(await online(i));
  }
  process.stderr.write(`round ${i + 1}/${rounds}: online ${on.at(-1)!.total.toFixed(2)} s (copy ${on.at(-1)!.copy.toFixed(2)} s), qemu-img convert ${off.at(-1)!.total.toFixed(2)} s\n`);
}
const mOnTotal = median(on.map((x) => x.total));
const mOnCopy = median(on.map((x) => x.copy));
const mOff = median(off.map((x) => x.total));
const rows = [
  ['method', 'median time (s)', 'MiB/s', 'runs (s)'],
  ['idlecrypt encrypt --speed 0 (online, whole command)', mOnTotal.toFixed(2), (sizeMiB / mOnTotal).toFixed(0), on.map((x) => x.total.toFixed(2)).join(' ')],
  ['idlecrypt encrypt --speed 0 (mirror phase only)', mOnCopy.toFixed(2), (sizeMiB / mOnCopy).toFixed(0), on.map((x) => x.copy.toFixed(2)).join(' ')],
  ['qemu-img convert -O luks (offline)', mOff.toFixed(2), (sizeMiB / mOff).toFixed(0), off.map((x) => x.total.toFixed(2)).join(' ')],
];
const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
const text = rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ')).join('\n');
console.log(`Encrypting a ${sizeMiB} MiB raw image, LUKS iter-time ${iterTime} ms, ${rounds} rounds, medians:\n${text}`);
await mkdir('bench/results', { recursive: true });
await writeFile('bench/results/encrypt-vs-convert.json', JSON.stringify({ sizeMiB, iterTime, rounds, online: on, offline: off }, null, 2));
await rm(dir, { recursive: true, force: true });
