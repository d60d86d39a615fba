/** Every panel of the committed dashboard returns data from a real influxd, after a realistic run written through InfluxSink. */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { InfluxDB } from 'influx';
import { checkPanels, variableQueries } from '../../dashboards/queries.ts';
import { InfluxSink } from '../../src/metrics/influx-sink.ts';
import { startInfluxd, type Influxd } from '../helpers/influxd.ts';
import { scenario } from '../metrics/scenario.ts';
import { assertEveryPanelReturnsData, loadDashboard } from './assert-panels.ts';

describe('dashboard queries against influxd', () => {
  let db: Influxd;
  let influx: InfluxDB;
  const dashboard = loadDashboard();

  before(async () => {
    db = await startInfluxd();
    // Two VMs on one host, a minute each, written as a run would write them.
    const sink = new InfluxSink(db.influxUrl('idlecrypt'), { flushIntervalMs: 100 });
    const end = Date.now() - 1000;
    sink.write(scenario({ vm: 'web1', device: 'disk0', endMs: end }));
    // db1 with `thresholds: auto` and `latency.margin: 15%`: its learnt levels and the
    // thresholds made of them; its latency, baseline and limit
    sink.write(scenario({ vm: 'db1', device: 'disk1', endMs: end - 20_000, learnt: { disk: 22, interrupts: 1800 }, latency: { baselineMs: 2, margin: 0.15 } }));
    await sink.close();
    assert.equal(sink.stats().dropped + sink.stats().rejected, 0);
    influx = new InfluxDB(db.influxUrl('idlecrypt'));
  });

  after(async () => {
    await db?.stop();
  });

  test('every panel query returns data for all VMs (multi-value variables), and for one VM and disk', async (t) => {
    // db1 learns its thresholds: with it, the learnt levels' queries must return data too
    const all = await assertEveryPanelReturnsData(influx, dashboard, { vm: ['web1', 'db1'] }, { optionalToo: true });
    const one = await assertEveryPanelReturnsData(influx, dashboard, { host: 'hv1', vm: 'web1', device: 'disk0' });
    assert.deepEqual(
      one.empty.map((q) => q.raw.match(/"((?:learnt|latency)_\w+)"/)?.[1]).sort(),
      ['latency_baseline_ms', 'latency_limit_ms', 'latency_ms', 'learnt_disk_level_per_s', 'learnt_interrupts_level_per_s'],
      'web1 has fixed thresholds and no latency control: its learnt levels and latency are the only empty queries',
    );
    // the latency panel plots only what latency.margin writes: for web1 it is not counted as missing
    assert.equal(one.policyOnly, 1);
    assert.equal(one.panelsWithData, one.panels);
    assert.equal(all.policyOnly, 0);
    await assert.rejects(
      assertEveryPanelReturnsData(influx, dashboard, { host: 'hv1', vm: 'web1', device: 'disk0' }, { optionalToo: true }),
      /learnt_disk_level_per_s/,
    );
    t.diagnostic(`${all.panelsWithData} of ${all.panels} panels (${all.queries.length} queries) returned data; one VM: ${one.panelsWithData} of ${one.panels}`);
    assert.equal(all.panelsWithData, all.panels);
    // Grouped by VM: both VMs' series come back where a query groups by vm.
    const state = all.queries.find((q) => q.raw.includes('"state_code"'))!;
    assert.equal(state.series, 2);
  });

  test('the panels show the run: busy, hold-off and idle states; paused and running; ebpf and qmp; thresholds at the policy values', async () => {
    const byField = async (field: string, vars = { vm: 'web1' }) => {
      const check = await checkPanels(influx, dashboard, vars);
      const q = check.queries.find((x) => x.raw.includes(`"${field}"`))!;
      const res = (await influx.queryRaw(q.query)) as { results: { series: { columns: string[]; values: unknown[][] }[] }[] };
      const s = res.results[0]!.series[0]!;
      // An aliased column carries the field's name (AS "paused"); a lone last() is column 1.
      const col = s.columns.includes(field) ? s.columns.indexOf(field) : 1;
      return new Set(s.values.map((row) => row[col]).filter((v) => v !== null));
    };
    assert.deepEqual([...(await byField('state_code'))].sort(), [0, 1, 2]);
    assert.deepEqual([...(await byField('threshold_disk_requests_per_s'))], [5]);
    assert.deepEqual([...(await byField('threshold_interrupts_per_s'))], [1000]);
    assert.deepEqual([...(await byField('source'))].sort(), ['ebpf', 'qmp']);
    assert.deepEqual([...(await byField('paused'))].sort(), [0, 1]);
    // a fixed threshold draws no learnt level; a learnt one draws both, and the threshold moves once learnt
    assert.deepEqual([...(await byField('learnt_disk_level_per_s').catch(() => new Set()))], []);
    assert.deepEqual([...(await byField('learnt_disk_level_per_s', { vm: 'db1' }))], [22]);
    assert.deepEqual([...(await byField('learnt_interrupts_level_per_s', { vm: 'db1' }))], [1800]);
    assert.deepEqual([...(await byField('threshold_disk_requests_per_s', { vm: 'db1' }))].sort((a, b) => Number(a) - Number(b)), [5, 33]);
    assert.deepEqual([...(await byField('threshold_interrupts_per_s', { vm: 'db1' }))].sort((a, b) => Number(a) - Number(b)), [1000, 2700]);
    // latency.margin: the baseline and the limit over it are drawn; the latency while busy
    assert.deepEqual([...(await byField('latency_baseline_ms', { vm: 'db1' }))], [2]);
    assert.deepEqual([...(await byField('latency_limit_ms', { vm: 'db1' }))], [2.3]);
    const lat = [...(await byField('latency_ms', { vm: 'db1' }))].map(Number);
    assert.ok(lat.length > 0 && lat.every((v) => v >= 2 && v <= 2.16), String(lat));
    assert.deepEqual([...(await byField('latency_ms').catch(() => new Set()))], []);
  });

  test("the variables' queries list the hosts, VMs and disks", async () => {
    const values = async (name: string, vars: Record<string, string | string[]>) => {
      const q = variableQueries(dashboard, vars).find((v) => v.name === name)!;
      const res = (await influx.queryRaw(q.query)) as { results: { series?: { values: [string, string][] }[] }[] };
      return (res.results[0]!.series?.[0]?.values ?? []).map((v) => v[1]).sort();
    };
    assert.deepEqual(await values('host', {}), ['hv1']);
    assert.deepEqual(await values('vm', { host: 'hv1' }), ['db1', 'web1']);
    assert.deepEqual(await values('device', { host: 'hv1', vm: ['web1', 'db1'] }), ['disk0', 'disk1']);
    assert.deepEqual(await values('device', { host: 'hv1', vm: 'web1' }), ['disk0']);
  });

  test('the check can fail: for a VM with no data no per-VM panel returns data (the host panels read the agent\'s points), and the assertion names them', async () => {
    const check = await checkPanels(influx, dashboard, { vm: 'nope' });
    const hostWide = check.queries.filter((q) => q.raw.includes('"idlecrypt_agent"'));
    assert.equal(hostWide.length, 4, 'the host row\'s queries');
    assert.equal(check.empty.length, check.queries.length - hostWide.length);
    await assert.rejects(assertEveryPanelReturnsData(influx, dashboard, { vm: 'nope' }), /panels returned no data/);
    // and for a host with no data, none at all
    const none = await checkPanels(influx, dashboard, { host: 'nohost' });
    assert.equal(none.panelsWithData, 0);
    assert.equal(none.empty.length, none.queries.length);
  });
});
