/**
 * Job control, as the moderation controller sees it: a running copy whose speed can be set,
 * that can be paused and resumed, and whose progress can be read back. Small on purpose,
 * so that a libvirt backend (`virsh blockjob --bandwidth`, which has no pause) can
 * implement it too; `canPause` says whether pause is real or emulated.
 */
import type { LatencyTotals } from '../controller/latency.ts';

export type JobStatus =
  | 'undefined'
  | 'created'
  | 'running'
  | 'paused'
  | 'ready'
  | 'standby'
  | 'waiting'
  | 'pending'
  | 'aborting'
  | 'concluded'
  | 'null';

export interface JobSnapshot {
  readonly id: string;
  readonly status: JobStatus;
  /** Bytes copied so far. For a mirror, `len - offset` is the work left, and `len` grows
   * as the guest dirties blocks that were already copied (QAPI BlockJobInfo). */
  readonly offset: number;
  readonly len: number;
  /** The speed limit in force, bytes/s; 0 means unlimited. */
  readonly speed: number;
  readonly paused: boolean;
  readonly ready: boolean;
  readonly error?: string;
}

export interface JobControl {
  readonly id: string;
  readonly canPause: boolean;
  snapshot(): Promise<JobSnapshot | undefined>;
  /** Bytes per second; 0 = unlimited (QAPI block-job-set-speed). */
  setSpeed(bytesPerSecond: number): Promise<void>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /**
   * The guest's own disk requests and the time they took, cumulative (the controller's
   * latency input, controller/latency.ts); absent where the backend cannot read them.
   */
  latency?(): Promise<LatencyTotals | undefined>;
}

/**
 * `job` with some of its calls replaced and the rest passed through: how a wrapper (the
 * agent's host-wide speed ceiling, the writeback target's flusher) changes one thing about a job.
 */
export function decorateJob(job: JobControl, over: Partial<Pick<JobControl, 'snapshot' | 'setSpeed' | 'pause' | 'resume'>>): JobControl {
  return {
    id: job.id,
    canPause: job.canPause,
    snapshot: () => job.snapshot(),
    setSpeed: (bps) => job.setSpeed(bps),
    pause: () => job.pause(),
    resume: () => job.resume(),
    ...(job.latency ? { latency: job.latency.bind(job) } : {}),
    ...over,
  };
}
