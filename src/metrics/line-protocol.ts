/**
 * InfluxDB line protocol (1.x), for the file sink and for docs/tests:
 *
 *   measurement,tag=value,... field=value,... timestamp
 *
 * Escaping follows the InfluxDB 1.x line protocol reference ("Special characters"):
 * measurement names escape `,` and space; tag keys, tag values and field keys escape `,`,
 * `=` and space; string field values are double-quoted with `"` and `\` escaped. Line
 * protocol cannot carry a newline in a tag or string, so CR/LF become spaces. Integers carry
 * the `i` suffix, floats none. Timestamps are nanoseconds (the default precision of
 * `/write` and `influx -import`), from epoch ms with microsecond resolution.
 *
 * The influx package writes the same text for the same MetricPoint (influx-sink.ts passes
 * it a schema derived from names.ts); test/metrics checks that both load identically.
 */
import { specOf, type MetricPoint } from './names.ts';

const oneLine = (s: string): string => s.replace(/[\r\n]+/g, ' ');

export function escapeMeasurement(s: string): string {
  return oneLine(s).replace(/[, ]/g, '\\$&');
}

/** Tag keys, tag values and field keys. */
export function escapeKey(s: string): string {
  return oneLine(s).replace(/[,= ]/g, '\\$&');
}

export function quoteString(s: string): string {
  return `"${oneLine(s).replace(/["\\]/g, '\\$&')}"`;
}

/** Nanoseconds since the epoch as a decimal string (microsecond resolution). */
export function nanoTimestamp(epochMs: number): string {
  const us = Math.round(epochMs * 1000);
  return us === 0 ? '0' : `${us}000`;
}

/** A field value as line protocol, by the field's type in names.ts. */
export function formatField(measurement: string, name: string, value: number | string): string {
  const type = specOf(measurement)?.fields[name]?.type ?? (typeof value === 'string' ? 'string' : 'float');
  switch (type) {
    case 'string':
      return quoteString(String(value));
    case 'integer':
      return `${Math.round(Number(value))}i`;
    case 'float':
      return String(Number(value));
  }
}

/** One point as one line (no trailing newline). */
export function toLineProtocol(p: MetricPoint): string {
  let line = escapeMeasurement(p.measurement);
  for (const [k, v] of Object.entries(p.tags)) line += `,${escapeKey(k)}=${escapeKey(v)}`;
  let sep = ' ';
  for (const [k, v] of Object.entries(p.fields)) {
    line += `${sep}${escapeKey(k)}=${formatField(p.measurement, k, v)}`;
    sep = ',';
  }
  return `${line} ${nanoTimestamp(p.time)}`;
}

/**
 * The header of a line-protocol file: comment lines that `/write` skips and that
 * `influx -import` reads as "the lines below are data for this database".
 */
export function fileHeader(database: string): string {
  return `# DML\n# CONTEXT-DATABASE: ${database}\n`;
}
