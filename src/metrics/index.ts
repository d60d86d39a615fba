/**
 * Metrics: names (names.ts) -> points -> a sink (InfluxDB, or a line-protocol file by
 * default). See README.md in this folder for every metric and how to load the file.
 */
import { hostname } from 'node:os';
import type { BatchingOptions } from './batching.ts';
import { defaultMetricsFile, LineProtocolFileSink } from './file-sink.ts';
import { InfluxSink, type InfluxSinkOptions } from './influx-sink.ts';
import { parseInfluxUrl } from './influx-url.ts';
import type { MetricsSink } from './sink.ts';

export * from './names.ts';
export { toLineProtocol, fileHeader } from './line-protocol.ts';
export { parseInfluxUrl, DEFAULT_DATABASE, DEFAULT_INFLUX_PORT, type InfluxTarget } from './influx-url.ts';
export { NullSink, type MetricsSink, type SinkStats, type SinkState } from './sink.ts';
export { InfluxSink, influxSchemas, type InfluxSinkOptions } from './influx-sink.ts';
export { LineProtocolFileSink, defaultMetricsFile, DEFAULT_METRICS_DIR, type FileSinkOptions } from './file-sink.ts';
export type { BatchingOptions } from './batching.ts';

/** The `host` tag: this machine's name. */
export function hostTag(): string {
  return hostname();
}

export interface OpenMetricsOptions extends BatchingOptions, InfluxSinkOptions {
  /** --influx URL; when absent, the file sink. */
  influx?: string;
  /** The file for the file sink; default idlecrypt-metrics/<vm>-<time>.lp. */
  file?: string;
  /** For the default file name. */
  vm: string;
  /** For the default file name; default now. */
  startedAt?: Date;
}

/**
 * The sink for a run: InfluxDB when --influx is given (the URL is checked now, the server
 * is not: it may come up later), else the line-protocol file (opened now, so that a bad
 * path fails before the copy starts). Throws IdlecryptError 'USAGE' for either mistake.
 */
export async function openMetricsSink(o: OpenMetricsOptions): Promise<MetricsSink> {
  if (o.influx !== undefined) return new InfluxSink(parseInfluxUrl(o.influx), o);
  const file = o.file ?? defaultMetricsFile({ vm: o.vm, time: o.startedAt ?? new Date() });
  return LineProtocolFileSink.open(file, o);
}
