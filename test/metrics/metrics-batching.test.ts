/** The bounded queue and the batching every sink shares, with a fake transport. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BatchingSink, type BatchingOptions } from '../../src/metrics/batching.ts';
import { point, type MetricPoint } from '../../src/metrics/names.ts';
import { BoundedQueue } from '../../src/metrics/queue.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Records every batch; fails while `down`. */
class FakeSink extends BatchingSink<number> {
  readonly description = 'fake';
  protected readonly kind = 'influx' as const;
  protected readonly target = 'fake://';
  readonly batches: number[][] = [];
  down = false;
  inFlight = 0;
  maxInFlight = 0;

  constructor(o: BatchingOptions) {
    super(o);
  }

  protected encode(p: MetricPoint): number {
    return p.fields.restarts as number;
  }

  protected async send(batch: number[]): Promise<void> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    await sleep(2);
    this.inFlight--;
    if (this.down) throw new Error('ECONNREFUSED');
    this.batches.push(batch);
  }

  protected async release(): Promise<void> {}
}

const p = (i: number) => point('probe', i, { host: 'h', vm: 'v' }, { restarts: i })!;

describe('BoundedQueue', () => {
  test('FIFO; when full the oldest goes; take and unshift keep the order; unshift beyond capacity drops the oldest of what comes back', () => {
    const q = new BoundedQueue<number>(3);
    assert.deepEqual([q.push(1), q.push(2), q.push(3), q.push(4)], [0, 0, 0, 1]);
    assert.deepEqual(q.take(2), [2, 3]);
    q.push(5);
    assert.equal(q.unshift([2, 3]), 1, 'one did not fit');
    assert.deepEqual(q.take(10), [3, 4, 5]);
    assert.equal(q.length, 0);
    assert.equal(q.dropOldest(), false);
  });
});

describe('BatchingSink', () => {
  test('a full batch goes at once, one after the other; less than a batch waits for the tick (here: close); in order, one send at a time', async () => {
    const sink = new FakeSink({ batchSize: 5, flushIntervalMs: 60_000 });
    sink.write(Array.from({ length: 12 }, (_, i) => p(i)));
    assert.deepEqual(sink.batches, [], 'nothing is sent from inside write()');
    const deadline = Date.now() + 5000;
    while (sink.batches.length < 2 && Date.now() < deadline) await sleep(5);
    await sleep(50);
    assert.deepEqual(sink.batches, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]);
    await sink.close();
    assert.deepEqual(sink.batches, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]);
    assert.equal(sink.maxInFlight, 1);
  });

  test('a steady trickle goes once per flush interval, not once per point', async () => {
    const sink = new FakeSink({ flushIntervalMs: 50 });
    const start = Date.now();
    for (let i = 0; i < 60; i++) {
      sink.write(p(i));
      await sleep(2);
    }
    const ticks = Math.floor((Date.now() - start) / 50);
    await sink.close();
    assert.equal(sink.batches.flat().length, 60);
    assert.ok(sink.batches.length <= ticks + 2, `${sink.batches.length} sends for 60 points in ${ticks} ticks`);
  });

  test('flush() resolves after delivery, or at once when the attempt fails (the points stay buffered); never rejects', async () => {
    const sink = new FakeSink({ flushIntervalMs: 10_000, initialBackoffMs: 10_000 });
    sink.write([p(1), p(2)]);
    await sink.flush();
    assert.deepEqual(sink.batches, [[1, 2]]);
    sink.down = true;
    sink.write(p(3));
    await sink.flush();
    assert.deepEqual({ state: sink.stats().state, buffered: sink.stats().buffered, failures: sink.stats().failures }, { state: 'down', buffered: 1, failures: 1 });
    sink.down = false;
    await sink.flush(); // flush tries at once, whatever the backoff
    assert.deepEqual(sink.batches, [[1, 2], [3]]);
    assert.equal(sink.stats().state, 'ok');
    await sink.close();
  });

  test('options are checked: a zero or negative size is a programming error', () => {
    assert.throws(() => new FakeSink({ maxBuffer: 0 }), /maxBuffer must be a positive number/);
    assert.throws(() => new FakeSink({ flushIntervalMs: -1 }), /flushIntervalMs must be a positive number/);
  });
});
