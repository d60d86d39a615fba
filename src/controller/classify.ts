/**
 * Busy or idle, from windowed rates and thresholds: pure. The guest is busy while ANY
 * signal's rate is strictly above its threshold (the source design: disk > 5 requests/s,
 * keyboard > 5 events/s, pointer > 100 events/s, interrupts > 1000/s; and the vCPUs' wait
 * for QEMU's big lock, stall > 600 ms/s, which a copy that freezes the guest cannot
 * suppress as it suppresses the disk count: docs/starvation.md). A signal that is
 * unknown (null: degraded mode) or switched off (threshold null) never makes it busy.
 */
import { SIGNALS } from '../policy/schema.ts';
import { formatRate } from '../policy/units.ts';
import type { ActivityRates, Classification, Reason, Signal } from './types.ts';

const FIELD: Record<Signal, 'diskPerS' | 'keyPerS' | 'pointerPerS' | 'interruptsPerS' | 'stallMsPerS'> = {
  disk: 'diskPerS',
  keyboard: 'keyPerS',
  pointer: 'pointerPerS',
  interrupts: 'interruptsPerS',
  stall: 'stallMsPerS',
};

export function rateOf(rates: ActivityRates, signal: Signal): number | null {
  return rates[FIELD[signal]] ?? null;
}

/**
 * `thresholds`: those in force (the policy's fixed ones, and for `auto` what calibrate.ts
 * learnt); `learnt`: the signals whose threshold was learnt, named so in the reasons.
 */
export function classify(rates: ActivityRates, thresholds: Readonly<Record<Signal, number | null>>, learnt: readonly Signal[] = []): Classification {
  const reasons: Reason[] = [];
  for (const signal of SIGNALS) {
    const threshold = thresholds[signal];
    const value = rateOf(rates, signal);
    if (threshold !== null && value !== null && value > threshold) reasons.push({ signal, value, threshold, ...(learnt.includes(signal) ? { learnt: true as const } : {}) });
  }
  return { state: reasons.length > 0 ? 'busy' : 'idle', reasons };
}

/** "disk 37.5/s > 5/s, keyboard 8/s > 5/s", "stall 412ms/s > 600ms/s", "disk 90/s > 42/s (learnt)" */
export function describeReasons(reasons: readonly Reason[]): string {
  const unit = (sig: Signal) => (sig === 'stall' ? 'ms/s' : '/s');
  return reasons.map((r) => `${r.signal} ${formatRate(r.value)}${unit(r.signal)} > ${formatRate(r.threshold)}${unit(r.signal)}${r.learnt ? ' (learnt)' : ''}`).join(', ');
}
