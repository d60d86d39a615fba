/**
 * The copy's writes in the host's page cache (policy `target.flush`).
 *
 * A target opened through the page cache (the guest's disk has cache mode writeback,
 * QEMU's default, and the target inherits it) takes the copy's writes at memory speed: in
 * one idle phase the copy left 0.9-1.3 GiB of them dirty on the project's 24 GiB host
 * (64 MiB without a copy), under the kernel's background threshold (10% of memory). The
 * kernel writes them back later, when they expire, which is often in the guest's next busy
 * phase, when the copy is already paused, and the guest's own requests queue behind them
 * (bench/README.md, "The matrix": once, a busy phase that began with 1 GiB dirty ran at
 * 329 MiB/s against 565-638 with 0.3-0.4 GiB). The main loop's load, which the headroom
 * reads, never shows it: the writeback is the kernel's, not QEMU's.
 *
 * So each time the copy has written `every` bytes (read from the job's progress, which the
 * controller reads every 250 ms anyway), the target is flushed (fdatasync on a descriptor
 * of our own), and the copy's writes reach the disk while the copy runs, in idle time. One
 * flush at a time; a flush never delays the controller (it runs in libuv's thread pool). A
 * target opened with O_DIRECT (cache=none, directsync) has nothing in the page cache and is
 * not flushed.
 *
 * What it does, measured (bench/README.md, "A writeback target flushed"; three rounds in one
 * run, flushed and not, alternating): the host's dirty memory peaked at 138-161 MiB instead of 1.8-2.0 GiB, at
 * the same copy speed. The guest's busy throughput kept was the same either way on the
 * project's host (94% and 93%), whose disk absorbs the writeback: the bound is for slower
 * storage and for memory pressure, where reclaiming a large page cache stalled guests (up to
 * 1.4 s, test/moderation/moderation.test.ts).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { describeError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { decorateJob, type JobControl } from '../jobs/types.ts';

export interface FlushStats {
  /** Flushes finished. */
  flushes: number;
  /** Their total time, ms. */
  ms: number;
  /** The longest, ms. */
  longestMs: number;
}

export class TargetFlusher {
  private fd?: FileHandle;
  /** The job's offset at the last flush's start; undefined before the first reading. */
  private flushedAt?: number;
  private inFlight?: Promise<void>;
  private failed = false;
  private closed = false;
  readonly stats: FlushStats = { flushes: 0, ms: 0, longestMs: 0 };

  /**
   * `every`: bytes of copying between flushes, read at each reading (the policy may be
   * reloaded); null = off. `sync` stands in for fdatasync in tests.
   */
  constructor(
    readonly path: string,
    private readonly every: () => number | null,
    private readonly log: Logger,
    private readonly sync: (fd: FileHandle) => Promise<void> = (fd) => fd.datasync(),
  ) {}

  /** A flush is in flight (started by observe(), synchronously). */
  get flushing(): boolean {
    return this.inFlight !== undefined;
  }

  /** A reading of the job: starts a flush once the copy has written `every` bytes since the last one. */
  observe(offset: number): void {
    if (this.closed || this.failed) return;
    const every = this.every();
    if (this.flushedAt === undefined || offset < this.flushedAt) {
      this.flushedAt = offset; // the first reading (an adopted job starts mid-way), or a job that started over
      return;
    }
    if (every === null || offset - this.flushedAt < every || this.inFlight) return;
    const from = this.flushedAt;
    this.flushedAt = offset;
    this.inFlight = this.flush(offset - from).finally(() => (this.inFlight = undefined));
  }

  private async flush(bytes: number): Promise<void> {
    const t0 = performance.now();
    try {
      this.fd ??= await open(this.path, 'r');
      await this.sync(this.fd);
      const ms = performance.now() - t0;
      this.stats.flushes++;
      this.stats.ms += ms;
      this.stats.longestMs = Math.max(this.stats.longestMs, ms);
      this.log.debug({ target: this.path, bytes, ms: Math.round(ms) }, 'flushed the copy\'s writes to the target\'s disk');
    } catch (e) {
      // Not worth failing the copy for: the kernel writes the pages back all the same.
      this.failed = true;
      this.log.warn({ target: this.path, err: describeError(e) }, 'cannot flush the target; the kernel writes the copy\'s writes back on its own from now on');
    }
  }

  /** Waits for a flush in flight and lets the target go (before it is removed or the run ends). */
  async close(): Promise<void> {
    this.closed = true;
    await this.inFlight;
    await this.fd?.close().catch(() => undefined);
    this.fd = undefined;
    if (this.stats.flushes > 0) {
      this.log.info({ target: this.path, flushes: this.stats.flushes, ms: Math.round(this.stats.ms), longest_ms: Math.round(this.stats.longestMs) }, 'target flushes during the copy');
    }
  }
}

/** `job`, whose every reading is shown to `flusher`. */
export function flushingTarget(job: JobControl, flusher: TargetFlusher): JobControl {
  return decorateJob(job, {
    async snapshot() {
      const s = await job.snapshot();
      if (s) flusher.observe(s.offset);
      return s;
    },
  });
}
