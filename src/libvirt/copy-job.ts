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
import type { LatencyTotals } from '../controller/latency.ts';
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

/**
 * How a pause is made: `speed` (default) sets LIBVIRT_PAUSED_SPEED through libvirt;
 * `qemu` sends QEMU's own `job-pause`/`job-resume` through libvirt's monitor pass-through
 * (virDomainQemuMonitorCommand), which holds at READY too, but makes libvirt mark the
 * domain tainted (custom-monitor) for the rest of its life: opt-in only.
 */
export type LibvirtPauseMode = 'speed' | 'qemu';

interface QemuBlockJob {
  readonly device: string;
  readonly type: string;
  readonly paused: boolean;
  readonly ready: boolean;
  readonly status: string;
}

export class LibvirtCopyJob implements JobControl {
  readonly canPause: boolean;
  /** libvirt said the copy is READY (its event, or `<mirror ready='yes'>`): a pivot may be asked. */
  ready = false;
  /** QEMU's id of libvirt's copy job (pause mode `qemu`), found on first use. */
  private qemuId: string | undefined;

  constructor(
    private readonly client: LibvirtClient,
    readonly domain: string,
    readonly disk: string,
    readonly pauseMode: LibvirtPauseMode = 'speed',
  ) {
    this.canPause = pauseMode === 'qemu';
  }

  private async monitor<T>(execute: string, args?: Record<string, unknown>): Promise<T> {
    const r = await this.client.call<{ return?: T; error?: { desc?: string } }>('monitor', { domain: this.domain, command: { execute, ...(args ? { arguments: args } : {}) } });
    if (r.error) throw new IdlecryptError('JOB_FAILED', `${execute} on ${this.id}: ${r.error.desc ?? 'QEMU refused'}`);
    return r.return as T;
  }

  /**
   * libvirt's copy job as QEMU lists it. libvirt names it `copy-<target>-<node>` (blockdev
   * era); the one mirror job on the disk otherwise.
   */
  private async qemuJob(): Promise<QemuBlockJob | undefined> {
    const jobs = await this.monitor<QemuBlockJob[]>('query-block-jobs');
    const mine = jobs.find((j) => j.device === this.qemuId) ?? jobs.find((j) => j.type === 'mirror' && j.device.startsWith(`copy-${this.disk}-`));
    if (mine) this.qemuId = mine.device;
    return mine;
  }

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
    // With QEMU's own pause, whether the job is paused is QEMU's to say (libvirt does not).
    const q = this.pauseMode === 'qemu' ? await this.qemuJob() : undefined;
    const paused = q?.paused ?? false;
    return {
      id: this.id,
      status: paused ? (this.ready ? 'standby' : 'paused') : this.ready ? 'ready' : 'running',
      offset: info.cur,
      len: info.end,
      speed: info.bandwidth,
      paused,
      ready: this.ready,
    };
  }

  /** The guest's requests on this disk and their time in QEMU (virDomainBlockStatsFlags). */
  async latency(): Promise<LatencyTotals> {
    const st = await this.client.call<Record<string, number>>('block-latency', { domain: this.domain, disk: this.disk });
    return {
      ops: { read: st.rd_operations ?? 0, write: st.wr_operations ?? 0, flush: st.flush_operations ?? 0 },
      ns: { read: st.rd_total_times ?? 0, write: st.wr_total_times ?? 0, flush: st.flush_total_times ?? 0 },
    };
  }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    await this.client.call('set-speed', { domain: this.domain, disk: this.disk, bytes: bytesPerSecond });
  }

  /**
   * Pause mode `speed`: libvirt cannot pause a block copy, so LIBVIRT_PAUSED_SPEED stands
   * in. Mode `qemu`: QEMU's job-pause through the monitor pass-through.
   */
  async pause(): Promise<void> {
    if (this.pauseMode === 'speed') return this.setSpeed(LIBVIRT_PAUSED_SPEED);
    await this.qemuVerb('job-pause', true);
  }

  async resume(): Promise<void> {
    // Mode speed: nothing is paused; the controller sets the speed it wants next.
    if (this.pauseMode === 'speed') return;
    await this.qemuVerb('job-resume', false);
  }

  /**
   * job-pause or job-resume, sent straight away once the job's id is known: one monitor
   * round trip, which counts while the copy fills QEMU's main loop. QEMU refuses to pause
   * a paused job (and to resume a running one): then the job's state is read, and if it is
   * already as wanted that is success.
   */
  private async qemuVerb(verb: 'job-pause' | 'job-resume', paused: boolean): Promise<void> {
    const id = this.qemuId ?? (await this.qemuJob())?.device;
    if (id === undefined) {
      if (!paused) return; // no job: nothing to resume
      throw new IdlecryptError('JOB_FAILED', `QEMU lists no copy job for ${this.id}`);
    }
    try {
      await this.monitor(verb, { id });
    } catch (e) {
      const j = await this.qemuJob();
      if (j && j.paused === paused) return;
      if (!j && !paused) return;
      throw e;
    }
  }

  /** The pivot (virDomainBlockJobAbort with PIVOT): returns once the guest runs on the copy. */
  async pivot(): Promise<void> {
    await this.resume(); // libvirt pivots a running READY job only
    await this.client.call('abort', { domain: this.domain, disk: this.disk, pivot: true });
  }

  /** Abandons the copy; the guest stays on its source. */
  async cancel(): Promise<void> {
    await this.client.call('abort', { domain: this.domain, disk: this.disk, pivot: false });
  }
}
