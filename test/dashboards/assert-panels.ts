/**
 * For tests after a real run: every panel's query, with Grafana's macros filled in, returns
 * data from InfluxDB. Reuse:
 *
 *   import { InfluxDB } from 'influx';
 *   import { assertEveryPanelReturnsData, loadDashboard } from '../dashboards/assert-panels.ts';
 *   const check = await assertEveryPanelReturnsData(new InfluxDB(db.influxUrl('idlecrypt')), loadDashboard(), { vm: 'web1' });
 *   // check.panelsWithData of check.panels
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import type { InfluxDB } from 'influx';
import { checkPanels, panelQueries, variableQueries, type GrafanaVars, type MacroValues, type PanelCheck } from '../../dashboards/queries.ts';

export { panelQueries, variableQueries, checkPanels };
export type { GrafanaVars, PanelCheck };

export const DASHBOARD_JSON = new URL('../../dashboards/json/idlecrypt.json', import.meta.url);

/** The committed dashboard JSON. */
export function loadDashboard(file: URL | string = DASHBOARD_JSON): unknown {
  return JSON.parse(readFileSync(file, 'utf8'));
}

/**
 * Fails with every query that returned nothing (not just the first); returns the check for
 * reporting. A query of what only some policies write (the learnt levels) may be empty,
 * unless `optionalToo` (the data written included such a policy).
 */
export async function assertEveryPanelReturnsData(
  influx: InfluxDB,
  dashboardJson: unknown,
  vars: GrafanaVars,
  macros: MacroValues & { database?: string; runOnly?: boolean; optionalToo?: boolean } = {},
): Promise<PanelCheck> {
  const check = await checkPanels(influx, dashboardJson, vars, macros);
  assert.ok(check.queries.length > 0, 'the dashboard has panel queries');
  assert.deepEqual(
    check.empty.filter((q) => !q.optional || q.error !== undefined || macros.optionalToo).map((q) => `panel ${q.panelId} "${q.panel}" ${q.refId}: ${q.error ?? 'no data'} <- ${q.query}`),
    [],
    `${check.panels - check.panelsWithData} of ${check.panels} panels returned no data`,
  );
  return check;
}
