/**
 * VM discovery from /proc: every process whose executable (or argv[0]) is a
 * qemu-system-* emulator, with the name and QMP sockets of its command line
 * (cmdline.ts). `watch()` polls, and emits the list whenever it changes.
 */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { asyncScheduler, distinctUntilChanged, exhaustMap, from, shareReplay, timer, type Observable, type SchedulerLike } from 'rxjs';
import { isQemuSystem, parseQemuCmdline } from './cmdline.ts';
import type { VmDiscovery, VmInfo } from './types.ts';

export interface ProcfsDiscoveryOptions {
  /** Default /proc; a directory laid out like it, for tests. */
  procRoot?: string;
  /** watch() polling period (default 1000 ms). */
  pollMs?: number;
  scheduler?: SchedulerLike;
}

export class ProcfsDiscovery implements VmDiscovery {
  private readonly root: string;
  private readonly pollMs: number;
  private readonly scheduler: SchedulerLike;
  /**
   * What was learnt of each QEMU process, by pid: its command line, working directory and
   * start time cannot change while it lives, so a later pass reads only its exe link.
   * Without this an agent watching 100 VMs spent a fifth of a core reading /proc
   * (bench/agent-scale.ts).
   */
  private readonly known = new Map<number, { vm: VmInfo; settled: boolean }>();
  private watch$?: Observable<VmInfo[]>;
  private readonly kernelThreads = new Set<number>();

  constructor(options: ProcfsDiscoveryOptions = {}) {
    this.root = options.procRoot ?? '/proc';
    this.pollMs = options.pollMs ?? 1000;
    this.scheduler = options.scheduler ?? asyncScheduler;
  }

  /**
   * Synchronous on purpose: /proc answers from memory, and one pass over 100 QEMUs (a few
   * hundred small reads) takes about a millisecond this way, where the promise API sent each
   * read through libuv's thread pool and cost the agent several percent of a core.
   */
  async list(): Promise<VmInfo[]> {
    const pids = readdirSync(this.root).filter((e) => /^\d+$/.test(e)).map(Number);
    // Forget the pids that are gone first: a pid absent from one pass is not trusted again.
    const present = new Set(pids);
    for (const pid of this.known.keys()) if (!present.has(pid)) this.known.delete(pid);
    for (const pid of this.kernelThreads) if (!present.has(pid)) this.kernelThreads.delete(pid);
    const vms = pids.map((pid) => this.inspect(pid));
    return vms.filter((v): v is VmInfo => v !== undefined).sort((a, b) => a.pid - b.pid);
  }

  /** The VM list, polled; one poll for every subscriber (the agent and its observation share it). */
  watch(): Observable<VmInfo[]> {
    this.watch$ ??= timer(0, this.pollMs, this.scheduler).pipe(
      exhaustMap(() => from(this.list())),
      distinctUntilChanged(sameVms),
      shareReplay({ bufferSize: 1, refCount: true }),
    );
    return this.watch$;
  }

  /** One process, or undefined if it is not QEMU (or exited while we looked). */
  private inspect(pid: number): VmInfo | undefined {
    const dir = `${this.root}/${pid}`;
    try {
      // A pid seen in the previous pass is the same process (a pid is reused only after the
      // kernel has handed out every other one): kernel threads are skipped, a known QEMU
      // costs one readlink (exe changes on exec). Unreadable exe (a kernel thread, or
      // another user's process when not root): the command line decides.
      if (this.kernelThreads.has(pid)) return undefined;
      const exe = tryRead(() => readlinkSync(`${dir}/exe`));
      if (exe !== undefined && !isQemuSystem(exe)) return undefined;
      const seen = this.known.get(pid);
      if (seen && seen.vm.exe === exe) {
        if (seen.vm.accel === 'tcg' && !seen.settled) {
          seen.settled = this.ageMs(seen.vm.startTicks) > ACCEL_SETTLE_MS;
          const accel = this.accel(pid);
          if (accel) seen.vm = { ...seen.vm, accel };
        }
        return seen.vm;
      }
      const raw = readFileSync(`${dir}/cmdline`, 'utf8');
      if (raw === '' && exe === undefined) {
        this.kernelThreads.add(pid);
        return undefined;
      }
      const argv = raw.split('\0');
      if (argv[argv.length - 1] === '') argv.pop();
      if (!isQemuSystem(exe ?? argv[0] ?? '')) return undefined;
      const cwd = tryRead(() => readlinkSync(`${dir}/cwd`)) ?? '/';
      const { name, qmpSockets } = parseQemuCmdline(argv, cwd);
      const stat = tryRead(() => readFileSync(`${dir}/stat`, 'utf8'));
      const startTicks = stat === undefined ? undefined : parseStartTicks(stat);
      const vm: VmInfo = { pid, name, qmpSockets };
      if (exe !== undefined) vm.exe = exe;
      if (startTicks !== undefined) vm.startTicks = startTicks;
      const accel = this.accel(pid);
      if (accel) vm.accel = accel;
      this.known.set(pid, { vm, settled: vm.accel === 'kvm' || this.ageMs(startTicks) > ACCEL_SETTLE_MS });
      return vm;
    } catch {
      return undefined; // the process exited, or is not ours to read
    }
  }

  /** How long ago a process started, from its start time in clock ticks (USER_HZ, 100 on Linux). */
  private ageMs(startTicks: number | undefined): number {
    const up = tryRead(() => readFileSync(`${this.root}/uptime`, 'utf8'));
    const upS = up === undefined ? NaN : Number(up.split(' ')[0]);
    return startTicks === undefined || !Number.isFinite(upS) ? 0 : upS * 1000 - startTicks * 10;
  }

  /**
   * 'kvm' once the process holds a KVM VM fd; 'tcg' otherwise. A QEMU that has just started
   * may not have created it yet, so 'tcg' is looked at again until it is ACCEL_SETTLE_MS old.
   */
  private accel(pid: number): VmInfo['accel'] {
    const fdDir = `${this.root}/${pid}/fd`;
    const fds = tryRead(() => readdirSync(fdDir));
    if (!fds) return undefined;
    const links = fds.map((fd) => tryRead(() => readlinkSync(`${fdDir}/${fd}`)) ?? '');
    // KVM_CREATE_VM returns an anonymous inode named "kvm-vm" (virt/kvm/kvm_main.c).
    return links.includes('anon_inode:kvm-vm') ? 'kvm' : 'tcg';
  }
}

/** How long after QEMU starts its accelerator may still change (the KVM fd appears). */
const ACCEL_SETTLE_MS = 10_000;

function tryRead<T>(read: () => T): T | undefined {
  try {
    return read();
  } catch {
    return undefined;
  }
}

/** Field 22 of /proc/PID/stat; fields are counted after the ")" that ends comm (which may hold spaces). */
export function parseStartTicks(stat: string): number | undefined {
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const v = Number(rest[22 - 3]);
  return Number.isFinite(v) ? v : undefined;
}

export function sameVms(a: VmInfo[], b: VmInfo[]): boolean {
  // A process known from the last pass is the same object: compared by reference first.
  return a.length === b.length && a.every((v, i) => v === b[i] || JSON.stringify(v) === JSON.stringify(b[i]));
}
