/**
 * The embedded default: without --influx, points are appended as InfluxDB line protocol to
 * a local file, so that a run needs no server and the metrics can be loaded later:
 *
 *   curl -XPOST 'http://127.0.0.1:8086/query' --data-urlencode 'q=CREATE DATABASE idlecrypt'
 *   curl -XPOST 'http://127.0.0.1:8086/write?db=idlecrypt' --data-binary @idlecrypt-metrics/vm1-20261125T091732Z.lp
 *   influx -import -path=idlecrypt-metrics/vm1-20261125T091732Z.lp   (influxdb-client package)
 *
 * The file opens with `# DML` / `# CONTEXT-DATABASE: idlecrypt` comment lines, which
 * `influx -import` needs and `/write` skips; timestamps are nanoseconds, the default of both.
 * Lines go to the file in batches (every flushIntervalMs) through the same bounded buffer
 * as the InfluxDB sink: a full or failing disk costs metrics, never the controller's time.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { IdlecryptError } from '../errors.ts';
import { BatchingSink, errorText, type BatchingOptions } from './batching.ts';
import { DEFAULT_DATABASE } from './influx-url.ts';
import { fileHeader, toLineProtocol } from './line-protocol.ts';
import type { MetricPoint } from './names.ts';

export const DEFAULT_METRICS_DIR = 'idlecrypt-metrics';

/** `<dir>/<vm>-<UTC time>.lp`, e.g. idlecrypt-metrics/vm1-20261125T091732Z.lp. */
export function defaultMetricsFile(o: { vm: string; time: Date; dir?: string }): string {
  const stamp = o.time.toISOString().replace(/\.\d+Z$/, 'Z').replace(/[-:]/g, '');
  const name = o.vm.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^\.+/, '_') || 'vm';
  return path.join(o.dir ?? DEFAULT_METRICS_DIR, `${name}-${stamp}.lp`);
}

export interface FileSinkOptions extends BatchingOptions {
  /** The database named in the file's header for `influx -import`; default idlecrypt. */
  database?: string;
}

export class LineProtocolFileSink extends BatchingSink<string> {
  readonly description: string;
  protected readonly kind = 'file' as const;
  protected readonly target: string;

  private constructor(
    readonly path: string,
    private readonly file: fs.FileHandle,
    options: FileSinkOptions,
  ) {
    super(options);
    this.target = path;
    this.description = `file ${path}`;
  }

  /**
   * Creates the directory and opens the file for appending (a file that exists is appended
   * to). Fails with IdlecryptError 'USAGE' when it cannot: that is a bad path or
   * permission, and better said before the copy starts than lost silently.
   */
  static async open(file: string, options: FileSinkOptions = {}): Promise<LineProtocolFileSink> {
    let handle: fs.FileHandle;
    try {
      await fs.mkdir(path.dirname(file), { recursive: true });
      handle = await fs.open(file, 'a', 0o644);
      if ((await handle.stat()).size === 0) await handle.appendFile(fileHeader(options.database ?? DEFAULT_DATABASE));
    } catch (e) {
      throw new IdlecryptError('USAGE', `cannot write the metrics file ${file}: ${errorText(e)}`, { cause: e, context: { path: file } });
    }
    return new LineProtocolFileSink(file, handle, options);
  }

  protected encode(p: MetricPoint): string {
    return toLineProtocol(p);
  }

  protected async send(batch: string[]): Promise<void> {
    await this.file.appendFile(`${batch.join('\n')}\n`);
  }

  protected async release(): Promise<void> {
    try {
      await this.file.sync();
    } finally {
      await this.file.close();
    }
  }
}
