/**
 * Neighbour protection (`host.protect: storage`): a copy reads and writes the host's disks,
 * so it slows every guest whose image lives on the same host device, not only its own.
 * The job's VM is then called busy while any of those neighbours is: its samples are
 * combined with theirs before the controller sees them.
 *
 * Which images a QEMU uses is read from its open files (/proc/PID/fd and fdinfo): regular
 * files it holds open for reading and writing or reading, without O_APPEND (its logs).
 * No QMP needed, so it covers every VM on the host, ours or not, libvirt's included.
 */
import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import { Observable, type OperatorFunction } from 'rxjs';
import type { ActivitySample } from '../streams/types.ts';

const O_ACCMODE = 0o3;
const O_WRONLY = 0o1;
const O_APPEND = 0o2000;

/** The host devices (st_dev) of the image files a QEMU process holds open. */
export async function imageDevices(pid: number, procRoot = '/proc'): Promise<Set<number>> {
  const devs = new Set<number>();
  const dir = `${procRoot}/${pid}/fd`;
  const fds = await readdir(dir).catch(() => [] as string[]);
  await Promise.all(
    fds.map(async (fd) => {
      const target = await readlink(`${dir}/${fd}`).catch(() => '');
      if (!target.startsWith('/')) return; // sockets, pipes, anon inodes
      const info = await readFile(`${procRoot}/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
      const flags = parseInt(/^flags:\s*([0-7]+)/m.exec(info)?.[1] ?? '0', 8);
      if ((flags & O_ACCMODE) === O_WRONLY || flags & O_APPEND) return;
      const st = await stat(`${dir}/${fd}`).catch(() => undefined);
      if (st?.isFile()) devs.add(st.dev);
    }),
  );
  return devs;
}

/** The host device of a path (a target not created yet: its directory's). */
export async function deviceOf(path: string): Promise<number | undefined> {
  const st = await stat(path).catch(() => stat(path.replace(/\/[^/]*$/, '') || '/').catch(() => undefined));
  return st?.dev;
}

/**
 * The job's VM's samples, each combined with the neighbours' samples of the same report:
 * every counter is the largest of them, so the controller calls the VM busy while any of
 * them is over its threshold. The time in flight too: a neighbour's requests wait on the
 * host device our copy writes to. The stall is the VM's own: a neighbour's vCPUs wait for
 * their own QEMU's lock, which our copy does not hold.
 *
 * The samples of one report arrive together (one bpftrace report for the host), in no set
 * order: they are gathered until the current macrotask ends, then combined.
 */
export function withNeighbours(ownPid: number, neighbours: () => ReadonlySet<number>): OperatorFunction<ActivitySample, ActivitySample> {
  return (source) =>
    new Observable<ActivitySample>((subscriber) => {
      let batch: ActivitySample[] = [];
      let flush: NodeJS.Immediate | undefined;
      const emit = () => {
        flush = undefined;
        const all = batch;
        batch = [];
        for (const own of all.filter((s) => s.pid === ownPid)) {
          const near = neighbours();
          const others = all.filter((s) => s.pid !== ownPid && near.has(s.pid) && Math.abs(s.time - own.time) < 1);
          subscriber.next(others.length === 0 ? own : combine(own, others));
        }
      };
      const sub = source.subscribe({
        next: (s) => {
          batch.push(s);
          flush ??= setImmediate(emit);
        },
        error: (e: unknown) => subscriber.error(e),
        complete: () => {
          if (flush) clearImmediate(flush);
          emit();
          subscriber.complete();
        },
      });
      return () => {
        if (flush) clearImmediate(flush);
        sub.unsubscribe();
      };
    });
}

const COMBINED = ['diskReads', 'diskWrites', 'diskFlushes', 'diskDiscards', 'diskBusyUs', 'keyEvents', 'pointerEvents', 'interrupts'] as const;

function combine(own: ActivitySample, others: readonly ActivitySample[]): ActivitySample {
  const out: Record<string, unknown> = { ...own };
  for (const k of COMBINED) {
    let v = own[k] ?? null;
    for (const o of others) {
      const n = o[k] ?? null;
      // Counts over the neighbour's interval, as a count over ours.
      const scaled = n === null || !(o.intervalS > 0) ? null : o.intervalS === own.intervalS ? n : (n * own.intervalS) / o.intervalS;
      if (scaled !== null && (v === null || scaled > v)) v = scaled;
    }
    out[k] = v;
  }
  return out as unknown as ActivitySample;
}
