/**
 * A JobControl for controller tests: holds a job's state, records every call, and can be
 * told to fail, to vanish or to answer slowly. Behaves as QEMU 7.2 does where it matters
 * to the reconciler: pausing a user-paused job and resuming one that is not paused fail.
 */
import type { JobControl, JobSnapshot, JobStatus } from '../../src/jobs/types.ts';
import { IdlecryptError, type ErrorCode } from '../../src/errors.ts';
import { pino } from 'pino';
import type { Logger } from '../../src/log.ts';

export type Call = 'snapshot' | 'pause' | 'resume' | `setSpeed ${number}`;

export class FakeJob implements JobControl {
  readonly id = 'idlecrypt-vda';
  readonly calls: Call[] = [];
  state: { status: JobStatus; paused: boolean; speed: number; offset: number; len: number; ready?: boolean; error?: string };
  gone = false;
  /** ms each call waits before answering */
  delayMs = 0;
  private failures = new Map<string, { error: IdlecryptError; times: number }>();

  constructor(
    readonly canPause = true,
    init: Partial<FakeJob['state']> = {},
  ) {
    this.state = { status: 'running', paused: false, speed: 0, offset: 0, len: 1 << 30, ...init };
  }

  /** The next call (or `times` calls) of `method` fails with an IdlecryptError of `code`. */
  failNext(method: 'snapshot' | 'pause' | 'resume' | 'setSpeed', code: ErrorCode = 'QMP_COMMAND', message = `${method}: injected failure`, times = 1): void {
    this.failures.set(method, { error: new IdlecryptError(code, message), times });
  }

  /** The actions only, without the snapshots. */
  actions(): Call[] {
    return this.calls.filter((c) => c !== 'snapshot');
  }

  private async call(method: string, c: Call): Promise<void> {
    this.calls.push(c);
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    const f = this.failures.get(method);
    if (f) {
      if (--f.times <= 0) this.failures.delete(method);
      throw f.error;
    }
  }

  /**
   * Reads from now on are answered only when the returned function is called, with the
   * job as it was when they were sent (as QEMU answers a query it has processed while the
   * reply is still on its way).
   */
  holdReads(): () => void {
    let release!: () => void;
    this.readGate = new Promise<void>((r) => (release = r));
    return () => {
      this.readGate = undefined;
      release();
    };
  }

  private readGate: Promise<void> | undefined;

  async snapshot(): Promise<JobSnapshot | undefined> {
    const gate = this.readGate;
    if (gate) {
      this.calls.push('snapshot');
      const then = { id: this.id, ...this.state, ready: this.state.ready ?? false };
      await gate;
      return this.gone ? undefined : then;
    }
    await this.call('snapshot', 'snapshot');
    if (this.gone) return undefined;
    return { id: this.id, ...this.state, ready: this.state.ready ?? false };
  }

  async setSpeed(bps: number): Promise<void> {
    await this.call('setSpeed', `setSpeed ${bps}`);
    this.state.speed = bps;
  }

  async pause(): Promise<void> {
    await this.call('pause', 'pause');
    if (this.state.paused) throw new IdlecryptError('QMP_COMMAND', 'job-pause: The job is already paused');
    this.state.paused = true;
    this.state.status = 'paused';
  }

  async resume(): Promise<void> {
    await this.call('resume', 'resume');
    if (!this.state.paused) throw new IdlecryptError('QMP_COMMAND', "job-resume: Can't resume a job that was not paused");
    this.state.paused = false;
    this.state.status = 'running';
  }
}

export interface LogRecord {
  level: number;
  msg: string;
  [k: string]: unknown;
}

/** A pino logger whose records land in `records` (level debug). */
export function captureLog(): { logger: Logger; records: LogRecord[] } {
  const records: LogRecord[] = [];
  const logger = pino({ level: 'debug', base: null, timestamp: false }, { write: (s: string) => void records.push(JSON.parse(s) as LogRecord) });
  return { logger, records };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function eventually(check: () => boolean, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await sleep(2);
  }
}
