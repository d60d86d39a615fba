/** Parsers for CLI option values; each rejects bad input with one line naming the flag. */
import { IdlecryptError } from '../errors.ts';

const SUFFIX: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** Bytes (per second) as an integer with an optional binary suffix: 0, 1048576, 100M, 1.5G. */
export function parseBytes(flag: string, value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:\/s)?$/i.exec(value.trim());
  if (!m) throw new IdlecryptError('USAGE', `${flag}: '${value}' is not a byte count (examples: 0, 52428800, 50M, 1G)`);
  const n = Math.round(Number(m[1]) * SUFFIX[m[2]!.toUpperCase()]!);
  if (!Number.isSafeInteger(n)) throw new IdlecryptError('USAGE', `${flag}: '${value}' is too large`);
  return n;
}

export function parsePositiveInt(flag: string, value: string, min = 1): number {
  if (!/^\d+$/.test(value.trim()) || Number(value) < min) {
    throw new IdlecryptError('USAGE', `${flag}: '${value}' must be a whole number >= ${min}`);
  }
  return Number(value);
}

export function parseChoice<T extends string>(flag: string, value: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(value)) {
    throw new IdlecryptError('USAGE', `${flag}: '${value}' is not one of ${choices.join(', ')}`);
  }
  return value as T;
}
