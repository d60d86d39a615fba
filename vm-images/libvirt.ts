/**
 * The test guest as a libvirt domain: for the libvirt backend's tests, the demo and the
 * benchmarks. Same kernel, initramfs and workloads as launch.ts (direct kernel boot, TCG
 * unless told otherwise), defined and started through `virsh` as an operator would, its
 * serial console written to a file that we follow.
 *
 * libvirt here runs without systemd (host-facts.md): ensureLibvirtd() starts virtlogd and
 * libvirtd as daemons when they are not running.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { INITRD_PATH, KERNEL_PATH, kernelCommandLine, type Workload } from './launch.ts';

const execFileP = promisify(execFile);

/** `virsh` against qemu:///system, untranslated. Rejects with virsh's own last line. */
export async function virsh(...args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileP('virsh', ['-c', 'qemu:///system', ...args], { env: { ...process.env, LC_ALL: 'C' } });
    return stdout;
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`virsh ${args.join(' ')}: ${(err.stderr ?? err.message).trim().split('\n').filter(Boolean).at(-1) ?? err.message}`);
  }
}

async function running(name: string): Promise<boolean> {
  return execFileP('pgrep', ['-x', name]).then(
    () => true,
    () => false,
  );
}

/** Starts virtlogd and libvirtd (as daemons) unless they run, and waits until virsh answers. */
export async function ensureLibvirtd(): Promise<void> {
  for (const d of ['/var/log/libvirt', '/var/run/libvirt']) if (!existsSync(d)) mkdirSync(d, { recursive: true });
  if (!(await running('virtlogd'))) await execFileP('virtlogd', ['-d']);
  if (!(await running('libvirtd'))) await execFileP('libvirtd', ['-d']);
  for (let i = 0; ; i++) {
    try {
      await virsh('version');
      return;
    } catch (e) {
      if (i >= 100) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

export interface TestDomainOptions {
  readonly name: string;
  /** Where its serial log goes. */
  readonly dir: string;
  readonly disk: string;
  readonly format?: 'raw' | 'qcow2';
  readonly cache?: 'writeback' | 'none';
  readonly workload?: Workload;
  readonly params?: Record<string, string | number>;
  /** virsh define + start (default), or virsh create (a transient domain). */
  readonly persistent?: boolean;
  readonly memoryMiB?: number;
  /** The disk in an iothread of its own (`<iothreads>1</iothreads>`, `<driver iothread='1'/>`). */
  readonly iothread?: boolean;
  /**
   * A second disk, `sda`, on a virtio-scsi controller that has an iothread of its own (the
   * next after the first disk's): QEMU serves, and copies, a SCSI disk in its controller's
   * iothread. The test guest has no SCSI driver and leaves it alone.
   */
  readonly scsiDisk?: string;
}

function esc(s: string): string {
  return s.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll("'", '&apos;');
}

export function testDomainXml(o: TestDomainOptions): string {
  const iothreads = (o.iothread ? 1 : 0) + (o.scsiDisk ? 1 : 0);
  const scsi = o.scsiDisk
    ? `
    <controller type='scsi' index='0' model='virtio-scsi'><driver iothread='${iothreads}'/></controller>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='${esc(o.scsiDisk)}'/>
      <target dev='sda' bus='scsi'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>`
    : '';
  return `<domain type='qemu'>
  <name>${esc(o.name)}</name>
  <memory unit='MiB'>${o.memoryMiB ?? 256}</memory>
  <vcpu>1</vcpu>${iothreads ? `\n  <iothreads>${iothreads}</iothreads>` : ''}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${esc(KERNEL_PATH)}</kernel>
    <initrd>${esc(INITRD_PATH)}</initrd>
    <cmdline>${esc(kernelCommandLine(o.workload ?? 'idle', o.params ?? {}))}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='${o.format ?? 'raw'}' cache='${o.cache ?? 'writeback'}'${o.iothread ? " iothread='1'" : ''}/>
      <source file='${esc(o.disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>${scsi}
    <serial type='file'><source path='${esc(join(o.dir, `${o.name}.serial`))}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

export class TestDomain {
  private constructor(
    readonly name: string,
    readonly serialLog: string,
    readonly persistent: boolean,
  ) {}

  /** Defines (or creates) and starts the domain; resolves once the guest printed READY. */
  static async start(o: TestDomainOptions): Promise<TestDomain> {
    const xmlFile = join(o.dir, `${o.name}.xml`);
    await writeFile(xmlFile, testDomainXml(o));
    const persistent = o.persistent ?? true;
    if (persistent) {
      await virsh('define', xmlFile);
      await virsh('start', o.name);
    } else {
      await virsh('create', xmlFile);
    }
    const d = new TestDomain(o.name, join(o.dir, `${o.name}.serial`), persistent);
    await d.waitForLine(/^IDLECRYPT-GUEST READY/, 60_000);
    return d;
  }

  /** The guest's serial lines so far (kernel messages included). */
  async lines(): Promise<string[]> {
    const text = await readFile(this.serialLog, 'utf8').catch(() => '');
    return text.split(/\r?\n/).filter((l) => l !== '');
  }

  async waitForLine(re: RegExp, timeoutMs: number, after = 0): Promise<string> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const hit = (await this.lines()).slice(after).find((l) => re.test(l));
      if (hit) return hit;
      if (Date.now() > until) throw new Error(`domain ${this.name}: no serial line matching ${re} within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** The QEMU pid libvirt recorded. */
  async pid(): Promise<number> {
    return Number((await readFile(`/run/libvirt/qemu/${this.name}.pid`, 'utf8')).trim());
  }

  /** virsh destroy, and for a persistent domain virsh undefine; never fails. */
  async remove(): Promise<void> {
    await virsh('destroy', this.name).catch(() => undefined);
    if (this.persistent) await virsh('undefine', this.name).catch(() => undefined);
  }
}
