/** The metric names: README against names.ts, the builders' arithmetic, line protocol, --influx URLs. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { IdlecryptError } from '../../src/errors.ts';
import { parseInfluxUrl } from '../../src/metrics/influx-url.ts';
import { fileHeader, toLineProtocol } from '../../src/metrics/line-protocol.ts';
import { activityPoint, jobPoint, MEASUREMENTS, moderationPoint, point, SIGNAL_RATE_FIELD, thresholdField } from '../../src/metrics/names.ts';
import { SIGNALS } from '../../src/policy/schema.ts';
import { EXAMPLE_POINTS } from './examples.ts';

const README = readFileSync(new URL('../../src/metrics/README.md', import.meta.url), 'utf8');

interface DocSection {
  tags: Map<string, string[]>;
  fields: Map<string, string[]>;
}

/** The README's `### \`name\`` sections and the backticked first cell of each table row in them. */
function documentedMeasurements(): Map<string, DocSection> {
  const out = new Map<string, DocSection>();
  const sections = README.split(/^### /m).slice(1);
  for (const sec of sections) {
    const name = /^`([^`]+)`/.exec(sec)?.[1];
    if (!name) continue;
    const doc: DocSection = { tags: new Map(), fields: new Map() };
    let table: 'tags' | 'fields' | null = null;
    for (const line of sec.split('\n')) {
      if (/^\| tag \|/.test(line)) table = 'tags';
      else if (/^\| field \|/.test(line)) table = 'fields';
      const row = /^\| `([^`]+)` \|(.*)\|$/.exec(line);
      if (row && table) doc[table].set(row[1]!, row[2]!.split('|').map((c) => c.trim()));
      if (line.startsWith('## ')) break;
    }
    out.set(name, doc);
  }
  return out;
}

describe('metrics docs', () => {
  test('the README documents exactly the measurements, tags and fields of names.ts, with their types and units', () => {
    const docs = documentedMeasurements();
    assert.deepEqual([...docs.keys()].sort(), Object.values(MEASUREMENTS).map((m) => m.name).sort());
    for (const m of Object.values(MEASUREMENTS)) {
      const d = docs.get(m.name)!;
      assert.deepEqual([...d.tags.keys()].sort(), Object.keys(m.tags).sort(), `${m.name} tags`);
      assert.deepEqual([...d.fields.keys()].sort(), Object.keys(m.fields).sort(), `${m.name} fields`);
      for (const [name, t] of Object.entries(m.tags)) assert.equal(d.tags.get(name)![0], t.required ? 'yes' : 'no', `${m.name}.${name} required`);
      for (const [name, f] of Object.entries(m.fields)) {
        const [type, unit] = d.fields.get(name)!;
        assert.deepEqual({ type, unit }, { type: f.type, unit: f.unit }, `${m.name}.${name}`);
      }
    }
  });

  test("the README's example output is what the serialiser writes for the example points", () => {
    const block = /## Example output\n\n```text\n([\s\S]*?)\n```/.exec(README)?.[1];
    assert.ok(block, 'an "Example output" text block');
    assert.equal(block, EXAMPLE_POINTS.map(toLineProtocol).join('\n'));
    // Every measurement appears in it.
    for (const m of Object.values(MEASUREMENTS)) assert.ok(block.includes(`${m.name},`), m.name);
  });

  test('field names carry their unit: rates end in _per_s or _bps, durations in _s, sizes start with bytes_', () => {
    for (const m of Object.values(MEASUREMENTS)) {
      for (const [name, f] of Object.entries(m.fields)) {
        assert.match(name, /^[a-z][a-z0-9_]*$/, `${m.name}.${name} is snake_case`);
        if (f.unit.endsWith('/s') && f.unit !== 'bytes/s') assert.match(name, /_per_s$/, `${m.name}.${name}`);
        if (f.unit === 'bytes/s') assert.match(name, /_bps$/, `${m.name}.${name}`);
        if (f.unit === 's') assert.match(name, /_s$/, `${m.name}.${name}`);
        if (f.unit === 'bytes') assert.match(name, /^bytes_/, `${m.name}.${name}`);
        if (f.unit === '0/1') assert.equal(f.type, 'integer', `${m.name}.${name}`);
      }
    }
  });

  test("every policy signal has a rate field in idlecrypt_activity and a threshold field in idlecrypt_moderation", () => {
    for (const s of SIGNALS) {
      assert.ok(SIGNAL_RATE_FIELD[s] in MEASUREMENTS.activity.fields, s);
      assert.ok(thresholdField(s) in MEASUREMENTS.moderation.fields, s);
    }
  });
});

describe('point builders', () => {
  test('an activity sample: counts as integers, rates = count / interval, disk = reads + writes + flushes + discards', () => {
    const p = activityPoint(
      { host: 'hv1', vm: 'web1', time: 1000, intervalS: 0.05, source: 'ebpf' },
      { diskReads: 3, diskWrites: 1, diskFlushes: 0, diskDiscards: 1, keyEvents: 2, pointerEvents: 0, interrupts: 131 },
    )!;
    assert.deepEqual(p.tags, { host: 'hv1', source: 'ebpf', vm: 'web1' });
    assert.equal(p.fields.disk_requests_per_s, 100);
    assert.equal(p.fields.key_events_per_s, 40);
    assert.equal(p.fields.interrupts_per_s, 2620);
    assert.equal(p.fields.disk_reads, 3);
  });

  test('under the QMP fallback the unknown counters and their rates are absent, not 0', () => {
    const p = activityPoint(
      { host: 'hv1', vm: 'web1', time: 1000, intervalS: 0.05, source: 'qmp' },
      { diskReads: 0, diskWrites: 2, diskFlushes: 0, keyEvents: null, pointerEvents: null, interrupts: null },
    )!;
    assert.deepEqual(Object.keys(p.fields), ['disk_flushes', 'disk_reads', 'disk_requests_per_s', 'disk_writes', 'interval_s']);
    assert.equal(p.fields.disk_requests_per_s, 40);
  });

  test('a job at speed 0 is unlimited; percent is bytes_done / bytes_total; an unknown ETA is absent', () => {
    const p = jobPoint({ host: 'h', vm: 'v', device: 'disk0', time: 1 }, { speedSetBps: 0, paused: false, bytesDone: 1024, bytesTotal: 4096, etaS: null })!;
    assert.deepEqual(p.fields, { bytes_done: 1024, bytes_total: 4096, paused: 0, percent: 25, speed_set_bps: 0, unlimited: 1 });
    const q = jobPoint({ host: 'h', vm: 'v', device: 'disk0', time: 1 }, { speedSetBps: 20 * 1024 * 1024, paused: true, bytesDone: 0, bytesTotal: 0 })!;
    assert.deepEqual(q.fields, { bytes_done: 0, bytes_total: 0, paused: 1, speed_set_bps: 20971520, unlimited: 0 });
  });

  test('moderation: state_code idle 0, holdoff 1, busy 2; busy is 1 in busy and holdoff; an `off` threshold is absent', () => {
    const codes = (['idle', 'holdoff', 'busy'] as const).map((state) => {
      const p = moderationPoint({ host: 'h', vm: 'v', time: 1 }, { state, reason: 'r', thresholds: { disk: 5, keyboard: null, pointer: 100, interrupts: 1000, stall: 600, inflight: 600 } })!;
      assert.ok(!('threshold_key_events_per_s' in p.fields));
      assert.equal(p.fields.threshold_disk_requests_per_s, 5);
      assert.ok(!('device' in p.tags), 'device is optional');
      return [p.fields.state_code, p.fields.busy];
    });
    assert.deepEqual(codes, [[0, 0], [1, 1], [2, 1]]);
  });

  test('integers are rounded, non-finite numbers and nulls are left out, a point without fields is null', () => {
    const p = point('job', 5, { host: 'h', vm: 'v', device: 'd' }, { bytes_done: 10.6, percent: Number.NaN, eta_s: Number.POSITIVE_INFINITY, speed_actual_bps: null })!;
    assert.deepEqual(p.fields, { bytes_done: 11 });
    assert.equal(point('job', 5, { host: 'h', vm: 'v', device: 'd' }, { percent: Number.NaN }), null);
  });

  test('an empty required tag is written as `unknown`, never left out', () => {
    const p = point('probe', 5, { host: 'h', vm: '' }, { restarts: 0 })!;
    assert.equal(p.tags.vm, 'unknown');
  });
});

describe('line protocol', () => {
  test('tags in name order, fields in name order, integers with i, strings quoted, nanosecond time', () => {
    const p = point('job', 1_700_000_000_123.456, { host: 'h', vm: 'v', device: 'd' }, { status: 'running', speed_set_bps: 5, percent: 2.5 })!;
    assert.equal(toLineProtocol(p), 'idlecrypt_job,device=d,host=h,vm=v percent=2.5,speed_set_bps=5i,status="running" 1700000000123456000');
  });

  test('spaces, commas and equals signs in tags are escaped; quotes and backslashes in strings; newlines become spaces', () => {
    const p = point('moderation', 0, { host: 'a host', vm: 'vm,1=x', device: 'd' }, { reason: 'say "hi"\\\nnow', state: 'busy' })!;
    assert.equal(toLineProtocol(p), 'idlecrypt_moderation,device=d,host=a\\ host,vm=vm\\,1\\=x reason="say \\"hi\\"\\\\ now",state="busy" 0');
  });

  test('the file header is the two comment lines influx -import reads', () => {
    assert.equal(fileHeader('idlecrypt'), '# DML\n# CONTEXT-DATABASE: idlecrypt\n');
  });
});

describe('parseInfluxUrl', () => {
  test('host, port and database from one URL; defaults 8086 and idlecrypt; credentials kept out of display', () => {
    assert.deepEqual(parseInfluxUrl('http://127.0.0.1:8086/idlecrypt'), { protocol: 'http', host: '127.0.0.1', port: 8086, database: 'idlecrypt', display: 'http://127.0.0.1:8086/idlecrypt' });
    assert.deepEqual(parseInfluxUrl('http://influx.example'), { protocol: 'http', host: 'influx.example', port: 8086, database: 'idlecrypt', display: 'http://influx.example:8086/idlecrypt' });
    assert.deepEqual(parseInfluxUrl('https://ops:s%40cret@[::1]:443/metrics/'), {
      protocol: 'https',
      host: '::1',
      port: 443,
      database: 'metrics',
      username: 'ops',
      password: 's@cret',
      display: 'https://ops@[::1]:443/metrics',
    });
    assert.equal(parseInfluxUrl('http://h:80/db').port, 80);
  });

  test('bad URLs are usage errors that say what is wrong and never show a password', () => {
    const cases: [string, RegExp][] = [
      ['', /empty/],
      ['127.0.0.1:8086/idlecrypt', /not a URL: it needs a scheme/],
      ['udp://127.0.0.1:8089/idlecrypt', /unsupported scheme 'udp'/],
      ['http://127.0.0.1:99999/idlecrypt', /not a valid URL|out of range/],
      ['http://127.0.0.1:8086/a/b', /single name/],
      ['http://127.0.0.1:8086/idlecrypt?precision=s', /query or fragment/],
      ['http://127.0.0.1:8086/bad%20name', /may only contain/],
      ['http://u:topsecret@127.0.0.1:8086/a/b', /single name/],
    ];
    for (const [url, why] of cases) {
      assert.throws(
        () => parseInfluxUrl(url),
        (e: unknown) => {
          assert.ok(e instanceof IdlecryptError, url);
          assert.equal(e.code, 'USAGE');
          assert.equal(e.exitCode, 2);
          assert.match(e.message, /^--influx: /);
          assert.match(e.message, why, url);
          assert.match(e.message, /e\.g\. http:\/\/127\.0\.0\.1:8086\/idlecrypt/);
          assert.ok(!e.message.includes('topsecret') && !JSON.stringify(e.context).includes('topsecret'), 'no password');
          return true;
        },
      );
    }
  });
});
