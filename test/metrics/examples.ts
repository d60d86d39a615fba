/**
 * The example points of src/metrics/README.md: the README's "Example output" block must be
 * exactly these, serialised (test/metrics/metrics-docs.test.ts), and influxd must accept
 * them (test/metrics/metrics-influxd.test.ts).
 */
import { activityPoint, agentPoint, jobPoint, moderationPoint, probePoint, type MetricPoint } from '../../src/metrics/names.ts';

const id = { host: 'hv1', vm: 'web1' };
const t = Date.UTC(2026, 10, 25, 9, 17, 32, 200); // 2026-11-25T09:17:32.200Z
const thresholds = { disk: 5, keyboard: 5, pointer: 100, interrupts: 1000, stall: 600, inflight: 600 };

export const EXAMPLE_POINTS: MetricPoint[] = [
  activityPoint({ ...id, time: t, intervalS: 0.05, source: 'ebpf' }, { diskReads: 3, diskWrites: 1, diskFlushes: 0, diskDiscards: 0, keyEvents: 0, pointerEvents: 0, interrupts: 131, vcpuWaitUs: 850, diskBusyUs: 12000 }),
  activityPoint({ ...id, time: t + 50, intervalS: 0.05, source: 'qmp' }, { diskReads: 0, diskWrites: 2, diskFlushes: 1, diskDiscards: null, keyEvents: null, pointerEvents: null, interrupts: null }),
  moderationPoint({ ...id, time: t, device: 'disk0' }, { state: 'busy', reason: 'disk 80/s > 5/s', mode: 'paused', thresholds, holdoffMs: 1000 }),
  moderationPoint({ ...id, time: t + 1250, device: 'disk0' }, { state: 'idle', reason: 'quiet for 1s', mode: 'full', thresholds: { ...thresholds, pointer: null }, holdoffMs: 1000 }),
  jobPoint({ ...id, time: t, device: 'disk0' }, { speedSetBps: 0, speedActualBps: 401493487.5, paused: false, bytesDone: 3221225472, bytesTotal: 8589934592, etaS: 13.4, status: 'running' }),
  jobPoint({ ...id, time: t + 250, device: 'disk0' }, { speedSetBps: 0, speedActualBps: 0, paused: true, bytesDone: 3221225472, bytesTotal: 8589934592, etaS: null, status: 'paused' }),
  probePoint({ ...id, time: t }, { source: 'ebpf', attached: true, restarts: 0 }),
  probePoint({ ...id, time: t + 5000 }, { source: 'qmp', attached: true, restarts: 3, reason: 'bpftrace exited 3 times in 60s' }),
  agentPoint({ host: 'hv1', time: t }, { vmsWatched: 40, disksConfigured: 12, copiesRunning: 1, maxJobs: 1, queued: 3, waiting: 0, encrypted: 7, failed: 1, cpuPercent: 0.4, rssBytes: 98566144 }),
].filter((p): p is MetricPoint => p !== null);
