/** Hot reload with a real file: changes apply, bad changes are reported and ignored, SIGHUP re-reads. */
import { describe, test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import type { Subscription } from 'rxjs';
import { defaultPolicy, watchPolicy, type Policy } from '../../src/policy/index.ts';
import { IdlecryptError } from '../../src/errors.ts';

interface LogRecord {
  level: number;
  msg: string;
  [k: string]: unknown;
}

/** A pino logger whose records land in `records`. */
function capture() {
  const records: LogRecord[] = [];
  const logger = pino({ level: 'debug' }, { write: (s: string) => void records.push(JSON.parse(s) as LogRecord) });
  return { logger, records };
}

/** Policies as they arrive, with a wait for the next one. */
function collect() {
  const seen: Policy[] = [];
  const waiters: (() => void)[] = [];
  return {
    seen,
    push(p: Policy) {
      seen.push(p);
      waiters.splice(0).forEach((w) => w());
    },
    /** Resolves when `count` policies have arrived; rejects after `ms`. */
    async until(count: number, ms = 3000): Promise<Policy> {
      const deadline = Date.now() + ms;
      while (seen.length < count) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`only ${seen.length} policies after ${ms} ms, wanted ${count}`);
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, left);
          waiters.push(() => (clearTimeout(t), resolve()));
        });
      }
      return seen[count - 1]!;
    },
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Condition polling for effects that have no event of their own (a log line). */
async function eventually(check: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await sleep(10);
  }
}

let dir: string;
let file: string;
let sub: Subscription | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'idlecrypt-reload-'));
  file = join(dir, 'policy.yaml');
});
afterEach(() => {
  sub?.unsubscribe();
  sub = undefined;
  rmSync(dir, { recursive: true, force: true });
});

describe('watchPolicy', () => {
  test('emits the policy at once, then each valid change of the file', async () => {
    writeFileSync(file, 'holdoff: 1s\n');
    const { logger, records } = capture();
    const got = collect();
    sub = watchPolicy(file, { logger, debounceMs: 20 }).subscribe((p) => got.push(p));
    assert.equal(got.seen.length, 1, 'the first policy arrives synchronously');
    assert.equal(got.seen[0]!.holdoff, 1000);

    writeFileSync(file, 'holdoff: 2s\nspeed:\n  busy: 20MiB\n');
    const next = await got.until(2);
    assert.equal(next.holdoff, 2000);
    assert.equal(next.speed.busy, 20 * 1024 * 1024);
    assert.ok(records.some((r) => r.msg === 'policy reloaded' && r.why === 'change'));
  });

  test('an invalid change is reported with its position and the last good policy stays', async () => {
    writeFileSync(file, 'holdoff: 1s\n');
    const { logger, records } = capture();
    const got = collect();
    sub = watchPolicy(file, { logger, debounceMs: 20 }).subscribe((p) => got.push(p));

    // as an editor saves: write a new file beside, rename it over the old one
    writeFileSync(join(dir, '.policy.yaml.tmp'), 'holdoff: 1s\nspeed:\n  busy: -5MiB\n');
    renameSync(join(dir, '.policy.yaml.tmp'), file);
    await eventually(() => records.some((r) => r.level === 50));
    const err = records.find((r) => r.level === 50)!;
    assert.equal(err.msg, `policy reload rejected, keeping the last good policy: ${file}:3:9: speed.busy: a speed cannot be negative, got "-5MiB"`);
    assert.deepEqual(err.issues, [`${file}:3:9: speed.busy: a speed cannot be negative, got "-5MiB"`]);
    await sleep(60);
    assert.equal(got.seen.length, 1, 'nothing new was emitted');

    // fixing the file applies it
    writeFileSync(file, 'holdoff: 3s\n');
    assert.equal((await got.until(2)).holdoff, 3000);
  });

  test('a change that does not change the policy emits nothing', async () => {
    writeFileSync(file, 'holdoff: 1s\n');
    const { logger, records } = capture();
    const got = collect();
    sub = watchPolicy(file, { logger, debounceMs: 20 }).subscribe((p) => got.push(p));
    writeFileSync(file, '# same, with a comment\nholdoff: 1000ms\n');
    await eventually(() => records.some((r) => r.msg === 'policy re-read, unchanged'));
    assert.equal(got.seen.length, 1);
  });

  test('SIGHUP re-reads the file', async () => {
    writeFileSync(file, 'holdoff: 1s\n');
    const { logger, records } = capture();
    const got = collect();
    const before = process.listenerCount('SIGHUP');
    // without the file watch, so that only the signal can cause the reload
    sub = watchPolicy(file, { logger, watchFile: false }).subscribe((p) => got.push(p));
    assert.equal(process.listenerCount('SIGHUP'), before + 1);
    writeFileSync(file, 'holdoff: 4s\n');
    await sleep(50);
    assert.equal(got.seen.length, 1, 'no reload without the signal');
    process.kill(process.pid, 'SIGHUP');
    assert.equal((await got.until(2)).holdoff, 4000);
    assert.ok(records.some((r) => r.msg === 'policy reloaded' && r.why === 'SIGHUP'));
    sub.unsubscribe();
    assert.equal(process.listenerCount('SIGHUP'), before, 'unsubscribing removes the handler');
  });

  test('an invalid file at the start is an error of the stream: nothing starts on a bad policy', () => {
    writeFileSync(file, 'thresholds:\n  disk: lots\n');
    const { logger } = capture();
    let error: unknown;
    sub = watchPolicy(file, { logger }).subscribe({ error: (e: unknown) => (error = e) });
    assert.ok(error instanceof IdlecryptError);
    assert.equal(error.code, 'POLICY');
    assert.equal(error.message, `${file}:2:9: thresholds.disk: expected a rate per second (a number), off or auto, got "lots"`);
  });

  test('without a file: the shipped default, and no signal handler', () => {
    const { logger } = capture();
    const before = process.listenerCount('SIGHUP');
    const got = collect();
    sub = watchPolicy(undefined, { logger }).subscribe((p) => got.push(p));
    assert.deepEqual(got.seen, [defaultPolicy()]);
    assert.equal(process.listenerCount('SIGHUP'), before);
  });
});
