/**
 * What one encryption run tells InfluxDB (src/metrics): every activity sample of the VM,
 * the controller's state with the thresholds in force, the job's speed and progress, and
 * the probes' health. Writes never wait: a sink queues (src/metrics/sink.ts).
 */
import type { MetricsSink } from '../metrics/sink.ts';
import { activityPoint, jobPoint, moderationPoint, probePoint } from '../metrics/names.ts';
import type { ActivitySample } from '../streams/types.ts';
import type { Decision } from '../controller/types.ts';
import { fixedThresholds, type EffectivePolicy } from '../policy/schema.ts';
import type { Progress } from './progress.ts';

export interface RunIdentity {
  readonly host: string;
  readonly vm: string;
  readonly device: string;
}

export class RunMetrics {
  private restarts = 0;
  private attached = false;
  private degradedReason: string | null = null;

  constructor(
    readonly sink: MetricsSink,
    private readonly id: RunIdentity,
    private readonly now: () => number = Date.now,
  ) {}

  sample(s: ActivitySample): void {
    this.sink.write(activityPoint({ host: this.id.host, vm: this.id.vm, time: s.time, intervalS: s.intervalS, source: s.source }, s));
  }

  /** Probe lifecycle, from activity$'s onStatus. */
  probeStatus(type: string, reason?: string): void {
    if (type === 'probes-attached') this.attached = true;
    if (type === 'probes-restarting') {
      this.restarts++;
      this.attached = false;
    }
    if (type === 'fallback') {
      this.degradedReason = reason ?? 'eBPF unavailable';
      this.attached = true; // the QMP source needs no attaching
    }
  }

  /** One progress tick: the job, and (moderated) the decision and the probes' health. */
  progress(p: Progress, policy?: EffectivePolicy, decision?: Decision): void {
    const time = this.now();
    const base = { host: this.id.host, vm: this.id.vm, time };
    this.sink.write(
      jobPoint(
        { ...base, device: this.id.device },
        {
          speedSetBps: p.speedLimit,
          speedActualBps: p.rate,
          paused: p.paused,
          bytesDone: p.offset,
          bytesTotal: p.len,
          etaS: p.etaS,
          status: p.status,
        },
      ),
    );
    if (decision) {
      this.sink.write(
        moderationPoint(
          { ...base, device: this.id.device },
          {
            state: decision.state,
            reason: decision.reason,
            mode: decision.mode,
            ...(policy ? { thresholds: decision.learnt?.thresholds ?? fixedThresholds(policy.thresholds), holdoffMs: policy.holdoff } : {}),
            ...(decision.learnt ? { levels: decision.learnt.levels } : {}),
            ...(decision.latency ? { latency: decision.latency } : {}),
          },
        ),
      );
    }
    if (p.moderation?.source) {
      this.sink.write(
        probePoint(base, { source: p.moderation.source, attached: this.attached, restarts: this.restarts, reason: this.degradedReason }),
      );
    }
  }
}
