/** The qemu-storage-daemons idlecrypt starts (src/encrypt/storage-daemon.ts), found in /proc. */
import { readdir, readFile } from 'node:fs/promises';

/** The qemu-storage-daemon processes whose command line names `image` (a path, or a directory above it): pid and command line. */
export async function daemonsOn(image: string): Promise<{ pid: number; cmdline: string }[]> {
  const out: { pid: number; cmdline: string }[] = [];
  for (const p of await readdir('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    const cmdline = await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.startsWith('qemu-storage-daemon\0') || cmdline.includes('/qemu-storage-daemon\0')) {
      if (cmdline.includes(image)) out.push({ pid: Number(p), cmdline: cmdline.replaceAll('\0', ' ') });
    }
  }
  return out;
}
