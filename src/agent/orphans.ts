/**
 * Copies of ours in QEMU that no run record describes: their record was lost, is corrupt,
 * or was written by another version. The agent does not guess what such a record held; it
 * reconciles from QEMU alone. Our names carry the run's tag (runs.ts runNames: job and
 * node `idlecrypt-<tag>`, file node `idlecrypt-file-<tag>`, with the storage daemon format
 * node `idlecrypt-fmt-<tag>` and nbd node `idlecrypt-nbd-<tag>`, secret `idlecrypt-key-<tag>`),
 * so QEMU says which nodes and which file are ours. Such a copy is rolled back (the job
 * cancelled: the guest stays on its source; nodes, secret and file removed) and the disk
 * is queued again: a fresh copy is safe, adopting one whose key and format are unknown is
 * not. A node the guest already runs on (the pivot happened) is the guest's disk now, and
 * is never touched.
 */
import type { QmpClient } from '../qmp/client.ts';
import type { Logger } from '../log.ts';
import { listDisks } from '../encrypt/disks.ts';
import { findLeftovers, type RunRecord } from '../encrypt/runs.ts';
import { rollBack } from '../encrypt/recover.ts';

const TAG = '([0-9a-f]{8})';
const JOB_OR_NODE = new RegExp(`^idlecrypt-(?:file-|fmt-|nbd-)?${TAG}$`);
const SECRET = new RegExp(`^idlecrypt-key-${TAG}$`);

/** The run tags our names in this QEMU carry. */
export async function tagsInQemu(client: QmpClient): Promise<Set<string>> {
  const tags = new Set<string>();
  for (const j of await client.execute('query-block-jobs')) {
    const m = JOB_OR_NODE.exec(j.device);
    if (m) tags.add(m[1]!);
  }
  for (const n of await client.execute('query-named-block-nodes', { flat: true })) {
    const m = JOB_OR_NODE.exec(n['node-name'] ?? '');
    if (m) tags.add(m[1]!);
  }
  for (const o of (await client.executeRaw('qom-list', { path: '/objects' })) as { name: string }[]) {
    const m = SECRET.exec(o.name);
    if (m) tags.add(m[1]!);
  }
  return tags;
}

/**
 * Rolls back every copy of ours in this VM that has no record. `known`: the tags of the
 * records read at the start of the pass; a tag not among them is checked against the
 * records as they are now (`fresh`) before anything is touched. Returns what it removed.
 */
export async function rollBackOrphans(
  client: QmpClient,
  vm: string,
  known: ReadonlySet<string>,
  fresh: () => Promise<ReadonlySet<string>>,
  log: Logger,
): Promise<{ tag: string; removed: string[] }[]> {
  const out: { tag: string; removed: string[] }[] = [];
  const unknown = [...(await tagsInQemu(client))].filter((t) => !known.has(t));
  if (unknown.length === 0) return out;
  const now = await fresh();
  // The disks as they are now, not as the pass listed them: a run may have switched its
  // guest over since.
  const disks = await listDisks(client);
  for (const tag of unknown) {
    if (now.has(tag)) continue;
    // The guest runs on it: it is the guest's disk now, whatever record was lost.
    if (disks.some((d) => d.nodeName === `idlecrypt-${tag}`)) continue;
    const l = await findLeftovers(client, tag);
    // The file our file node names is ours to delete only while no disk runs on that path: a
    // later run of the same disk makes its target at the same path, and a file node a failed
    // rollback left names the new file as well as the old (2026-12-05: an orphan's format
    // node not removed kept its file node, and the next pass deleted the image the guest had
    // just switched onto).
    const inUse = l.fileNodePath !== undefined && disks.some((d) => d.file === l.fileNodePath);
    if (inUse) log.warn({ vm, tag, file: l.fileNodePath }, `a copy of ours with no record names ${l.fileNodePath}, which a disk of VM '${vm}' runs on: its nodes are removed, the file is left`);
    const rec: RunRecord = {
      version: 1,
      tag,
      owner: { pid: 0, start: 0 },
      vm,
      qmp: client.socketPath,
      device: '',
      source: '',
      // The file our file node has open is the target we created; without one, no file is ours.
      target: inUse ? '' : (l.fileNodePath ?? ''),
      format: 'luks',
      keyFile: '',
      phase: 'copying',
      createdAt: 0,
    };
    const removed = await rollBack(client, rec, l, log);
    log.warn({ vm, tag, removed }, `rolled back a copy of ours in VM '${vm}' that no readable run record describes: removed ${removed.join(', ') || 'nothing'}; its disk is queued again`);
    out.push({ tag, removed });
  }
  return out;
}
