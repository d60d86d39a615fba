/**
 * Reading a policy file: YAML → a validated `Policy`, or every problem with its place.
 *
 * A user's file is merged over the shipped default (policy/default.yaml, read from the
 * package, not the working directory) before validation, so it sets only what it changes;
 * each `vms.<name>` entry is merged over the result for that VM. Problems are reported as
 * `FILE:LINE:COLUMN: key.path: problem`, positions taken from the YAML document's nodes
 * (yaml's Document API with a LineCounter), so that an operator lands on the offending
 * token, as a compiler would put them.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { isMap, isNode, isScalar, isSeq, LineCounter, parseDocument, type Document } from 'yaml';
import type { z } from 'zod';
import { IdlecryptError } from '../errors.ts';
import { knownKeys, LEARNABLE, moderationSchema, moderationShape, policySchema, type Moderation, type Policy } from './schema.ts';

/** The shipped default policy, next to src/ in the package. */
export const DEFAULT_POLICY_FILE = fileURLToPath(new URL('../../policy/default.yaml', import.meta.url));

export interface PolicyIssue {
  readonly file: string;
  /** 1-based, as editors count. */
  readonly line: number;
  readonly col: number;
  /** Dotted key path, e.g. `vms.web-1.speed.busy`; '' when the problem is not under a key. */
  readonly path: string;
  readonly message: string;
}

export function formatIssue(i: PolicyIssue): string {
  return `${i.file}:${i.line}:${i.col}: ${i.path ? `${i.path}: ` : ''}${i.message}`;
}

/** The error for a policy that cannot be used: the first problem, and how many more. */
export function policyError(issues: readonly PolicyIssue[]): IdlecryptError {
  const first = formatIssue(issues[0]!);
  const more = issues.length > 1 ? ` (and ${issues.length - 1} more)` : '';
  return new IdlecryptError('POLICY', first + more, { context: { file: issues[0]!.file, issues } });
}

type Raw = Record<string, unknown>;

interface Parsed {
  readonly policy: Policy;
  /** The merged raw values, the base a VM override is merged over. */
  readonly raw: Raw;
}

let defaultCache: Parsed | undefined;

function defaults(): Parsed {
  if (!defaultCache) {
    const text = readFileSync(DEFAULT_POLICY_FILE, 'utf8');
    try {
      defaultCache = parse(text, DEFAULT_POLICY_FILE, undefined);
    } catch (e) {
      // The shipped file is ours: if it does not validate, that is a bug, not an input error.
      throw new IdlecryptError('INTERNAL', `the shipped default policy is invalid: ${(e as Error).message}`, { cause: e });
    }
  }
  return defaultCache;
}

/** The shipped default policy (policy/default.yaml). */
export function defaultPolicy(): Policy {
  return defaults().policy;
}

/**
 * Reads and validates a policy file (the shipped default when `file` is undefined). Throws
 * IdlecryptError code POLICY with every problem in `context.issues`. Synchronous on purpose:
 * it is a small file read at start and on reload, and a synchronous read cannot interleave
 * with a half-applied reload.
 */
export function loadPolicy(file?: string): Policy {
  if (file === undefined) return defaultPolicy();
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message;
    throw new IdlecryptError('POLICY', `${file}: cannot read the policy: ${why}`, { cause: e, context: { file } });
  }
  return parsePolicy(text, file);
}

/** Validates policy text as if read from `file` (the name is used in messages only). */
export function parsePolicy(text: string, file: string): Policy {
  return parse(text, file, defaults()).policy;
}

function parse(text: string, file: string, base: Parsed | undefined): Parsed {
  const lineCounter = new LineCounter();
  // uniqueKeys: a key given twice is a mistake worth a message, not "the last one wins".
  const doc = parseDocument(text, { lineCounter, keepSourceTokens: true, prettyErrors: false, uniqueKeys: true });
  const issueAt = (offset: number, path: readonly (string | number)[], message: string): PolicyIssue => {
    const { line, col } = lineCounter.linePos(offset);
    return { file, line, col, path: path.map(String).join('.'), message };
  };

  if (doc.errors.length > 0) {
    throw policyError(
      doc.errors.map((e) => issueAt(e.pos[0], pathAt(doc, e.pos[0]), `YAML syntax: ${lowerFirst(e.message.split('\n')[0]!)}`)),
    );
  }
  const js: unknown = doc.toJS({ maxAliasCount: 100 }) ?? {};
  if (!isPlainObject(js)) {
    throw policyError([issueAt(doc.contents?.range?.[0] ?? 0, [], 'the policy must be a mapping of keys such as thresholds, speed, holdoff')]);
  }

  const issues: PolicyIssue[] = [];
  /** Adds zod's issues under `prefix`; `written` limits them to paths this file wrote. */
  const report = (zissues: readonly z.core.$ZodIssue[], prefix: readonly (string | number)[], writtenOnly = false) => {
    for (const iss of zissues) {
      const path = [...prefix, ...(iss.path as (string | number)[])];
      if (iss.code === 'unrecognized_keys') {
        for (const key of iss.keys) {
          const where = locate(doc, [...path, key], 'key');
          if (writtenOnly && !where.exact) continue;
          issues.push(issueAt(where.offset, [...path, key], unknownKeyMessage(key, knownKeys(path))));
        }
      } else {
        const where = locate(doc, path, 'value');
        if (writtenOnly && !where.exact) continue;
        issues.push(issueAt(where.offset, path, where.exact ? iss.message : `${iss.message} (from the defaults)`));
      }
    }
  };

  const { vms: rawVms, ...topWritten } = js;
  const top = expandAuto(topWritten);
  const merged = base ? deepMerge(base.raw, top) : top;
  const result = policySchema.safeParse({ ...merged, vms: base ? (rawVms ?? {}) : rawVms }, { reportInput: true });
  if (!result.success) report(result.error.issues, []);

  // Each VM's entry is merged over the (file's) top-level settings and validated whole, so
  // that an override is checked exactly as that VM will run it.
  const vms: Record<string, Moderation> = {};
  if (isPlainObject(rawVms)) {
    const moderationKeys = Object.keys(moderationShape);
    const vmBase = Object.fromEntries(moderationKeys.map((k) => [k, merged[k]]));
    for (const [name, over] of Object.entries(rawVms)) {
      const r = moderationSchema.safeParse(deepMerge(vmBase, isPlainObject(over) ? expandAuto(over) : (over ?? {})), { reportInput: true });
      if (r.success) vms[name] = r.data;
      // problems in the shared part are reported once, above; here only what the override wrote
      else report(r.error.issues, ['vms', name], true);
    }
  }

  if (issues.length > 0 || !result.success) {
    issues.sort((a, b) => a.line - b.line || a.col - b.col);
    throw policyError(issues);
  }
  const { vms: _ignored, ...settings } = result.data;
  return { policy: { ...settings, source: file, vms }, raw: merged };
}

/**
 * `thresholds: auto` is short for learning every signal that can be learnt (disk and
 * interrupts, src/controller/calibrate.ts); the others keep the values they are merged over.
 */
function expandAuto(raw: Raw): Raw {
  return raw.thresholds === 'auto' ? { ...raw, thresholds: Object.fromEntries(LEARNABLE.map((s) => [s, 'auto'])) } : raw;
}

export function unknownKeyMessage(key: string, known: readonly string[]): string {
  if (known.length === 0) return 'unknown key';
  const near = known.filter((k) => editDistance(k, key) <= Math.max(1, Math.floor(k.length / 3)));
  const hint = near.length > 0 ? ` (did you mean ${near.join(' or ')}?)` : '';
  return `unknown key${hint}; expected one of ${known.join(', ')}`;
}

/**
 * Where in the document `path` is: the value node (or, for `key`, the key node). When the
 * path is not written in this file (a value that came from the defaults, or a key that is
 * missing), the nearest enclosing node that is, with `exact: false`.
 */
export function locate(doc: Document, path: readonly (string | number)[], want: 'key' | 'value'): { offset: number; exact: boolean } {
  let node: unknown = doc.contents;
  let offset = (isNode(node) && node.range?.[0]) || 0;
  for (let i = 0; i < path.length; i++) {
    // a list's entry, by index (the agent's `encrypt:` list)
    if (isSeq(node) && typeof path[i] === 'number') {
      const item: unknown = node.items[path[i] as number];
      if (!isNode(item) || !item.range) return { offset, exact: false };
      node = item;
      offset = item.range[0];
      continue;
    }
    if (!isMap(node)) return { offset, exact: false };
    const pair = node.items.find((p) => keyText(p.key) === String(path[i]));
    if (!pair) return { offset, exact: false };
    const keyOffset = isNode(pair.key) && pair.key.range ? pair.key.range[0] : offset;
    if (i === path.length - 1 && want === 'key') return { offset: keyOffset, exact: true };
    node = pair.value;
    // `key:` with nothing after it: point at the key, not at the empty space behind it
    const empty = !isNode(node) || !node.range || (isScalar(node) && node.value === null && node.range[0] === node.range[1]);
    offset = empty ? keyOffset : (node as { range: [number, number, number] }).range[0];
  }
  return { offset, exact: true };
}

/** The key path whose entry spans `offset`, for syntax errors. */
export function pathAt(doc: Document, offset: number): string[] {
  const path: string[] = [];
  let node: unknown = doc.contents;
  while (isMap(node)) {
    // The entry whose value holds the offset: its key ends before it (an error inside a
    // key means the key itself is garbled, and is no name to report), its value reaches it
    // (an unterminated value is reported just past its end).
    const pair = node.items.findLast((p) => {
      const keyEnd = isNode(p.key) && p.key.range ? p.key.range[1] : Infinity;
      const end = isNode(p.value) && p.value.range ? p.value.range[2] : -1;
      return keyEnd <= offset && offset <= end;
    });
    if (!pair) break;
    path.push(keyText(pair.key));
    node = pair.value;
  }
  return path;
}

function keyText(key: unknown): string {
  return isScalar(key) ? String(key.value) : String(key);
}

export function isPlainObject(v: unknown): v is Raw {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** `over` wins; mappings merge key by key; anything else (lists, scalars, null) replaces. */
export function deepMerge(base: unknown, over: unknown): Raw {
  if (!isPlainObject(base) || !isPlainObject(over)) return over as Raw;
  const out: Raw = { ...base };
  for (const [k, v] of Object.entries(over)) out[k] = k in base ? deepMerge(base[k], v) : v;
  return out;
}

export function lowerFirst(s: string): string {
  return s.charAt(0).toLowerCase() + s.slice(1);
}

/** Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent swaps. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      // a swap of two neighbours ("dsik") is one typo, not two
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i]![j] = Math.min(d[i]![j]!, d[i - 2]![j - 2]! + 1);
    }
  }
  return d[a.length]![b.length]!;
}
