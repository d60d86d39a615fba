/**
 * Builds the one bpftrace program the runner runs from the scripts in probes/.
 *
 * Each probes/*.bt file is a complete tool for people (header, counting probes, and a
 * "standalone report" that prints and clears per interval). The runner keeps each
 * file's counting probes, drops its standalone report, points the uprobes at the QEMU
 * binaries actually running, and appends one shared report that never clears: it prints
 * every map's running totals, then a marker line with the kernel's CLOCK_MONOTONIC time
 * (`nsecs`). Differences of running totals lose no event, whatever the output lag; a
 * print-then-clear report loses the events that land between the two.
 *
 * One process for all scripts: bpftrace compiles with LLVM at start (~100 MB, ~1 s), so
 * four processes would cost four times that.
 */
import { access, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { IdlecryptError } from '../errors.ts';
import { counterForMap } from './counters.ts';

export const PROBES_DIR = fileURLToPath(new URL('../../probes/', import.meta.url));

/** The QEMU binary the scripts name; the runner substitutes the real ones. */
export const SCRIPT_QEMU_BINARY = '/usr/bin/qemu-system-x86_64';

/** The line that ends each file's probes; what follows is its standalone report. */
export const STANDALONE_MARK = '// ---- standalone report ----';

/** printf markers of the shared report (bpftrace -f json puts them in {"type":"printf"}). */
export const REPORT_MARK = 'idlecrypt-report';
export const FINAL_MARK = 'idlecrypt-final';

export const SCRIPTS = {
  disk: 'qemu-disk.bt',
  /** Time the disks had a request in flight: a probe on each request's end too, which costs (its header). */
  inflight: 'qemu-inflight.bt',
  input: 'qemu-input.bt',
  /** Interrupts through QEMU's own APIC model: TCG (and KVM with kernel-irqchip=off). */
  irqQemu: 'qemu-irq.bt',
  /** Interrupts through KVM's in-kernel irqchip: kernel tracepoints. */
  irqKvm: 'kvm-irq.bt',
  /** vCPU waits for QEMU's big lock: the stall a busy main loop inflicts on the guest. */
  stall: 'qemu-stall.bt',
} as const;

export type ScriptId = keyof typeof SCRIPTS;

export interface ProbeScript {
  id: ScriptId;
  file: string;
  text: string;
}

/**
 * Maps of spans in progress: `@<map>[pid, tid] = nsecs` at a span's start, 0 at its end,
 * when the span's length is added to the counter (zeroed, not deleted: bpftrace 0.17
 * aborts when an element is deleted while it prints the map). The report prints them after the
 * counters, and the parser counts each open span up to the report's time (records.ts), so
 * a span that lasts seconds is seen while it lasts, not when it ends.
 */
export const OPEN_SPAN_MAPS = { vcpu_waiting_since: 'vcpu_wait_us', disk_busy_since: 'disk_busy_us' } as const;

export interface ComposedProgram {
  text: string;
  /** Counter maps the program prints (without '@'), then its open-span maps. */
  maps: string[];
  /** How many probes bpftrace must report in "attached_probes"; fewer means a symbol was missing. */
  expectedProbes: number;
}

export async function loadScripts(ids: readonly ScriptId[], dir = PROBES_DIR): Promise<ProbeScript[]> {
  return Promise.all(
    ids.map(async (id) => {
      const file = `${dir}${SCRIPTS[id]}`;
      const text = await readFile(file, 'utf8').catch((e: NodeJS.ErrnoException) => {
        throw new IdlecryptError('INTERNAL', `probe script ${file} is missing (${e.code})`, { cause: e });
      });
      return { id, file, text };
    }),
  );
}

/** A path bpftrace's attach-point grammar takes unquoted. */
const PLAIN_PATH = /^\/[\w./+-]+$/;

/**
 * The counting part of one script: no shebang, header or standalone report, and every
 * `uprobe:<SCRIPT_QEMU_BINARY>:fn` attach point repeated for each binary.
 */
export function countingPart(script: ProbeScript, qemuBinaries: readonly string[]): { text: string; probes: number } {
  const cut = script.text.indexOf(STANDALONE_MARK);
  if (cut < 0) throw new IdlecryptError('INTERNAL', `${script.file} has no "${STANDALONE_MARK}" line`);
  let probes = 0;
  const lines = script.text
    .slice(0, cut)
    // the header is for people reading the file; bpftrace gets the program on its command line
    .replace(/^\/\*[\s\S]*?\*\/\n/m, `// ${script.id}: probes/${SCRIPTS[script.id]}\n`)
    .split('\n')
    .filter((l) => !l.startsWith('#!'))
    .map((line) => {
      // One attach point per line; a probe with several lists them one per line, comma-ended.
      const m = /^(uprobe|uretprobe):(\S+?):(\w+)(,?)\s*$/.exec(line);
      if (m) {
        if (m[2] !== SCRIPT_QEMU_BINARY) {
          throw new IdlecryptError('INTERNAL', `${script.file}: ${m[1]} on ${m[2]}, expected ${SCRIPT_QEMU_BINARY}`);
        }
        probes += qemuBinaries.length;
        return qemuBinaries.map((b) => `${m[1]}:${b}:${m[3]}`).join(',\n') + m[4];
      }
      // One attach point per probe header line, as the scripts are written.
      if (/^(tracepoint|kprobe|kretprobe|uretprobe|kfunc|kretfunc):\S+\s*$/.test(line)) probes += 1;
      return line;
    });
  return { text: lines.join('\n'), probes };
}

/**
 * Counter maps a script writes, in order of first use: per-pid `count()`s and `sum()`s,
 * whose running totals the report prints (a difference of two is the interval's).
 */
export function mapsOf(text: string): string[] {
  const maps: string[] = [];
  for (const m of text.matchAll(/@(\w+)\[pid\]\s*=\s*(?:count\(\)|sum\()/g)) {
    const name = m[1]!;
    if (!counterForMap(name)) throw new IdlecryptError('INTERNAL', `probe map @${name} is not a known counter`);
    if (!maps.includes(name)) maps.push(name);
  }
  return maps;
}

export function composeProgram(scripts: readonly ProbeScript[], qemuBinaries: readonly string[]): ComposedProgram {
  const bad = qemuBinaries.filter((b) => !PLAIN_PATH.test(b));
  if (bad.length) throw new IdlecryptError('PROBE_UNAVAILABLE', `cannot probe QEMU binary path ${JSON.stringify(bad[0])}`);
  const usesUprobes = scripts.some((s) => s.text.includes(`uprobe:${SCRIPT_QEMU_BINARY}:`));
  if (usesUprobes && qemuBinaries.length === 0) {
    throw new IdlecryptError('PROBE_UNAVAILABLE', 'no QEMU binary to probe (no qemu-system-x86_64 found)');
  }
  const parts = scripts.map((s) => countingPart(s, qemuBinaries));
  const maps: string[] = [];
  for (const p of parts) for (const m of mapsOf(p.text)) if (!maps.includes(m)) maps.push(m);
  // Counters first: a span that ends between the two prints is then missing from both (the
  // parser keeps totals from going back; the next report has it), never counted twice.
  const spans = Object.keys(OPEN_SPAN_MAPS).filter((m) => parts.some((p) => p.text.includes(`@${m}[`)));
  const prints = [...maps, ...spans].map((m) => `\tprint(@${m});`).join('\n');
  const clears = [...maps, ...spans].map((m) => `\tclear(@${m});`).join('\n');
  const report = [
    '// ---- idlecrypt report: running totals, then the CLOCK_MONOTONIC time they were printed for ----',
    'interval:ms:$1',
    '{',
    prints,
    `\tprintf("${REPORT_MARK} %llu\\n", nsecs);`,
    '}',
    '',
    // On SIGINT/SIGTERM bpftrace detaches every probe, then runs END: this last report
    // covers every event up to the stop. Clearing afterwards keeps bpftrace from printing
    // the maps a second time as it exits.
    'END',
    '{',
    prints,
    `\tprintf("${FINAL_MARK} %llu\\n", nsecs);`,
    clears,
    '}',
    '',
  ].join('\n');
  const text = `${parts.map((p) => p.text.trimEnd()).join('\n\n')}\n\n${report}`;
  // + the interval probe and END
  const expectedProbes = parts.reduce((n, p) => n + p.probes, 0) + 2;
  return { text, maps: [...maps, ...spans], expectedProbes };
}

/** Where tracefs shows kernel tracepoints (bpftrace reads their formats from there). */
const TRACEFS_DIRS = ['/sys/kernel/tracing', '/sys/kernel/debug/tracing'];

/** Whether this host has the kvm tracepoints kvm-irq.bt uses (kvm module loaded, tracefs mounted). */
export async function hostHasKvmTracepoints(): Promise<boolean> {
  for (const dir of TRACEFS_DIRS) {
    const ok = await Promise.all(
      ['kvm_msi_set_irq', 'kvm_set_irq'].map((tp) => access(`${dir}/events/kvm/${tp}/format`).then(() => true, () => false)),
    );
    if (ok.every(Boolean)) return true;
  }
  return false;
}

/** x86 QEMU binaries: the only ones whose symbols the scripts name (apic_deliver_irq is x86's). */
export function isProbeableQemu(exe: string): boolean {
  return /\/qemu-system-(x86_64|i386)$/.test(exe) && PLAIN_PATH.test(exe);
}
