/** Dashboards as code: the committed JSON is what the generator writes, and it agrees with names.ts and the provisioning files. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { renderDashboards } from '../../dashboards/generate.ts';
import { DATASOURCE } from '../../dashboards/influxql.ts';
import { fillQuery, panelQueries, variableQueries } from '../../dashboards/queries.ts';
import { learntField, MEASUREMENTS, SIGNAL_RATE_FIELD, thresholdField, type MeasurementSpec } from '../../src/metrics/names.ts';
import { isLearnable, SIGNALS } from '../../src/policy/schema.ts';
import { loadDashboard } from './assert-panels.ts';

const pexec = promisify(execFile);
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const JSON_DIR = path.join(ROOT, 'dashboards/json');
const dashboard = loadDashboard();
const ALL = panelQueries(dashboard, {});

function spec(name: string): MeasurementSpec {
  const m = Object.values(MEASUREMENTS).find((x) => x.name === name);
  assert.ok(m, `measurement ${name} is in names.ts`);
  return m;
}

describe('dashboards', () => {
  test('regenerating the dashboards (the generator CLI, into a temp dir) changes no byte of the committed JSON', async () => {
    const out = await fs.mkdtemp(path.join(tmpdir(), 'idlecrypt-dashboards-'));
    try {
      const { stdout } = await pexec(process.execPath, ['--import', 'tsx', 'dashboards/generate.ts', '--out', out], { cwd: ROOT });
      assert.match(stdout, /wrote .*idlecrypt\.json/);
      const generated = (await fs.readdir(out)).sort();
      const committed = (await fs.readdir(JSON_DIR)).filter((f) => f.endsWith('.json')).sort();
      assert.deepEqual(generated, committed);
      for (const f of generated) assert.ok((await fs.readFile(path.join(out, f))).equals(await fs.readFile(path.join(JSON_DIR, f))), `${f} differs: run node --import tsx dashboards/generate.ts`);
      // And twice in one process gives the same text (no clocks, no random ids).
      assert.deepEqual(renderDashboards(), renderDashboards());
    } finally {
      await fs.rm(out, { recursive: true, force: true });
    }
  });

  test('every target is raw InfluxQL on the provisioned datasource, filtered by $timeFilter, grouped by $__interval where it groups by time', () => {
    assert.ok(ALL.length >= 15, `${ALL.length} queries`);
    const d = dashboard as { panels: { type: string; datasource?: unknown; targets?: { rawQuery?: boolean; datasource?: unknown; resultFormat?: string }[] }[] };
    for (const p of d.panels.filter((x) => x.type !== 'row')) {
      assert.deepEqual(p.datasource, DATASOURCE);
      for (const t of p.targets ?? []) {
        assert.equal(t.rawQuery, true);
        assert.deepEqual(t.datasource, DATASOURCE);
        assert.ok(t.resultFormat === 'time_series' || t.resultFormat === 'table');
      }
    }
    for (const q of ALL) {
      assert.match(q.raw, /\$timeFilter/, q.raw);
      if (/GROUP BY time\(/.test(q.raw)) assert.match(q.raw, /GROUP BY time\(\$__interval\)/, q.raw);
    }
  });

  test('every measurement, field and tag a query names is one of names.ts', () => {
    for (const q of ALL) {
      const m = spec(/FROM "([^"]+)"/.exec(q.raw)![1]!);
      const selectPart = /^SELECT (.*) FROM /.exec(q.raw)![1]!.replace(/ AS "[^"]+"/g, '');
      for (const [, f] of selectPart.matchAll(/"([^"]+)"/g)) assert.ok(f! in m.fields, `${m.name}.${f} in: ${q.raw}`);
      const rest = q.raw.slice(q.raw.indexOf(' WHERE '));
      for (const [, t] of rest.matchAll(/"([^"]+)"/g)) assert.ok(t! in m.tags, `tag ${t} of ${m.name} in: ${q.raw}`);
    }
  });

  test('each policy signal has a panel with its rate and its threshold; state, speed, progress, ETA and probe health are drawn', () => {
    const fieldsOf = (panel: string) => ALL.filter((q) => q.panel === panel).map((q) => q.raw).join('\n');
    const panels = [...new Set(ALL.map((q) => q.panel))];
    for (const s of SIGNALS) {
      const p = panels.find((t) => fieldsOf(t).includes(`"${SIGNAL_RATE_FIELD[s]}"`));
      assert.ok(p, `a panel for ${s}`);
      assert.ok(fieldsOf(p).includes(`"${thresholdField(s)}"`), `${p} draws the ${s} threshold`);
      if (isLearnable(s)) assert.ok(fieldsOf(p).includes(`"${learntField(s)}"`), `${p} draws the ${s} level learnt with thresholds: auto`);
    }
    const needs: [string, string][] = [
      ['state-timeline', '"state_code"'],
      ['timeseries', '"speed_set_bps"'],
      ['timeseries', '"speed_actual_bps"'],
      ['timeseries', '"percent"'],
      ['timeseries', '"bytes_done"'],
      ['stat', '"eta_s"'],
      ['state-timeline', '"source"'],
      ['state-timeline', '"degraded"'],
      ['timeseries', '"restarts"'],
      ['table', '"reason"'],
    ];
    for (const [type, field] of needs) assert.ok(ALL.some((q) => q.type === type && q.raw.includes(field)), `a ${type} panel with ${field}`);
  });

  test('the template variables: host, vm (from idlecrypt_activity) and device, multi-value with All, on the provisioned datasource', () => {
    const vars = (dashboard as { templating: { list: { name: string; query: string; multi: boolean; includeAll: boolean; datasource: unknown }[] } }).templating.list;
    assert.deepEqual(vars.map((v) => v.name), ['host', 'vm', 'device']);
    for (const v of vars) {
      assert.equal(v.multi, true);
      assert.equal(v.includeAll, true);
      assert.deepEqual(v.datasource, DATASOURCE);
    }
    assert.match(vars[1]!.query, /^SHOW TAG VALUES FROM "idlecrypt_activity" WITH KEY = "vm"/);
    assert.equal(variableQueries(dashboard, { host: 'hv1' })[1]!.query, 'SHOW TAG VALUES FROM "idlecrypt_activity" WITH KEY = "vm" WHERE "host" =~ /^hv1$/');
  });

  test('macro filling as Grafana does it: several values as (a|b), regex characters escaped, All as .*, and nothing left unfilled', () => {
    const raw = 'SELECT last("x") FROM "m" WHERE "host" =~ /^$host$/ AND "vm" =~ /^$vm$/ AND $timeFilter GROUP BY time($__interval) fill(none)';
    assert.equal(
      fillQuery(raw, { vm: ['web1', 'db.1'], host: [] }),
      'SELECT last("x") FROM "m" WHERE "host" =~ /^.*$/ AND "vm" =~ /^(web1|db\\.1)$/ AND time > now() - 1h GROUP BY time(1s) fill(none)',
    );
    assert.equal(fillQuery(raw, { vm: 'a/b', host: 'h' }, { timeFilter: 'time > 0', interval: '5s' }).includes('/^a\\/b$/ AND time > 0 GROUP BY time(5s)'), true);
    assert.throws(() => fillQuery('SELECT x FROM m WHERE "vm" = \'$vm\'', { vm: 'a' }), /cannot fill \$vm/);
    for (const q of ALL) assert.doesNotMatch(q.query, /\$[A-Za-z_{[]/, q.query);
  });

  test('the README lists every panel and variable', () => {
    const readme = readFileSync(path.join(ROOT, 'dashboards/README.md'), 'utf8');
    const d = dashboard as { panels: { title: string }[]; templating: { list: { name: string; query: string }[] } };
    for (const p of d.panels) assert.ok(readme.includes(`| ${p.title} |`) || readme.includes(`| **${p.title}** |`), p.title);
    for (const v of d.templating.list) assert.ok(readme.includes(`| \`${v.name}\` | \`${v.query}\` |`), v.name);
  });

  test('the provisioning files: an InfluxQL datasource on database idlecrypt with the uid the panels use, and a file provider, each saying where it goes', () => {
    const dsText = readFileSync(path.join(ROOT, 'dashboards/provisioning/datasources/idlecrypt.yaml'), 'utf8');
    const ds = parseYaml(dsText) as { apiVersion: number; datasources: Record<string, unknown>[] };
    assert.equal(ds.apiVersion, 1);
    assert.equal(ds.datasources.length, 1);
    const d = ds.datasources[0]!;
    assert.deepEqual(
      { uid: d.uid, type: d.type, access: d.access, url: d.url, jsonData: d.jsonData },
      { uid: DATASOURCE.uid, type: 'influxdb', access: 'proxy', url: 'http://127.0.0.1:8086', jsonData: { version: 'InfluxQL', dbName: 'idlecrypt', httpMode: 'GET', timeInterval: '1s' } },
    );
    assert.match(dsText, /\/etc\/grafana\/provisioning\/datasources\//);

    const provText = readFileSync(path.join(ROOT, 'dashboards/provisioning/dashboards/idlecrypt.yaml'), 'utf8');
    const prov = parseYaml(provText) as { apiVersion: number; providers: { type: string; options: { path: string } }[] };
    assert.equal(prov.apiVersion, 1);
    assert.equal(prov.providers[0]!.type, 'file');
    const where = prov.providers[0]!.options.path;
    assert.match(provText, /\/etc\/grafana\/provisioning\/dashboards\//);
    assert.ok(provText.includes(`ln -s "$PWD/dashboards/json" ${where}`), 'says how to put the JSON where the provider reads it');
  });
});
