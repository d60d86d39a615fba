/**
 * InfluxQL targets for the foundation SDK, which ships no InfluxDB query type (11.6): a
 * custom Dataquery as its "custom query type" how-to shows. The fields are those of
 * Grafana's InfluxDB query model for a raw query: `rawQuery: true` with the text in
 * `query`; Grafana substitutes $timeFilter, $__interval and the template variables.
 */
import type { Builder, Dataquery } from '@grafana/grafana-foundation-sdk/cog';
import type { DataSourceRef } from '@grafana/grafana-foundation-sdk/dashboard';

/** The datasource every panel uses; dashboards/provisioning/datasources/idlecrypt.yaml defines it with this uid. */
export const DATASOURCE: Required<DataSourceRef> = { type: 'influxdb', uid: 'idlecrypt-influxdb' };

export interface InfluxQLQuery {
  refId: string;
  hide?: boolean;
  datasource: DataSourceRef;
  query: string;
  rawQuery: true;
  /** time_series for graphs, table for tables. */
  resultFormat: 'time_series' | 'table';
  /** Series name pattern: $tag_vm, $col, $m. */
  alias?: string;
  _implementsDataqueryVariant(): void;
}

export class InfluxQLQueryBuilder implements Builder<Dataquery> {
  private readonly internal: InfluxQLQuery;

  constructor(query: string) {
    this.internal = {
      refId: 'A',
      datasource: DATASOURCE,
      query,
      rawQuery: true,
      resultFormat: 'time_series',
      _implementsDataqueryVariant() {},
    };
  }

  build(): InfluxQLQuery {
    return this.internal;
  }

  refId(refId: string): this {
    this.internal.refId = refId;
    return this;
  }

  alias(alias: string): this {
    this.internal.alias = alias;
    return this;
  }

  resultFormat(format: InfluxQLQuery['resultFormat']): this {
    this.internal.resultFormat = format;
    return this;
  }

  hide(hide: boolean): this {
    this.internal.hide = hide;
    return this;
  }
}
