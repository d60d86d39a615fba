/**
 * The probe scripts and the program the runner composes from them: headers, map names
 * (against src/probes/counters.ts and probes/README.md), the input probe's privacy, and a
 * dry-run compile of every script and of the composed program with the real bpftrace.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { deepStrictEqual, equal, match, ok, throws } from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { COUNTERS } from '../../src/probes/counters.ts';
import { probedCounters, probeScripts } from '../../src/streams/activity.ts';
import { parsePolicy, signalInUse } from '../../src/policy/index.ts';
import {
  PROBES_DIR,
  SCRIPTS,
  SCRIPT_QEMU_BINARY,
  STANDALONE_MARK,
  composeProgram,
  loadScripts,
  mapsOf,
  type ProbeScript,
  type ScriptId,
} from '../../src/probes/program.ts';

const execFileP = promisify(execFile);
const ALL_IDS = Object.keys(SCRIPTS) as ScriptId[];

let scripts: ProbeScript[];
let tmp: string;
before(async () => {
  scripts = await loadScripts(ALL_IDS);
  tmp = await mkdtemp(join(tmpdir(), 'idlecrypt-probes-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** `bpftrace --emit-elf`: parses, resolves probes and compiles to BPF, loads nothing. */
async function dryRun(args: string[]): Promise<void> {
  await execFileP('bpftrace', ['--emit-elf', join(tmp, 'out.elf'), ...args], { timeout: 60_000 });
}

describe('probe scripts', () => {
  it('are exactly the files in probes/, each listed in probes/README.md', async () => {
    const files = (await readdir(PROBES_DIR)).filter((f) => f.endsWith('.bt')).sort();
    deepStrictEqual(files, Object.values(SCRIPTS).sort());
    const readme = await readFile(join(PROBES_DIR, 'README.md'), 'utf8');
    for (const f of files) ok(readme.includes(`[${f}](${f})`), `README lists ${f}`);
  });

  it('open with a header that says what they count, an example, how to read it and the cost', () => {
    for (const s of scripts) {
      const header = s.text.slice(0, s.text.indexOf('*/'));
      ok(s.text.startsWith('#!/usr/bin/env bpftrace\n/*'), `${s.file}: shebang and header`);
      for (const section of ['USAGE:', 'What it counts', 'Example output', 'How to read it', 'Cost']) {
        ok(header.includes(section), `${s.file}: header has "${section}"`);
      }
      ok(s.text.includes(STANDALONE_MARK), `${s.file}: has the standalone report mark`);
    }
  });

  it('count exactly the counters of src/probes/counters.ts, by pid, and README names each map', async () => {
    const maps = new Set(scripts.flatMap((s) => mapsOf(s.text)));
    deepStrictEqual([...maps].sort(), COUNTERS.map((c) => c.map).sort());
    const readme = await readFile(join(PROBES_DIR, 'README.md'), 'utf8');
    for (const m of maps) ok(readme.includes(`\`@${m}\``), `README names @${m}`);
  });

  it('read nothing of an input event but its kind (the first 32 bits)', () => {
    const input = scripts.find((s) => s.id === 'input')!;
    const code = input.text.slice(input.text.indexOf('*/') + 2).replace(/\/\/.*$/gm, '');
    const argUses = [...code.matchAll(/[^\n]*\barg\d[^\n]*/g)].map((m) => m[0].trim());
    deepStrictEqual(argUses, ['if (*(uint32 *)arg1 == 0) {']);
    for (const forbidden of ['str(', 'buf(', 'uptr(', 'kptr(', 'reg(', 'ustack', '+ 4', '+ 8', 'arg1 +']) {
      ok(!code.includes(forbidden), `input probe must not use ${forbidden}`);
    }
  });

  it('name functions this host\'s QEMU exports (bpftrace -l finds each uprobe)', async () => {
    // A dry run does not resolve uprobe symbols, and bpftrace 0.17 silently drops a probe
    // whose symbol is missing (the runner catches that at run time by counting probes).
    const fns = [...new Set(scripts.flatMap((s) => [...s.text.matchAll(/^u(?:ret)?probe:\S+?:(\w+),?$/gm)].map((m) => m[1]!)))];
    deepStrictEqual(fns.sort(), ['apic_deliver_irq', 'block_acct_done', 'block_acct_failed', 'block_acct_start', 'qemu_input_event_send_impl']);
    for (const fn of fns) {
      const { stdout } = await execFileP('bpftrace', ['-l', `uprobe:${SCRIPT_QEMU_BINARY}:${fn}`]);
      equal(stdout.trim(), `uprobe:${SCRIPT_QEMU_BINARY}:${fn}`);
    }
  });

  for (const id of ALL_IDS) {
    it(`${SCRIPTS[id]} compiles on its own (bpftrace dry run)`, async () => {
      await dryRun([join(PROBES_DIR, SCRIPTS[id]), '50']);
    });
  }
});

describe('composeProgram', () => {
  it('keeps the counting probes, repeats uprobes per QEMU binary and ends in one report that never clears', () => {
    const p = composeProgram(scripts, [SCRIPT_QEMU_BINARY, '/opt/qemu/bin/qemu-system-x86_64']);
    ok(!p.text.includes('#!'), 'no shebang');
    ok(!p.text.includes('What it counts'), 'no header');
    match(p.text, /^\/\/ disk: probes\/qemu-disk\.bt\n+uprobe:/);
    ok(!p.text.includes(STANDALONE_MARK), 'no standalone report');
    ok(!p.text.includes('time('), 'no standalone time() header');
    match(p.text, /uprobe:\/usr\/bin\/qemu-system-x86_64:block_acct_start,\nuprobe:\/opt\/qemu\/bin\/qemu-system-x86_64:block_acct_start\n/);
    const report = p.text.slice(p.text.indexOf('interval:ms:$1'), p.text.indexOf('END'));
    ok(!report.includes('clear('), 'the interval report never clears');
    match(report, /printf\("idlecrypt-report %llu\\n", nsecs\);/);
    // The stall probe is host-wide (tracepoints): once, whatever the binaries.
    equal(p.text.match(/^tracepoint:syscalls:sys_enter_futex$/gm)?.length, 1);
    match(p.text, /^\/\/ inflight: probes\/qemu-inflight\.bt\n+uprobe:/m);
    // A probe with two attach points: each repeated per binary, still one comma-joined list.
    match(
      p.text,
      /uprobe:\/usr\/bin\/qemu-system-x86_64:block_acct_done,\nuprobe:\/opt\/qemu\/bin\/qemu-system-x86_64:block_acct_done,\nuprobe:\/usr\/bin\/qemu-system-x86_64:block_acct_failed,\nuprobe:\/opt\/qemu\/bin\/qemu-system-x86_64:block_acct_failed\n\{/,
    );
    deepStrictEqual(p.maps, [
      'disk_reads', 'disk_writes', 'disk_flushes', 'disk_discards', 'disk_busy_us', 'key_events', 'pointer_events', 'interrupts', 'vcpu_wait_us',
      'vcpu_waiting_since', 'disk_busy_since',
    ]);
    // 6 uprobes (block_acct_start twice: counted, and in flight; _done; _failed; input; irq) x 2 binaries + 2 kvm tracepoints + 2 futex tracepoints (once) + interval + END
    equal(p.expectedProbes, 6 * 2 + 2 + 2 + 2);
  });

  it('refuses a QEMU path bpftrace could not parse, and uprobes without any binary', () => {
    throws(() => composeProgram(scripts, ['/tmp/my qemu/qemu-system-x86_64']), /cannot probe QEMU binary path/);
    throws(() => composeProgram(scripts, []), /no QEMU binary to probe/);
  });

  it('compiles (bpftrace dry run), with and without the kvm script', async () => {
    await dryRun(['-e', composeProgram(scripts, [SCRIPT_QEMU_BINARY]).text, '50']);
    await dryRun(['-e', composeProgram(scripts.filter((s) => s.id !== 'irqKvm'), [SCRIPT_QEMU_BINARY]).text, '50']);
  });
});

describe('the scripts an observation runs', () => {
  it('leaves out the requests-in-flight probe (and its counter) when asked, as the interrupts', () => {
    const all = { interrupts: true, inflight: true, kvmTracepoints: true };
    deepStrictEqual(probeScripts(all), ['disk', 'inflight', 'input', 'irqQemu', 'irqKvm', 'stall']);
    deepStrictEqual(probeScripts({ ...all, inflight: false }), ['disk', 'input', 'irqQemu', 'irqKvm', 'stall']);
    deepStrictEqual(probeScripts({ ...all, interrupts: false }), ['disk', 'inflight', 'input', 'stall']);
    deepStrictEqual([...probedCounters(all, 'tcg')], COUNTERS.map((c) => c.key));
    deepStrictEqual([...probedCounters({ ...all, inflight: false }, 'tcg')], COUNTERS.map((c) => c.key).filter((k) => k !== 'diskBusyUs'));
    deepStrictEqual([...probedCounters({ ...all, kvmTracepoints: false }, 'kvm')], COUNTERS.map((c) => c.key).filter((k) => k !== 'interrupts'));
    ok(probedCounters({ ...all, kvmTracepoints: false }, 'tcg').has('interrupts'));
  });

  it('runs the probe while any VM\'s policy uses the signal', () => {
    equal(signalInUse(parsePolicy('{}', 'p.yaml'), 'inflight'), true);
    const off = parsePolicy('thresholds:\n  inflight: off\n', 'p.yaml');
    equal(signalInUse(off, 'inflight'), false);
    equal(signalInUse(parsePolicy('thresholds:\n  inflight: off\nvms:\n  db:\n    thresholds:\n      inflight: 400\n', 'p.yaml'), 'inflight'), true);
  });
});
