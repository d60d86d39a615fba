/**
 * Without a Grafana, a dashboard is checked by running what Grafana would run: every
 * panel's InfluxQL with Grafana's macros and template variables filled in, against a real
 * InfluxDB. panelQueries() does the filling; checkPanels() runs them and says which
 * returned data. test/dashboards asserts on it; a demo can print its summary.
 *
 * Filling follows Grafana's InfluxDB datasource: $timeFilter becomes a time condition,
 * $__interval a duration, and a variable inside a regex (`/^$vm$/`) its value with regex
 * characters escaped, several values as `(a|b)`, "All" as every value (here: `.*`).
 */
import type { InfluxDB } from 'influx';
import { LATENCY_FIELDS, learntField } from '../src/metrics/names.ts';
import { LEARNABLE } from '../src/policy/schema.ts';

export interface GrafanaVars {
  /** Values of the dashboard's variables by name; absent or [] = "All". */
  readonly [variable: string]: string | readonly string[] | undefined;
}

export interface MacroValues {
  /** $timeFilter; default `time > now() - 1h`. */
  readonly timeFilter?: string;
  /** $__interval; default `1s`. */
  readonly interval?: string;
}

export interface PanelQuery {
  readonly panelId: number;
  readonly panel: string;
  readonly type: string;
  readonly refId: string;
  /** As in the dashboard JSON. */
  readonly raw: string;
  /** With the macros and variables filled in. */
  readonly query: string;
}

interface JsonPanel {
  id?: number;
  type?: string;
  title?: string;
  targets?: { refId?: string; query?: string; rawQuery?: boolean; hide?: boolean }[];
  panels?: JsonPanel[];
}

interface JsonDashboard {
  panels?: JsonPanel[];
  templating?: { list?: { name: string; query?: unknown }[] };
}

/** As Grafana's InfluxDB datasource escapes a value for use in a regex. */
export function escapeRegex(value: string): string {
  return value.replace(/[\\^$*+?.()|[\]{}/]/g, '\\$&');
}

function regexValue(v: string | readonly string[] | undefined): string {
  const values = v === undefined ? [] : typeof v === 'string' ? [v] : v;
  if (values.length === 0) return '.*';
  if (values.length === 1) return escapeRegex(values[0]!);
  return `(${values.map(escapeRegex).join('|')})`;
}

/** One query with Grafana's macros and the variables filled in; throws on a `$name` it cannot fill. */
export function fillQuery(raw: string, vars: GrafanaVars, macros: MacroValues = {}): string {
  let q = raw.replaceAll('$timeFilter', macros.timeFilter ?? 'time > now() - 1h').replace(/\$__interval(?![_A-Za-z0-9])/g, macros.interval ?? '1s');
  // Variables are used only inside regexes (the multi-value form); anything else is a bug
  // in the dashboard, which this refuses rather than guesses.
  q = q.replace(/\/\^\$([A-Za-z_][A-Za-z0-9_]*)\$\//g, (_, name: string) => `/^${regexValue(vars[name])}$/`);
  const left = /\$[A-Za-z_{[][A-Za-z0-9_\]}]*/.exec(q.replace(/\/\^[^/]*\$\//g, ''));
  if (left) throw new Error(`cannot fill ${left[0]} in: ${raw}`);
  return q;
}

function* allPanels(panels: readonly JsonPanel[] | undefined): Generator<JsonPanel> {
  for (const p of panels ?? []) {
    yield p;
    yield* allPanels(p.panels);
  }
}

/** Every (visible) target of every panel, rows' nested panels included, filled in. */
export function panelQueries(dashboard: unknown, vars: GrafanaVars, macros: MacroValues = {}): PanelQuery[] {
  const out: PanelQuery[] = [];
  for (const p of allPanels((dashboard as JsonDashboard).panels)) {
    for (const t of p.targets ?? []) {
      if (t.hide || typeof t.query !== 'string') continue;
      out.push({ panelId: p.id ?? 0, panel: p.title ?? '', type: p.type ?? '', refId: t.refId ?? '', raw: t.query, query: fillQuery(t.query, vars, macros) });
    }
  }
  return out;
}

/** The template variables' own queries (SHOW TAG VALUES ...), filled in. */
export function variableQueries(dashboard: unknown, vars: GrafanaVars): { name: string; query: string }[] {
  return ((dashboard as JsonDashboard).templating?.list ?? [])
    .filter((v) => typeof v.query === 'string')
    .map((v) => ({ name: v.name, query: fillQuery(v.query as string, vars) }));
}

export interface QueryCheck extends PanelQuery {
  /** Series returned. */
  readonly series: number;
  /** Non-null values in them (time column excluded). */
  readonly values: number;
  readonly error?: string;
  /** It reads only what a run writes under some policies (POLICY_DEPENDENT_FIELDS): empty is no fault. */
  readonly optional: boolean;
}

export interface PanelCheck {
  readonly queries: QueryCheck[];
  /** Panels with queries, but for the policyOnly ones. */
  readonly panels: number;
  /**
   * Panels that plot only what some policies write (every query optional) and are empty:
   * the latency panel of a run with `latency.margin` off. Not counted in `panels`.
   */
  readonly policyOnly: number;
  /** Panels every query of which (but the optional ones) returned at least one non-null value. */
  readonly panelsWithData: number;
  /** The queries that returned nothing (or failed). */
  readonly empty: QueryCheck[];
}

interface RawResult {
  results?: { error?: string; series?: { values?: unknown[][] }[] }[];
}

/** Fields written only under some policies: the learnt background levels (`thresholds: auto`), the latency control (`latency.margin`). */
export const POLICY_DEPENDENT_FIELDS: readonly string[] = [...LEARNABLE.map(learntField), ...LATENCY_FIELDS];

/** The measurement only `idlecrypt agent` writes: a run of `idlecrypt encrypt` leaves the host row empty. */
export const AGENT_MEASUREMENT = 'idlecrypt_agent';

/**
 * Runs every panel query against InfluxDB (the client's default database, or `database`).
 * `runOnly`: only the panels a run of `idlecrypt encrypt` fills (not the host row, whose
 * points the agent writes).
 */
export async function checkPanels(influx: InfluxDB, dashboard: unknown, vars: GrafanaVars, o: MacroValues & { database?: string; runOnly?: boolean } = {}): Promise<PanelCheck> {
  const queries: QueryCheck[] = [];
  for (const q of panelQueries(dashboard, vars, o)) {
    if (o.runOnly && q.raw.includes(`"${AGENT_MEASUREMENT}"`)) continue;
    const fields = [...(/^SELECT (.*) FROM /.exec(q.raw)?.[1] ?? '').matchAll(/"([^"]+)"/g)].map((m) => m[1]!);
    const optional = fields.length > 0 && fields.every((f) => POLICY_DEPENDENT_FIELDS.includes(f));
    try {
      const res = (await influx.queryRaw(q.query, o.database ? { database: o.database } : {})) as RawResult;
      const r = res.results?.[0];
      const series = r?.series ?? [];
      const values = series.reduce((n, s) => n + (s.values ?? []).reduce((m, row) => m + row.slice(1).filter((v) => v !== null).length, 0), 0);
      queries.push({ ...q, series: series.length, values, optional, ...(r?.error ? { error: r.error } : {}) });
    } catch (e) {
      queries.push({ ...q, series: 0, values: 0, optional, error: e instanceof Error ? e.message : String(e) });
    }
  }
  const byPanel = new Map<number, QueryCheck[]>();
  for (const q of queries) byPanel.set(q.panelId, [...(byPanel.get(q.panelId) ?? []), q]);
  const ok = (q: QueryCheck) => q.values > 0 && !q.error;
  const groups = [...byPanel.values()];
  const policyOnly = groups.filter((qs) => qs.every((q) => q.optional && !q.error && q.values === 0)).length;
  const panelsWithData = groups.filter((qs) => qs.some(ok) && qs.every((q) => ok(q) || (q.optional && !q.error))).length;
  return { queries, panels: groups.length - policyOnly, policyOnly, panelsWithData, empty: queries.filter((q) => q.values === 0 || q.error !== undefined) };
}
