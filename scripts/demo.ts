/**
 * `npm run demo`: the main job, end to end, on the bundled test guest.
 *
 * Boots the test VM (TCG) with a bursty workload (idle and busy disk phases), encrypts its
 * disk in the background with `idlecrypt encrypt` showing live progress, checks that the
 * guest now runs on the encrypted image and that the image decrypts to the guest's data,
 * and says where everything is. Everything lives in one work folder (printed), removed at
 * the end unless --keep is given.
 *
 *   npm run demo [-- --size-mib 512] [--keep]
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { ensureImage, makeDiskImage, startTestVm } from '../vm-images/launch.ts';

const BIN = fileURLToPath(new URL('../bin/idlecrypt', import.meta.url));
const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '512' }, keep: { type: 'boolean', default: false } } });
const sizeMiB = Number(values['size-mib']);

const say = (s: string) => process.stdout.write(`\x1b[1m==>\x1b[0m ${s}\n`);

ensureImage();
const work = await mkdtemp(path.join(tmpdir(), 'idlecrypt-demo-'));
const source = path.join(work, 'guest.raw');
const target = path.join(work, 'guest.luks');
const keyFile = path.join(work, 'guest.key');

say(`work folder ${work}`);
say(`making a ${sizeMiB} MiB guest disk with recognisable data`);
await makeDiskImage(source, { sizeMiB, format: 'raw', fill: 'pattern' });
await writeFile(keyFile, randomBytes(32).toString('base64url'), { mode: 0o600 });

say('booting the test VM (TCG): 8 s idle, 8 s of disk I/O, repeating');
const vm = await startTestVm({ name: 'demo', disk: source, dir: path.join(work, 'vm'), workload: 'bursty', params: { idle: 8, busy: 8 } });
let exitCode = 0;
try {
  await vm.ready;
  say(`guest up (pid ${vm.pid}); encrypting its disk while it runs:`);
  const args = ['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile];
  process.stdout.write(`    idlecrypt ${args.join(' ')}\n`);
  const code = await new Promise<number>((resolve) => {
    const child = spawn(BIN, args, { stdio: 'inherit' });
    // Ctrl-C reaches the child through the terminal; the demo waits for it to clean up.
    process.on('SIGINT', () => {});
    child.on('close', (c) => resolve(c ?? 1));
  });
  if (code !== 0) {
    exitCode = code;
    say(`encrypt exited with ${code}; the guest still runs on ${source}`);
  } else {
    say('the guest now runs on:');
    execFileSync(BIN, ['status', '--qmp', vm.toolQmpSocket], { stdio: 'inherit' });
    await vm.waitForLine(/^PHASE /, 20_000);
    say('verifying: the encrypted image, decrypted with the key, equals the guest\'s data');
    // The guest's disk loop writes back the bytes it read, so the data stays comparable
    // while the guest runs; -U lets qemu-img read images QEMU holds open.
    const cmp = spawnCompare(source, target, keyFile);
    say(cmp.ok ? `verified: ${cmp.text}` : `MISMATCH: ${cmp.text}`);
    if (!cmp.ok) exitCode = 1;
    say(`plaintext markers in the raw encrypted file: ${await countMarkers(target)} (in the source: ${await countMarkers(source)})`);
  }
} catch (e) {
  exitCode = 1;
  process.stderr.write(`demo: ${(e as Error).message}\n`);
} finally {
  await vm.stop();
  if (values.keep) say(`kept ${work} (source, encrypted image, key, serial log)`);
  else await rm(work, { recursive: true, force: true });
}
process.exit(exitCode);

/** How many 'IDLECRYPT-DATA' markers (one per 32 bytes of the test data) a file holds. */
async function countMarkers(file: string): Promise<number> {
  const needle = Buffer.from('IDLECRYPT-DATA');
  let n = 0;
  let tail = Buffer.alloc(0);
  for await (const chunk of createReadStream(file, { highWaterMark: 4 << 20 })) {
    const buf = Buffer.concat([tail, chunk as Buffer]);
    for (let i = buf.indexOf(needle); i !== -1; i = buf.indexOf(needle, i + 1)) n++;
    // keep a tail shorter than the needle, so no match is counted twice
    tail = buf.subarray(Math.max(0, buf.length - needle.length + 1));
  }
  return n;
}

function spawnCompare(plain: string, enc: string, key: string): { ok: boolean; text: string } {
  try {
    const out = execFileSync('qemu-img', ['compare', '-U', '--object', `secret,id=sec0,file=${key}`, '--image-opts', `driver=file,filename=${plain}`, `driver=luks,key-secret=sec0,file.filename=${enc}`], { encoding: 'utf8' });
    return { ok: true, text: out.trim() };
  } catch (e) {
    return { ok: false, text: String((e as { stdout?: string }).stdout ?? (e as Error).message).trim() };
  }
}
