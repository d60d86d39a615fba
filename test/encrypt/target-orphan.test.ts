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
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { childrenOf } from '../observe/helpers.ts';

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-orphan-'));
  await writeFile(path.join(dir, 'key'), 'orphan-key', { mode: 0o600 });
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Whether a process runs: a zombie (dead, not yet reaped by init) does not. */
const alive = async (pid: number): Promise<boolean> => {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3); // the field after "(comm)"
  return stat !== '' && state !== 'Z';
};

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
    pids = await childrenOf(run.pid!, 'qemu-img');
  }
  assert.equal(pids.length, 1, 'qemu-img runs, writing the header');
  run.kill('SIGKILL');
  await new Promise((r) => run.once('exit', r));
  let left = pids;
  for (let i = 0; i < 20 && left.length > 0; i++) {
    await sleep(100);
    left = (await Promise.all(left.map(async (p) => ((await alive(p)) ? [p] : [])))).flat();
  }
  for (const p of left) process.kill(p, 'SIGKILL'); // do not leave it to the rest of the suite
  assert.deepEqual(left, [], 'qemu-img died with the run that started it');
});
