/**
 * A libvirt domain as idlecrypt works on it: which of its disks, and which QEMU process
 * runs it (the eBPF probes count processes).
 *
 * libvirt hands QEMU its monitor as a file descriptor, so no QMP socket shows on the
 * command line (host-facts.md); the pid comes from libvirt's pid file instead, checked
 * against the process's `-uuid` so that a stale file or a reused pid is never taken for it.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { IdlecryptError } from '../errors.ts';
import type { VmInfo } from '../discovery/types.ts';
import type { DomainDisk, DomainRef } from './types.ts';

/** Where libvirt's QEMU driver keeps its pid files (qemu:///system). */
export const LIBVIRT_QEMU_RUN_DIR = '/run/libvirt/qemu';

/** The QEMU process of a running domain, as the probes see it. */
export async function domainVm(dom: DomainRef, runDir = LIBVIRT_QEMU_RUN_DIR): Promise<VmInfo & { name: string }> {
  const file = path.join(runDir, `${dom.name}.pid`);
  let pid: number;
  try {
    pid = Number((await readFile(file, 'utf8')).trim());
  } catch (e) {
    throw new IdlecryptError('PROBE_UNAVAILABLE', `cannot read domain '${dom.name}''s pid file ${file} (is libvirt on this host, qemu:///system?): ${(e as Error).message}`, { cause: e });
  }
  const argv = await readFile(`/proc/${pid}/cmdline`, 'utf8').then((s) => s.split('\0'), () => [] as string[]);
  const i = argv.indexOf('-uuid');
  if (!Number.isSafeInteger(pid) || pid <= 0 || i < 0 || argv[i + 1]?.toLowerCase() !== dom.uuid.toLowerCase()) {
    throw new IdlecryptError('PROBE_UNAVAILABLE', `domain '${dom.name}''s pid file ${file} names pid ${pid}, which is not its QEMU (no -uuid ${dom.uuid})`);
  }
  return { pid, name: dom.name, qmpSockets: [] };
}

/** The disk by its target name (`virsh domblklist`), or a one-line error listing the domain's disks. */
export function findDomainDisk(domain: string, disks: readonly DomainDisk[], target: string): DomainDisk {
  const d = disks.find((x) => x.target === target);
  if (!d) {
    const have = disks.filter((x) => x.target).map((x) => x.target).join(', ') || 'none';
    throw new IdlecryptError('UNKNOWN_DEVICE', `domain '${domain}' has no disk '${target}' (its disks: ${have})`);
  }
  return d;
}

/** Whether a disk can be encrypted by a block copy here; else the one-line reason. */
export function checkCopyable(domain: string, d: DomainDisk): void {
  const name = `${domain} ${d.target}`;
  if (d.device !== 'disk') throw new IdlecryptError('USAGE', `${name} is a ${d.device}, not a disk`);
  if (d.type !== 'file' && d.type !== 'block') throw new IdlecryptError('USAGE', `${name} is a ${d.type} disk; idlecrypt copies file and block disks`);
  if (!d.source) throw new IdlecryptError('USAGE', `${name} has no medium`);
  if (d.readonly) throw new IdlecryptError('USAGE', `${name} is read-only`);
  if (d.encryption) throw new IdlecryptError('USAGE', `${name} already runs on an encrypted image (${d.source}, ${d.encryption.format ?? 'encrypted'})`);
  if (d.format !== 'raw' && d.format !== 'qcow2') throw new IdlecryptError('USAGE', `${name} is in format ${d.format ?? 'unknown'}; idlecrypt copies raw and qcow2 disks`);
}

/** libvirt's cache modes that open the image with O_DIRECT (domain XML `<driver cache>`). */
export function directCache(cache: string | null): boolean {
  return cache === 'none' || cache === 'directsync';
}

/** XML text escaping for attribute values we write into libvirt XML. */
export function xmlAttr(s: string): string {
  return s.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll("'", '&apos;').replaceAll('"', '&quot;');
}
