/**
 * bpftrace's `-f json` output, parsed into typed records.
 *
 * bpftrace 0.17 writes one JSON object per line (src/output.cpp, JsonOutput):
 *   {"type": "attached_probes", "data": {"probes": 9}}        (before attaching!)
 *   {"type": "map", "data": {"@disk_reads": {"6865": 2480}}}  (print(@m); keys are pids)
 *   {"type": "map", "data": {"@x": 0}}                        (a map without keys)
 *   {"type": "printf", "data": "idlecrypt-report 538497133370\n"}
 *   {"type": "lost_events", "data": {"events": 12}}
 * An empty map prints nothing at all. A map keyed by several values gets one
 * comma-joined string key: the counters are keyed by pid, the open-span maps
 * (program.ts OPEN_SPAN_MAPS) by "pid,tid", with the span's start in nsecs, or 0 when that
 * thread is in no span (the scripts zero a key: bpftrace 0.17 aborts printing a map whose
 * element is deleted under it):
 *   {"type": "map", "data": {"@vcpu_waiting_since": {"6865,6870": 538497001234}}}
 *
 * "attached_probes" is printed before any probe is attached, so it is not the signal that
 * counting has begun: with the environment variable __BPFTRACE_NOTIFY_PROBES_ATTACHED set,
 * bpftrace prints that name on a line of its own once every probe is attached (on stderr
 * in 0.17, stdout in later versions; both are watched).
 */
import { counterForMap, type CounterKey, type Totals } from './counters.ts';
import { FINAL_MARK, OPEN_SPAN_MAPS, REPORT_MARK } from './program.ts';

export const ATTACHED_NOTICE = '__BPFTRACE_NOTIFY_PROBES_ATTACHED';

/** The shared report's marker line (program.ts): `idlecrypt-report <nsecs>` or `idlecrypt-final <nsecs>`. */
const MARKER = new RegExp(`^(${REPORT_MARK}|${FINAL_MARK}) (\\d+)\\s*$`);

/** One print of the shared report: running totals per QEMU pid since the probes attached. */
export interface TotalsReport {
  type: 'report';
  /** CLOCK_MONOTONIC at the report (bpftrace's nsecs), in ms. */
  monoMs: number;
  /** The END report, after bpftrace detached its probes. */
  final: boolean;
  totals: ReadonlyMap<number, Totals>;
}

export type BpftraceRecord =
  | { type: 'probe_count'; probes: number }
  | { type: 'attached' }
  | TotalsReport
  | { type: 'lost_events'; events: number }
  | { type: 'other'; line: string };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * The longest an open span counts for. A span whose end the probes missed (its thread gone
 * in the middle of it) must not keep its VM busy for ever: after this it adds nothing more
 * until it ends. A guest held back this long has long since been seen.
 */
export const OPEN_SPAN_CAP_MS = 10_000;

/** nsecs as ms, exactly to the microsecond (a double holds ns only up to 104 days of uptime). */
export function nsToMs(ns: bigint): number {
  return Number(ns / 1000n) / 1000;
}

/**
 * Stateful line parser: map lines accumulate until the report marker closes a report.
 * Pure apart from that state; no I/O.
 */
export class BpftraceJsonParser {
  private pending = new Map<number, Totals>();
  /** Open spans of this report: counter, pid, start (ns). */
  private open: { key: CounterKey; pid: number; startNs: bigint }[] = [];
  /** The totals last reported, per pid: open spans must never make one go back. */
  private last = new Map<number, Totals>();

  push(rawLine: string): BpftraceRecord | undefined {
    const line = rawLine.trim();
    if (line === '') return undefined;
    if (line === ATTACHED_NOTICE) return { type: 'attached' };
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      return { type: 'other', line };
    }
    if (!isObject(msg) || typeof msg.type !== 'string') return { type: 'other', line };
    const data = msg.data;
    switch (msg.type) {
      case 'attached_probes':
        if (isObject(data) && typeof data.probes === 'number') return { type: 'probe_count', probes: data.probes };
        break;
      case 'lost_events':
        if (isObject(data) && typeof data.events === 'number') return { type: 'lost_events', events: data.events };
        break;
      case 'map':
        if (isObject(data) && this.addMap(data)) return undefined;
        break;
      case 'printf':
        if (typeof data === 'string') {
          const m = MARKER.exec(data);
          if (m) {
            const atNs = BigInt(m[2]!);
            const report: TotalsReport = {
              type: 'report',
              monoMs: nsToMs(atNs),
              final: m[1] === FINAL_MARK,
              totals: this.closeReport(atNs),
            };
            return report;
          }
        }
        break;
    }
    return { type: 'other', line };
  }

  /**
   * The report's totals: the counters as printed, each open span added up to the report's
   * time (at most OPEN_SPAN_CAP_MS, in the counter's microseconds), and none below what
   * the last report said. A span that ends between the report's two prints is in neither
   * (program.ts prints the counters first), so this report would say less than the last;
   * the next one has it.
   */
  private closeReport(atNs: bigint): Map<number, Totals> {
    const totals = this.pending;
    const capNs = BigInt(OPEN_SPAN_CAP_MS) * 1_000_000n;
    for (const { key, pid, startNs } of this.open) {
      const age = atNs > startNs ? atNs - startNs : 0n;
      const us = Number((age < capNs ? age : capNs) / 1000n);
      const t = totals.get(pid) ?? {};
      t[key] = (t[key] ?? 0) + us;
      totals.set(pid, t);
    }
    for (const [pid, t] of totals) {
      const before = this.last.get(pid);
      if (before) for (const k of Object.keys(t) as CounterKey[]) t[k] = Math.max(t[k]!, before[k] ?? 0);
      this.last.set(pid, { ...t });
    }
    this.pending = new Map();
    this.open = [];
    return totals;
  }

  /** `{"@span_map": {"pid,tid": startNs, ...}}` for an open-span map; false if not one. */
  private addOpenSpans(name: string, values: unknown): boolean {
    const counter = (OPEN_SPAN_MAPS as Record<string, string>)[name.slice(1)];
    const key = counter === undefined ? undefined : counterForMap(counter);
    if (!key || !isObject(values)) return false;
    for (const [k, start] of Object.entries(values)) {
      const pid = Number(k.split(',')[0]);
      if (!Number.isSafeInteger(pid) || pid <= 0 || typeof start !== 'number' || !Number.isInteger(start)) return false;
      if (start === 0) continue; // that thread is not in a span now (keys are zeroed, not deleted)
      // Past 2^53 ns (104 days of uptime) the number has lost its last bits: a few ns.
      this.open.push({ key, pid, startNs: BigInt(start) });
    }
    return true;
  }

  /** Adds `{"@name": {"pid": n, ...}}`; false if it is not one of our counter maps. */
  private addMap(data: Record<string, unknown>): boolean {
    const entries = Object.entries(data);
    if (entries.length !== 1) return false;
    const [name, values] = entries[0]!;
    if (name.slice(1) in OPEN_SPAN_MAPS) return this.addOpenSpans(name, values);
    const key = counterForMap(name);
    if (!key || !isObject(values)) return false;
    for (const [pidText, n] of Object.entries(values)) {
      const pid = Number(pidText);
      if (!Number.isSafeInteger(pid) || pid <= 0 || typeof n !== 'number') return false;
      const totals = this.pending.get(pid) ?? {};
      totals[key] = n;
      this.pending.set(pid, totals);
    }
    return true;
  }
}
