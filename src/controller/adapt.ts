/**
 * From the observation streams' per-interval counts (src/streams ActivitySample, issue 3)
 * to the controller's input. Typed structurally, so that neither layer imports the other.
 *
 * Feed the controller raw per-interval samples, not src/streams' windowRates: the
 * controller averages over the policy's window itself and divides by the whole window,
 * so that one stray request stays under the threshold also right after a (re)start,
 * when the window holds a single 50 ms sample (1 request / 0.05 s would read 20/s).
 */
import { map, type OperatorFunction } from 'rxjs';
import { msPerSecond, perSecond, type SampleCounts } from '../probes/counters.ts';
import type { ActivityRates } from './types.ts';

/**
 * The fields of an ActivitySample the controller reads: the counters (one table in
 * src/probes/counters.ts) per interval, null = unknown. Discards, the vCPUs' wait and the
 * time in flight may be absent (OptionalCounter).
 */
export interface CountSample extends SampleCounts {
  readonly time: number;
  readonly pid: number;
  readonly vm: string | null;
  /** Measured length of the interval, seconds. */
  readonly intervalS: number;
  readonly source: 'ebpf' | 'qmp';
}

/** One sample as rates over its own interval. Disk is every request kind the guest submits. */
export function ratesFromSample(s: CountSample, vmName: string): ActivityRates {
  const perS = (n: number | null | undefined) => perSecond(n, s.intervalS);
  const disk = [s.diskReads, s.diskWrites, s.diskFlushes, s.diskDiscards ?? null].reduce<number>((a, n) => a + (n ?? 0), 0);
  return {
    time: s.time,
    vm: s.vm ?? vmName,
    pid: s.pid,
    ...(s.intervalS > 0 ? { intervalMs: s.intervalS * 1000 } : {}),
    diskPerS: perS(disk) ?? 0,
    ...(s.intervalS > 0
      ? { diskKindsPerS: { reads: perS(s.diskReads) ?? 0, writes: perS(s.diskWrites) ?? 0, flushes: perS(s.diskFlushes) ?? 0, discards: perS(s.diskDiscards) ?? 0 } }
      : {}),
    keyPerS: perS(s.keyEvents),
    pointerPerS: perS(s.pointerEvents),
    interruptsPerS: perS(s.interrupts),
    // a source without the counter leaves it out
    ...(s.vcpuWaitUs !== undefined ? { stallMsPerS: msPerSecond(s.vcpuWaitUs, s.intervalS) } : {}),
    ...(s.diskBusyUs !== undefined ? { inflightMsPerS: msPerSecond(s.diskBusyUs, s.intervalS) } : {}),
    source: s.source,
  };
}

/** ratesFromSample as an operator, for one VM's samples. */
export function toActivityRates(vmName: string): OperatorFunction<CountSample, ActivityRates> {
  return map((s) => ratesFromSample(s, vmName));
}
