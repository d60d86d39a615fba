/**
 * The fallback source: a VM's guest disk requests from QMP query-blockstats, for hosts
 * where bpftrace cannot run. Input events and interrupts are unknown then.
 *
 * query-blockstats lists the BlockBackends that have a name or a guest device
 * (block/qapi.c, qmp_query_blockstats): the guest's disks. A block job's own
 * BlockBackend has neither, and its I/O is never accounted, so the encryption copy is not
 * counted here either. Its counters are cumulative since QEMU started and count requests
 * when they complete (the probes count them when they start).
 *
 * Reaching the socket: a QMP socket serves one client at a time, and a second client is
 * accepted but gets no greeting until the first leaves. So each of the VM's QMP sockets is
 * tried in turn with a short greeting timeout, and a busy one is skipped.
 */
import { QmpClient } from '../qmp/client.ts';
import type { BlockStats } from '../qmp/schema.ts';
import { describeError } from '../errors.ts';
import { silentLogger, type Logger } from '../log.ts';
import type { VmInfo } from '../discovery/types.ts';
import type { CounterKey, Totals } from './counters.ts';
import { HISTOGRAM_BOUNDARIES, OP_KINDS, type Histogram, type LatencyTotals, type OpKind } from '../controller/latency.ts';

/** The counters this source measures. */
export const QMP_MEASURED: ReadonlySet<CounterKey> = new Set(['diskReads', 'diskWrites', 'diskFlushes', 'diskDiscards']);

/** Running totals of a VM's guest disk requests: the sum over its devices. */
export function blockstatsTotals(stats: readonly BlockStats[]): Totals {
  const t = { diskReads: 0, diskWrites: 0, diskFlushes: 0, diskDiscards: 0 };
  for (const s of stats) {
    t.diskReads += s.stats.rd_operations;
    t.diskWrites += s.stats.wr_operations;
    t.diskFlushes += s.stats.flush_operations;
    t.diskDiscards += s.stats.unmap_operations;
  }
  return t;
}

/**
 * The guest's requests and the time QEMU took for them (block_acct_start to block_acct_done),
 * per kind, summed over its devices: the latency control's input (controller/latency.ts).
 * Discards are left out: they take no time worth judging and come in bursts. A kind's
 * latency histogram is summed too where every device keeps one with the same buckets
 * (block-latency-histogram-set); else that kind has none.
 */
export function blockstatsLatency(stats: readonly BlockStats[]): LatencyTotals {
  const ops = { read: 0, write: 0, flush: 0 };
  const ns = { read: 0, write: 0, flush: 0 };
  const field = { read: 'rd_latency_histogram', write: 'wr_latency_histogram', flush: 'flush_latency_histogram' } as const;
  const hist: Partial<Record<OpKind, { boundaries: readonly number[]; bins: number[] } | null>> = {};
  for (const s of stats) {
    ops.read += s.stats.rd_operations;
    ops.write += s.stats.wr_operations;
    ops.flush += s.stats.flush_operations;
    ns.read += s.stats.rd_total_time_ns;
    ns.write += s.stats.wr_total_time_ns;
    ns.flush += s.stats.flush_total_time_ns;
    for (const k of OP_KINDS) {
      const h = s.stats[field[k]];
      const acc = hist[k];
      if (acc === null) continue;
      if (!h) hist[k] = null;
      else if (acc === undefined) hist[k] = { boundaries: h.boundaries, bins: [...h.bins] };
      else if (acc.boundaries.length !== h.boundaries.length || acc.boundaries.some((b, i) => b !== h.boundaries[i])) hist[k] = null;
      else h.bins.forEach((x, i) => (acc.bins[i]! += x));
    }
  }
  const kept: Partial<Record<OpKind, Histogram>> = {};
  for (const k of OP_KINDS) if (hist[k]) kept[k] = hist[k];
  return Object.keys(kept).length > 0 ? { ops, ns, hist: kept } : { ops, ns };
}

/**
 * Has QEMU keep a latency histogram (HISTOGRAM_BOUNDARIES) on each of the guest's devices
 * that keeps none, so that the latency control can judge the median (controller/latency.ts).
 * A device that already keeps one (someone else's) is left as it is. The histograms stay
 * after the job: they are statistics only, cost QEMU a binary search per request, and
 * `block-latency-histogram-set id=<device>` with no boundaries removes them. A device that
 * refuses (a QEMU older than 4.0, a device without a backend) goes on being judged by its
 * mean, which the control's view says (`statistic`).
 */
export async function keepLatencyHistograms(client: QmpClient, stats: readonly BlockStats[]): Promise<void> {
  for (const s of stats) {
    const id = s.qdev || s.device;
    if (!id) continue;
    const st = s.stats;
    if (st.rd_latency_histogram || st.wr_latency_histogram || st.flush_latency_histogram) continue;
    await client.execute('block-latency-histogram-set', { id, boundaries: HISTOGRAM_BOUNDARIES }).catch(() => {});
  }
}

export interface BlockstatsReaderOptions {
  greetingTimeoutMs?: number;
  commandTimeoutMs?: number;
  /** Wait this long before trying the sockets again after none answered (default 5 s). */
  retryMs?: number;
  logger?: Logger;
}

/** One VM's QMP connection for query-blockstats, (re)connected on demand. */
export class BlockstatsReader {
  private client?: QmpClient;
  private connecting?: Promise<QmpClient | undefined>;
  private lastAttempt = -Infinity;
  private warned = false;
  private closed = false;
  private readonly log: Logger;

  constructor(
    readonly vm: VmInfo,
    private readonly options: BlockstatsReaderOptions = {},
  ) {
    this.log = (options.logger ?? silentLogger).child({ component: 'qmp-blockstats', pid: vm.pid });
  }

  /** Running totals now, or undefined if no QMP socket of the VM answers. */
  async read(): Promise<Totals | undefined> {
    const client = await this.connect();
    if (!client) return undefined;
    try {
      return blockstatsTotals(await client.execute('query-blockstats'));
    } catch (err) {
      this.log.warn({ err: describeError(err) }, 'query-blockstats failed; reconnecting next time');
      this.client = undefined;
      await client.close().catch(() => {});
      return undefined;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const c = this.client ?? (await this.connecting);
    this.client = undefined;
    await c?.close().catch(() => {});
  }

  private connect(): Promise<QmpClient | undefined> {
    if (this.client?.state === 'running') return Promise.resolve(this.client);
    this.connecting ??= this.tryConnect().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async tryConnect(): Promise<QmpClient | undefined> {
    const now = performance.now();
    if (this.closed || now - this.lastAttempt < (this.options.retryMs ?? 5000)) return undefined;
    this.lastAttempt = now;
    const reasons: string[] = [];
    for (const socket of this.vm.qmpSockets) {
      try {
        const client = await QmpClient.connect(socket, {
          greetingTimeoutMs: this.options.greetingTimeoutMs ?? 1000,
          commandTimeoutMs: this.options.commandTimeoutMs ?? 5000,
          logger: this.options.logger,
        });
        if (this.closed) {
          await client.close();
          return undefined;
        }
        this.client = client;
        this.warned = false;
        this.log.debug({ socket }, 'qmp connected for query-blockstats');
        return client;
      } catch (err) {
        reasons.push(describeError(err));
      }
    }
    if (!this.warned) {
      this.warned = true;
      this.log.warn(
        { vm: this.vm.name, sockets: this.vm.qmpSockets, reasons },
        this.vm.qmpSockets.length ? 'no QMP socket of this VM answers; its disk activity is unknown' : 'this VM has no QMP socket on its command line; its disk activity is unknown',
      );
    }
    return undefined;
  }
}
