/**
 * Progress of a copy as an operator reads it: bytes, measured speed and ETA. The speed is
 * measured from the job's offset over a sliding window (the job's `speed` field is only
 * the limit in force), and the ETA from the work left, `len - offset`, which grows while
 * the guest dirties blocks already copied.
 */
import type { JobSnapshot, JobStatus } from '../jobs/types.ts';
import type { LatencyView } from '../controller/latency.ts';

export interface Progress {
  readonly status: JobStatus;
  readonly offset: number;
  readonly len: number;
  /** 0..100 */
  readonly percent: number;
  /** the limit in force, bytes/s (0 = unlimited) */
  readonly speedLimit: number;
  readonly paused: boolean;
  /** measured, bytes/s */
  readonly rate: number;
  /** seconds, or null while nothing moves */
  readonly etaS: number | null;
  /** The controller's latest decision, when the run is moderated. */
  readonly moderation?: {
    readonly state: 'idle' | 'busy' | 'holdoff';
    readonly mode: 'full' | 'throttled' | 'paused';
    readonly reason: string;
    readonly source: 'ebpf' | 'qmp' | null;
    /** The headroom's cap on the idle speed, bytes/s, and the main loop's busy share (controller/headroom.ts). */
    readonly headroom?: { readonly capBps: number; readonly load: number | null };
    /** What was learnt of the guest, with `thresholds: auto` (controller/calibrate.ts). */
    readonly learnt?: string;
    /** The latency control, with `latency.margin` (controller/latency.ts). */
    readonly latency?: LatencyView;
  };
}

export class ProgressMeter {
  private readonly history: { t: number; offset: number }[] = [];

  constructor(private readonly windowMs = 2000) {}

  /** `nowMs` is a monotonic clock reading (performance.now()), injected for tests. */
  sample(s: JobSnapshot, nowMs: number): Progress {
    this.history.push({ t: nowMs, offset: s.offset });
    while (this.history.length > 2 && nowMs - this.history[1]!.t >= this.windowMs) this.history.shift();
    const first = this.history[0]!;
    const dt = (nowMs - first.t) / 1000;
    const rate = dt > 0 ? Math.max(0, (s.offset - first.offset) / dt) : 0;
    const left = Math.max(0, s.len - s.offset);
    return {
      status: s.status,
      offset: s.offset,
      len: s.len,
      percent: s.len > 0 ? (100 * s.offset) / s.len : 0,
      speedLimit: s.speed,
      paused: s.paused,
      rate,
      etaS: left === 0 ? 0 : rate > 0 ? left / rate : null,
    };
  }
}
