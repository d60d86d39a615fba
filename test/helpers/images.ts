/** Image checks done with the tools an operator trusts: qemu-img, sha256. */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import { promisify } from 'node:util';
import assert from 'node:assert/strict';
import { writerBlock } from '../../vm-images/launch.ts';

const pexec = promisify(execFile);

export async function sha256(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** `--image-opts` for an encrypted image, keyed through the secret object `sec0` (the key file's). */
export function encryptedImageOpts(image: string, format: 'luks' | 'qcow2'): string {
  return format === 'luks'
    ? `driver=luks,key-secret=sec0,file.filename=${image}`
    : `driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename=${image}`;
}

/** Decrypts with qemu-img into a raw file (the operator's way to check an image). */
export async function decryptToRaw(image: string, format: 'luks' | 'qcow2', keyFile: string, out: string): Promise<void> {
  await pexec('qemu-img', ['convert', '--object', `secret,id=sec0,file=${keyFile}`, '--image-opts', encryptedImageOpts(image, format), '-O', 'raw', out]);
}

/**
 * Runs a qemu-img command that writes a LUKS key slot. Key-slot creation first times the
 * PBKDF by the thread's CPU time, sometimes read as 0 on these hosts: qemu-img then fails
 * with "Unable to get accurate CPU usage" whatever the iter-time (the product retries the
 * same way: src/encrypt/target.ts, retryLuksTiming). Tried again then, up to 12 times.
 */
async function qemuImgWritingKeySlot(args: string[]): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await pexec('qemu-img', args);
      return;
    } catch (e) {
      const stderr = String((e as { stderr?: unknown }).stderr ?? '');
      if (attempt >= 12 || !/accurate CPU usage/i.test(stderr)) throw e;
      await new Promise((r) => setTimeout(r, 50 * attempt));
    }
  }
}

/** `qemu-img create -f luks` of an empty image of `size` (qemu-img's units). */
export async function createLuksImage(out: string, size: string, keyFile: string, iterTimeMs = 10): Promise<void> {
  await qemuImgWritingKeySlot(['create', '-q', '-f', 'luks', '--object', `secret,id=sec0,file=${keyFile}`, '-o', `key-secret=sec0,iter-time=${iterTimeMs}`, out, size]);
}

/** Encrypts a plain image into a new LUKS or LUKS-encrypted qcow2 image with qemu-img. */
export async function encryptImage(plain: string, out: string, format: 'luks' | 'qcow2', keyFile: string, iterTimeMs = 10): Promise<void> {
  const o = format === 'luks'
    ? `key-secret=sec0,iter-time=${iterTimeMs}`
    : `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=${iterTimeMs}`;
  await qemuImgWritingKeySlot(['convert', '--object', `secret,id=sec0,file=${keyFile}`, '-O', format, '-o', o, plain, out]);
}

/**
 * Images from this size on are compared in COMPARE_PARTS ranges at once, each by its own
 * `qemu-img compare` through the raw driver's offset and size: qemu-img decrypts in one
 * thread (about 190 MiB/s on these hosts): a 4 GiB image took 22-28 s whole, 16 s in two
 * ranges and 11 s in four.
 */
const COMPARE_SPLIT_FROM = 1 << 30;
const COMPARE_PARTS = 4;

/** `qemu-img compare` of a plain image against an encrypted one; true when identical. */
export async function compareWithEncrypted(plain: string, image: string, format: 'luks' | 'qcow2', keyFile: string, o: { splitFrom?: number } = {}): Promise<{ same: boolean; output: string }> {
  const compare = async (a: string, b: string, from: number): Promise<{ same: boolean; output: string }> => {
    try {
      const { stdout } = await pexec('qemu-img', ['compare', '--object', `secret,id=sec0,file=${keyFile}`, '--image-opts', a, b]);
      return { same: true, output: stdout };
    } catch (e) {
      const err = e as { code?: number; stdout?: string; stderr?: string };
      // a range's offsets are from its start: said from the image's
      if (err.code === 1) return { same: false, output: `${err.stdout}${err.stderr}`.replace(/offset (\d+)/, (_, at: string) => `offset ${from + Number(at)}`) };
      throw e;
    }
  };
  const plainOpts = `driver=file,filename=${plain}`;
  const encrypted = encryptedImageOpts(image, format);
  const size = (await fs.stat(plain)).size;
  if (size < (o.splitFrom ?? COMPARE_SPLIT_FROM)) return compare(plainOpts, encrypted, 0);
  // In ranges, a size mismatch would go unseen (qemu-img compare says it of whole images).
  const virtual = (await imageInfo(image))['virtual-size'];
  if (virtual !== size) return { same: false, output: `Image size mismatch: ${plain} is ${size} bytes, ${image} holds ${virtual}` };
  const MiB = 1 << 20;
  const part = Math.ceil(size / COMPARE_PARTS / MiB) * MiB;
  const starts = Array.from({ length: Math.ceil(size / part) }, (_, i) => i * part);
  const inRange = (opts: string, from: number) => `driver=raw,offset=${from},size=${Math.min(part, size - from)},${opts.split(',').map((opt) => `file.${opt}`).join(',')}`;
  const results = await Promise.all(starts.map((from) => compare(inRange(plainOpts, from), inRange(encrypted, from), from)));
  const differ = results.filter((r) => !r.same);
  return differ.length ? { same: false, output: differ.map((r) => r.output).join('') } : { same: true, output: results[0]!.output };
}

export async function imageInfo(path: string): Promise<{ format: string; 'virtual-size': number; encrypted?: boolean }> {
  const { stdout } = await pexec('qemu-img', ['info', '--output=json', '-U', path]);
  return JSON.parse(stdout);
}

/** The active LUKS key slots of an image (luks, or qcow2 with LUKS encryption): index and PBKDF iterations. */
export async function activeKeySlots(path: string): Promise<{ slot: number; iters: number }[]> {
  const { stdout } = await pexec('qemu-img', ['info', '--output=json', '-U', path]);
  const fs = JSON.parse(stdout)['format-specific'] as { type: string; data: { slots?: Slot[]; encrypt?: { slots?: Slot[] } } };
  type Slot = { active: boolean; iters?: number };
  const slots = (fs.type === 'luks' ? fs.data.slots : fs.data.encrypt?.slots) ?? [];
  return slots.flatMap((s, slot) => (s.active ? [{ slot, iters: s.iters ?? 0 }] : []));
}

/** fileContains reads this much at a time (its unit test puts needles across the seams). */
export const FILE_CONTAINS_READ_BYTES = 16 << 20;

/**
 * Does the file contain `needle` anywhere? Read into one reused 16 MiB buffer whose first
 * bytes are the last needle-length-minus-one of the read before, so a needle across two
 * reads is found too. (A stream's chunks joined to the previous tail copied the whole file
 * and took 7.5 s for a 4 GiB image in the page cache; this takes 1.7 s.)
 */
export async function fileContains(path: string, needle: string): Promise<boolean> {
  const n = Buffer.from(needle);
  const fh = await fs.open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(Math.max(FILE_CONTAINS_READ_BYTES, 2 * n.length));
    let kept = 0;
    let pos = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, kept, buf.length - kept, pos);
      if (bytesRead === 0) return false;
      pos += bytesRead;
      const end = kept + bytesRead;
      if (buf.subarray(0, end).includes(n)) return true;
      kept = Math.min(n.length - 1, end);
      buf.copy(buf, 0, end - kept, end);
    }
  } finally {
    await fh.close();
  }
}

export async function writeKey(path: string, key: string): Promise<void> {
  await fs.writeFile(path, key, { mode: 0o600 });
}

/**
 * Every block the writer guest reported (its `WROTE seq=N off=O` lines) is in the decrypted
 * image with its latest content; the block after the last one reported may hold that next,
 * unreported write (the VM stopped between the write and its report).
 */
export async function checkWriterBlocks(lines: readonly string[], image: string, keyFile: string, format: 'luks' | 'qcow2' = 'luks'): Promise<void> {
  const latest = new Map<number, number>();
  for (const l of lines) {
    const m = /^WROTE seq=(\d+) off=(\d+)/.exec(l);
    if (m) latest.set(Number(m[2]), Number(m[1]));
  }
  assert.ok(latest.size > 10, 'the guest wrote during the test');
  const lastSeq = Math.max(...latest.values());
  const plain = `${image}.dec`;
  await decryptToRaw(image, format, keyFile, plain);
  const fd = await fs.open(plain, 'r');
  try {
    const wrong: number[] = [];
    for (const [off, seq] of latest) {
      const { buffer } = await fd.read(Buffer.alloc(4096), 0, 4096, off);
      if (!buffer.equals(writerBlock(seq, off)) && !buffer.equals(writerBlock(lastSeq + 1, off))) wrong.push(off);
    }
    assert.deepEqual(wrong, [], `${wrong.length} of ${latest.size} written blocks lack the guest's last write`);
  } finally {
    await fd.close();
    await fs.rm(plain, { force: true });
  }
}
