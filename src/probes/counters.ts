/**
 * The activity counters: one module owns their names. Each counter has
 *   - a camelCase key (ActivitySample fields in src/streams),
 *   - the bpftrace map that counts it (probes/*.bt, `@<map>[pid] = count()` or `sum(...)`),
 *   - its field in `idlecrypt observe --json` (snake_case; null when unknown), if any.
 * Tests check the probe scripts and the docs against this table.
 */

export const COUNTERS = [
  { key: 'diskReads', map: 'disk_reads', json: 'disk_reads' },
  { key: 'diskWrites', map: 'disk_writes', json: 'disk_writes' },
  { key: 'diskFlushes', map: 'disk_flushes', json: 'disk_flushes' },
  // Discards (BLOCK_ACCT_UNMAP) are guest disk activity too, but not a field of the
  // issue's JSON record: they reach the controller only through ActivitySample.
  { key: 'diskDiscards', map: 'disk_discards', json: null },
  { key: 'keyEvents', map: 'key_events', json: 'key_events' },
  { key: 'pointerEvents', map: 'pointer_events', json: 'pointer_events' },
  { key: 'interrupts', map: 'interrupts', json: 'interrupts' },
  // Microseconds the VM's vCPU threads waited for QEMU's big lock (a sum, not a count):
  // the guest held back by QEMU's main loop (probes/qemu-stall.bt).
  { key: 'vcpuWaitUs', map: 'vcpu_wait_us', json: 'vcpu_wait_us' },
  // Microseconds the VM's disks had a guest request in flight (started, not completed; a
  // sum over its disks): 250 ms of it in one 250 ms report is one request that took that
  // long, which the copy cannot hide as it hides the requests' count (probes/qemu-inflight.bt).
  { key: 'diskBusyUs', map: 'disk_busy_us', json: 'disk_busy_us' },
] as const;

export type CounterKey = (typeof COUNTERS)[number]['key'];

/** Counts of one VM; null = unknown (not measured by this source). */
export type Counts = Record<CounterKey, number | null>;

/** Counters a sample may lack altogether (a source or a test that predates them): absent = unknown. */
export type OptionalCounter = 'diskDiscards' | 'vcpuWaitUs' | 'diskBusyUs';

/** Counts of one VM as an activity sample carries them: the optional counters may be absent. */
export type SampleCounts = Readonly<Omit<Counts, OptionalCounter>> & { readonly [K in OptionalCounter]?: number | null };

/**
 * A count over an interval as a rate per second; null when the count is unknown (null or
 * absent) or the interval is not positive. The controller (src/controller/adapt.ts) and the
 * metrics (src/metrics/names.ts) both take their rates from here, so the panels show what
 * the controller compared with its thresholds.
 */
export function perSecond(n: number | null | undefined, intervalS: number): number | null {
  return n === null || n === undefined || !(intervalS > 0) ? null : n / intervalS;
}

/** A counter in µs over an interval (vcpuWaitUs, diskBusyUs) as ms per second; null as perSecond. */
export function msPerSecond(us: number | null | undefined, intervalS: number): number | null {
  return perSecond(us === null || us === undefined ? null : us / 1000, intervalS);
}

/** Running totals of one process as bpftrace reports them (absent = 0). */
export type Totals = Partial<Record<CounterKey, number>>;

export const COUNTER_KEYS: readonly CounterKey[] = COUNTERS.map((c) => c.key);

const KEY_BY_MAP = new Map<string, CounterKey>(COUNTERS.map((c) => [c.map, c.key]));

/** The counter a bpftrace map name (with or without '@') holds, if it is one of ours. */
export function counterForMap(map: string): CounterKey | undefined {
  return KEY_BY_MAP.get(map.startsWith('@') ? map.slice(1) : map);
}

export function zeroCounts(): Counts {
  return Object.fromEntries(COUNTER_KEYS.map((k) => [k, 0])) as Counts;
}
