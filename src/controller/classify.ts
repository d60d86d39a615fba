/**
 * Busy or idle, from windowed rates and thresholds: pure. The guest is busy while ANY
 * signal's rate is strictly above its threshold (the source design: disk > 5 requests/s,
 * keyboard > 5 events/s, pointer > 100 events/s, interrupts > 1000/s; and two that a copy
 * holding the guest back cannot suppress as it suppresses the disk count
 * (docs/starvation.md): the vCPUs' wait for QEMU's big lock, stall > 800 ms/s, and the time
 * the guest's requests are in flight, inflight > 600 ms/s). A signal that is
 * unknown (null: degraded mode) or switched off (threshold null) never makes it busy.
 */
import { rateUnit, SIGNALS } from '../policy/schema.ts';
import { formatRate } from '../policy/units.ts';
import { DISK_KINDS, type ActivityRates, type Classification, type DiskKind, type Reason, type Signal } from './types.ts';

const FIELD: Record<Signal, 'diskPerS' | 'keyPerS' | 'pointerPerS' | 'interruptsPerS' | 'stallMsPerS' | 'inflightMsPerS'> = {
  disk: 'diskPerS',
  keyboard: 'keyPerS',
  pointer: 'pointerPerS',
  interrupts: 'interruptsPerS',
  stall: 'stallMsPerS',
  inflight: 'inflightMsPerS',
};

export function rateOf(rates: ActivityRates, signal: Signal): number | null {
  return rates[FIELD[signal]] ?? null;
}

/**
 * `thresholds`: those in force (the policy's fixed ones, and for `auto` what calibrate.ts
 * learnt); `learnt`: the signals whose threshold was learnt, named so in the reasons;
 * `kinds`: with `disk: auto`, each kind of disk request's learnt threshold. A kind over its
 * own makes the disk busy even when the sum is under the disk's (one reason, the kind
 * furthest over: a guest whose background is writes starts reading).
 */
export function classify(
  rates: ActivityRates,
  thresholds: Readonly<Record<Signal, number | null>>,
  learnt: readonly Signal[] = [],
  kinds?: Readonly<Partial<Record<DiskKind, { readonly threshold: number }>>>,
): Classification {
  const reasons: Reason[] = [];
  for (const signal of SIGNALS) {
    const threshold = thresholds[signal];
    const value = rateOf(rates, signal);
    if (threshold !== null && value !== null && value > threshold) reasons.push({ signal, value, threshold, ...(learnt.includes(signal) ? { learnt: true as const } : {}) });
    else if (signal === 'disk' && threshold !== null && kinds && rates.diskKindsPerS) {
      let over: Reason | undefined;
      for (const kind of DISK_KINDS) {
        const t = kinds[kind]?.threshold;
        const v = rates.diskKindsPerS[kind];
        if (t !== undefined && v > t && (!over || v / t > over.value / over.threshold)) over = { signal, kind, value: v, threshold: t, learnt: true };
      }
      if (over) reasons.push(over);
    }
  }
  return { state: reasons.length > 0 ? 'busy' : 'idle', reasons };
}

/** "disk 37.5/s > 5/s, keyboard 8/s > 5/s", "stall 412ms/s > 600ms/s", "disk 90/s > 42/s (learnt)", "disk reads 20/s > 5/s (learnt)" */
export function describeReasons(reasons: readonly Reason[]): string {
  return reasons
    .map((r) => `${r.signal}${r.kind ? ` ${r.kind}` : ''} ${formatRate(r.value)}${rateUnit(r.signal)} > ${formatRate(r.threshold)}${rateUnit(r.signal)}${r.learnt ? ' (learnt)' : ''}`)
    .join(', ');
}
