/**
 * A QEMU mirror block job driven over QMP: the `JobControl` the controller moderates.
 *
 * QAPI references (QEMU 7.2): blockdev-mirror, block-job-set-speed, job-pause/job-resume,
 * job-complete, job-cancel, job-dismiss, query-block-jobs (BlockJobInfo), query-jobs
 * (JobInfo, which carries the error of a concluded job).
 */
import type { QmpClient } from '../qmp/client.ts';
import type { JobControl, JobSnapshot, JobStatus } from './types.ts';
import type { LatencyTotals } from '../controller/latency.ts';
import { blockstatsLatency, keepLatencyHistograms } from '../probes/qmp-blockstats.ts';

export interface MirrorOptions {
  readonly jobId: string;
  /** root node (or drive name) the guest writes through */
  readonly source: string;
  /** node to copy into */
  readonly target: string;
  /** bytes/s, 0 = unlimited */
  readonly speed: number;
  /** mirror buffer; smaller gives finer speed control (host-facts.md). QEMU default 16 MiB. */
  readonly bufSize?: number;
  /** The chunk size the mirror copies at once (power of two, 512 B .. 64 MiB). */
  readonly granularity?: number;
}

export class QmpMirrorJob implements JobControl {
  readonly canPause = true;

  /** Latency histograms asked for (on the first latency reading). */
  private histograms = false;

  private constructor(
    private readonly client: QmpClient,
    readonly id: string,
  ) {}

  /**
   * Starts the mirror. copy-mode=background: guest writes during the copy mark blocks dirty
   * and the mirror copies them again, so nothing is lost; write-blocking would ignore speed
   * and pause (host-facts.md). auto-dismiss=false keeps the concluded job around so that we
   * can read its error before dismissing it.
   */
  static async start(client: QmpClient, o: MirrorOptions): Promise<QmpMirrorJob> {
    await client.execute('blockdev-mirror', {
      'job-id': o.jobId,
      device: o.source,
      target: o.target,
      sync: 'full',
      speed: o.speed,
      'copy-mode': 'background',
      'auto-finalize': true,
      'auto-dismiss': false,
      ...(o.bufSize !== undefined ? { 'buf-size': o.bufSize } : {}),
      ...(o.granularity !== undefined ? { granularity: o.granularity } : {}),
    });
    return new QmpMirrorJob(client, o.jobId);
  }

  /** A mirror already in QEMU under this id (a run that died left it; see encrypt/runs.ts). */
  static adopt(client: QmpClient, jobId: string): QmpMirrorJob {
    return new QmpMirrorJob(client, jobId);
  }

  async snapshot(): Promise<JobSnapshot | undefined> {
    const jobs = await this.client.execute('query-block-jobs');
    const j = jobs.find((x) => x.device === this.id);
    if (!j) return undefined;
    return {
      id: this.id,
      status: j.status as JobStatus,
      offset: j.offset,
      len: j.len,
      speed: j.speed,
      paused: j.paused,
      ready: j.ready,
      ...(j.error !== undefined ? { error: j.error } : {}),
    };
  }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    await this.client.execute('block-job-set-speed', { device: this.id, speed: bytesPerSecond });
  }

  async pause(): Promise<void> {
    await this.client.execute('job-pause', { id: this.id });
  }

  async resume(): Promise<void> {
    await this.client.execute('job-resume', { id: this.id });
  }

  /**
   * The guest's disk requests and their time in QEMU (query-blockstats: only the guest's
   * devices are listed; the mirror's own I/O is not accounted). The first reading also has
   * QEMU keep latency histograms on them (keepLatencyHistograms), which the next ones carry:
   * the control judges their median (controller/latency.ts).
   */
  async latency(): Promise<LatencyTotals> {
    const stats = await this.client.execute('query-blockstats');
    if (!this.histograms) {
      this.histograms = true;
      await keepLatencyHistograms(this.client, stats);
    }
    return blockstatsLatency(stats);
  }

  /** Pivot the guest onto the target. Only valid in READY; a paused mirror cannot complete. */
  async complete(): Promise<void> {
    await this.client.execute('job-complete', { id: this.id });
  }

  /** Abort the copy; the guest stays on the source (for a READY mirror too: job-cancel forces). */
  async cancel(): Promise<void> {
    await this.client.execute('job-cancel', { id: this.id });
  }

  /** The error of a concluded job (query-jobs), then dismiss it. */
  async dismiss(): Promise<string | undefined> {
    const jobs = await this.client.execute('query-jobs');
    const error = jobs.find((j) => j.id === this.id)?.error;
    await this.client.execute('job-dismiss', { id: this.id });
    return error;
  }
}
