/**
 * VM discovery: which QEMU VMs run on this host. The procfs backend (procfs.ts) reads
 * QEMU command lines; a libvirt backend could implement the same interface from
 * `virsh list` / domain XML.
 */
import type { Observable } from 'rxjs';

export interface VmInfo {
  /** The QEMU process id (tgid). */
  pid: number;
  /** The VM name from `-name` (guest=NAME or the bare NAME), or null if it has none. */
  name: string | null;
  /** QMP control sockets from the command line, absolute paths, in command-line order. */
  qmpSockets: string[];
  /** The QEMU executable (/proc/PID/exe), if readable; ends in " (deleted)" after an upgrade. */
  exe?: string;
  /** The accelerator, from the process's open files (a kvm-vm fd means KVM). */
  accel?: 'kvm' | 'tcg';
  /** Process start time (clock ticks since boot, /proc/PID/stat field 22): pid + this is unique. */
  startTicks?: number;
}

export interface VmDiscovery {
  /** The VMs running now. */
  list(): Promise<VmInfo[]>;
  /** The VM list now and again whenever it changes (a VM starts or exits). */
  watch(): Observable<VmInfo[]>;
}
