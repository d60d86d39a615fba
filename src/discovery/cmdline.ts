/**
 * Reads a VM's name and QMP sockets from a QEMU command line (pure; no I/O).
 *
 * QEMU accepts each option as -opt or --opt, its value in the next argument. Values of
 * -name, -qmp, -chardev and -mon are QemuOpts strings: comma-separated key=value pairs, a
 * leading bare value standing for the option's implied key (`guest` for -name, `path` for
 * a `unix:` chardev), and ",," for a literal comma (docs/system/invocation, "-name";
 * util/qemu-option.c). Recognised QMP monitors:
 *   -qmp unix:PATH[,server=on,wait=off]     (also -qmp-pretty, and unix:path=PATH)
 *   -chardev socket,id=ID,path=PATH,...  with  -mon chardev=ID,mode=control
 * A -mon without mode=control is the human monitor (HMP), not QMP. Sockets passed as file
 * descriptors (libvirt: -chardev socket,id=charmonitor,fd=N) have no path to report.
 */
import { isAbsolute, resolve } from 'node:path';

export interface QemuCmdlineInfo {
  name: string | null;
  qmpSockets: string[];
}

/** Splits a QemuOpts string into [key, value] pairs; a bare first value gets `impliedKey`. */
export function parseQemuOpts(value: string, impliedKey?: string): Array<[string, string]> {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < value.length; i++) {
    const ch = value[i];
    if (ch === ',') {
      if (value[i + 1] === ',') {
        cur += ',';
        i++;
      } else {
        parts.push(cur);
        cur = '';
      }
    } else {
      cur += ch;
    }
  }
  parts.push(cur);
  return parts.flatMap((p, i): Array<[string, string]> => {
    const eq = p.indexOf('=');
    if (eq >= 0) return [[p.slice(0, eq), p.slice(eq + 1)]];
    if (i === 0 && impliedKey) return [[impliedKey, p]];
    return p === '' ? [] : [[p, 'on']]; // a bare flag such as `server` means server=on
  });
}

function optsGet(pairs: Array<[string, string]>, key: string): string | undefined {
  // QemuOpts: the last occurrence of a key wins.
  let v: string | undefined;
  for (const [k, val] of pairs) if (k === key) v = val;
  return v;
}

/**
 * The options we read. Every other argument is skipped: an option's value never starts
 * with '-' in practice, so no table of which QEMU options take a value is needed (and a
 * missing entry in one would make us swallow the option after a flag).
 */
const WANTED = new Set(['name', 'qmp', 'qmp-pretty', 'chardev', 'mon']);

/** argv of a QEMU process (argv[0] included); `cwd` resolves relative socket paths. */
export function parseQemuCmdline(argv: readonly string[], cwd = '/'): QemuCmdlineInfo {
  let name: string | null = null;
  const qmp: string[] = [];
  const chardevPaths = new Map<string, string>();
  const controlMons: string[] = [];
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(cwd, p));

  for (let i = 1; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('-')) continue;
    const opt = arg.replace(/^--?/, '');
    if (!WANTED.has(opt) || i + 1 >= argv.length) continue;
    const value = argv[++i]!;
    switch (opt) {
      case 'name': {
        const guest = optsGet(parseQemuOpts(value, 'guest'), 'guest');
        if (guest !== undefined && guest !== '') name = guest;
        break;
      }
      case 'qmp':
      case 'qmp-pretty': {
        if (!value.startsWith('unix:')) break; // tcp:, stdio, chardev: ... have no socket path
        const path = optsGet(parseQemuOpts(value.slice('unix:'.length), 'path'), 'path');
        if (path) qmp.push(abs(path));
        break;
      }
      case 'chardev': {
        const pairs = parseQemuOpts(value, 'backend');
        const id = optsGet(pairs, 'id');
        const path = optsGet(pairs, 'path');
        if (optsGet(pairs, 'backend') === 'socket' && id && path) chardevPaths.set(id, abs(path));
        break;
      }
      case 'mon': {
        const pairs = parseQemuOpts(value, 'chardev');
        const chardev = optsGet(pairs, 'chardev');
        if (chardev && optsGet(pairs, 'mode') === 'control') controlMons.push(chardev);
        break;
      }
    }
  }
  for (const id of controlMons) {
    const path = chardevPaths.get(id);
    if (path) qmp.push(path);
  }
  return { name, qmpSockets: [...new Set(qmp)] };
}

/** Whether argv[0] (or an exe path) is a QEMU system emulator. */
export function isQemuSystem(path: string): boolean {
  return /(^|\/)qemu-system-[\w-]+$/.test(path.replace(/ \(deleted\)$/, ''));
}
