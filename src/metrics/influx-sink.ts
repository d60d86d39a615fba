/**
 * Points to InfluxDB 1.x with the `influx` package (5.x; its write endpoint works with
 * Debian's InfluxDB 1.6, unlike @influxdata/influxdb-client which needs 1.8+).
 *
 * The package's own retry and host-disabling are turned off (maxRetries 0, a backoff of 0):
 * BatchingSink owns retries, so that one policy decides what is kept, what is dropped and
 * what is logged. The database is created on the first send (CREATE DATABASE is a no-op
 * when it exists) and again if InfluxDB reports it missing.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import { FieldType, InfluxDB, type IPoint, type ISchemaOptions } from 'influx';
import { BatchingSink, errorText, RejectedBatch, type BatchingOptions } from './batching.ts';
import { parseInfluxUrl, type InfluxTarget } from './influx-url.ts';
import { nanoTimestamp } from './line-protocol.ts';
import { MEASUREMENTS, type MeasurementSpec, type MetricPoint } from './names.ts';

export interface InfluxSinkOptions extends BatchingOptions {
  /** ms without an answer before a request counts as failed ("slow"); default 5000. */
  requestTimeoutMs?: number;
}

const TYPE: Record<MeasurementSpec['fields'][string]['type'], FieldType> = {
  integer: FieldType.INTEGER,
  float: FieldType.FLOAT,
  string: FieldType.STRING,
};

/** names.ts as the influx package's schemas: integers get their `i`, unknown names are refused. */
export function influxSchemas(database: string): ISchemaOptions[] {
  return Object.values(MEASUREMENTS).map((m: MeasurementSpec) => ({
    database,
    measurement: m.name,
    tags: Object.keys(m.tags),
    fields: Object.fromEntries(Object.entries(m.fields).map(([name, f]) => [name, TYPE[f.type]])),
  }));
}

/** Never retried by the pool, never disables the host: see the module comment. */
const NO_BACKOFF = { getDelay: () => 0, next: () => NO_BACKOFF, reset: () => NO_BACKOFF };

export class InfluxSink extends BatchingSink<IPoint> {
  readonly description: string;
  protected readonly kind = 'influx' as const;
  protected readonly target: string;
  readonly influx: InfluxDB;
  readonly database: string;
  private readonly agent: http.Agent;
  private databaseReady = false;

  constructor(target: InfluxTarget | string, options: InfluxSinkOptions = {}) {
    super(options);
    const t = typeof target === 'string' ? parseInfluxUrl(target) : target;
    this.target = t.display;
    this.description = `InfluxDB ${t.display}`;
    this.database = t.database;
    // Our own agent, so that close() can drop its kept-alive sockets.
    this.agent = t.protocol === 'https' ? new https.Agent({ keepAlive: true, maxSockets: 2 }) : new http.Agent({ keepAlive: true, maxSockets: 2 });
    this.influx = new InfluxDB({
      host: t.host,
      port: t.port,
      protocol: t.protocol,
      database: t.database,
      ...(t.username !== undefined ? { username: t.username, password: t.password ?? '' } : {}),
      options: { agent: this.agent },
      pool: { maxRetries: 0, requestTimeout: options.requestTimeoutMs ?? 5000, backoff: NO_BACKOFF },
      schema: influxSchemas(t.database),
    });
  }

  protected encode(p: MetricPoint): IPoint {
    const point: IPoint = { measurement: p.measurement, tags: p.tags as Record<string, string>, fields: p.fields, timestamp: nanoTimestamp(p.time) };
    // The schema check writePoints() would make, per point: a bad point is refused alone
    // instead of failing (and being retried with) its whole batch.
    this.influx.parsePoint(point, { precision: 'n' });
    return point;
  }

  protected async send(batch: IPoint[]): Promise<void> {
    if (!this.databaseReady) {
      try {
        await this.influx.createDatabase(this.database);
      } catch (e) {
        // A user with write but not admin rights may not create databases: go on and write
        // (a missing database then shows as a failed write).
        const status = statusOf(e);
        if (status !== 401 && status !== 403) throw e;
      }
      this.databaseReady = true;
    }
    try {
      await this.influx.writePoints(batch, { precision: 'n' });
    } catch (e) {
      let error = e;
      if (statusOf(error) === 404) {
        // The database was dropped under us: create it again and retry this batch once.
        try {
          await this.influx.createDatabase(this.database);
          await this.influx.writePoints(batch, { precision: 'n' });
          return;
        } catch (again) {
          error = again;
        }
      }
      // 400 and the like: the points are wrong (a field type conflict, a malformed value),
      // and sending them again will not help. A partial write says how many it dropped
      // ("dropped=N"); the others were written. Auth, timeouts, 429 and 5xx are retried.
      const status = statusOf(error);
      if (status !== undefined && status >= 400 && status < 500 && ![401, 403, 404, 408, 429].includes(status)) {
        const refused = /dropped=(\d+)/.exec(errorText(error))?.[1];
        throw new RejectedBatch(errorText(error), refused === undefined ? undefined : Number(refused));
      }
      throw error;
    }
  }

  protected async release(): Promise<void> {
    this.agent.destroy();
  }
}

/** The HTTP status of an influx package RequestError (it carries the response as `res`). */
function statusOf(e: unknown): number | undefined {
  const res = (e as { res?: { statusCode?: unknown } } | null)?.res;
  return typeof res?.statusCode === 'number' ? res.statusCode : undefined;
}
