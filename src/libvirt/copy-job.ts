/**
 * A block copy run by libvirt (virDomainBlockCopy): the `JobControl` the controller
 * moderates on libvirt hosts. libvirt has no pause for block copies, so `canPause` is false
 * and the controller stands in a minimal speed for a pause (LIBVIRT_PAUSED_SPEED).
 *
 * Speeds cross in bytes/s (VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES and
 * VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES), so what is set reads back exactly.
 */
import { IdlecryptError } from '../errors.ts';
import type { JobControl, JobSnapshot } from '../jobs/types.ts';
import type { LibvirtClient } from './client.ts';
import { BLOCK_JOB_TYPE_COPY } from './types.ts';

/**
 * The speed that stands in for a pause: 1 byte/s. QEMU's rate limit (util/throttle's
 * ratelimit_calculate_delay, one slice of 100 ms, quota at least 1 byte) lets the copy
 * operation in flight finish and then delays the next by (bytes dispatched / quota)
 * slices: for a 1 MiB chunk, days. In effect the copy stops after at most its buffer
 * (`buf-size`), and QEMU wakes the job at once when the speed is raised again
 * (block_job_set_speed kicks a job whose rate-limit timer is pending). How close it comes
 * is measured in test/libvirt and docs/libvirt.md.
 *
 * Not at READY: there QEMU's mirror no longer sleeps for its rate limit while dirty data
 * is left (mirror_run, block/mirror.c: a READY job's delay is 0 unless it is clean), so
 * the copy follows the guest's writes whatever its speed. The libvirt engine pivots as
 * soon as the copy is READY for that reason (encrypt.ts).
 */
export const LIBVIRT_PAUSED_SPEED = 1;

export class LibvirtCopyJob implements JobControl {
  readonly canPause = false;
  /** libvirt said the copy is READY (its event, or `<mirror ready='yes'>`): a pivot may be asked. */
  ready = false;

  constructor(
    private readonly client: LibvirtClient,
    readonly domain: string,
    readonly disk: string,
  ) {}

  /** The job's name in logs and progress: libvirt's own for a copy is the disk's target. */
  get id(): string {
    return `${this.domain}/${this.disk}`;
  }

  async snapshot(): Promise<JobSnapshot | undefined> {
    const info = await this.client.jobInfo(this.domain, this.disk);
    if (!info) return undefined;
    if (info.type !== BLOCK_JOB_TYPE_COPY) {
      throw new IdlecryptError('JOB_EXISTS', `the block job on ${this.domain} ${this.disk} is not a copy (libvirt job type ${info.type})`);
    }
    // libvirt's READY event (and the <mirror ready='yes'> attribute) says when a pivot may
    // be asked; it stays so while the mirror follows the guest's writes, as QEMU's `ready`
    // does. The attribute is read too, for an event that came while nobody listened (a job
    // adopted after a restart).
    if (!this.ready && info.end > 0 && info.cur === info.end) {
      const d = (await this.client.disks(this.domain)).find((x) => x.target === this.disk);
      if (d?.mirror?.ready === 'yes') this.ready = true;
    }
    return {
      id: this.id,
      status: this.ready ? 'ready' : 'running',
      offset: info.cur,
      len: info.end,
      speed: info.bandwidth,
      paused: false,
      ready: this.ready,
    };
  }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    await this.client.call('set-speed', { domain: this.domain, disk: this.disk, bytes: bytesPerSecond });
  }

  /** libvirt cannot pause a block copy: the controller uses LIBVIRT_PAUSED_SPEED instead. */
  async pause(): Promise<void> {
    await this.setSpeed(LIBVIRT_PAUSED_SPEED);
  }

  async resume(): Promise<void> {
    // Nothing is paused; the controller sets the speed it wants next.
  }

  /** The pivot (virDomainBlockJobAbort with PIVOT): returns once the guest runs on the copy. */
  async pivot(): Promise<void> {
    await this.client.call('abort', { domain: this.domain, disk: this.disk, pivot: true });
  }

  /** Abandons the copy; the guest stays on its source. */
  async cancel(): Promise<void> {
    await this.client.call('abort', { domain: this.domain, disk: this.disk, pivot: false });
  }
}
