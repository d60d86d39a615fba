/**
 * The bpftrace runner against the real bpftrace (no guest needed: uprobes attach to the
 * QEMU binary on disk): attach detection, reports timed by the kernel clock, the final
 * report on stop, restart after a kill, and the one-line errors.
 */
import { chmod, copyFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deepStrictEqual, equal, ok, rejects } from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Subject, filter, firstValueFrom, take, type Observable } from 'rxjs';
import { IdlecryptError } from '../../src/errors.ts';
import { SCRIPTS, SCRIPT_QEMU_BINARY, composeProgram, loadScripts, type ComposedProgram, type ScriptId } from '../../src/probes/program.ts';
import { restartWithBackoff } from '../../src/probes/restart.ts';
import { isRetryableProbeError, resolveBpftrace, runBpftrace, type ProbeEvent } from '../../src/probes/runner.ts';
import { alive, waitUntil } from '../observe/helpers.ts';

let program: ComposedProgram;
let tmp: string;
before(async () => {
  program = composeProgram(await loadScripts(Object.keys(SCRIPTS) as ScriptId[]), [SCRIPT_QEMU_BINARY]);
  tmp = await mkdtemp(join(tmpdir(), 'idlecrypt-runner-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function probeError(err: unknown, code: string, message: RegExp): boolean {
  ok(err instanceof IdlecryptError, `an IdlecryptError, not ${String(err)}`);
  equal(err.code, code);
  ok(message.test(err.message), `message "${err.message}" matches ${message}`);
  ok(!err.message.includes('\n'), 'one line');
  return true;
}


describe('runBpftrace', () => {
  it('emits spawned, attached, then reports every interval timed by the kernel clock; stop$ gives a final report and completes', async () => {
    const stop$ = new Subject<void>();
    const { events, done } = collect(runBpftrace({ program, intervalMs: 100, stop$ }));
    // stop after three reports
    await waitUntil('three reports', () => events.filter((e) => e.type === 'report').length >= 3);
    const stopAt = performance.now();
    stop$.next();
    await done;
    const all = events;
    equal(all[0]!.type, 'spawned');
    equal(all[1]!.type, 'attached');
    const reports = all.filter((e): e is Extract<ProbeEvent, { type: 'report' }> => e.type === 'report');
    ok(reports.length >= 4);
    deepStrictEqual(reports.map((r) => r.final), [...reports.slice(1).map(() => false), true]);
    const attached = all[1] as Extract<ProbeEvent, { type: 'attached' }>;
    const gaps = reports.slice(0, -1).map((r, i) => r.monoMs - (i === 0 ? attached.monoMs : reports[i - 1]!.monoMs));
    for (const g of gaps.slice(1)) ok(g > 80 && g < 200, `interval ${g} ms is about 100 ms`);
    ok(performance.now() - stopAt < 5000, 'stops promptly');
    ok(!alive((all[0] as Extract<ProbeEvent, { type: 'spawned' }>).pid), 'bpftrace has exited');
  });

  it('is restarted with backoff after being killed mid-run, counting again from a new baseline', async () => {
    const stop$ = new Subject<void>();
    const restarts: number[] = [];
    const events$: Observable<ProbeEvent> = runBpftrace({ program, intervalMs: 100, stop$ }).pipe(
      restartWithBackoff({
        initialMs: 200,
        isRetryable: isRetryableProbeError,
        isHealthy: (e) => e.type === 'attached',
        until$: stop$,
        onRestart: (_err, failures) => restarts.push(failures),
      }),
    );
    const { events, done } = collect(events$);
    await waitUntil('a report', () => events.some((e) => e.type === 'report'));
    const first = events.find((e) => e.type === 'spawned') as Extract<ProbeEvent, { type: 'spawned' }>;
    process.kill(first.pid, 'SIGKILL');
    await waitUntil('a report from the restarted bpftrace', () => events.filter((e) => e.type === 'attached').length === 2 && events.at(-1)!.type === 'report');
    stop$.next();
    await done;
    deepStrictEqual(restarts, [1]);
    const runs = [...new Set(events.map((e) => e.run))];
    equal(runs.length, 2);
    equal(runs[1], runs[0]! + 1);
    ok(!alive(first.pid));
  });

  it('fails with one clear line when bpftrace is not installed', async () => {
    await rejects(firstValueFrom(runBpftrace({ program, intervalMs: 100, bpftrace: '/nonexistent/bpftrace' })),
      (e) => probeError(e, 'PROBE_UNAVAILABLE', /^bpftrace not found \(\/nonexistent\/bpftrace does not exist/));
    // a PATH without it
    equal(resolveBpftrace('bpftrace', '/usr/bin'), '/usr/bin/bpftrace');
    let err: unknown;
    try {
      resolveBpftrace('bpftrace', tmp); // an empty directory
    } catch (e) {
      err = e;
    }
    probeError(err, 'PROBE_UNAVAILABLE', /^bpftrace not found \("bpftrace" is not in PATH; on Debian: apt-get install bpftrace\)$/);
  });

  it('fails with one clear line when bpftrace is not permitted (not root)', async () => {
    const wrapper = join(tmp, 'bpftrace-as-nobody');
    await writeFile(wrapper, `#!/bin/sh\nexec /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/bpftrace "$@"\n`);
    await chmod(wrapper, 0o755);
    await rejects(firstValueFrom(runBpftrace({ program, intervalMs: 100, bpftrace: wrapper }).pipe(filter((e) => e.type === 'attached'))),
      (e) => probeError(e, 'PROBE_UNAVAILABLE', /^bpftrace is not permitted to trace \(bpftrace currently only supports running as the root user\.\); run idlecrypt as root/));
  });

  it('fails with one clear line when a QEMU binary lacks a probed function (bpftrace would skip it silently)', async () => {
    const fakeQemu = join(tmp, 'qemu-system-x86_64');
    await copyFile('/usr/bin/true', fakeQemu);
    const bad = composeProgram(await loadScripts(['disk', 'input']), [SCRIPT_QEMU_BINARY, fakeQemu]);
    await rejects(firstValueFrom(runBpftrace({ program: bad, intervalMs: 100 }).pipe(filter((e) => e.type === 'attached'))),
      (e) => probeError(e, 'PROBE_UNAVAILABLE', /^bpftrace found only 4 of 6 probe points: a QEMU binary lacks a probed function/));
  });

  it('rejects an interval under 50 ms', async () => {
    await rejects(firstValueFrom(runBpftrace({ program, intervalMs: 20 }).pipe(take(1))), (e) => probeError(e, 'USAGE', /interval/));
  });
});

/** Subscribes once: the events so far, and a promise of the end. */
function collect<T>(src: Observable<T>): { events: T[]; done: Promise<void> } {
  const events: T[] = [];
  const done = new Promise<void>((resolve, reject) => {
    src.subscribe({ next: (e) => events.push(e), error: reject, complete: resolve });
  });
  return { events, done };
}
