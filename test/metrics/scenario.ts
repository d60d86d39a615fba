/**
 * A realistic minute of one VM, as the controller would write it, for the InfluxDB tests
 * and the dashboard check: sampled every 100 ms,
 *
 *    0-10 s   idle            job unlimited at ~400 MiB/s
 *   10-25 s   disk busy       job paused; ~40 requests and ~130 interrupts per sample
 *   25-26 s   hold-off        still paused
 *   26-40 s   idle            unlimited again
 *   40-45 s   typing          busy by keyboard (a key press is two events)
 *   45-50 s   probes degraded source qmp: disk counts only; bpftrace restarted once
 *   50-60 s   idle            eBPF back, the job completes
 *
 * Moderation points are written at every state change and every second; job readings
 * every 250 ms; probe health at changes and every 5 s; the host agent's point every 10 s.
 */
import { thresholdFor } from '../../src/controller/calibrate.ts';
import { activityPoint, agentPoint, jobPoint, moderationPoint, probePoint, type MetricPoint, type ModerationState } from '../../src/metrics/names.ts';

export interface ScenarioOptions {
  host?: string;
  vm?: string;
  device?: string;
  /** Epoch ms of the last sample; default: 1 s before now. */
  endMs?: number;
  /** Length, s; default 60 (the phases scale with it). */
  seconds?: number;
  /**
   * `thresholds: auto` for disk and interrupts: learning for the first sixth, then these
   * levels learnt, and the thresholds drawn from them.
   */
  learnt?: { disk: number; interrupts: number };
  /**
   * `latency.margin` on: learning the baseline in the first busy second, then the disk-busy
   * phase graded at 8 MiB/s with the guest's latency around `baselineMs`.
   */
  latency?: { baselineMs: number; margin: number };
}

export const THRESHOLDS = { disk: 5, keyboard: 5, pointer: 100, interrupts: 1000, stall: 600, inflight: 600 };
const MiB = 1024 * 1024;
const GRADED_BPS = 8 * MiB;

export function scenario(o: ScenarioOptions = {}): MetricPoint[] {
  const host = o.host ?? 'hv1';
  const vm = o.vm ?? 'web1';
  const device = o.device ?? 'disk0';
  const seconds = o.seconds ?? 60;
  const end = o.endMs ?? Date.now() - 1000;
  const start = end - seconds * 1000;
  const at = (frac: number) => frac * seconds; // phase boundaries scale with the length
  const stepS = 0.1;
  const total = 8 * 1024 * MiB;
  const points: (MetricPoint | null)[] = [];
  let done = 0;
  let lastState: ModerationState | null = null;
  let lastModerationAt = -Infinity;
  let lastProbe: string | null = null;
  let lastProbeAt = -Infinity;

  for (let i = 1; i <= seconds / stepS; i++) {
    const s = i * stepS;
    const time = start + s * 1000;
    const id = { host, vm, time };
    const diskBusy = s > at(10 / 60) && s <= at(25 / 60);
    const typing = s > at(40 / 60) && s <= at(45 / 60);
    const degraded = s > at(45 / 60) && s <= at(50 / 60);
    const holdoff = (s > at(25 / 60) && s <= at(25 / 60) + 1) || (s > at(45 / 60) && s <= at(45 / 60) + 1 && !degraded);
    const state: ModerationState = diskBusy || typing ? 'busy' : holdoff ? 'holdoff' : 'idle';
    const jitter = (i * 7919) % 5; // deterministic variety
    const graded = o.latency !== undefined && diskBusy && s > at(10 / 60) + 1;

    points.push(
      activityPoint(
        { ...id, intervalS: stepS, source: degraded ? 'qmp' : 'ebpf' },
        {
          diskReads: diskBusy ? 30 + jitter : jitter === 0 ? 1 : 0,
          diskWrites: diskBusy ? 10 + jitter : 0,
          diskFlushes: diskBusy ? 1 : 0,
          diskDiscards: degraded ? null : 0,
          keyEvents: degraded ? null : typing ? 2 + (jitter % 2) : 0,
          pointerEvents: degraded ? null : typing ? jitter : 0,
          interrupts: degraded ? null : diskBusy ? 250 + jitter : 2,
          vcpuWaitUs: degraded ? null : diskBusy ? 12_000 + 1000 * jitter : 150,
          diskBusyUs: degraded ? null : diskBusy ? 15_000 + 1000 * jitter : 400,
        },
      ),
    );

    if (state !== lastState || time - lastModerationAt >= 1000) {
      const reason = diskBusy ? `disk ${400 + jitter * 10}/s > 5/s` : typing ? 'keyboard 25/s > 5/s' : holdoff ? 'hold-off 1s after disk 400/s > 5/s' : 'every rate under its threshold';
      points.push(
        moderationPoint({ ...id, device }, {
          state,
          reason,
          mode: state === 'idle' ? 'full' : graded ? 'throttled' : 'paused',
          holdoffMs: 1000,
          ...(o.latency
            ? {
                latency: {
                  latencyMs: diskBusy ? o.latency.baselineMs * (1 + jitter / 50) : null,
                  baselineMs: s > at(10 / 60) + 1 ? o.latency.baselineMs : null,
                  margin: o.latency.margin,
                  speedBps: graded ? GRADED_BPS : 0,
                },
              }
            : {}),
          ...(o.learnt && s > at(10 / 60)
            ? {
                thresholds: { ...THRESHOLDS, disk: thresholdFor('disk', o.learnt.disk), interrupts: thresholdFor('interrupts', o.learnt.interrupts) },
                levels: { disk: { level: o.learnt.disk }, interrupts: { level: o.learnt.interrupts } },
              }
            : { thresholds: THRESHOLDS }),
        }),
      );
      lastState = state;
      lastModerationAt = time;
    }

    if (i % 3 === 0 || i === seconds / stepS) {
      const paused = state !== 'idle' && !graded;
      const actual = paused ? 0 : graded ? GRADED_BPS : 400 * MiB + jitter * MiB;
      done = Math.min(total, done + actual * 0.25);
      points.push(
        jobPoint(
          { ...id, device },
          {
            speedSetBps: 0,
            speedActualBps: actual,
            paused,
            bytesDone: done,
            bytesTotal: total,
            etaS: actual > 0 ? (total - done) / actual : null,
            status: done >= total ? 'ready' : paused ? 'paused' : 'running',
          },
        ),
      );
    }

    const probeKey = degraded ? 'qmp' : 'ebpf';
    if (probeKey !== lastProbe || time - lastProbeAt >= 5000) {
      points.push(
        probePoint(id, {
          source: probeKey,
          attached: true,
          restarts: s > at(45 / 60) ? 1 : 0,
          reason: degraded ? 'bpftrace exited; using query-blockstats' : null,
        }),
      );
      lastProbe = probeKey;
      lastProbeAt = time;
    }

    // The host agent's own point every 10 s: one copy (this VM's) until it completes.
    if (i % 100 === 0) {
      const copying = done < total;
      points.push(
        agentPoint({ host, time }, { vmsWatched: 3, disksConfigured: 3, copiesRunning: copying ? 1 : 0, maxJobs: 1, queued: copying ? 1 : 0, waiting: 0, encrypted: copying ? 1 : 2, failed: 0, cpuPercent: 0.3 + jitter / 10, rssBytes: 95_000_000 + jitter * 1_000_000 }),
      );
    }
  }
  return points.filter((p): p is MetricPoint => p !== null);
}
