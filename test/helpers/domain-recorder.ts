/**
 * GuestRecorder's counterpart for a libvirt domain (bench/moderation.ts --backend libvirt):
 * the same samples and phases, read the way an operator's tools read a libvirt host.
 *
 * - The guest's phases: its serial console, which libvirt writes to a file
 *   (vm-images/libvirt.ts); the file is read every 20 ms, so a line's arrival is dated up
 *   to 20 ms late (GuestRecorder sees QEMU's chardev directly).
 * - The guest's throughput: virDomainBlockStats of the disk (`virsh domblkstat`), QEMU's
 *   counters of the guest's own requests, never the copy's.
 * - The job: virDomainGetBlockJobInfo (`virsh blockjob --bytes`): offset, length, speed.
 *   With `qemuJobs` (the runs with `--pause qemu`, whose domains are tainted anyway) also
 *   QEMU's query-block-jobs through the monitor pass-through, for `paused`, which libvirt
 *   does not report.
 *
 * Polled on a connection of its own, never on idlecrypt's.
 */
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { LibvirtClient } from '../../src/libvirt/client.ts';
import type { BlockJobInfo } from '../../src/libvirt/types.ts';
import type { TestDomain } from '../../vm-images/libvirt.ts';
import { nextPhaseLine, now, phasesFrom, sleepUntil, type JobEvent, type Phase, type Sample } from './moderation-lab.ts';

export class DomainRecorder {
  readonly lines: { t: number; line: string }[] = [];
  readonly samples: Sample[] = [];
  /** libvirt has no event for a paused copy: reactions come from the polls alone. */
  readonly jobEvents: JobEvent[] = [];
  private stopped = false;
  private following?: Promise<void>;
  private polling?: Promise<void>;
  private client?: LibvirtClient;

  constructor(
    readonly domain: TestDomain,
    readonly disk = 'vda',
  ) {
    this.following = this.follow();
  }

  private async follow(): Promise<void> {
    let offset = 0;
    let partial = '';
    while (!this.stopped) {
      const buf = await readFile(this.domain.serialLog).catch(() => Buffer.alloc(0));
      if (buf.length > offset) {
        const t = now();
        const text = partial + buf.subarray(offset).toString('utf8');
        offset = buf.length;
        const parts = text.split(/\r?\n/);
        partial = parts.pop() ?? '';
        for (const line of parts) if (line !== '') this.lines.push({ t, line });
      }
      await sleep(20);
    }
  }

  async poll(o: { intervalMs: number; qemuJobs?: boolean }): Promise<void> {
    this.client = await LibvirtClient.connect();
    const c = this.client;
    const name = this.domain.name;
    this.polling = (async () => {
      let next = now();
      while (!this.stopped) {
        const sent = now();
        try {
          const [stats, info, qjobs] = await Promise.all([
            c.call<{ rd_bytes: number; wr_bytes: number; rd_req: number; wr_req: number }>('block-stats', { domain: name, disk: this.disk }),
            c.jobInfo(name, this.disk),
            o.qemuJobs ? c.call<{ return?: { device: string; type: string; paused: boolean }[] }>('monitor', { domain: name, command: { execute: 'query-block-jobs' } }) : undefined,
          ]);
          const t = now();
          const paused = qjobs?.return?.find((j) => j.type === 'mirror')?.paused ?? false;
          this.samples.push({
            sent,
            t,
            guestBytes: stats.rd_bytes + stats.wr_bytes,
            guestOps: stats.rd_req + stats.wr_req,
            job: info ? jobState(name, info, paused) : null,
          });
        } catch {
          if (this.stopped || c.closedReason !== undefined) break;
        }
        next = Math.max(next + o.intervalMs, now());
        await sleepUntil(next);
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.polling;
    await this.following;
    await this.client?.close().catch(() => {});
  }

  phases(): Phase[] {
    return phasesFrom(this.lines);
  }

  nextPhase(kind: 'idle' | 'busy', after: number, timeoutMs = 40_000): Promise<number> {
    return nextPhaseLine(this.lines, kind, after, timeoutMs, this.domain.name, () => sleep(20));
  }
}

function jobState(domain: string, info: BlockJobInfo, paused: boolean) {
  return {
    id: domain,
    offset: info.cur,
    len: info.end,
    paused,
    speed: info.bandwidth,
    ready: info.end > 0 && info.cur === info.end,
    status: paused ? 'paused' : 'running',
  };
}
