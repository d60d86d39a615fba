/**
 * The suite's own check of an encrypted image against its source (test/helpers/images.ts
 * compareWithEncrypted), which large images take in ranges at once: it must still see one
 * changed sector in any range, say where, and see a size that differs.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { makeDiskImage } from '../../vm-images/launch.ts';
import { FILE_CONTAINS_READ_BYTES, compareWithEncrypted, encryptImage, encryptedImageOpts, fileContains, writeKey } from '../helpers/images.ts';

const pexec = promisify(execFile);
const MiB = 1 << 20;
let dir: string;
let key: string;

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-compare-'));
  key = path.join(dir, 'key');
  await writeKey(key, 'compare key');
});
after(() => rm(dir, { recursive: true, force: true }));

async function overwrite(image: string, format: 'luks' | 'qcow2', offset: number): Promise<void> {
  await pexec('qemu-io', ['--object', `secret,id=sec0,file=${key}`, '--image-opts', encryptedImageOpts(image, format), '-c', `write -P 0x41 ${offset} 512`]);
}

describe('compareWithEncrypted', () => {
  for (const format of ['luks', 'qcow2'] as const) {
    test(`${format}: whole and in ranges, identical images are the same; one changed sector in the third range is seen at its offset in the image; in ranges, a size that differs is seen`, async () => {
      const plain = path.join(dir, `${format}.raw`);
      const image = path.join(dir, `${format}.img`);
      await makeDiskImage(plain, { sizeMiB: 10, format: 'raw', fill: 'pattern' });
      await encryptImage(plain, image, format, key);
      for (const splitFrom of [undefined, 1]) assert.equal((await compareWithEncrypted(plain, image, format, key, { splitFrom })).same, true);
      // in ranges, a source smaller than the image is not the same (whole, qemu-img says so)
      const smaller = path.join(dir, `${format}-8.raw`);
      await makeDiskImage(smaller, { sizeMiB: 8, format: 'raw', fill: 'pattern' });
      const r8 = await compareWithEncrypted(smaller, image, format, key, { splitFrom: 1 });
      assert.equal(r8.same, false);
      assert.match(r8.output, /size mismatch/i);
      const at = 7 * MiB + 4096; // ranges of 3 MiB: in the third
      await overwrite(image, format, at);
      for (const splitFrom of [undefined, 1]) {
        const r = await compareWithEncrypted(plain, image, format, key, { splitFrom });
        assert.equal(r.same, false, `splitFrom ${splitFrom}`);
        assert.match(r.output, new RegExp(`offset ${at}\\b`), `splitFrom ${splitFrom}: ${r.output}`);
      }
    });
  }
});

describe('fileContains', () => {
  // The needle at the start, the end, inside a read, and across the seam between two reads
  // is found; a needle split apart, or only its first bytes, is not.
  test('finds the needle anywhere, across the seam between two reads too, and nothing that only resembles it', async () => {
    const needle = 'IDLECRYPT-DATA';
    const file = path.join(dir, 'haystack');
    const R = FILE_CONTAINS_READ_BYTES;
    const size = 3 * R + 7;
    const cases: [string, (b: Buffer) => void, boolean][] = [
      ['absent', () => {}, false],
      ['at 0', (b) => b.write(needle, 0, 'latin1'), true],
      ['inside the second read', (b) => b.write(needle, R + 4 * MiB, 'latin1'), true],
      ['across the first seam', (b) => b.write(needle, R - 5, 'latin1'), true],
      ['one byte over the seam', (b) => b.write(needle, R - needle.length + 1, 'latin1'), true],
      ['ending at the file end', (b) => b.write(needle, size - needle.length, 'latin1'), true],
      ['split apart at the seam', (b) => { b.write(needle.slice(0, -1), R - 13, 'latin1'); b.write(needle.slice(-1), R + 5, 'latin1'); }, false],
      ['all but its last byte, at the end', (b) => b.write(needle.slice(0, -1), size - needle.length + 1, 'latin1'), false],
    ];
    for (const [name, put, expected] of cases) {
      const b = Buffer.alloc(size);
      put(b);
      await writeFile(file, b);
      assert.equal(await fileContains(file, needle), expected, name);
    }
    await writeFile(file, `xx${needle}`);
    assert.equal(await fileContains(file, needle), true, 'a file shorter than one read');
  });
});
