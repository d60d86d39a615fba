/** Reading policy files: the shipped defaults, values as people write them, per-VM overrides, and bad files. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMap, isScalar, parseDocument, type YAMLMap } from 'yaml';
import { Command } from 'commander';
import {
  DEFAULT_POLICY_FILE,
  defaultPolicy,
  describePolicy,
  formatDuration,
  formatSpeed,
  loadPolicy,
  parsePolicy,
  resolvePolicy,
  UNLIMITED,
  PAUSED,
  type PolicyIssue,
} from '../../src/policy/index.ts';
import { knownKeys } from '../../src/policy/schema.ts';
import { IdlecryptError } from '../../src/errors.ts';
import { policyCommand } from '../../src/cli/policy.ts';

const MiB = 1024 * 1024;

/** The problems parsePolicy reports for `text`, as `FILE:LINE:COL: path: problem` lines. */
function problems(text: string, file = 'p.yaml'): string[] {
  try {
    parsePolicy(text, file);
  } catch (e) {
    assert.ok(e instanceof IdlecryptError, `not an IdlecryptError: ${String(e)}`);
    assert.equal(e.code, 'POLICY');
    return (e.context.issues as PolicyIssue[]).map((i) => `${i.file}:${i.line}:${i.col}: ${i.path ? `${i.path}: ` : ''}${i.message}`);
  }
  assert.fail('the policy was accepted');
}

describe('the shipped default policy', () => {
  test('is read from the package, not from the working directory', () => {
    assert.equal(DEFAULT_POLICY_FILE, fileURLToPath(new URL('../../policy/default.yaml', import.meta.url)));
    assert.equal(loadPolicy().source, DEFAULT_POLICY_FILE);
  });

  test("has the source design's thresholds (any key event for the keyboard) and speeds, a hold-off of at most 2 s and a deadline", () => {
    const p = defaultPolicy();
    assert.deepEqual(p.thresholds, { disk: 5, keyboard: 0, pointer: 100, interrupts: 1000, stall: 800, inflight: 600 });
    assert.equal(p.speed.idle, UNLIMITED);
    assert.equal(p.speed.busy, PAUSED);
    assert.equal(p.holdoff, 1000);
    assert.ok(p.holdoff <= 2000);
    assert.deepEqual(p.sampling, { interval: 50, window: 250 });
    assert.deepEqual(p.guarantee, { floor: 0, deadline: { after: 4 * 3600_000 }, margin: 1.25 });
    assert.deepEqual(p.vms, {});
  });

  test('a single stray event in the window stays under every threshold but the keyboard\'s (a key is a person, never a stray), and no note says otherwise', () => {
    const p = defaultPolicy();
    const oneEventPerS = 1000 / p.sampling.window; // 4/s
    for (const [s, t] of Object.entries(p.thresholds)) assert.equal(t !== null && t !== 'auto' && oneEventPerS <= t, s !== 'keyboard', s);
    assert.ok(!describePolicy(p).some((l) => l.startsWith('note:')));
  });

  test('sets exactly the keys the schema has (the file documents every key, and no stale one)', () => {
    const doc = parseDocument(readFileSync(DEFAULT_POLICY_FILE, 'utf8'));
    const written: string[] = [];
    const walk = (m: YAMLMap, prefix: string[]) => {
      for (const pair of m.items) {
        const key = String(isScalar(pair.key) ? pair.key.value : pair.key);
        const path = [...prefix, key];
        if (isMap(pair.value) && key !== 'vms') walk(pair.value, path);
        else written.push(path.join('.'));
      }
    };
    walk(doc.contents as YAMLMap, []);
    const schema: string[] = [];
    for (const top of knownKeys([])) {
      const sub = top === 'vms' ? [] : knownKeys([top]);
      if (sub.length === 0) schema.push(top);
      else for (const k of sub) schema.push(`${top}.${k}`);
    }
    assert.deepEqual([...written].sort(), [...schema].sort());
  });

  test('reads as a short summary', () => {
    assert.deepEqual(describePolicy(defaultPolicy()), [
      'sampling: every 50ms, rates over 250ms',
      'busy while: disk > 5/s, any keyboard event, pointer > 100/s, interrupts > 1000/s, stall > 800ms/s, inflight > 600ms/s',
      'speed: idle unlimited, busy paused; idle speed again after 1s quiet (after a stall or requests in flight alone, one sampling window)',
      "headroom: the copy leaves 10% of QEMU's main loop free",
      'latency: off (a guest busy with its disk gets the busy speed)',
      "guarantee: finish within 4h of the job's start (margin 1.25), floor none",
      'pivot: once caught up, waits up to 30s for a quiet guest; pushes at full speed for up to 2s when the copy has not caught up for 2m',
      "target: flushed to its disk after every 64 MiB copied, when it is opened through the host's page cache (writeback)",
    ]);
  });
});

describe('target', () => {
  test('flush: bytes of copying between flushes of a writeback target (64 MiB by default), or off; bad values say what is expected', () => {
    assert.deepEqual(defaultPolicy().target, { flush: 64 * 1024 * 1024 });
    assert.equal(parsePolicy('target:\n  flush: 256M\n', 't.yaml').target.flush, 256 * 1024 * 1024);
    const off = parsePolicy('target:\n  flush: off\n', 't.yaml');
    assert.equal(off.target.flush, null);
    assert.ok(describePolicy(off).includes("target: not flushed (with writeback, the kernel writes the copy's writes back when it likes)"));
    assert.throws(() => parsePolicy('target:\n  flush: 64MiB/s\n', 'bad.yaml'), /bad\.yaml:2:10: target\.flush: expected off or bytes such as 64MiB, got "64MiB\/s" \(an amount, not a speed\)/);
    assert.throws(() => parsePolicy('target:\n  flush: 4KiB\n', 'bad.yaml'), /target\.flush: must be off or at least 1MiB, got "4KiB"/);
    assert.throws(() => parsePolicy('target:\n  flush: -1G\n', 'bad.yaml'), /target\.flush: an amount cannot be negative, got "-1G"/);
    assert.throws(() => parsePolicy('target:\n  flush: often\n', 'bad.yaml'), /target\.flush: expected off or bytes such as 64MiB, got "often"/);
    const o = parsePolicy('vms:\n  db:\n    target:\n      flush: off\n', 'vm.yaml');
    assert.equal(o.vms.db!.target.flush, null);
    assert.equal(o.target.flush, 64 * 1024 * 1024);
  });
});

describe('latency', () => {
  test('a margin as a percentage grades the busy speed; off by default; bad values say what is expected', () => {
    const p = parsePolicy('latency:\n  margin: 15%\n  refresh: 30s\n', 'lat.yaml');
    assert.deepEqual(p.latency, { margin: 0.15, refresh: 30_000 });
    assert.deepEqual(defaultPolicy().latency, { margin: null, refresh: 60_000 });
    assert.ok(describePolicy(p).includes('latency: a guest busy with its disk gets the highest speed that keeps its disk latency within 15% of its latency without the copy (baseline re-measured every 30s)'));
    assert.throws(() => parsePolicy('latency:\n  margin: 0.15\n', 'bad.yaml'), /bad\.yaml:2:11: latency\.margin: expected off or a percentage such as 15%, got 0\.15/);
    assert.throws(() => parsePolicy('latency:\n  margin: 900%\n', 'bad.yaml'), /latency\.margin: must be between 1% and 500% \(or off\), got "900%"/);
    const o = parsePolicy('vms:\n  db:\n    latency:\n      margin: 20%\n', 'vm.yaml');
    assert.equal(o.vms.db!.latency.margin, 0.2);
    assert.equal(o.latency.margin, null);
  });
});

describe('values as people write them', () => {
  test('a file sets only what it changes; the rest comes from the defaults', () => {
    const p = parsePolicy('holdoff: 1500ms\nthresholds:\n  disk: 20\n', 'mine.yaml');
    assert.equal(p.holdoff, 1500);
    assert.deepEqual(p.thresholds, { disk: 20, keyboard: 0, pointer: 100, interrupts: 1000, stall: 800, inflight: 600 });
    assert.equal(p.speed.busy, PAUSED);
    assert.equal(p.source, 'mine.yaml');
  });

  test('an empty file is the default policy', () => {
    const p = parsePolicy('# nothing to change\n', 'empty.yaml');
    assert.deepEqual({ ...p, source: '' }, { ...defaultPolicy(), source: '' });
  });

  test('speeds: unlimited, paused, 0, bytes/s with binary suffixes', () => {
    const busy = (v: string) => parsePolicy(`speed:\n  busy: ${v}\n`, 'p.yaml').speed.busy;
    assert.equal(busy('unlimited'), UNLIMITED);
    assert.equal(busy('paused'), PAUSED);
    assert.equal(busy('0'), PAUSED);
    assert.equal(busy('104857600'), 100 * MiB);
    assert.equal(busy('50MiB'), 50 * MiB);
    assert.equal(busy('100M'), 100 * MiB);
    assert.equal(busy('1.5G'), 1.5 * 1024 * MiB);
    assert.equal(busy('64KiB/s'), 64 * 1024);
  });

  test('headroom: a share of the main loop from 5% to 90%, as 15% or 0.15, or off', () => {
    const h = (v: string) => parsePolicy(`speed:\n  headroom: ${v}\n`, 'p.yaml').speed.headroom;
    assert.equal(h('15%'), 0.15);
    assert.equal(h('0.3'), 0.3);
    assert.equal(h('off'), null);
    assert.throws(() => h('95%'), /p\.yaml:2:13: speed\.headroom: must be between 5% and 90% \(or off\), got "95%"/);
    assert.throws(() => h('lots'), /speed\.headroom: expected off or a share of the main loop such as 15%, got "lots"/);
  });

  test('durations need a unit; deadlines are relative, absolute or none; thresholds can be off', () => {
    const p = parsePolicy('holdoff: 1h30m\nthresholds:\n  interrupts: off\nguarantee:\n  deadline: 2030-01-31T18:00:00+01:00\n  floor: 10MiB\n', 'p.yaml');
    assert.equal(p.holdoff, 90 * 60_000);
    assert.equal(p.thresholds.interrupts, null);
    assert.deepEqual(p.guarantee.deadline, { at: Date.parse('2030-01-31T17:00:00Z') });
    assert.equal(p.guarantee.floor, 10 * MiB);
    assert.equal(parsePolicy('guarantee:\n  deadline: none\n', 'p.yaml').guarantee.deadline, null);
    assert.deepEqual(parsePolicy('guarantee:\n  deadline: 90m\n', 'p.yaml').guarantee.deadline, { after: 5_400_000 });
  });

  test('thresholds: auto learns disk and interrupts per guest; a signal can be auto alone; input never', () => {
    const p = parsePolicy('thresholds: auto\n', 'p.yaml');
    assert.deepEqual(p.thresholds, { disk: 'auto', keyboard: 0, pointer: 100, interrupts: 'auto', stall: 800, inflight: 600 });
    assert.ok(describePolicy(p).includes('busy while: disk above the level learnt for each guest (never under 5/s), any keyboard event, pointer > 100/s, interrupts above the level learnt for each guest (never under 1000/s), stall > 800ms/s, inflight > 600ms/s'));
    assert.deepEqual(parsePolicy('thresholds:\n  disk: auto\n', 'p.yaml').thresholds, { disk: 'auto', keyboard: 0, pointer: 100, interrupts: 1000, stall: 800, inflight: 600 });
    // an override over a file that says auto, and auto in an override only
    const v = parsePolicy('thresholds: auto\nvms:\n  db:\n    thresholds: {disk: 50}\n  web:\n    thresholds: auto\n', 'p.yaml');
    assert.deepEqual(resolvePolicy(v, 'db').thresholds, { disk: 50, keyboard: 0, pointer: 100, interrupts: 'auto', stall: 800, inflight: 600 });
    assert.deepEqual(parsePolicy('vms:\n  web:\n    thresholds: auto\n', 'p.yaml').vms.web!.thresholds, { disk: 'auto', keyboard: 0, pointer: 100, interrupts: 'auto', stall: 800, inflight: 600 });
    assert.deepEqual(problems('thresholds:\n  keyboard: auto\n'), [
      'p.yaml:2:13: thresholds.keyboard: auto is for disk and interrupts only: input is never learnt (a person at the console comes first), nor the stall the copy itself causes',
    ]);
  });

  test('and read back as written', () => {
    assert.equal(formatSpeed(UNLIMITED), 'unlimited');
    assert.equal(formatSpeed(PAUSED), 'paused');
    assert.equal(formatSpeed(15 * MiB), '15 MiB/s');
    assert.equal(formatDuration(250), '250ms');
    assert.equal(formatDuration(5_400_000), '1h30m');
    assert.equal(formatDuration(1500), '1.5s');
  });
});

describe('per-VM overrides', () => {
  const text = [
    'holdoff: 2s',
    'vms:',
    '  build-runner:',
    '    speed:',
    '      busy: 20MiB',
    '  db:',
    '    thresholds: {disk: 50}',
    '',
  ].join('\n');

  test("a VM named in vms gets its override merged over the file's settings", () => {
    const p = parsePolicy(text, 'p.yaml');
    const runner = resolvePolicy(p, 'build-runner');
    assert.equal(runner.speed.busy, 20 * MiB);
    assert.equal(runner.speed.idle, UNLIMITED);
    assert.equal(runner.holdoff, 2000); // the file's, not the default's
    assert.equal(runner.override, 'build-runner');
    const db = resolvePolicy(p, 'db');
    assert.deepEqual(db.thresholds, { disk: 50, keyboard: 0, pointer: 100, interrupts: 1000, stall: 800, inflight: 600 });
    assert.equal(db.speed.busy, PAUSED);
  });

  test('any other VM gets the top-level settings', () => {
    const other = resolvePolicy(parsePolicy(text, 'p.yaml'), 'web');
    assert.equal(other.speed.busy, PAUSED);
    assert.equal(other.holdoff, 2000);
    assert.equal(other.override, undefined);
    assert.equal(resolvePolicy(parsePolicy(text, 'p.yaml'), 'constructor').override, undefined);
  });

  test('a bad override is reported at its place under vms', () => {
    assert.deepEqual(problems('vms:\n  web:\n    speed:\n      busy: -20MiB\n    sampling:\n      interval: 10ms\n'), [
      'p.yaml:4:13: vms.web.speed.busy: a speed cannot be negative, got "-20MiB"',
      'p.yaml:5:5: vms.web.sampling: unknown key; expected one of thresholds, speed, holdoff, guarantee, latency, pivot, target',
    ]);
  });
});

describe('bad policy files are rejected with the file, line, column and key', () => {
  test('a syntax error', () => {
    assert.deepEqual(problems('thresholds:\n  disk: 5\n   keyboard: 5\n'), [
      'p.yaml:2:9: thresholds.disk: YAML syntax: nested mappings are not allowed in compact mappings',
      'p.yaml:2:9: thresholds.disk: YAML syntax: implicit keys need to be on a single line',
    ]);
  });

  test('a key given twice', () => {
    assert.deepEqual(problems('holdoff: 1s\nholdoff: 2s\n'), ['p.yaml:2:1: holdoff: YAML syntax: map keys must be unique']);
  });

  test('an unknown key, with the likely one', () => {
    assert.deepEqual(problems('thresholds:\n  dsik: 5\n'), [
      'p.yaml:2:3: thresholds.dsik: unknown key (did you mean disk?); expected one of disk, keyboard, pointer, interrupts, stall, inflight',
    ]);
    assert.deepEqual(problems('hold_off: 1s\n'), [
      'p.yaml:1:1: hold_off: unknown key (did you mean holdoff?); expected one of sampling, thresholds, speed, holdoff, guarantee, latency, pivot, target, vms',
    ]);
  });

  test('a wrong type', () => {
    assert.deepEqual(problems('thresholds:\n  disk: five\n'), ['p.yaml:2:9: thresholds.disk: expected a rate per second (a number), off or auto, got "five"']);
    assert.deepEqual(problems('speed: fast\n'), ['p.yaml:1:8: speed: expected a mapping (key: value lines), got "fast"']);
    assert.deepEqual(problems('holdoff: 2\n'), ['p.yaml:1:10: holdoff: a duration needs a unit (such as 250ms, 1s, 2h), got 2']);
    assert.deepEqual(problems('speed:\n  idle:\n'), ['p.yaml:2:3: speed.idle: expected unlimited, paused, or bytes/s such as 50MiB, 100M or 104857600, got nothing']);
  });

  test('a negative speed, threshold or duration', () => {
    assert.deepEqual(problems('speed:\n  busy: -5MiB\n'), ['p.yaml:2:9: speed.busy: a speed cannot be negative, got "-5MiB"']);
    assert.deepEqual(problems('speed:\n  idle: -1\n'), ['p.yaml:2:9: speed.idle: a speed cannot be negative, got -1']);
    assert.deepEqual(problems('thresholds:\n  pointer: -1\n'), ['p.yaml:2:12: thresholds.pointer: a threshold cannot be negative, got -1']);
    assert.deepEqual(problems('thresholds:\n  disk: -1\n'), ['p.yaml:2:9: thresholds.disk: a threshold cannot be negative, got -1']);
    assert.deepEqual(problems('holdoff: -1s\n'), ['p.yaml:1:10: holdoff: a duration cannot be negative, got "-1s"']);
  });

  test('settings that contradict each other, where one came from the defaults', () => {
    assert.deepEqual(problems('sampling:\n  interval: 500ms\n'), [
      'p.yaml:2:3: sampling.window: must be at least sampling.interval (500ms), got 250ms (from the defaults)',
    ]);
  });

  test('every problem is listed; the error names the first and counts the rest', () => {
    const text = 'thresholds:\n  disk: five\n  dsik: 3\nspeed:\n  busy: -1M\n';
    assert.throws(
      () => parsePolicy(text, 'bad.yaml'),
      (e: unknown) =>
        e instanceof IdlecryptError &&
        e.code === 'POLICY' &&
        e.exitCode === 1 &&
        e.message === 'bad.yaml:2:9: thresholds.disk: expected a rate per second (a number), off or auto, got "five" (and 2 more)' &&
        (e.context.issues as PolicyIssue[]).length === 3,
    );
  });

  test('a file that is not there', () => {
    assert.throws(() => loadPolicy('/nonexistent/policy.yaml'), {
      code: 'POLICY',
      message: '/nonexistent/policy.yaml: cannot read the policy: no such file',
    });
  });
});

describe('idlecrypt policy check', () => {
  async function check(file: string): Promise<{ out: string; error?: unknown }> {
    let out = '';
    const program = new Command('idlecrypt').exitOverride().addCommand(policyCommand({ stdout: { write: (s: string) => (out += s) } }).exitOverride());
    try {
      await program.parseAsync(['node', 'idlecrypt', 'policy', 'check', file]);
      return { out };
    } catch (error) {
      return { out, error };
    }
  }

  test('a good file: ok and what it does', async () => {
    const r = await check(DEFAULT_POLICY_FILE);
    assert.equal(r.error, undefined);
    assert.equal(r.out.split('\n')[0], `${DEFAULT_POLICY_FILE}: ok`);
    assert.match(r.out, /^ {2}busy while: disk > 5\/s, any keyboard event, pointer > 100\/s, interrupts > 1000\/s, stall > 800ms\/s, inflight > 600ms\/s$/m);
  });

  test('a bad file: one line per problem, and a POLICY error', async () => {
    const tmp = mkdtempSync(join(tmpdir(), 'idlecrypt-policy-'));
    const file = join(tmp, 'bad.yaml');
    try {
      writeFileSync(file, 'speed:\n  busy: -1M\nholdoff: 3\n');
      const r = await check(file);
      assert.equal(r.out, `${file}:2:9: speed.busy: a speed cannot be negative, got "-1M"\n${file}:3:10: holdoff: a duration needs a unit (such as 250ms, 1s, 2h), got 3\n`);
      assert.ok(r.error instanceof IdlecryptError && r.error.code === 'POLICY');
      assert.equal(r.error.message, `${file}:2:9: speed.busy: a speed cannot be negative, got "-1M" (and 1 more)`);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });
});
