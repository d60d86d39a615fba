/**
 * The guest's disks as QEMU sees them (QMP `query-block`), and finding one by the names an
 * operator knows: the qdev id (`-device virtio-blk-pci,id=disk0`), the legacy drive name
 * (`-drive id=drive0`), or the node name (`-blockdev node-name=...`).
 */
import type { QmpClient } from '../qmp/client.ts';
import { IdlecryptError } from '../errors.ts';

export interface DiskInfo {
  /** qdev id, e.g. `disk0` (from `/machine/peripheral/disk0/virtio-backend`), or '' */
  readonly qdevId: string;
  /** The guest device's QOM path (query-block's `qdev`), or '' */
  readonly qdev: string;
  /** legacy drive (BlockBackend) name; '' for -blockdev style disks */
  readonly device: string;
  /** the root node the guest writes through; what we mirror from */
  readonly nodeName: string;
  /** the image file at the bottom of the node chain */
  readonly file: string;
  /** the format driver of the root node: raw, qcow2, luks, ... */
  readonly driver: string;
  readonly virtualSize: number;
  /**
   * What the image occupies on the host, bytes (QEMU's `actual-size`), where that measures
   * what the copy will read as data: a regular file (a block device reports 0) with no
   * backing image (whose data the copy reads too but `actual-size` leaves out). Else null.
   */
  readonly allocatedBytes: number | null;
  readonly encrypted: boolean;
  /** How QEMU opened the image file (its protocol node): what the target inherits. */
  readonly cache: DiskCache;
}

/**
 * The host-cache mode of an image, as `-drive cache=` or `-blockdev cache.direct=,cache.no-flush=`
 * set it: `cache=none` is { direct: true, noFlush: false }, `writeback` is { false, false },
 * `unsafe` is { false, true }. (`writethrough` and `directsync` differ from writeback and none
 * only in the device's write cache, which belongs to the guest's BlockBackend and survives
 * the pivot unchanged.)
 */
export interface DiskCache {
  readonly direct: boolean;
  readonly noFlush: boolean;
}

/** Protocol drivers: the nodes that open the file itself, where O_DIRECT takes effect. */
const PROTOCOL_DRIVERS = new Set(['file', 'host_device', 'host_cdrom']);

/** The qdev id is the path component after /machine/peripheral/ (QOM path of -device id=). */
export function qdevIdOf(qdev: string | undefined): string {
  if (!qdev) return '';
  const m = /^\/machine\/peripheral\/([^/]+)/.exec(qdev);
  return m ? m[1]! : qdev.startsWith('/') ? '' : qdev;
}

export async function listDisks(client: QmpClient): Promise<DiskInfo[]> {
  const [blocks, nodes] = await Promise.all([client.execute('query-block'), client.execute('query-named-block-nodes', { flat: true })]);
  const disks: DiskInfo[] = [];
  for (const b of blocks) {
    const ins = b.inserted;
    if (!ins) continue; // empty CD-ROM drives and the like
    const image = ins.image as { 'virtual-size'?: number; 'actual-size'?: number; 'backing-image'?: unknown; format?: string; 'format-specific'?: { type?: string; data?: { encrypt?: unknown } } } | undefined;
    // A disk encrypted through the storage daemon runs on a raw node over its luks|qcow2
    // node (target.ts): it is that format's, and encrypted.
    const under = formatUnderRaw(ins.drv, ins.file);
    const driver = under?.driver ?? ins.drv;
    const file = imagePath(ins.file);
    // With -blockdev, each node has its own cache options and the format node (the root)
    // does not show its file node's: read them where the file is opened. -drive cache=
    // sets both alike.
    const protocol = nodes.find((n) => PROTOCOL_DRIVERS.has(n.drv) && n.file === file);
    const cache = (protocol ?? ins).cache;
    disks.push({
      qdevId: qdevIdOf(b.qdev),
      qdev: b.qdev ?? '',
      device: b.device ?? '',
      nodeName: ins['node-name'] ?? '',
      file,
      driver,
      virtualSize: image?.['virtual-size'] ?? 0,
      allocatedBytes: protocol?.drv === 'file' && image?.['backing-image'] === undefined && ins.backing_file === undefined ? (image?.['actual-size'] ?? null) : null,
      // `encrypted` is set by qcow2's built-in encryption; a luks node is encrypted by its driver.
      encrypted: driver === 'luks' || ins.encrypted === true || image?.['format-specific']?.data?.encrypt !== undefined || !!under?.encrypted,
      cache: { direct: cache.direct, noFlush: cache['no-flush'] },
    });
  }
  return disks;
}

/**
 * The format node under a plain `raw` root (no offset or size: a pass-through), from the
 * root's `json:` pseudo-filename, e.g. `json:{"driver": "raw", "file": {"driver": "luks", …}}`.
 */
export function formatUnderRaw(drv: string, file: string): { driver: string; encrypted: boolean } | undefined {
  if (drv !== 'raw' || !file.startsWith('json:')) return undefined;
  try {
    const root = JSON.parse(file.slice(5)) as Record<string, unknown>;
    const child = root.file as Record<string, unknown> | undefined;
    if (root.offset !== undefined || root.size !== undefined || !child || typeof child !== 'object' || typeof child.driver !== 'string') return undefined;
    if (child.driver !== 'luks' && child.driver !== 'qcow2') return undefined;
    const encrypted = child.driver === 'luks' || child.encrypt !== undefined || Object.keys(child).some((k) => k.startsWith('encrypt.'));
    return { driver: child.driver, encrypted };
  } catch {
    return undefined;
  }
}

/**
 * QEMU names a node that has options beyond a file name with a `json:{...}` pseudo-filename
 * (block.c bdrv_refresh_filename), e.g. a LUKS node with its key-secret. The operator wants
 * the file underneath: follow `file` children down to the protocol node's `filename`.
 */
export function imagePath(file: string): string {
  if (!file.startsWith('json:')) return file;
  try {
    let node = JSON.parse(file.slice(5)) as { filename?: unknown; file?: unknown };
    for (let depth = 0; depth < 8; depth++) {
      if (typeof node.filename === 'string') return node.filename;
      if (typeof node.file === 'string') return node.file;
      if (node.file && typeof node.file === 'object') node = node.file as typeof node;
      else break;
    }
  } catch {
    // not JSON after all: show what QEMU said
  }
  return file;
}

export function diskLabel(d: DiskInfo): string {
  return d.qdevId || d.device || d.nodeName;
}

export function findDisk(disks: readonly DiskInfo[], id: string): DiskInfo {
  const hit = disks.find((d) => d.qdevId === id || (d.device !== '' && d.device === id) || d.nodeName === id);
  if (hit) return hit;
  const known = disks.map((d) => `${diskLabel(d)} (${d.file})`).join(', ') || 'none';
  throw new IdlecryptError('UNKNOWN_DEVICE', `unknown device '${id}'; this VM's disks: ${known}`, {
    context: { device: id },
  });
}

/**
 * The iothread that serves a disk, if it has one: its device's `iothread` link (virtio-blk),
 * or for a device on a bus (a SCSI disk) its controller's (virtio-scsi), and that iothread's
 * host thread (query-iothreads). A link reads as the iothread's QOM path
 * (`/objects/io0`), or '' when unset. QEMU runs the disk's requests and any block job on it
 * in that thread instead of the main loop (src/probes/mainloop.ts).
 */
export async function diskIothread(client: QmpClient, disk: Pick<DiskInfo, 'qdev'>): Promise<{ id: string; tid: number } | undefined> {
  const threads = await client.execute('query-iothreads');
  if (threads.length === 0 || !disk.qdev) return undefined;
  const link = async (path: string): Promise<string | undefined> => {
    const v = await client.execute('qom-get', { path, property: 'iothread' }).catch(() => undefined);
    return typeof v === 'string' && v !== '' ? v : undefined;
  };
  // A SCSI disk (scsi-hd) has no link of its own: its bus (…/virtio-backend/scsi0.0) belongs to the controller.
  const controllerOf = async (path: string): Promise<string | undefined> => {
    const bus = await client.execute('qom-get', { path, property: 'parent_bus' }).catch(() => undefined);
    return typeof bus === 'string' && bus.lastIndexOf('/') > 0 ? bus.slice(0, bus.lastIndexOf('/')) : undefined;
  };
  let path = await link(disk.qdev);
  if (path === undefined) {
    const controller = await controllerOf(disk.qdev);
    if (controller !== undefined) path = await link(controller);
  }
  const id = path?.split('/').pop();
  const t = threads.find((x) => x.id === id);
  return t ? { id: t.id, tid: t['thread-id'] } : undefined;
}
