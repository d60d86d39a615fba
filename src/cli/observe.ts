/**
 * `idlecrypt observe`: per-VM guest activity, one record per VM per interval.
 *
 *   idlecrypt observe [--pid PID ...] [--duration S] [--interval MS] [--json]
 *                     [--source auto|ebpf|qmp] [--bpftrace PATH]
 *
 * --json prints one JSON object per line with exactly the fields of JSON_FIELDS; on a
 * terminal it draws a live table of per-second rates instead, and otherwise plain rows.
 * It ends after --duration (counted from when counting begins) or on Ctrl-C (SIGINT) or
 * SIGTERM, after flushing the last, partial interval, so every event up to the end is
 * counted. A second Ctrl-C quits at once.
 */
import { Command } from 'commander';
import { Subject, lastValueFrom, tap } from 'rxjs';
import { IdlecryptError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { ProcfsDiscovery } from '../discovery/procfs.ts';
import { COUNTERS } from '../probes/counters.ts';
import { MIN_INTERVAL_MS } from '../probes/runner.ts';
import { activity$, type ActivityStatus, type SourceChoice } from '../streams/activity.ts';
import { ratesOf } from '../streams/rates.ts';
import type { ActivitySample } from '../streams/types.ts';
import { parseChoice, parsePositiveInt } from './options.ts';
import { LibvirtClient } from '../libvirt/client.ts';
import { domainVm } from '../libvirt/domains.ts';
import { activityPoint, hostTag, openMetricsSink, probePoint } from '../metrics/index.ts';

/** The fields of a --json record, in order (issue 3). */
export const JSON_FIELDS = [
  'time',
  'pid',
  'vm',
  'interval_s',
  ...COUNTERS.flatMap((c) => (c.json ? [c.json] : [])),
  'source',
] as const;

export type ObserveRecord = Record<(typeof JSON_FIELDS)[number], string | number | null>;

export function toJsonRecord(s: ActivitySample): ObserveRecord {
  const rec: Record<string, string | number | null> = {
    time: new Date(s.time).toISOString(),
    pid: s.pid,
    vm: s.vm,
    interval_s: Math.round(s.intervalS * 1e6) / 1e6,
  };
  for (const c of COUNTERS) if (c.json) rec[c.json] = s[c.key];
  rec.source = s.source;
  return rec as ObserveRecord;
}

interface ObserveOptions {
  pid?: number[];
  domain?: string[];
  connect: string;
  duration?: number;
  interval: number;
  json?: boolean;
  source: SourceChoice;
  bpftrace?: string;
  influx?: string;
  metricsFile?: string;
}

function parseDuration(value: string): number {
  const n = Number(value);
  if (!/^\d+(\.\d+)?$/.test(value.trim()) || !(n > 0)) {
    throw new IdlecryptError('USAGE', `--duration: '${value}' must be a number of seconds > 0`);
  }
  return n;
}

export function observeCommand(): Command {
  return new Command('observe')
    .description('Show each VM\'s guest activity (disk requests, input events, interrupts) per interval')
    .option('--pid <pid>', 'only this QEMU process (repeatable; default: every QEMU VM)', (v: string, acc: number[] = []) => [...acc, parsePositiveInt('--pid', v)])
    .option('--domain <name>', 'only this libvirt domain (repeatable): its QEMU, found through libvirt', (v: string, acc: string[] = []) => [...acc, v])
    .option('--connect <uri>', 'with --domain, the libvirt URI', 'qemu:///system')
    .option('--duration <s>', 'stop after counting for this many seconds (default: until Ctrl-C)', parseDuration)
    .option('--interval <ms>', `sampling interval in ms (>= ${MIN_INTERVAL_MS})`, (v: string) => parsePositiveInt('--interval', v, MIN_INTERVAL_MS), 1000)
    .option('--json', 'one JSON object per VM per interval on stdout')
    .option('--source <source>', 'auto (eBPF, else QMP), ebpf, or qmp', (v: string) => parseChoice('--source', v, ['auto', 'ebpf', 'qmp'] as const), 'auto' as SourceChoice)
    .option('--bpftrace <path>', 'the bpftrace binary (default: $IDLECRYPT_BPFTRACE, else bpftrace in PATH)')
    .option('--influx <url>', 'also send every sample to InfluxDB 1.x, e.g. http://127.0.0.1:8086/idlecrypt')
    .option('--metrics-file <path>', 'also append every sample to this line-protocol file')
    .action(async (opts: ObserveOptions) => observe(opts));
}

async function observe(opts: ObserveOptions): Promise<void> {
  const logger = createLogger();
  const discovery = new ProcfsDiscovery();
  if (opts.domain?.length) {
    // The domain's QEMU, from libvirt's pid file checked against its -uuid (domains.ts).
    const client = await LibvirtClient.connect({ uri: opts.connect, logger });
    try {
      for (const name of opts.domain) {
        const dom = await client.domain(name);
        if (!dom.active) throw new IdlecryptError('USAGE', `--domain ${name}: the domain is not running`);
        opts.pid = [...(opts.pid ?? []), (await domainVm(dom)).pid];
      }
    } finally {
      await client.close();
    }
  }
  if (opts.pid) {
    const vms = await discovery.list();
    const missing = opts.pid.filter((p) => !vms.some((v) => v.pid === p));
    if (missing.length) {
      throw new IdlecryptError('USAGE', `--pid ${missing[0]}: no QEMU VM with that pid is running`);
    }
  }

  if (opts.influx !== undefined && opts.metricsFile !== undefined) throw new IdlecryptError('USAGE', '--influx and --metrics-file: choose one');
  const sink =
    opts.influx !== undefined || opts.metricsFile !== undefined
      ? await openMetricsSink({ vm: 'observe', logger, ...(opts.influx !== undefined ? { influx: opts.influx } : {}), ...(opts.metricsFile !== undefined ? { file: opts.metricsFile } : {}) })
      : undefined;
  const host = hostTag();
  let restarts = 0;
  const record = (s: ActivitySample) => {
    if (!sink) return;
    const id = { host, vm: s.vm ?? `pid-${s.pid}`, time: s.time };
    sink.write([activityPoint({ ...id, intervalS: s.intervalS, source: s.source }, s), probePoint(id, { source: s.source, attached: true, restarts })]);
  };

  const stop$ = new Subject<void>();
  let stopping = false;
  const requestStop = () => {
    if (stopping) return;
    stopping = true;
    stop$.next();
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      process.stderr.write('idlecrypt: stopped at once; the last interval was not counted\n');
      process.exit(130);
    }
    if (signal === 'SIGINT' && process.stderr.isTTY) process.stderr.write('\nidlecrypt: stopping (Ctrl-C again to quit at once)\n');
    requestStop();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // `observe --json | head`: a reader that goes away ends the observation, quietly.
  const onStdoutError = (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE' && err.code !== 'ERR_STREAM_DESTROYED') throw err;
    requestStop();
  };
  process.stdout.on('error', onStdoutError);
  // --duration counts from when counting begins (bpftrace attached, or the QMP poller
  // started), so the records cover that long: bpftrace's start-up is not taken from it.
  let timer: NodeJS.Timeout | undefined;
  const startDuration = () => {
    if (opts.duration !== undefined && !timer) timer = setTimeout(requestStop, opts.duration * 1000);
  };

  const view = opts.json ? jsonView() : process.stdout.isTTY ? tableView(opts.interval) : rowsView();
  const onStatus = (s: ActivityStatus) => {
    switch (s.type) {
      case 'counting':
        return startDuration();
      case 'fallback':
        return note(`eBPF probes unavailable (${s.reason}); disk counts come from QMP query-blockstats, input and interrupts are unknown`);
      case 'probes-restarting':
        restarts++;
        return note(`${s.reason}; restarting bpftrace in ${s.delayMs / 1000} s (events until then are not counted)`);
      case 'unmeasured':
        return note(`VM ${s.vm ?? s.pid} (pid ${s.pid}): ${s.counters.join(', ')} unknown: ${s.why}`);
      default:
        return;
    }
  };

  try {
    await lastValueFrom(
      activity$({
        intervalMs: opts.interval,
        pids: opts.pid,
        source: opts.source,
        bpftrace: opts.bpftrace,
        discovery,
        logger,
        stop$,
        onStatus,
      }).pipe(
        tap((s) => {
          view.sample(s);
          record(s);
        }),
      ),
      { defaultValue: undefined },
    );
  } finally {
    clearTimeout(timer);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    view.end();
    process.stdout.off('error', onStdoutError);
    await sink?.close();
  }
}

function note(line: string): void {
  process.stderr.write(`idlecrypt: ${line}\n`);
}

interface View {
  sample(s: ActivitySample): void;
  end(): void;
}

function jsonView(): View {
  return {
    sample: (s) => process.stdout.write(`${JSON.stringify(toJsonRecord(s))}\n`),
    end: () => {},
  };
}

const COLUMNS = COUNTERS.filter((c) => c.json !== null);
const fmt = (v: number | null, digits = 0) => (v === null ? '-' : v.toFixed(digits));

/** Plain rows for a pipe or file: one per sample, counts in the interval. */
function rowsView(): View {
  let header = false;
  return {
    sample: (s) => {
      if (!header) {
        header = true;
        process.stdout.write(`${['TIME', 'VM', 'PID', 'SOURCE', 'INTERVAL_S', ...COLUMNS.map((c) => c.json!.toUpperCase())].join('\t')}\n`);
      }
      const cells = [new Date(s.time).toISOString(), s.vm ?? '-', String(s.pid), s.source, s.intervalS.toFixed(3), ...COLUMNS.map((c) => fmt(s[c.key]))];
      process.stdout.write(`${cells.join('\t')}\n`);
    },
    end: () => {},
  };
}

/** A live table on a terminal: per-second rates over the last second (or interval), redrawn per report. */
function tableView(intervalMs: number): View {
  const windowMs = Math.max(1000, intervalMs);
  const recent = new Map<number, ActivitySample[]>();
  let drawn = 0;
  let scheduled = false;
  const heads = ['VM', 'PID', 'SRC', ...COLUMNS.map((c) => `${c.json!.replace('_events', '').replace('disk_', '')}/s`)];
  const draw = () => {
    scheduled = false;
    const newest = Math.max(...[...recent.values()].map((w) => w[w.length - 1]!.time));
    for (const [pid, win] of recent) if (win[win.length - 1]!.time < newest - 2 * windowMs) recent.delete(pid); // gone
    const rows = [...recent.values()].map((win) => {
      const r = ratesOf(win);
      return [r.vm ?? '-', String(r.pid), r.source, ...COLUMNS.map((c) => fmt(r.perSecond[c.key], 1))];
    });
    const table = [heads, ...rows];
    const widths = heads.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
    const lines = table.map((row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  '));
    process.stdout.write(`${drawn ? `\x1b[${drawn}A\x1b[J` : ''}${lines.join('\n')}\n`);
    drawn = lines.length;
  };
  return {
    sample: (s) => {
      const win = (recent.get(s.pid) ?? []).filter((w) => w.time > s.time - windowMs);
      win.push(s);
      recent.set(s.pid, win);
      // The samples of one report arrive together: draw once, after the last of them.
      if (!scheduled) {
        scheduled = true;
        setImmediate(draw);
      }
    },
    end: () => {
      if (scheduled) draw();
    },
  };
}
