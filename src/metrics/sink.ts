/**
 * Where points go. The controller writes from its decision path, so a sink must never make
 * it wait or fail: write() is synchronous, O(1) per point, never throws, and a sink that
 * cannot deliver keeps a bounded buffer, drops the oldest points beyond it and counts them.
 */
import type { MetricPoint } from './names.ts';

export type SinkState = 'ok' | 'down' | 'closed';

export interface SinkStats {
  readonly kind: 'influx' | 'file' | 'null';
  /** Where the points go: the InfluxDB URL without credentials, or the file's path. */
  readonly target: string;
  /** ok: delivering (or nothing tried yet); down: the last attempt failed, retrying; closed. */
  readonly state: SinkState;
  /** Points handed to write(). */
  readonly written: number;
  /** Points InfluxDB (or the file) took. */
  readonly delivered: number;
  /** Points waiting, a batch in flight included. Never more than maxBuffer. */
  readonly buffered: number;
  readonly maxBuffer: number;
  /** Points lost: the buffer was full (the oldest go first), written after close, or left at close. */
  readonly dropped: number;
  /** Points InfluxDB refused as invalid (HTTP 4xx other than auth): a bug, not retried. */
  readonly rejected: number;
  /** Failed delivery attempts (each is retried with backoff). */
  readonly failures: number;
  readonly lastError: string | null;
}

export interface MetricsSink {
  /** For people: "InfluxDB http://127.0.0.1:8086/idlecrypt" or "file idlecrypt-metrics/vm1-....lp". */
  readonly description: string;
  /** Queues points (nulls from the builders are skipped). Never blocks, never throws. */
  write(points: MetricPoint | null | readonly (MetricPoint | null)[]): void;
  /**
   * Sends what is buffered now and resolves when it is delivered, or as soon as an attempt
   * fails (the points stay buffered and are retried). Never rejects.
   */
  flush(): Promise<void>;
  /** Flushes (retrying for a bounded time), releases the connection or file, and ends. Never rejects. */
  close(): Promise<void>;
  stats(): SinkStats;
}

/** A sink that counts and discards: for library callers and tests that want no metrics. */
export class NullSink implements MetricsSink {
  readonly description = 'no metrics';
  private written = 0;
  private closed = false;

  write(points: MetricPoint | null | readonly (MetricPoint | null)[]): void {
    const list: readonly (MetricPoint | null)[] = Array.isArray(points) ? points : [points as MetricPoint | null];
    for (const p of list) if (p) this.written++;
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
  }

  stats(): SinkStats {
    return {
      kind: 'null',
      target: '',
      state: this.closed ? 'closed' : 'ok',
      written: this.written,
      delivered: 0,
      buffered: 0,
      maxBuffer: 0,
      dropped: this.written,
      rejected: 0,
      failures: 0,
      lastError: null,
    };
  }
}
