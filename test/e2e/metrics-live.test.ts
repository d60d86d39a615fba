/**
 * Metrics end to end: a real moderated encryption of a guest with busy and idle phases,
 * written to a real influxd, read back through every dashboard panel's query; InfluxDB
 * killed in the middle of a run; `observe --influx`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { InfluxDB } from 'influx';
import { ensureImage, makeDiskImage, startTestVm, type TestVm } from '../../vm-images/launch.ts';
import { HISTOGRAM_BOUNDARIES } from '../../src/controller/latency.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { hostTag } from '../../src/metrics/index.ts';
import { jsonLines, runCli, startCli } from '../helpers/cli.ts';
import { startInfluxd, type Influxd } from '../helpers/influxd.ts';
import { assertEveryPanelReturnsData, loadDashboard } from '../dashboards/assert-panels.ts';
import { stopGuestsAfterEachTest } from '../helpers/guests.ts';

let dir: string;
let db: Influxd;
const vms: TestVm[] = [];

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-live-'));
  await writeFile(path.join(dir, 'key'), 'live-metrics-key', { mode: 0o600 });
  db = await startInfluxd();
});
stopGuestsAfterEachTest(vms);
after(async () => {
  await Promise.all(vms.map((v) => v.stop()));
  await db?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function boot(name: string, sizeMiB: number, workload: 'bursty' | 'idle' | 'trickle', params: Record<string, number> = {}): Promise<{ vm: TestVm; disk: string }> {
  const disk = path.join(dir, `${name}.raw`);
  await makeDiskImage(disk, { sizeMiB, format: 'raw', fill: 'sparse' });
  await mkdir(path.join(dir, name));
  const vm = await startTestVm({ name, disk, dir: path.join(dir, name), workload, params });
  vms.push(vm);
  await vm.ready;
  return { vm, disk };
}

/** A policy with a capped idle speed, so that the copy spans busy and idle phases. */
async function policy(name: string, idle: string, extra = ''): Promise<string> {
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, `speed:\n  idle: ${idle}\nholdoff: 500ms\n${extra}`);
  return file;
}

const count = async (q: string): Promise<number> => Number((await db.query(q, 'idlecrypt')).results[0]?.series?.[0]?.values[0]?.[1] ?? 0);

describe('metrics', () => {
  test('after a real moderated encryption with busy and idle phases, every dashboard panel returns data', async () => {
    // The guest rewrites a 16 MiB region in busy phases; the job copies ~100 MiB in each
    // idle phase, so the copy converges within a few cycles. (With a region larger than an
    // idle phase's worth of copying it would not, until the policy's deadline.)
    const { vm } = await boot('live', 256, 'bursty', { idle: 3, busy: 2, region_mb: 16 });
    // A few keys typed into the guest once the copy runs (the probes are attached by then;
    // keys typed while the command starts may precede them), not throughout, which would
    // keep the guest busy and the job paused until the deadline: the keyboard panel must
    // see them.
    const cli = startCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', path.join(dir, 'live.luks'), '--key-file', path.join(dir, 'key'), '--iter-time', '50', '--policy', await policy('live', '48MiB', 'latency:\n  margin: 15%\n'), '--influx', db.influxUrl('idlecrypt'), '--json']);
    await cli.waitForStdout(/"phase":"copying"/, 60_000);
    const typer = await QmpClient.connect(vm.qmpSocket);
    try {
      for (let i = 0; i < 6; i++) {
        for (const down of [true, false]) await typer.execute('input-send-event', { events: [{ type: 'key', data: { down, key: { type: 'qcode', data: 'a' } } }] });
        await new Promise((resolve) => setTimeout(resolve, 300));
      }
    } finally {
      await typer.close();
    }
    const run = await cli.result;
    assert.equal(run.code, 0, run.stderr);
    const done = JSON.parse(run.stdout.trim().split('\n').at(-1)!);
    assert.equal(done.event, 'completed');
    assert.equal(done.metrics.dropped, 0);
    assert.ok(done.metrics.delivered > 100, `delivered ${done.metrics.delivered}`);

    // The host row is the agent's (idlecrypt_agent): an `encrypt` run fills every other panel.
    const check = await assertEveryPanelReturnsData(new InfluxDB(db.influxUrl('idlecrypt')), loadDashboard(), { host: hostTag(), vm: 'live', device: 'disk0' }, { runOnly: true });
    console.log(`live dashboard check: ${check.panelsWithData} of ${check.panels} panels, ${check.queries.length} queries returned data`);
    assert.equal(check.panelsWithData, check.panels);

    // The series say what happened: the guest was busy and idle, keys were counted.
    assert.ok((await count(`SELECT count("busy") FROM "idlecrypt_moderation" WHERE "vm" = 'live' AND "busy" = 1`)) > 0, 'busy states recorded');
    assert.ok((await count(`SELECT count("busy") FROM "idlecrypt_moderation" WHERE "vm" = 'live' AND "busy" = 0`)) > 0, 'idle states recorded');
    assert.ok((await count(`SELECT sum("key_events") FROM "idlecrypt_activity" WHERE "vm" = 'live'`)) >= 4, 'typed keys counted');
    // latency.margin is on: the guest's latency as QEMU accounts it (query-blockstats) is written
    assert.ok((await count(`SELECT min("latency_ms") FROM "idlecrypt_moderation" WHERE "vm" = 'live'`)) > 0, 'guest latency recorded');
    // ...as the median of QEMU's latency histogram, which the job had QEMU keep on the guest's device
    const statistics = new Set(run.stdout.split('\n').filter((l) => l.includes('"latency_statistic"')).map((l) => JSON.parse(l).latency_statistic));
    assert.ok(statistics.has('median'), `latency statistics shown: ${[...statistics].join(', ')}`);
    const qmp = await QmpClient.connect(vm.qmpSocket);
    try {
      const dev = (await qmp.execute('query-blockstats')).find((x) => x.qdev?.includes('/disk0/'));
      assert.deepEqual(dev?.stats.wr_latency_histogram?.boundaries, HISTOGRAM_BOUNDARIES);
    } finally {
      await qmp.close();
    }
    assert.ok((await count(`SELECT max("bytes_done") FROM "idlecrypt_job" WHERE "vm" = 'live'`)) >= 256 * 1024 * 1024);
    // The disk is in the host's page cache (writeback, QEMU's default); the copy is not: the
    // storage daemon (the default encrypter) writes it with O_DIRECT (copyCache), so policy
    // target.flush has nothing to flush. (Through the guest's QEMU the target inherited the
    // page cache and was flushed every 64 MiB: test/encrypt/writeback.test.ts.)
    const opened = run.stderr.split('\n').filter((l) => l.includes('target opened in qemu-storage-daemon')).map((l) => JSON.parse(l) as { direct?: boolean });
    assert.deepEqual(opened.map((o) => o.direct), [true], 'the daemon opened the target with O_DIRECT');
    const flushes = run.stderr.split('\n').filter((l) => l.includes('"msg":"target flushes during the copy"'));
    assert.deepEqual(flushes, [], 'no flushes of an O_DIRECT copy');
  });

  test('latency.margin also judges an idle guest that still writes: beside a trickle its thresholds let through, the idle copy is graded by the median, and completes', async () => {
    // 20 flushed 4 KiB writes a second, no busy phase in the test's time; thresholds high
    // enough that the trickle counts as idle (as `thresholds: auto` learns to call it)
    const { vm } = await boot('trickle', 256, 'trickle', { wps: 20, idle: 1000, busy: 1 });
    const file = path.join(dir, 'trickle.yaml');
    await writeFile(file, 'thresholds:\n  disk: 100000\n  interrupts: 100000000\nspeed:\n  idle: 64MiB\nlatency:\n  margin: 15%\n');
    const run = await runCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', path.join(dir, 'trickle.luks'), '--key-file', path.join(dir, 'key'), '--iter-time', '50', '--policy', file, '--influx', db.influxUrl('idlecrypt'), '--json']);
    assert.equal(run.code, 0, run.stderr);
    const records = jsonLines(run.stdout);
    assert.equal(records.at(-1)!.event, 'completed');
    const judged = records.filter((r) => r.event === 'progress' && r.state === 'idle' && r.latency_scope === 'idle');
    const seen = [...new Set(judged.map((r) => `${String(r.mode)} ${String(r.latency_phase)}`))];
    // its baseline is learnt with the copy paused, then the copy is graded from the idle speed
    assert.ok(judged.some((r) => r.latency_phase === 'learning' && r.mode === 'paused'), `idle judgements: ${seen.join(', ')}`);
    assert.ok(judged.some((r) => r.latency_phase === 'graded' && r.mode !== 'paused' && r.latency_statistic === 'median'), `idle judgements: ${seen.join(', ')}`);
    assert.ok((await count(`SELECT count("latency_ms") FROM "idlecrypt_moderation" WHERE "vm" = 'trickle' AND "busy" = 0`)) > 0, 'idle judgements in the metrics');
    console.log(`trickle: idle judgements ${seen.join(', ')}`);
  });

  test('InfluxDB killed mid-run: the copy finishes on time, memory stays bounded, metrics resume when it returns', async () => {
    const { vm } = await boot('outage', 256, 'idle');
    // 256 MiB at 32 MiB/s: 8 s of copying, with InfluxDB gone for 3 s in the middle.
    const cli = startCli(['encrypt', '--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', path.join(dir, 'outage.luks'), '--key-file', path.join(dir, 'key'), '--iter-time', '50', '--policy', await policy('outage', '32MiB'), '--influx', db.influxUrl('idlecrypt'), '--json']);
    await cli.waitForStdout(/"event":"phase","phase":"copying"/);
    const copyStart = Date.now();
    let maxRssKiB = 0;
    const rss = setInterval(() => {
      void readFile(`/proc/${cli.child.pid}/status`, 'utf8').then((s) => (maxRssKiB = Math.max(maxRssKiB, Number(/VmRSS:\s+(\d+)/.exec(s)?.[1] ?? 0))), () => {});
    }, 100);
    await new Promise((r) => setTimeout(r, 2000));
    await db.kill();
    await new Promise((r) => setTimeout(r, 3000));
    await db.restart();
    const back = Date.now();
    const res = await cli.result;
    clearInterval(rss);
    const copyS = (Date.now() - copyStart) / 1000;
    assert.equal(res.code, 0, res.stderr);
    // On time: the copy's own pace (8 s at the capped speed) plus slack for TCG; an encrypt
    // that waited on InfluxDB would add the outage and its retries.
    assert.ok(copyS < 14, `copy took ${copyS.toFixed(1)} s`);
    assert.ok(maxRssKiB > 0 && maxRssKiB < 300 * 1024, `max RSS ${maxRssKiB} KiB`);
    const warnings = res.stderr.split('\n').filter((l) => /"level":40/.test(l) && /influx/i.test(l));
    assert.equal(warnings.length, 1, `one warning about InfluxDB, got: ${warnings.join('\n')}`);
    const done = JSON.parse(res.stdout.trim().split('\n').at(-1)!);
    assert.ok(done.metrics.buffered <= done.metrics.max_buffer);
    const after = await count(`SELECT count("bytes_done") FROM "idlecrypt_job" WHERE "vm" = 'outage' AND time > ${back * 1e6}`);
    assert.ok(after > 0, 'job readings written after InfluxDB came back arrived');
    console.log(`outage: copy ${copyS.toFixed(1)} s, max RSS ${(maxRssKiB / 1024).toFixed(0)} MiB, delivered ${done.metrics.delivered}, dropped ${done.metrics.dropped}, ${after} job points after the restart`);
  });

  test('observe --influx sends every sample with the VM name', async () => {
    const { vm } = await boot('watched', 64, 'idle');
    const r = await runCli(['observe', '--pid', String(vm.pid), '--duration', '2', '--interval', '100', '--json', '--influx', db.influxUrl('idlecrypt')]);
    assert.equal(r.code, 0, r.stderr);
    const printed = r.stdout.trim().split('\n').length;
    const stored = await count(`SELECT count("interval_s") FROM "idlecrypt_activity" WHERE "vm" = 'watched'`);
    assert.equal(stored, printed, 'every printed sample is in InfluxDB');
    assert.ok(stored >= 15);
  });
});
