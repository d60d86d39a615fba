/**
 * The buffering, batching and retry logic both real sinks share; each adds only its
 * transport (encode a point, send a batch).
 *
 *   write() ──> BoundedQueue (maxBuffer points, oldest dropped) ──> one batch in flight
 *                    ▲                                                  │ failed: back in
 *                    └──────────────────────────────────────────────────┘ front, retry after
 *                                                                          backoff
 *
 * - A batch goes every flushIntervalMs, or at once when batchSize points are waiting.
 * - One send at a time, so points arrive in order.
 * - A failed send (unreachable, 5xx, timeout: "down") puts the batch back in front and
 *   retries after an exponential backoff (initialBackoffMs doubling to maxBackoffMs).
 *   Entering "down" logs one warning; the first success after it logs one info line with
 *   what was lost. Points stay bounded: at most maxBuffer, in flight included (while a
 *   batch is in flight, the oldest points queued behind it are the ones dropped).
 * - A batch the server refuses as invalid (HTTP 400: a field type conflict) is not retried:
 *   counted as rejected and logged once per distinct error.
 *
 * Retrying a batch whose first attempt reached InfluxDB after all (a timeout) writes it
 * twice; InfluxDB keeps one point per series and timestamp, so that is harmless.
 */
import type { Logger } from '../log.ts';
import { silentLogger } from '../log.ts';
import type { MetricPoint } from './names.ts';
import { BoundedQueue } from './queue.ts';
import type { MetricsSink, SinkState, SinkStats } from './sink.ts';

export interface BatchingOptions {
  /** Points per request, at most; default 5000. */
  batchSize?: number;
  /** ms between sends of what has accumulated; default 1000. */
  flushIntervalMs?: number;
  /** Points kept while the target is unreachable (in flight included); default 50000 (about 16 MB). */
  maxBuffer?: number;
  /** First retry delay, ms; default 250. */
  initialBackoffMs?: number;
  /** Longest retry delay, ms; default 10000. */
  maxBackoffMs?: number;
  /** How long close() keeps retrying to deliver what is left, ms; default 3000. */
  closeTimeoutMs?: number;
  logger?: Logger;
  /** Clock for backoff and outage durations (ms); default Date.now. */
  now?: () => number;
}

/** A send failure that retrying will not fix: the batch is counted as rejected. */
export class RejectedBatch extends Error {
  constructor(
    message: string,
    /** How many of the batch's points were refused (the rest were written); default all. */
    readonly refused?: number,
  ) {
    super(message);
    this.name = 'RejectedBatch';
  }
}

export function errorText(e: unknown): string {
  if (e instanceof Error) return e.message || e.name || String(e);
  return String(e);
}

export abstract class BatchingSink<T> implements MetricsSink {
  abstract readonly description: string;
  protected abstract readonly kind: SinkStats['kind'];
  protected abstract readonly target: string;
  /** The point as the transport wants it; called when a batch is sent, never from write(). */
  protected abstract encode(p: MetricPoint): T;
  /** Delivers a batch, or throws: RejectedBatch (not retried) or anything else (retried). */
  protected abstract send(batch: T[]): Promise<void>;
  /** Releases the transport; called once by close(). */
  protected abstract release(): Promise<void>;

  protected readonly log: Logger;
  private readonly now: () => number;
  private readonly batchSize: number;
  private readonly maxBuffer: number;
  private readonly initialBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly closeTimeoutMs: number;
  private readonly queue: BoundedQueue<MetricPoint>;

  private state: SinkState = 'ok';
  private accepting = true;
  private inflight = 0;
  private sending: Promise<boolean> | null = null;
  private kickQueued = false;
  private backoffMs = 0;
  private retryAt = 0;
  private retryTimer: NodeJS.Timeout | null = null;
  private readonly tick: NodeJS.Timeout;
  private closing: Promise<void> | null = null;
  private downSince = 0;
  private droppedAtDown = 0;
  private readonly rejections = new Set<string>();

  private written = 0;
  private delivered = 0;
  private dropped = 0;
  private rejected = 0;
  private failures = 0;
  private lastError: string | null = null;

  constructor(o: BatchingOptions = {}) {
    this.log = o.logger ?? silentLogger;
    this.now = o.now ?? Date.now;
    this.maxBuffer = positive('maxBuffer', o.maxBuffer ?? 50_000);
    this.batchSize = Math.min(positive('batchSize', o.batchSize ?? 5000), this.maxBuffer);
    this.initialBackoffMs = positive('initialBackoffMs', o.initialBackoffMs ?? 250);
    this.maxBackoffMs = Math.max(this.initialBackoffMs, o.maxBackoffMs ?? 10_000);
    this.closeTimeoutMs = o.closeTimeoutMs ?? 3000;
    this.queue = new BoundedQueue<MetricPoint>(this.maxBuffer);
    this.tick = setInterval(() => this.kick(false), positive('flushIntervalMs', o.flushIntervalMs ?? 1000));
    // Metrics never keep the process alive: close() is how a run ends them.
    this.tick.unref();
  }

  write(points: MetricPoint | null | readonly (MetricPoint | null)[]): void {
    // No I/O and no allocation (but for the rare setImmediate below): the point is stored
    // as it is and encoded when its batch is sent.
    try {
      if (Array.isArray(points)) {
        for (const p of points as readonly (MetricPoint | null)[]) this.enqueue(p);
      } else {
        this.enqueue(points as MetricPoint | null);
      }
      if (this.queue.length >= this.batchSize && !this.kickQueued) {
        this.kickQueued = true;
        // Never send from inside write(): the caller is the controller's decision path.
        setImmediate(() => {
          this.kickQueued = false;
          this.kick(false);
        }).unref();
      }
    } catch (e) {
      // Unreachable with points from names.ts; a sink must not take the controller down.
      this.lastError = errorText(e);
    }
  }

  private enqueue(p: MetricPoint | null): void {
    if (!p) return;
    this.written++;
    if (!this.accepting) {
      this.dropped++;
      return;
    }
    this.dropped += this.queue.push(p);
    // The bound covers the batch in flight too.
    if (this.queue.length + this.inflight > this.maxBuffer && this.queue.dropOldest()) this.dropped++;
  }

  async flush(): Promise<void> {
    const target = this.written;
    while (this.delivered + this.dropped + this.rejected < target) {
      if (this.sending) {
        await this.sending;
        continue;
      }
      if (this.queue.length === 0) return;
      if (!(await this.sendNext())) return;
    }
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  stats(): SinkStats {
    return {
      kind: this.kind,
      target: this.target,
      state: this.state,
      written: this.written,
      delivered: this.delivered,
      buffered: this.queue.length + this.inflight,
      maxBuffer: this.maxBuffer,
      dropped: this.dropped,
      rejected: this.rejected,
      failures: this.failures,
      lastError: this.lastError,
    };
  }

  private kick(force: boolean): void {
    if (this.sending || this.queue.length === 0 || this.state === 'closed') return;
    if (!force && this.now() < this.retryAt) return;
    void this.sendNext();
  }

  /** Sends one batch; true when it left the buffer (delivered or rejected), false when it failed. */
  private sendNext(): Promise<boolean> {
    const run = async (): Promise<boolean> => {
      const taken = this.queue.take(this.batchSize);
      this.inflight = taken.length;
      // A point the transport cannot encode (only possible for one built by hand, not by
      // names.ts) is refused alone, and never retried.
      const batch: MetricPoint[] = [];
      const encoded: T[] = [];
      for (const p of taken) {
        try {
          encoded.push(this.encode(p));
          batch.push(p);
        } catch (e) {
          this.rejected++;
          this.refusedBatch(new RejectedBatch(`invalid point for ${p.measurement}: ${errorText(e)}`));
        }
      }
      if (batch.length === 0) return true;
      try {
        await this.send(encoded);
        this.delivered += batch.length;
        this.succeeded();
        return true;
      } catch (e) {
        if (e instanceof RejectedBatch) {
          const refused = Math.min(batch.length, e.refused ?? batch.length);
          this.rejected += refused;
          this.delivered += batch.length - refused;
          this.refusedBatch(e);
          return true;
        }
        this.inflight = 0;
        this.dropped += this.queue.unshift(batch);
        this.failed(e);
        return false;
      } finally {
        this.inflight = 0;
      }
    };
    const p = run().finally(() => {
      this.sending = null;
      // A backlog (after an outage) drains batch after batch, not one batch a tick; less
      // than a batch waits for the tick, so that a steady flow goes once a flushIntervalMs.
      if (this.state === 'ok' && this.queue.length >= this.batchSize && this.accepting) setImmediate(() => this.kick(false)).unref();
    });
    this.sending = p;
    return p;
  }

  private succeeded(): void {
    this.backoffMs = 0;
    this.retryAt = 0;
    if (this.state === 'down') {
      this.state = 'ok';
      this.log.info(
        { sink: this.target, down_s: round1((this.now() - this.downSince) / 1000), dropped: this.dropped - this.droppedAtDown, buffered: this.queue.length },
        `metrics: ${this.description} is reachable again; delivering the buffered points`,
      );
    }
  }

  private failed(e: unknown): void {
    this.failures++;
    this.lastError = errorText(e);
    this.backoffMs = this.backoffMs === 0 ? this.initialBackoffMs : Math.min(this.maxBackoffMs, this.backoffMs * 2);
    this.retryAt = this.now() + this.backoffMs;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.kick(true);
    }, this.backoffMs);
    this.retryTimer.unref();
    if (this.state === 'ok') {
      this.state = 'down';
      this.downSince = this.now();
      this.droppedAtDown = this.dropped;
      this.log.warn(
        { sink: this.target, error: this.lastError, buffered: this.queue.length, max_buffer: this.maxBuffer },
        `metrics: ${this.description} is unreachable or too slow; buffering up to ${this.maxBuffer} points (the oldest are dropped beyond that) and retrying`,
      );
    }
  }

  private refusedBatch(e: RejectedBatch): void {
    this.lastError = e.message;
    if (this.rejections.size < 20 && !this.rejections.has(e.message)) {
      this.rejections.add(e.message);
      this.log.error({ sink: this.target, error: e.message }, `metrics: ${this.description} refused points; they are dropped (a bug: please report)`);
    }
  }

  private async shutdown(): Promise<void> {
    this.accepting = false;
    clearInterval(this.tick);
    const deadline = this.now() + this.closeTimeoutMs;
    try {
      for (;;) {
        if (this.sending) {
          await this.sending;
          continue;
        }
        if (this.queue.length === 0) break;
        if (await this.sendNext()) continue;
        const wait = Math.min(this.backoffMs, deadline - this.now());
        if (wait <= 0) break;
        await new Promise((r) => setTimeout(r, wait));
      }
    } finally {
      if (this.retryTimer) clearTimeout(this.retryTimer);
      const left = this.queue.clear();
      if (left > 0) {
        this.dropped += left;
        this.log.warn({ sink: this.target, points: left, error: this.lastError }, `metrics: ${left} points could not be delivered to ${this.description} before exit`);
      }
      this.state = 'closed';
      try {
        await this.release();
      } catch (e) {
        this.lastError = errorText(e);
      }
    }
  }
}

function positive(name: string, v: number): number {
  if (!Number.isFinite(v) || v <= 0) throw new RangeError(`metrics: ${name} must be a positive number, got ${v}`);
  return Math.floor(v);
}

const round1 = (x: number): number => Math.round(x * 10) / 10;
