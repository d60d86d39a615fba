/**
 * What idlecrypt reads from libvirt, as helper.py returns it. Names follow libvirt's
 * (domain XML elements, virDomainBlockJobInfo), so that `virsh` output reads the same.
 */

/** A running domain (virConnectListAllDomains). */
export interface DomainRef {
  readonly name: string;
  readonly uuid: string;
  /** libvirt's domain id (virsh list's Id). */
  readonly id: number;
  /** Defined (virsh define), not only created: it has a definition for its next boot. */
  readonly persistent: boolean;
}

/** One `<disk>` of the domain XML, as `virsh domblklist --details` shows it and more. */
export interface DomainDisk {
  /** `<target dev>`: vda, sda, ... */
  readonly target: string | null;
  readonly bus: string | null;
  /** `<disk type>`: file, block, network, volume */
  readonly type: string | null;
  /** `<disk device>`: disk, cdrom, floppy, lun */
  readonly device: string | null;
  /** The source file or device path (or network name), null for an empty drive. */
  readonly source: string | null;
  /** `<driver type>`: raw, qcow2, ... */
  readonly format: string | null;
  readonly cache: string | null;
  /**
   * QEMU's id of the iothread that serves the disk (libvirt names them `iothreadN`): the disk's
   * `<driver iothread='N'/>`, or for a SCSI disk its virtio-scsi controller's. null without one.
   */
  readonly iothread: string | null;
  readonly readonly: boolean;
  /** The image has a backing image (`<backingStore>` with a `<source>`). */
  readonly backing: boolean;
  readonly encryption: { readonly format: string | null; readonly engine: string | null; readonly secret: string | null } | null;
  /** A block copy in progress (`<mirror>`): its job type and destination. */
  readonly mirror: { readonly job: string | null; readonly ready: string | null; readonly source: string | null } | null;
}

/**
 * virDomainGetBlockJobInfo with VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES: `cur`/`end` are
 * QEMU's offset/len, `bandwidth` bytes/s (0 = unlimited), `type` virDomainBlockJobType
 * (2 = copy).
 */
export interface BlockJobInfo {
  readonly type: number;
  readonly bandwidth: number;
  readonly cur: number;
  readonly end: number;
}

export interface SecretInfo {
  readonly uuid: string;
  /** virsh secret-list's usage type: volume, ceph, iscsi, tls, vtpm, none. */
  readonly usageType: string;
  /** The usage id: for usage 'volume', the volume's path. */
  readonly usage: string;
  readonly private: boolean;
  readonly ephemeral: boolean;
}

/** virConnectDomainEventBlockJobStatus (libvirt-domain.h). */
export const BLOCK_JOB = { COMPLETED: 0, FAILED: 1, CANCELED: 2, READY: 3 } as const;
/** virDomainBlockJobType: a block copy. */
export const BLOCK_JOB_TYPE_COPY = 2;
/** virDomainEventType: the domain stopped. */
export const LIFECYCLE_STOPPED = 5;

export type LibvirtEvent =
  | { readonly event: 'block-job'; readonly domain: string; readonly disk: string; readonly type: number; readonly status: number }
  | { readonly event: 'lifecycle'; readonly domain: string; readonly type: number; readonly detail: number }
  /** libvirtd is back after it went away (restarted): events of the gap are lost, re-read the state. */
  | { readonly event: 'reconnected' };
