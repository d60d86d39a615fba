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
 * comma-joined string key; ours are keyed by pid only.
 *
 * "attached_probes" is printed before any probe is attached, so it is not the signal that
 * counting has begun: with the environment variable __BPFTRACE_NOTIFY_PROBES_ATTACHED set,
 * bpftrace prints that name on a line of its own once every probe is attached (on stderr
 * in 0.17, stdout in later versions; both are watched).
 */
import { counterForMap, type Totals } from './counters.ts';
import { FINAL_MARK, REPORT_MARK } from './program.ts';

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
            const report: TotalsReport = {
              type: 'report',
              monoMs: nsToMs(BigInt(m[2]!)),
              final: m[1] === FINAL_MARK,
              totals: this.pending,
            };
            this.pending = new Map();
            return report;
          }
        }
        break;
    }
    return { type: 'other', line };
  }

  /** Adds `{"@name": {"pid": n, ...}}`; false if it is not one of our counter maps. */
  private addMap(data: Record<string, unknown>): boolean {
    const entries = Object.entries(data);
    if (entries.length !== 1) return false;
    const [name, values] = entries[0]!;
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
