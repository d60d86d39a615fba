/**
 * The scalar values a policy is written in, as people write them, and back.
 *
 * Speeds are held as bytes/s with two special values: `UNLIMITED` (Infinity) and `PAUSED`
 * (0), so that "the fastest of several limits" is plain `Math.max`. They become QMP's
 * encoding (0 = unlimited, block-job-set-speed) only at the edge, in the controller.
 *
 * Each parser returns a value or a one-line problem (never throws): the schema turns the
 * problem into an error with the file position and key path.
 */

/** No speed limit (QMP: `speed: 0` to block-job-set-speed). */
export const UNLIMITED = Infinity;
/** Job paused (QMP job-pause), or emulated by a very low limit where pause is missing. */
export const PAUSED = 0;

export type Parsed<T> = { ok: true; value: T } | { ok: false; problem: string };

const ok = <T>(value: T): Parsed<T> => ({ ok: true, value });
const bad = <T>(problem: string): Parsed<T> => ({ ok: false, problem });

/** How a value read from YAML is named in a problem: `"fast"`, `-5`, `a mapping`. */
export function show(v: unknown): string {
  if (v === null || v === undefined) return 'nothing';
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return 'a list';
  return 'a mapping';
}

// Binary multiples, as `--speed` on the command line (src/cli/options.ts) reads them, so that
// "50M" means the same in a policy file and on the command line.
const BYTE_SUFFIX: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };
const BYTES_RE = /^(-?\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:\/s)?$/i;

/** A byte rate: 104857600, 50MiB, 100M, 1.5G, 64KiB/s. Negative values are rejected. */
export function parseByteRate(v: unknown): Parsed<number> {
  let n: number;
  if (typeof v === 'number') n = v;
  else if (typeof v === 'string' && BYTES_RE.test(v.trim())) {
    const m = BYTES_RE.exec(v.trim())!;
    n = Number(m[1]) * BYTE_SUFFIX[m[2]!.toUpperCase()]!;
  } else return bad(`expected bytes/s such as 50MiB, 100M or 104857600, got ${show(v)}`);
  if (!Number.isFinite(n)) return bad(`expected a finite number of bytes/s, got ${show(v)}`);
  if (n < 0) return bad(`a speed cannot be negative, got ${show(v)}`);
  const rounded = Math.round(n);
  if (!Number.isSafeInteger(rounded)) return bad(`${show(v)} is too large`);
  return ok(rounded);
}

/**
 * A job speed: `unlimited`, `paused`, or a byte rate. A plain 0 means paused, as the
 * issue's "busy speed (default 0 = paused)" reads; note that QMP's 0 means the opposite,
 * which is why policies should write the words.
 */
export function parseSpeed(v: unknown): Parsed<number> {
  if (v === 'unlimited') return ok(UNLIMITED);
  if (v === 'paused') return ok(PAUSED);
  const r = parseByteRate(v);
  if (!r.ok && !/negative|too large/.test(r.problem)) {
    return bad(`expected unlimited, paused, or bytes/s such as 50MiB, 100M or 104857600, got ${show(v)}`);
  }
  return r;
}

/** How much of the copy may sit in the host's page cache before the target is flushed: off, or bytes (at least 1 MiB). */
export function parseFlush(v: unknown): Parsed<number | null> {
  if (v === 'off' || v === null) return ok(null);
  const expected = `expected off or bytes such as 64MiB, got ${show(v)}`;
  if (typeof v === 'string' && /\/s$/i.test(v.trim())) return bad(`${expected} (an amount, not a speed)`);
  const r = parseByteRate(v);
  if (!r.ok) return bad(/negative|too large/.test(r.problem) ? r.problem.replace('a speed', 'an amount') : expected);
  if (r.value < 1024 ** 2) return bad(`must be off or at least 1MiB, got ${show(v)}`);
  return r;
}

/** The floor of the completion guarantee: `none` (no floor) or a positive byte rate. */
export function parseFloor(v: unknown): Parsed<number> {
  if (v === 'none' || v === null || v === 0) return ok(0);
  const r = parseByteRate(v);
  if (!r.ok) {
    if (/negative|too large/.test(r.problem)) return r;
    return bad(`expected none or bytes/s such as 10MiB, got ${show(v)}`);
  }
  return r;
}

const DURATION_UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION_RE = /^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$/;

/** A duration with units: 50ms, 1s, 1.5s, 90m, 2h, 1h30m. A bare number is refused: ms or s? */
export function parseDuration(v: unknown): Parsed<number> {
  if (typeof v === 'number') {
    return bad(v < 0 ? `a duration cannot be negative, got ${v}` : `a duration needs a unit (such as 250ms, 1s, 2h), got ${v}`);
  }
  if (typeof v !== 'string') return bad(`expected a duration such as 250ms, 1s or 2h, got ${show(v)}`);
  const s = v.trim();
  if (s.startsWith('-')) return bad(`a duration cannot be negative, got ${show(v)}`);
  if (!DURATION_RE.test(s)) return bad(`expected a duration such as 250ms, 1s or 2h, got ${show(v)}`);
  let ms = 0;
  for (const m of s.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) ms += Number(m[1]) * DURATION_UNIT_MS[m[2]!]!;
  return ok(Math.round(ms));
}

/** A rate threshold in events per second (a number >= 0), or `off` to ignore that signal. */
export function parseThreshold(v: unknown): Parsed<number | null> {
  if (v === 'off') return ok(null);
  if (v === 'auto') return bad('auto is for disk and interrupts only: input is never learnt (a person at the console comes first), nor the stall the copy itself causes');
  if (typeof v !== 'number' || !Number.isFinite(v)) return bad(`expected a rate per second (a number) or off, got ${show(v)}`);
  if (v < 0) return bad(`a threshold cannot be negative, got ${v}`);
  return ok(v);
}

/** A threshold that may be learnt per guest: a rate, off, or auto (src/controller/calibrate.ts). */
export function parseLearnableThreshold(v: unknown): Parsed<number | null | 'auto'> {
  if (v === 'auto') return ok('auto');
  if (v !== 'off' && (typeof v !== 'number' || !Number.isFinite(v))) return bad(`expected a rate per second (a number), off or auto, got ${show(v)}`);
  return parseThreshold(v); // its own words for a negative rate
}

/**
 * The share of QEMU's main loop the copy leaves free at its idle speed: `off` (null: the
 * idle speed is not capped), or a share from 5% to 90% written as `15%` or `0.15`.
 */
export function parseHeadroom(v: unknown): Parsed<number | null> {
  if (v === 'off' || v === null) return ok(null);
  let n: number | undefined;
  if (typeof v === 'number' && Number.isFinite(v)) n = v;
  else if (typeof v === 'string' && /^\d+(?:\.\d+)?\s*%$/.test(v.trim())) n = Number(v.trim().replace('%', '').trim()) / 100;
  if (n === undefined) return bad(`expected off or a share of the main loop such as 15%, got ${show(v)}`);
  if (n < 0.05 || n > 0.9) return bad(`must be between 5% and 90% (or off), got ${show(v)}`);
  return ok(n);
}

/** latency.margin: off, or how far the guest's typical (median, or mean) disk latency may rise over its baseline (1% to 500%). */
export function parseLatencyMargin(v: unknown): Parsed<number | null> {
  if (v === 'off' || v === null) return ok(null);
  let n: number | undefined;
  if (typeof v === 'string' && /^\d+(?:\.\d+)?\s*%$/.test(v.trim())) n = Number(v.trim().replace('%', '').trim()) / 100;
  if (n === undefined) return bad(`expected off or a percentage such as 15%, got ${show(v)}`);
  if (n < 0.01 || n > 5) return bad(`must be between 1% and 500% (or off), got ${show(v)}`);
  return ok(n);
}

/** When the copy must be done: a duration after the job starts, an ISO 8601 time, or none. */
export type Deadline = { readonly after: number } | { readonly at: number };

// Date and time with an explicit offset, so that a deadline does not depend on the host's
// time zone (RFC 3339 profile of ISO 8601).
const ISO_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})$/;

export function parseDeadline(v: unknown): Parsed<Deadline | null> {
  if (v === 'none' || v === null) return ok(null);
  if (typeof v === 'string' && ISO_RE.test(v.trim())) {
    const t = Date.parse(v.trim());
    if (Number.isNaN(t)) return bad(`${show(v)} is not a valid date and time`);
    return ok({ at: t });
  }
  const d = parseDuration(v);
  if (d.ok) {
    if (d.value <= 0) return bad(`a deadline must be after the job starts, got ${show(v)}`);
    return ok({ after: d.value });
  }
  if (/negative/.test(d.problem)) return d as Parsed<never>;
  return bad(`expected none, a duration after the job starts (such as 2h) or a time such as 2030-01-31T18:00:00Z, got ${show(v)}`);
}

// ---- formatting, for logs, reasons and `policy check` ----

/** 0 → "paused", Infinity → "unlimited", 15728640 → "15 MiB/s", 1536 → "1.5 KiB/s". */
export function formatSpeed(bps: number): string {
  if (bps === UNLIMITED) return 'unlimited';
  if (bps === PAUSED) return 'paused';
  return `${formatBytes(bps)}/s`;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : round(v, 1)} ${units[i]}`;
}

/** 50 → "50ms", 1000 → "1s", 5400000 → "1h30m". */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  let rest = ms;
  let out = '';
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000]] as const) {
    if (rest >= size) {
      out += `${Math.floor(rest / size)}${unit}`;
      rest %= size;
    }
  }
  if (rest > 0) out += rest % 1000 === 0 ? `${rest / 1000}s` : `${round(rest / 1000, 3)}s`;
  return out;
}

/** A rate as a reason shows it: 37.5, 4, 1200. */
export function formatRate(v: number): string {
  return String(round(v, 1));
}

function round(v: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(v * f) / f;
}
