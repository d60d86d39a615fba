/** Shared by the observe tests: guests, QMP for the harness, input injection, waiting. */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/client.ts';
import type { InputEvent } from '../../src/qmp/schema.ts';
import { makeDiskImage, startTestVm, type TestVm, type TestVmOptions } from '../../vm-images/launch.ts';

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Whether a process with this pid exists (signal 0 checks without sending anything). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function waitUntil(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export interface Guest {
  vm: TestVm;
  /** The harness's QMP (vm.qmpSocket); vm.toolQmpSocket stays free for idlecrypt. */
  qmp: QmpClient;
  disk: string;
}

/** A scratch directory and the guests booted in it; `cleanup()` stops them all and removes it. */
export class Lab {
  readonly guests: Guest[] = [];
  private constructor(readonly dir: string) {}

  static async create(prefix: string): Promise<Lab> {
    return new Lab(await mkdtemp(join(tmpdir(), `ic-${prefix}-`)));
  }

  async boot(opts: Omit<TestVmOptions, 'disk' | 'dir'> & { diskMiB?: number }): Promise<Guest> {
    const disk = join(this.dir, `${opts.name}.raw`);
    await makeDiskImage(disk, { sizeMiB: opts.diskMiB ?? 64, format: 'raw', fill: 'pattern' });
    const vm = await startTestVm({ ...opts, disk, dir: join(this.dir, opts.name) });
    try {
      await vm.ready;
      const qmp = await QmpClient.connect(vm.qmpSocket);
      const g = { vm, qmp, disk };
      this.guests.push(g);
      return g;
    } catch (e) {
      await vm.stop();
      throw e;
    }
  }

  async cleanup(): Promise<void> {
    await Promise.all(this.guests.map(async (g) => {
      await g.qmp.close().catch(() => {});
      await g.vm.stop();
    }));
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Text "typed" into guests by the privacy tests: must never appear in any output. */
export const SECRET_TEXT = 'hunter2 zebra9';

const QCODE: Record<string, string> = { ' ': 'spc' };

/** Press and release of every character of `text`: 2 key events per character. */
export function typeText(text: string): InputEvent[] {
  return [...text].flatMap((ch): InputEvent[] => {
    const key = { type: 'qcode' as const, data: QCODE[ch] ?? ch };
    return [{ type: 'key', data: { key, down: true } }, { type: 'key', data: { key, down: false } }];
  });
}

/** A click and a move: button press/release, absolute x/y, relative x/y: 6 pointer events. */
export function pointerEvents(): InputEvent[] {
  return [
    { type: 'btn', data: { button: 'left', down: true } },
    { type: 'btn', data: { button: 'left', down: false } },
    { type: 'abs', data: { axis: 'x', value: 12345 } },
    { type: 'abs', data: { axis: 'y', value: 23456 } },
    { type: 'rel', data: { axis: 'x', value: 7 } },
    { type: 'rel', data: { axis: 'y', value: -3 } },
  ];
}

/** Guest disk requests per QEMU's own accounting (the device's rd/wr/flush operations). */
export async function blockstats(qmp: QmpClient): Promise<{ reads: number; writes: number; flushes: number }> {
  const stats = await qmp.execute('query-blockstats');
  return stats.reduce(
    (t, s) => ({ reads: t.reads + s.stats.rd_operations, writes: t.writes + s.stats.wr_operations, flushes: t.flushes + s.stats.flush_operations }),
    { reads: 0, writes: 0, flushes: 0 },
  );
}

/** Pids of this process's children named `comm` (e.g. the bpftrace a CLI started). */
export async function childrenOf(ppid: number, comm: string): Promise<number[]> {
  const pids: number[] = [];
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const stat = await readFile(`/proc/${e}/stat`, 'utf8').catch(() => '');
    const m = /^\d+ \((.*)\) \S+ (\d+)/.exec(stat);
    if (m && m[1] === comm && Number(m[2]) === ppid) pids.push(Number(e));
  }
  return pids;
}
