/**
 * Checks made before anything is created, so that bad input costs nothing: each failure is
 * one line naming the problem. The key file is checked for presence and size only; its
 * bytes are never read here (QEMU reads them through a `secret` object).
 */
import { constants, promises as fs } from 'node:fs';
import path from 'node:path';
import { IdlecryptError } from '../errors.ts';
import type { FormatChoice, TargetFormat } from './target.ts';

export async function checkKeyFile(keyFile: string): Promise<string> {
  const abs = path.resolve(keyFile);
  let st;
  try {
    st = await fs.stat(abs);
  } catch (e) {
    throw new IdlecryptError('KEY_FILE', `key file ${abs} does not exist`, { cause: e });
  }
  if (!st.isFile()) throw new IdlecryptError('KEY_FILE', `key file ${abs} is not a regular file`);
  try {
    await fs.access(abs, constants.R_OK);
    // access() says yes to root for any mode; opening proves it (without reading a byte).
    await (await fs.open(abs, 'r')).close();
  } catch (e) {
    throw new IdlecryptError('KEY_FILE', `key file ${abs} is not readable`, { cause: e });
  }
  if (st.size === 0) throw new IdlecryptError('KEY_FILE', `key file ${abs} is empty`);
  return abs;
}

/** The target must not exist: we never overwrite a file, whatever it is. */
export async function checkTargetPath(target: string, sourceFile: string | undefined): Promise<string> {
  const abs = path.resolve(target);
  if (sourceFile !== undefined && path.resolve(sourceFile) === abs) {
    throw new IdlecryptError('TARGET_EXISTS', `target ${abs} is the guest's own disk; choose a new file`);
  }
  try {
    await fs.lstat(abs);
    throw new IdlecryptError('TARGET_EXISTS', `target ${abs} already exists; refusing to overwrite it`);
  } catch (e) {
    if (e instanceof IdlecryptError) throw e;
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new IdlecryptError('TARGET_EXISTS', `cannot check target ${abs}: ${(e as Error).message}`, { cause: e });
    }
  }
  const dir = path.dirname(abs);
  try {
    const st = await fs.stat(dir);
    if (!st.isDirectory()) throw new Error('not a directory');
  } catch (e) {
    throw new IdlecryptError('USAGE', `target directory ${dir} does not exist`, { cause: e });
  }
  return abs;
}

/**
 * Room the target takes when the copy is done, plus the format's metadata. Raw LUKS: the
 * whole virtual size, sparse or not (encrypted zeros are not zeros). qcow2: what the source
 * occupies on the host (`allocatedBytes`, where known): its unallocated and zero areas
 * become zero clusters, which take no room; from then on it grows as the source would
 * have. Where the allocation is unknown (a block device, a backing chain), the virtual size.
 */
export function targetBytesNeeded(virtualSize: number, format: TargetFormat, allocatedBytes: number | null = null): number {
  const MiB = 1024 * 1024;
  // LUKS1 header with 8 key slots of 4000 AF stripes is ~2 MiB; qcow2 adds L1/L2 tables and
  // refcounts (~0.2% at 64 KiB clusters). Round up generously.
  const meta = format === 'luks' ? 16 * MiB : 16 * MiB + Math.ceil(virtualSize / 256);
  const data = format === 'qcow2' && allocatedBytes !== null ? Math.min(allocatedBytes, virtualSize) : virtualSize;
  return data + meta;
}

/**
 * What to tell an operator whose mostly unallocated disk goes into raw LUKS by default (a raw
 * disk under `--format auto`): the image will hold the whole virtual size, and the copy
 * encrypts every hole. Named formats are the operator's choice: nothing to say then.
 */
export function thinDiskNote(choice: FormatChoice, format: TargetFormat, virtualSize: number, allocatedBytes: number | null): { text: string; record: Record<string, unknown> } | null {
  if (choice !== 'auto' || format !== 'luks' || allocatedBytes === null || virtualSize <= 0 || allocatedBytes >= virtualSize / 2) return null;
  return {
    text: `the disk occupies ${fmtBytes(allocatedBytes)} of its ${fmtBytes(virtualSize)}; the raw LUKS image will hold all ${fmtBytes(virtualSize)}, its holes as encrypted zeros, which the copy encrypts too: --format qcow2 keeps it as thin`,
    record: { hint: 'format', allocated: allocatedBytes, virtual_size: virtualSize },
  };
}

export async function checkSpace(target: string, needed: number): Promise<void> {
  const dir = path.dirname(target);
  const st = await fs.statfs(dir);
  const free = Number(st.bavail) * Number(st.bsize);
  if (free < needed) {
    throw new IdlecryptError(
      'NO_SPACE',
      `not enough space for ${target}: needs ${fmtBytes(needed)}, ${dir} has ${fmtBytes(free)} free`,
      { context: { needed, free } },
    );
  }
}

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}
