/**
 * The qemu-img that writes a target's LUKS header dies with the run that started it
 * (src/encrypt/target.ts, `setpriv --pdeathsig KILL`). Before, a run killed with -9 while
 * qemu-img derived the key left it running; once the next run had made its own target at
 * the same path, the orphan's failure deleted that file (QEMU's LUKS create deletes its file
 * when it fails), and the next run could not open its target (ci17). Real qemu-img, with a
 * key derivation long enough to kill the run in the middle of it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-orphan-'));
  await writeFile(path.join(dir, 'key'), 'orphan-key', { mode: 0o600 });
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Pids of processes whose command line holds `needle`. */
async function processesWith(needle: string): Promise<number[]> {
  const out: number[] = [];
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const cmd = await readFile(`/proc/${e}/cmdline`, 'utf8').catch(() => '');
    if (cmd.split('\0')[0]?.endsWith('qemu-img') && cmd.includes(needle)) out.push(Number(e));
  }
  return out;
}

test('a run killed with -9 while qemu-img writes its LUKS header takes qemu-img with it', async () => {
  const target = path.join(dir, 't.luks');
  const module = path.resolve('src/encrypt/target.ts');
  const log = path.resolve('src/log.ts');
  // 20 s of key derivation: far longer than the test waits
  const script =
    `import { writeImageWithQemuImg } from ${JSON.stringify(module)};` +
    `import { silentLogger } from ${JSON.stringify(log)};` +
    `await writeImageWithQemuImg('qemu-img', { path: ${JSON.stringify(target)}, format: 'luks', size: 1 << 20, keyFile: ${JSON.stringify(path.join(dir, 'key'))}, iterTimeMs: 20000 }, silentLogger);`;
  const run = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: 'ignore' });
  let pids: number[] = [];
  for (let i = 0; i < 100 && pids.length === 0; i++) {
    await sleep(100);
    pids = await processesWith(target);
  }
  assert.equal(pids.length, 1, 'qemu-img runs, writing the header');
  run.kill('SIGKILL');
  await new Promise((r) => run.once('exit', r));
  let left = pids;
  for (let i = 0; i < 20 && left.length > 0; i++) {
    await sleep(100);
    left = await processesWith(target);
  }
  for (const p of left) process.kill(p, 'SIGKILL'); // do not leave it to the rest of the suite
  assert.deepEqual(left, [], 'qemu-img died with the run that started it');
});
