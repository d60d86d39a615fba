/**
 * The activity stream against real guests under TCG and the real bpftrace: the numbers
 * must be true, so they are compared with QEMU's own accounting and with the events the
 * test itself injects.
 *
 * Three guests run at once: `busy` alternates 2 s idle and 2 s of a disk read/write loop
 * (the bursty workload), `calm` is idle and takes the injected input, and `writer` writes
 * and flushes (fsync) 4 KiB blocks at 40 per second.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { equal, ok } from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Subject } from 'rxjs';
import { createLogger } from '../../src/log.ts';
import { activity$, type ActivityStatus } from '../../src/streams/activity.ts';
import type { ActivitySample } from '../../src/streams/types.ts';
import { Lab, SECRET_TEXT, blockstats, pointerEvents, sleep, typeText, waitUntil, type Guest } from './helpers.ts';

let lab: Lab;
let busy: Guest;
let calm: Guest;
let writer: Guest;
const samples: ActivitySample[] = [];
const statuses: ActivityStatus[] = [];
const stop$ = new Subject<void>();
let ended: Promise<void>;
let logFile: string;

const of = (g: Guest, from = 0, to = samples.length) => samples.slice(from, to).filter((s) => s.pid === g.vm.pid);
const sum = (list: ActivitySample[], k: 'diskReads' | 'diskWrites' | 'diskFlushes' | 'keyEvents' | 'pointerEvents' | 'interrupts') =>
  list.reduce((t, s) => t + (s[k] ?? NaN), 0);

/** Index just past the first sample of `g` reported after now (+ one more, for margin). */
async function reportAfterNow(g: Guest): Promise<number> {
  const t = Date.now();
  let seen = 0;
  let index = -1;
  await waitUntil('a report after now', () => {
    for (let i = index + 1; i < samples.length; i++) {
      if (samples[i]!.pid === g.vm.pid && samples[i]!.time > t) {
        seen += 1;
        index = i;
      }
    }
    return seen >= 2;
  });
  return index + 1;
}

before(async () => {
  lab = await Lab.create('acc');
  [busy, calm, writer] = await Promise.all([
    lab.boot({ name: 'obs-busy', workload: 'bursty', params: { idle: 2, busy: 2, region_mb: 32, bs_kb: 64, chunk_kb: 1024 } }),
    lab.boot({ name: 'obs-calm', workload: 'idle' }),
    lab.boot({ name: 'obs-writer', workload: 'writer', params: { wps: 40, flush: 1 } }),
  ]);
  logFile = join(lab.dir, 'activity.log');
  ended = new Promise<void>((resolve, reject) => {
    activity$({
      intervalMs: 100,
      pids: [busy.vm.pid, calm.vm.pid, writer.vm.pid],
      source: 'ebpf',
      stop$,
      logger: createLogger({ level: 'debug', destination: logFile }),
      onStatus: (s) => statuses.push(s),
    }).subscribe({ next: (s) => samples.push(s), error: reject, complete: resolve });
  });
  await waitUntil('probes attached', () => statuses.some((s) => s.type === 'probes-attached'));
  await waitUntil('first samples', () => samples.length >= 4);
});

after(async () => {
  stop$.next();
  await ended.catch(() => {});
  await lab?.cleanup();
});

describe('activity$ on three real guests', () => {
  it('attributes every sample to the right pid and VM name, from the probes, at the measured interval', () => {
    const names = new Map([[busy.vm.pid, 'obs-busy'], [calm.vm.pid, 'obs-calm'], [writer.vm.pid, 'obs-writer']]);
    ok(samples.some((s) => s.pid === writer.vm.pid), 'all three guests are reported');
    const seen = new Set<number>();
    for (const s of samples) {
      equal(s.vm, names.get(s.pid));
      equal(s.source, 'ebpf');
      // a VM's first interval runs from the attach to the first report: shorter, but measured
      if (seen.has(s.pid)) ok(s.intervalS > 0.05 && s.intervalS < 0.5, `interval ${s.intervalS} s (nominal 0.1 s)`);
      else ok(s.intervalS > 0 && s.intervalS < 0.5);
      seen.add(s.pid);
    }
  });

  it('counts exactly the disk requests query-blockstats counts over the same window, while a write-blocking mirror job runs on each guest', async (t) => {
    // Each guest's disk is being copied to a scratch image by a mirror job (the kind of job
    // the encryption runs). Its own reads and writes must not be counted as the guest's.
    for (const g of [busy, calm]) {
      const scratch = join(lab.dir, `${g.vm.name}-scratch.raw`);
      await writeFile(scratch, '');
      await truncate(scratch, 64 * 1024 * 1024);
      await g.qmp.execute('blockdev-add', { driver: 'file', filename: scratch, 'node-name': 'scratch-file' });
      await g.qmp.execute('blockdev-add', { driver: 'raw', file: 'scratch-file', 'node-name': 'scratch' });
    }
    for (const g of [busy, calm]) {
      await g.qmp.execute('blockdev-mirror', {
        'job-id': 'mirror0', device: 'disk0-fmt', target: 'scratch', sync: 'full',
        'copy-mode': 'write-blocking', speed: 4 * 1024 * 1024, 'buf-size': 1024 * 1024,
      });
    }
    const progress = async (g: Guest) => (await g.qmp.execute('query-jobs')).find((j) => j.id === 'mirror0')!['current-progress'];

    // The window starts and ends with the guests paused: `stop` drains in-flight requests,
    // so QEMU's completion counts and the probes' submission counts describe the same requests.
    const all = [busy, calm, writer];
    await Promise.all(all.map((g) => g.qmp.execute('stop')));
    const from = await reportAfterNow(busy);
    const before = await Promise.all(all.map((g) => blockstats(g.qmp)));
    const copiedBefore = await Promise.all([progress(busy), progress(calm)]);
    await Promise.all(all.map((g) => g.qmp.execute('cont')));
    await sleep(4500); // at least one busy phase of the bursty guest
    await Promise.all(all.map((g) => g.qmp.execute('stop')));
    const to = await reportAfterNow(busy);
    const afterStats = await Promise.all(all.map((g) => blockstats(g.qmp)));
    const copiedAfter = await Promise.all([progress(busy), progress(calm)]);
    await Promise.all(all.map((g) => g.qmp.execute('cont')));

    const busyWindow = of(busy, from, to);
    ok(busyWindow.length >= 40, `${busyWindow.length} samples in the window`);
    equal(sum(busyWindow, 'diskReads'), afterStats[0]!.reads - before[0]!.reads);
    equal(sum(busyWindow, 'diskWrites'), afterStats[0]!.writes - before[0]!.writes);
    equal(sum(busyWindow, 'diskFlushes'), afterStats[0]!.flushes - before[0]!.flushes);
    t.diagnostic(`busy guest, window of ${busyWindow.length} samples: probes ${sum(busyWindow, 'diskReads')} reads / ${sum(busyWindow, 'diskWrites')} writes / ${sum(busyWindow, 'diskFlushes')} flushes; ` +
      `query-blockstats ${afterStats[0]!.reads - before[0]!.reads} / ${afterStats[0]!.writes - before[0]!.writes} / ${afterStats[0]!.flushes - before[0]!.flushes}; ` +
      `mirror copied ${copiedAfter[0]! - copiedBefore[0]!} + ${copiedAfter[1]! - copiedBefore[1]!} bytes meanwhile`);
    ok(sum(busyWindow, 'diskReads') > 100, `the busy guest did disk I/O (${sum(busyWindow, 'diskReads')} reads)`);
    const w = of(writer, from, to);
    t.diagnostic(`writer guest: probes ${sum(w, 'diskReads')} / ${sum(w, 'diskWrites')} / ${sum(w, 'diskFlushes')}; ` +
      `query-blockstats ${afterStats[2]!.reads - before[2]!.reads} / ${afterStats[2]!.writes - before[2]!.writes} / ${afterStats[2]!.flushes - before[2]!.flushes}`);
    equal(sum(w, 'diskReads'), afterStats[2]!.reads - before[2]!.reads);
    equal(sum(w, 'diskWrites'), afterStats[2]!.writes - before[2]!.writes);
    equal(sum(w, 'diskFlushes'), afterStats[2]!.flushes - before[2]!.flushes);
    ok(sum(w, 'diskFlushes') >= 50, 'the writer flushed');
    // the idle guest made no request at all, although its disk was being copied
    const calmWindow = of(calm, from, to);
    equal(sum(calmWindow, 'diskReads') + sum(calmWindow, 'diskWrites') + sum(calmWindow, 'diskFlushes'), 0);
    equal(afterStats[1]!.reads - before[1]!.reads, 0);
    for (const i of [0, 1]) ok(copiedAfter[i]! > copiedBefore[i]!, `mirror job ${i} copied data during the window`);

    for (const g of [busy, calm]) await g.qmp.execute('job-cancel', { id: 'mirror0' });
  });

  it('counts interrupts that rise with guest disk load and are near zero at idle', async (t) => {
    await sleep(4500); // a full idle + busy cycle of the bursty guest
    const list = of(busy);
    // classify by disk activity, dropping samples next to a change (phase edges)
    const active = (i: number) => (list[i]!.diskReads ?? 0) + (list[i]!.diskWrites ?? 0) > 0;
    const idle: ActivitySample[] = [];
    const loaded: ActivitySample[] = [];
    for (let i = 1; i < list.length - 1; i++) {
      if (!active(i - 1) && !active(i) && !active(i + 1)) idle.push(list[i]!);
      if (active(i - 1) && active(i) && active(i + 1)) loaded.push(list[i]!);
    }
    const rate = (l: ActivitySample[]) => sum(l, 'interrupts') / l.reduce((t, s) => t + s.intervalS, 0);
    t.diagnostic(`interrupts/s: busy phases ${rate(loaded).toFixed(0)}, idle phases ${rate(idle).toFixed(1)}, idle guest ${rate(of(calm)).toFixed(1)}`);
    ok(idle.length >= 10 && loaded.length >= 10, `${idle.length} idle and ${loaded.length} loaded samples`);
    ok(rate(loaded) > 200, `busy: ${rate(loaded).toFixed(0)} interrupts/s`);
    ok(rate(idle) < 10, `idle phases: ${rate(idle).toFixed(1)} interrupts/s`);
    ok(rate(of(calm)) < 10, `idle guest: ${rate(of(calm)).toFixed(1)} interrupts/s`);
  });

  it('counts exactly the key and pointer events injected, for the guest that got them only, and never shows what was typed', async () => {
    const keys = typeText(SECRET_TEXT);
    const pointer = pointerEvents();
    const start = samples.length;
    await calm.qmp.execute('input-send-event', { events: [...keys.slice(0, 10), ...pointer.slice(0, 3)] });
    await calm.qmp.execute('input-send-event', { events: [...keys.slice(10), ...pointer.slice(3)] });
    const end = await reportAfterNow(calm);
    equal(sum(of(calm, start, end), 'keyEvents'), keys.length);
    equal(sum(of(calm, start, end), 'pointerEvents'), pointer.length);
    equal(sum(of(calm), 'keyEvents'), keys.length, 'no other key event since the probes attached');
    for (const g of [busy, writer]) equal(sum(of(g), 'keyEvents') + sum(of(g), 'pointerEvents'), 0);

    // privacy: neither the samples nor the debug log hold the text, a word of it, or a key name
    const outputs = JSON.stringify(samples) + (await readFile(logFile, 'utf8'));
    for (const needle of [SECRET_TEXT, ...SECRET_TEXT.split(' '), 'qcode', '"spc"']) {
      ok(!outputs.includes(needle), `output must not contain ${JSON.stringify(needle)}`);
    }
  });
});
