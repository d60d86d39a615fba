/**
 * The agent's configuration file (default /etc/idlecrypt/agent.yaml): what to encrypt on
 * this host, and how much of the host the copies may use. Validated like the policy
 * (src/policy/load.ts): every problem as `FILE:LINE:COLUMN: key.path: problem`.
 *
 *   policy: /etc/idlecrypt/policy.yaml        # or the policy's keys inline
 *   backend: auto                              # qmp | libvirt | auto (libvirt for its domains)
 *   connect: qemu:///system                    # the libvirt URI
 *   libvirt-pause: speed                       # speed (1 byte/s) | qemu (job-pause; taints the domain)
 *   influx: http://127.0.0.1:8086/idlecrypt    # optional; else the local metrics file
 *   host:
 *     max-jobs: 1                              # copies at once on this host
 *     max-speed: 0                             # host-wide ceiling, bytes/s; 0 = none
 *     protect: storage                         # storage | vm
 *   encrypt:
 *     - vm: "web*"                             # VM name, glob (* ? [..])
 *       disks: [vd0]                           # qdev ids, drive or node names; or all
 *       target: /var/lib/idlecrypt/{vm}-{disk}.luks
 *       key-file: /etc/idlecrypt/keys/{vm}.key
 *       format: auto                           # luks, qcow2, or auto: qcow2 for a qcow2 disk
 *       encrypter: storage-daemon              # optional; storage-daemon (qmp's default for luks) or qemu
 *       qmp: /run/qemu/{vm}.qmp                # optional; else the VM's first -qmp socket
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { isMap, isNode, LineCounter, parseDocument } from 'yaml';
import { z } from 'zod';
import { IdlecryptError } from '../errors.ts';
import { parseInfluxUrl } from '../metrics/influx-url.ts';
import { formatIssue, isPlainObject, loadPolicy, locate, lowerFirst, parsePolicy, pathAt, unknownKeyMessage, type PolicyIssue } from '../policy/load.ts';
import { scalar, type Policy } from '../policy/schema.ts';
import { parseByteRate, show } from '../policy/units.ts';
import { FORMAT_CHOICES, type FormatChoice } from '../encrypt/target.ts';
import { ENCRYPTERS, type Encrypter } from '../encrypt/storage-daemon.ts';
import type { LibvirtPauseMode } from '../libvirt/copy-job.ts';

export const DEFAULT_AGENT_CONFIG = '/etc/idlecrypt/agent.yaml';

export type Protect = 'storage' | 'vm';

export interface EncryptEntry {
  /** Glob over VM names. */
  readonly vm: string;
  /** Disk ids, or 'all'. */
  readonly disks: readonly string[] | 'all';
  /** Path template with {vm} and {disk}. */
  readonly target: string;
  readonly keyFile: string;
  /** The target's format; `auto`: the disk's (targetFormatFor). */
  readonly format: FormatChoice;
  /**
   * Who encrypts (`encrypt --encrypter`): a qemu-storage-daemon, or the VM's QEMU; undefined:
   * the backend's own (qmp: the daemon for a LUKS target, QEMU for a qcow2 one; libvirt:
   * libvirt's copy, which QEMU encrypts).
   */
  readonly encrypter?: Encrypter;
  /** Path template with {vm}: the VM's QMP socket, when not the first on its command line. */
  readonly qmp?: string;
}

/** How the agent reaches a VM: its QMP socket, libvirt, or whichever it has (auto). */
export type BackendChoice = 'auto' | 'qmp' | 'libvirt';

export interface AgentConfig {
  readonly file: string;
  readonly backend: BackendChoice;
  /** The libvirt URI (default qemu:///system). */
  readonly connect: string;
  /** How libvirt copies are paused: 1 byte/s (default), or QEMU's job-pause (taints the domain). */
  readonly libvirtPause: LibvirtPauseMode;
  /** The policy file, or undefined for the shipped default or an inline policy. */
  readonly policyFile?: string;
  /** The policy in force: read from policyFile, or the inline keys. */
  readonly policy: Policy;
  readonly influx?: string;
  readonly host: { readonly maxJobs: number; readonly maxSpeed: number; readonly protect: Protect };
  readonly encrypt: readonly EncryptEntry[];
}

const mapping = { error: (iss: { code: string; input?: unknown }) => (iss.code === 'invalid_type' ? `expected a mapping (key: value lines), got ${show(iss.input)}` : undefined) };

const absolutePath = (what: string) =>
  z.string({ error: (iss) => `expected ${what}, got ${show(iss.input)}` }).refine((p) => path.isAbsolute(p), { message: `${what} must be an absolute path` });

const PLACEHOLDER = /\{([^}]*)\}/g;
const template = (what: string) =>
  absolutePath(what).superRefine((p, ctx) => {
    for (const m of p.matchAll(PLACEHOLDER)) {
      if (m[1] !== 'vm' && m[1] !== 'disk') ctx.addIssue({ code: 'custom', message: `unknown placeholder {${m[1]}}; the placeholders are {vm} and {disk}` });
    }
  });

const entrySchema = z
  .strictObject(
    {
      vm: z.string({ error: (iss) => `expected a VM name or glob such as "web*", got ${show(iss.input)}` }).min(1, 'must not be empty'),
      disks: z.union([z.literal('all'), z.array(z.string().min(1)).min(1, 'name at least one disk, or say all')], {
        error: (iss) => `expected a list of disks such as [vd0] or all, got ${show(iss.input)}`,
      }),
      target: template('the target image path'),
      'key-file': template('the key file path'),
      format: z.enum(FORMAT_CHOICES, { error: (iss) => `expected auto, luks or qcow2, got ${show(iss.input)}` }).default('auto'),
      encrypter: z.enum(ENCRYPTERS, { error: (iss) => `expected qemu or storage-daemon, got ${show(iss.input)}` }).optional(),
      qmp: template('the QMP socket path').optional(),
    },
    mapping,
  )
  .superRefine((e, ctx) => {
    // Two disks of one VM would be written to one file.
    const many = e.disks === 'all' || e.disks.length > 1;
    if (many && !e.target.includes('{disk}')) {
      ctx.addIssue({ code: 'custom', path: ['target'], message: 'needs {disk} when the entry names more than one disk (each disk gets its own image)' });
    }
    if (!e.target.includes('{vm}') && /[*?[]/.test(e.vm)) {
      ctx.addIssue({ code: 'custom', path: ['target'], message: 'needs {vm} when vm is a glob (each VM gets its own image)' });
    }
  });

const configSchema = z.strictObject(
  {
    policy: z.union([z.string().min(1), z.record(z.string(), z.unknown())], { error: (iss) => `expected a policy file path or the policy's keys, got ${show(iss.input)}` }).optional(),
    backend: z.enum(['auto', 'qmp', 'libvirt'], { error: (iss) => `expected auto, qmp or libvirt, got ${show(iss.input)}` }).default('auto'),
    connect: z.string({ error: (iss) => `expected a libvirt URI such as qemu:///system, got ${show(iss.input)}` }).regex(/^[a-z][a-z0-9+]*:\/\//, 'expected a libvirt URI such as qemu:///system').default('qemu:///system'),
    'libvirt-pause': z.enum(['speed', 'qemu'], { error: (iss) => `expected speed or qemu, got ${show(iss.input)}` }).default('speed'),
    influx: z
      .string({ error: (iss) => `expected a URL such as http://127.0.0.1:8086/idlecrypt, got ${show(iss.input)}` })
      .superRefine((u, ctx) => {
        try {
          parseInfluxUrl(u);
        } catch (e) {
          ctx.addIssue({ code: 'custom', message: (e as Error).message });
        }
      })
      .optional(),
    host: z
      .strictObject(
        {
          'max-jobs': z.number({ error: (iss) => `expected a whole number >= 1, got ${show(iss.input)}` }).int('expected a whole number').min(1, 'must be at least 1').default(1),
          'max-speed': scalar(parseByteRate).default(0),
          protect: z.enum(['storage', 'vm'], { error: (iss) => `expected storage or vm, got ${show(iss.input)}` }).default('storage'),
        },
        mapping,
      )
      .default({ 'max-jobs': 1, 'max-speed': 0, protect: 'storage' }),
    encrypt: z.array(entrySchema, { error: (iss) => `expected a list of entries (- vm: ...), got ${show(iss.input)}` }).default([]),
  },
  mapping,
);

const KNOWN: Record<string, string[]> = {
  '': ['policy', 'backend', 'connect', 'libvirt-pause', 'influx', 'host', 'encrypt'],
  host: ['max-jobs', 'max-speed', 'protect'],
  entry: ['vm', 'disks', 'target', 'key-file', 'format', 'encrypter', 'qmp'],
};

function configError(issues: readonly PolicyIssue[]): IdlecryptError {
  const more = issues.length > 1 ? ` (and ${issues.length - 1} more)` : '';
  return new IdlecryptError('CONFIG', formatIssue(issues[0]!) + more, { context: { file: issues[0]!.file, issues } });
}

/** Reads and validates the agent's configuration. Throws IdlecryptError CONFIG. */
export function loadAgentConfig(file: string): AgentConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message;
    throw new IdlecryptError('CONFIG', `${file}: cannot read the agent's configuration: ${why}`, { cause: e, context: { file } });
  }
  return parseAgentConfig(text, file);
}

export function parseAgentConfig(text: string, file: string): AgentConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, keepSourceTokens: true, prettyErrors: false, uniqueKeys: true });
  const issueAt = (offset: number, p: readonly (string | number)[], message: string): PolicyIssue => {
    const { line, col } = lineCounter.linePos(offset);
    return { file, line, col, path: p.map(String).join('.'), message };
  };
  if (doc.errors.length > 0) {
    throw configError(doc.errors.map((e) => issueAt(e.pos[0], pathAt(doc, e.pos[0]), `YAML syntax: ${lowerFirst(e.message.split('\n')[0]!)}`)));
  }
  const js: unknown = doc.toJS({ maxAliasCount: 100 }) ?? {};
  if (!isPlainObject(js)) throw configError([issueAt(doc.contents?.range?.[0] ?? 0, [], 'the configuration must be a mapping of keys such as host, encrypt')]);
  const result = configSchema.safeParse(js, { reportInput: true });
  if (!result.success) {
    const issues: PolicyIssue[] = [];
    for (const iss of result.error.issues) {
      const p = iss.path as (string | number)[];
      if (iss.code === 'unrecognized_keys') {
        const known = KNOWN[p[0] === 'encrypt' ? 'entry' : p.join('.')] ?? [];
        for (const key of iss.keys) issues.push(issueAt(locate(doc, [...p, key], 'key').offset, [...p, key], unknownKeyMessage(key, known)));
      } else {
        issues.push(issueAt(locate(doc, p, 'value').offset, p, iss.message));
      }
    }
    issues.sort((a, b) => a.line - b.line || a.col - b.col);
    throw configError(issues);
  }
  const c = result.data;
  let policy: Policy;
  let policyFile: string | undefined;
  if (typeof c.policy === 'string') {
    policyFile = path.resolve(path.dirname(file), c.policy);
    policy = loadPolicy(policyFile);
  } else if (c.policy) {
    // Inline keys: validated as a policy file would be, with positions in this file. The
    // text before the mapping is blanked (newlines kept), so lines and columns stay.
    const node = isMap(doc.contents) ? doc.contents.items.find((p) => isNode(p.key) && String((p.key as { value?: unknown }).value) === 'policy')?.value : undefined;
    const range = isNode(node) ? node.range : undefined;
    const inline = range ? text.slice(0, range[0]).replace(/[^\n]/g, ' ') + text.slice(range[0], range[1]) : '';
    policy = parsePolicy(inline, file);
  } else {
    policy = loadPolicy(undefined);
  }
  return {
    file,
    backend: c.backend,
    connect: c.connect,
    libvirtPause: c['libvirt-pause'],
    ...(policyFile !== undefined ? { policyFile } : {}),
    policy,
    ...(c.influx !== undefined ? { influx: c.influx } : {}),
    host: { maxJobs: c.host['max-jobs'], maxSpeed: c.host['max-speed'], protect: c.host.protect },
    encrypt: c.encrypt.map((e) => ({
      vm: e.vm,
      disks: e.disks,
      target: e.target,
      keyFile: e['key-file'],
      format: e.format,
      ...(e.encrypter !== undefined ? { encrypter: e.encrypter } : {}),
      ...(e.qmp !== undefined ? { qmp: e.qmp } : {}),
    })),
  };
}

/** Whether a VM name matches an entry's glob: `*` any run, `?` one character, `[..]` a class. */
export function globMatch(glob: string, name: string): boolean {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const ch = glob[i]!;
    if (ch === '*') re += '.*';
    else if (ch === '?') re += '.';
    else if (ch === '[') {
      const end = glob.indexOf(']', i + 1);
      if (end < 0) re += '\\[';
      else {
        const body = glob.slice(i + 1, end).replace(/\\/g, '\\\\');
        re += `[${body.startsWith('!') ? `^${body.slice(1)}` : body}]`;
        i = end;
      }
    } else re += ch.replace(/[.+^${}()|\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`).test(name);
}

/** A template with {vm} and {disk} filled in. Characters a path cannot hold become '_'. */
export function expand(template: string, vm: string, disk: string): string {
  const safe = (s: string) => s.replace(/[/\0]/g, '_');
  return template.replace(/\{vm\}/g, safe(vm)).replace(/\{disk\}/g, safe(disk));
}
