/**
 * VM discovery from /proc: every process whose executable (or argv[0]) is a
 * qemu-system-* emulator, with the name and QMP sockets of its command line
 * (cmdline.ts). `watch()` polls, and emits the list whenever it changes.
 */
import { readdir, readFile, readlink } from 'node:fs/promises';
import { asyncScheduler, distinctUntilChanged, exhaustMap, from, timer, type Observable, type SchedulerLike } from 'rxjs';
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
  /** VMs (pid+start time) seen with a KVM fd: that cannot change while the process lives. */
  private readonly kvmSeen = new Set<string>();

  constructor(options: ProcfsDiscoveryOptions = {}) {
    this.root = options.procRoot ?? '/proc';
    this.pollMs = options.pollMs ?? 1000;
    this.scheduler = options.scheduler ?? asyncScheduler;
  }

  async list(): Promise<VmInfo[]> {
    const entries = await readdir(this.root);
    const vms = await Promise.all(entries.filter((e) => /^\d+$/.test(e)).map((e) => this.inspect(Number(e))));
    const found = vms.filter((v): v is VmInfo => v !== undefined).sort((a, b) => a.pid - b.pid);
    const alive = new Set(found.map(identity));
    for (const key of this.kvmSeen) if (!alive.has(key)) this.kvmSeen.delete(key);
    return found;
  }

  watch(): Observable<VmInfo[]> {
    return timer(0, this.pollMs, this.scheduler).pipe(
      exhaustMap(() => from(this.list())),
      distinctUntilChanged(sameVms),
    );
  }

  /** One process, or undefined if it is not QEMU (or exited while we looked). */
  private async inspect(pid: number): Promise<VmInfo | undefined> {
    const dir = `${this.root}/${pid}`;
    try {
      const raw = await readFile(`${dir}/cmdline`, 'utf8');
      const argv = raw.split('\0');
      if (argv[argv.length - 1] === '') argv.pop();
      const exe = await readlink(`${dir}/exe`).catch(() => undefined);
      if (!isQemuSystem(exe ?? argv[0] ?? '')) return undefined;
      const cwd = await readlink(`${dir}/cwd`).catch(() => '/');
      const { name, qmpSockets } = parseQemuCmdline(argv, cwd);
      const startTicks = await readFile(`${dir}/stat`, 'utf8').then(parseStartTicks, () => undefined);
      const vm: VmInfo = { pid, name, qmpSockets };
      if (exe !== undefined) vm.exe = exe;
      if (startTicks !== undefined) vm.startTicks = startTicks;
      const accel = await this.accel(vm);
      if (accel) vm.accel = accel;
      return vm;
    } catch {
      return undefined; // the process exited, or is not ours to read
    }
  }

  private async accel(vm: VmInfo): Promise<VmInfo['accel']> {
    const key = identity(vm);
    if (this.kvmSeen.has(key)) return 'kvm';
    const fdDir = `${this.root}/${vm.pid}/fd`;
    const fds = await readdir(fdDir).catch(() => undefined);
    if (!fds) return undefined;
    const links = await Promise.all(fds.map((fd) => readlink(`${fdDir}/${fd}`).catch(() => '')));
    // KVM_CREATE_VM returns an anonymous inode named "kvm-vm" (virt/kvm/kvm_main.c).
    // Not cached when absent: a QEMU that has just started may not have created it yet.
    if (!links.includes('anon_inode:kvm-vm')) return 'tcg';
    this.kvmSeen.add(key);
    return 'kvm';
  }
}

function identity(vm: VmInfo): string {
  return `${vm.pid}/${vm.startTicks ?? ''}`;
}

/** Field 22 of /proc/PID/stat; fields are counted after the ")" that ends comm (which may hold spaces). */
export function parseStartTicks(stat: string): number | undefined {
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const v = Number(rest[22 - 3]);
  return Number.isFinite(v) ? v : undefined;
}

export function sameVms(a: VmInfo[], b: VmInfo[]): boolean {
  return a.length === b.length && a.every((v, i) => JSON.stringify(v) === JSON.stringify(b[i]));
}
