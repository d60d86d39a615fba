/**
 * What the activity streams carry. Counts are per interval (or per second in rates);
 * null means "not measured by this source" (input and interrupts under the QMP fallback),
 * never zero.
 */
import type { CounterKey, Counts, Totals } from '../probes/counters.ts';

export type { CounterKey, Counts, Totals };

/** 'ebpf': the probes (every counter). 'qmp': degraded, query-blockstats only (disk counters). */
export type ActivitySource = 'ebpf' | 'qmp';

export interface ActivitySample extends Counts {
  /** End of the interval, ms since the epoch. */
  time: number;
  pid: number;
  vm: string | null;
  /** The measured length of the interval (from the source's own clock), in seconds. */
  intervalS: number;
  source: ActivitySource;
  /** The last, partial interval, flushed when the stream was asked to stop. */
  final: boolean;
}

export interface ActivityRates {
  /** Time of the newest sample in the window. */
  time: number;
  pid: number;
  vm: string | null;
  /** Measured time the window's samples cover, in seconds. */
  windowS: number;
  source: ActivitySource;
  /** Events per second over the window; null where any sample in it is unknown. */
  perSecond: Counts;
}

/** One VM a totals reading is reported for. */
export interface SampleTarget {
  pid: number;
  vm: string | null;
  /** Counters the source measures for this VM; the others come out null. */
  measured: ReadonlySet<CounterKey>;
}

/**
 * Running totals from a source, the input of totalsToSamples().
 *   baseline  all totals of `run` are zero at monoMs (bpftrace attached)
 *   totals    running totals at monoMs. scope 'all': every process with events is in
 *             `totals` (absent = none yet); scope 'listed': only the targets' entries are
 *             known (a QMP poll of one VM), and a target's first reading is its baseline.
 * A new `run` (a restarted bpftrace, another QEMU process) starts from scratch.
 */
export type TotalsEvent =
  | { type: 'baseline'; run: string; monoMs: number }
  | {
      type: 'totals';
      run: string;
      monoMs: number;
      epochMs: number;
      final: boolean;
      source: ActivitySource;
      scope: 'all' | 'listed';
      totals: ReadonlyMap<number, Totals>;
      targets: readonly SampleTarget[];
    };
