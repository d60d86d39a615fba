/**
 * The idlecrypt dashboard, as code. Every measurement and field comes from
 * src/metrics/names.ts through influxql() below, so a renamed metric breaks the build here,
 * not a panel in production. `node --import tsx dashboards/generate.ts` writes the JSON.
 *
 * Queries are raw InfluxQL for InfluxDB 1.x. Multi-value variables are matched as regexes
 * (`"vm" =~ /^$vm$/`), which Grafana fills with `(web1|db1)`; $timeFilter and $__interval
 * are Grafana's macros. Readings that are written on change or once a second (thresholds,
 * states, job limits) use last() with fill(previous), so that a line continues between
 * points; rates use mean() with fill(none).
 */
import {
  DashboardBuilder,
  DashboardCursorSync,
  MappingType,
  QueryVariableBuilder,
  RowBuilder,
  VariableRefresh,
  VariableSort,
  type Dashboard,
  type DynamicConfigValue,
  type ValueMapping,
} from '@grafana/grafana-foundation-sdk/dashboard';
import {
  BigValueGraphMode,
  GraphDrawStyle,
  LegendDisplayMode,
  LegendPlacement,
  LineInterpolation,
  ReduceDataOptionsBuilder,
  SortOrder,
  TooltipDisplayMode,
  VisibilityMode,
  VizLegendOptionsBuilder,
  VizTooltipOptionsBuilder,
} from '@grafana/grafana-foundation-sdk/common';
import { PanelBuilder as StatPanel } from '@grafana/grafana-foundation-sdk/stat';
import { PanelBuilder as StateTimelinePanel } from '@grafana/grafana-foundation-sdk/statetimeline';
import { PanelBuilder as TablePanel } from '@grafana/grafana-foundation-sdk/table';
import { PanelBuilder as TimeseriesPanel } from '@grafana/grafana-foundation-sdk/timeseries';
import { learntField, measurement, SIGNAL_RATE_FIELD, STATE_CODE, TAG, thresholdField, type FieldName, type MeasurementKey } from '../src/metrics/names.ts';
import { isLearnable, SIGNALS, type Signal } from '../src/policy/schema.ts';
import { DATASOURCE, InfluxQLQueryBuilder } from './influxql.ts';

export const DASHBOARD_UID = 'idlecrypt';

/** The template variables, and the measurement each one's values are read from. */
export const VARIABLES = ['host', 'vm', 'device'] as const;

const match = (tag: string, variable: string) => `"${tag}" =~ /^$${variable}$/`;

/**
 * One InfluxQL SELECT over measurement m; `select` gets a quoting function that accepts
 * only m's field names (compile-time checked against names.ts).
 */
export function influxql<K extends MeasurementKey>(
  m: K,
  select: (f: (name: FieldName<K>) => string) => string,
  o: { device?: boolean; vm?: boolean; groupBy?: readonly string[]; time?: boolean; fill?: 'none' | 'previous' | '0'; tail?: string } = {},
): string {
  // A host-wide measurement (idlecrypt_agent) has no vm tag: `vm: false` leaves out its filter.
  const where = [match(TAG.host, 'host'), ...(o.vm === false ? [] : [match(TAG.vm, 'vm')]), ...(o.device ? [match(TAG.device, 'device')] : []), '$timeFilter'].join(' AND ');
  const groups = [...(o.time === false ? [] : ['time($__interval)']), ...(o.groupBy ?? [o.vm === false ? TAG.host : TAG.vm]).map((t) => `"${t}"`)];
  const fill = o.time === false ? '' : ` fill(${o.fill ?? 'none'})`;
  const tail = o.tail ? ` ${o.tail}` : '';
  return `SELECT ${select((name) => `"${name}"`)} FROM "${measurement(m)}" WHERE ${where} GROUP BY ${groups.join(', ')}${fill}${tail}`;
}

const target = (refId: string, query: string, alias?: string) => {
  const b = new InfluxQLQueryBuilder(query).refId(refId);
  return alias === undefined ? b : b.alias(alias);
};

const valueMap = (entries: Record<string, { text: string; color: string }>): ValueMapping => ({
  type: MappingType.ValueToText,
  options: Object.fromEntries(Object.entries(entries).map(([k, v], index) => [k, { ...v, index }])),
});

/** Every series at the cursor: a rate beside its threshold, actual beside limit. */
const tooltip = () => new VizTooltipOptionsBuilder().mode(TooltipDisplayMode.Multi).sort(SortOrder.None);

const legend = () => new VizLegendOptionsBuilder().displayMode(LegendDisplayMode.List).placement(LegendPlacement.Bottom).showLegend(true);

/** A time series panel with this dashboard's chrome: every series in the tooltip, a legend below, lines without points. */
const timeseries = (id: number) =>
  new TimeseriesPanel().id(id).datasource(DATASOURCE).showPoints(VisibilityMode.Never).tooltip(tooltip()).legend(legend());

/** A state timeline with this dashboard's chrome: values shown, equal neighbours merged, a legend below. */
const stateTimeline = (id: number) =>
  new StateTimelinePanel().id(id).datasource(DATASOURCE).showValue(VisibilityMode.Auto).mergeValues(true).fillOpacity(80).legend(legend());

/** A reference line drawn over a panel's rates: fixed colour, no fill, stepped. */
const referenceLine = (color: string, lineStyle: { fill: 'dash' | 'dot'; dash: number[] }): DynamicConfigValue[] => [
  { id: 'color', value: { mode: 'fixed', fixedColor: color } },
  { id: 'custom.lineStyle', value: lineStyle },
  { id: 'custom.lineWidth', value: 2 },
  { id: 'custom.fillOpacity', value: 0 },
  { id: 'custom.lineInterpolation', value: LineInterpolation.StepAfter },
];

/** The policy threshold as a dashed red line, on the query that reads it. */
const thresholdLine = referenceLine('red', { fill: 'dash', dash: [10, 10] });

/** A learnt background level (`thresholds: auto`) as a dotted orange line under its threshold. */
const learntLine = referenceLine('orange', { fill: 'dot', dash: [0, 10] });

const SIGNAL_PANEL: Record<Signal, { title: string; unit: string; what: string }> = {
  disk: { title: 'Disk requests/s', unit: 'reqps', what: "the guest's own disk requests (reads, writes, flushes, discards); the copy's I/O is not counted" },
  keyboard: { title: 'Keyboard events/s', unit: 'short', what: 'keyboard events (a key press is two); absent while the probes are degraded' },
  pointer: { title: 'Pointer events/s', unit: 'short', what: 'pointer events (buttons and moves); absent while the probes are degraded' },
  interrupts: { title: 'Interrupts/s', unit: 'short', what: 'interrupts delivered into the guest; absent while the probes are degraded' },
  stall: { title: 'vCPU stall, ms/s', unit: 'ms', what: "milliseconds per second the guest's vCPUs waited for QEMU's big lock, i.e. held back by QEMU's main loop; absent while the probes are degraded" },
  inflight: {
    title: 'Disk requests in flight, ms/s',
    unit: 'ms',
    what: "milliseconds per second the guest's disks had a request started and not yet completed (summed over its disks): a request the copy holds up counts while it waits; absent while the probes are degraded",
  },
};

function signalPanel(signal: Signal, id: number) {
  const p = SIGNAL_PANEL[signal];
  const rate = SIGNAL_RATE_FIELD[signal];
  const learnt = isLearnable(signal) ? signal : null;
  const panel = timeseries(id)
    .title(p.title)
    .description(
      `Per VM: ${p.what}. Averaged over the interval and drawn against the policy's \`${signal}\` threshold (dashed red): ` +
        'the guest counts as busy while any rate is above its threshold (the controller averages over sampling.window first).' +
        (learnt
          ? ` With \`thresholds: ${signal}: auto\`, the threshold is the one learnt from the guest, and the dotted line is the background level it was learnt from (absent while learning, or with a fixed threshold).`
          : ''),
    )
    .withTarget(target('A', influxql('activity', (f) => `mean(${f(rate)})`), '$tag_vm'))
    .withTarget(target('B', influxql('moderation', (f) => `last(${f(thresholdField(signal))})`, { fill: 'previous' }), '$tag_vm threshold'))
    .overrideByQuery('B', thresholdLine);
  if (learnt) {
    panel
      .withTarget(target('C', influxql('moderation', (f) => `last(${f(learntField(learnt))})`, { fill: 'previous' }), '$tag_vm learnt background'))
      .overrideByQuery('C', learntLine);
  }
  return panel
    .unit(p.unit)
    .min(0)
    .lineWidth(1)
    .fillOpacity(10)
    .height(8)
    .span(12);
}

function latencyPanel(id: number) {
  return timeseries(id)
    .title('Guest disk latency (latency.margin)')
    .description(
      "Per VM, with `latency.margin` on: the guest's disk request latency in QEMU at each of the controller's judgements (twice a second while it does I/O; the median per kind of request, or the mean under libvirt), " +
        'against its baseline without the copy (dotted orange, for the same mix of reads, writes and flushes) and the baseline raised by the margin (dashed red). ' +
        'While the guest is busy with its disk, or idle but still doing requests, the copy runs at the highest speed that keeps the latency under the red line. Empty when latency.margin is off.',
    )
    .withTarget(target('A', influxql('moderation', (f) => `last(${f('latency_ms')})`), '$tag_vm latency'))
    .withTarget(target('B', influxql('moderation', (f) => `last(${f('latency_limit_ms')})`, { fill: 'previous' }), '$tag_vm limit'))
    .withTarget(target('C', influxql('moderation', (f) => `last(${f('latency_baseline_ms')})`, { fill: 'previous' }), '$tag_vm baseline'))
    .overrideByQuery('B', thresholdLine)
    .overrideByQuery('C', learntLine)
    .unit('ms')
    .min(0)
    .lineWidth(1)
    .fillOpacity(10)
    .height(8)
    .span(12);
}

function moderationStatePanel(id: number) {
  return stateTimeline(id)
    .title('Moderation state')
    .description(
      'Per VM: idle (the copy runs at the idle speed), busy (the busy speed, paused by default), hold-off (the quiet time after busy, still at the busy speed).',
    )
    .withTarget(target('A', influxql('moderation', (f) => `last(${f('state_code')})`, { fill: 'previous' }), '$tag_vm'))
    .mappings([
      valueMap({
        [STATE_CODE.idle]: { text: 'idle', color: 'green' },
        [STATE_CODE.holdoff]: { text: 'hold-off', color: 'yellow' },
        [STATE_CODE.busy]: { text: 'busy', color: 'red' },
      }),
    ])
    .height(6)
    .span(24);
}

function decisionsPanel(id: number) {
  return new TablePanel()
    .id(id)
    .title('Moderation: latest decisions')
    .description('The newest controller decisions per VM: state, what the job was told, and why.')
    .datasource(DATASOURCE)
    .withTarget(
      target('A', influxql('moderation', (f) => [f('state'), f('mode'), f('reason')].join(', '), { time: false, groupBy: [TAG.vm], tail: 'ORDER BY time DESC LIMIT 50' })).resultFormat(
        'table',
      ),
    )
    .height(8)
    .span(24);
}

function speedPanel(id: number) {
  return timeseries(id)
    .title('Copy speed: limit and actual')
    .description('The speed limit in force (block-job-set-speed; 0 = unlimited) and the measured copy speed, per VM and disk.')
    .withTarget(target('A', influxql('job', (f) => `mean(${f('speed_actual_bps')}) AS "actual"`, { device: true, groupBy: [TAG.vm, TAG.device] }), '$tag_vm/$tag_device actual'))
    .withTarget(
      target(
        'B',
        influxql('job', (f) => `last(${f('speed_set_bps')}) AS "limit"`, { device: true, groupBy: [TAG.vm, TAG.device], fill: 'previous' }),
        '$tag_vm/$tag_device limit (0 = unlimited)',
      ),
    )
    .overrideByQuery('B', [
      { id: 'custom.lineStyle', value: { fill: 'dash', dash: [10, 10] } },
      { id: 'custom.fillOpacity', value: 0 },
      { id: 'custom.lineInterpolation', value: LineInterpolation.StepAfter },
    ])
    .unit('binBps')
    .min(0)
    .fillOpacity(10)
    .height(8)
    .span(12);
}

function jobControlPanel(id: number) {
  return stateTimeline(id)
    .title('Job control')
    .description('Whether the copy is paused, and whether it runs without a speed limit, per VM and disk.')
    .withTarget(
      target(
        'A',
        influxql('job', (f) => `last(${f('paused')}) AS "paused", last(${f('unlimited')}) AS "unlimited"`, { device: true, groupBy: [TAG.vm, TAG.device], fill: 'previous' }),
        '$tag_vm/$tag_device $col',
      ),
    )
    .overrideByRegexp('/paused$/', [{ id: 'mappings', value: [valueMap({ 0: { text: 'running', color: 'green' }, 1: { text: 'paused', color: 'orange' } })] }])
    .overrideByRegexp('/unlimited$/', [{ id: 'mappings', value: [valueMap({ 0: { text: 'limited', color: 'blue' }, 1: { text: 'unlimited', color: 'green' } })] }])
    .height(8)
    .span(12);
}

function progressPanel(id: number) {
  return timeseries(id)
    .title('Progress')
    .description('Bytes copied / bytes to copy, per VM and disk. It can step back: blocks the guest rewrites after they were copied are copied again.')
    .withTarget(target('A', influxql('job', (f) => `last(${f('percent')})`, { device: true, groupBy: [TAG.vm, TAG.device], fill: 'previous' }), '$tag_vm/$tag_device'))
    .unit('percent')
    .min(0)
    .max(100)
    .height(8)
    .span(10);
}

function bytesPanel(id: number) {
  return timeseries(id)
    .title('Bytes copied')
    .description('Bytes copied so far and the bytes to copy in all (QMP offset and len; len grows while the guest writes).')
    .withTarget(
      target(
        'A',
        influxql('job', (f) => `last(${f('bytes_done')}) AS "done", last(${f('bytes_total')}) AS "total"`, { device: true, groupBy: [TAG.vm, TAG.device], fill: 'previous' }),
        '$tag_vm/$tag_device $col',
      ),
    )
    .unit('bytes')
    .min(0)
    .height(8)
    .span(9);
}

function etaPanel(id: number) {
  return new StatPanel()
    .id(id)
    .title('ETA')
    .description('Estimated time to completion at the recent speed, per VM and disk; no value while it is unknown (paused, no speed yet).')
    .datasource(DATASOURCE)
    .withTarget(target('A', influxql('job', (f) => `last(${f('eta_s')})`, { device: true, groupBy: [TAG.vm, TAG.device] }), '$tag_vm/$tag_device'))
    .reduceOptions(new ReduceDataOptionsBuilder().calcs(['lastNotNull']).values(false))
    .graphMode(BigValueGraphMode.Area)
    .unit('s')
    .decimals(0)
    .noValue('unknown')
    .height(8)
    .span(5);
}

function probeHealthPanel(id: number) {
  return stateTimeline(id)
    .title('Probe health')
    .description(
      'Per VM: the activity source (ebpf, or qmp when degraded to query-blockstats: keyboard, pointer and interrupts are then unknown and never make the guest busy), whether the source delivers samples, and the degraded flag.',
    )
    .withTarget(
      target(
        'A',
        influxql('probe', (f) => `last(${f('source')}) AS "source", last(${f('attached')}) AS "attached", last(${f('degraded')}) AS "degraded"`, { fill: 'previous' }),
        '$tag_vm $col',
      ),
    )
    .overrideByRegexp('/source$/', [{ id: 'mappings', value: [valueMap({ ebpf: { text: 'ebpf', color: 'green' }, qmp: { text: 'qmp (degraded)', color: 'orange' } })] }])
    .overrideByRegexp('/attached$/', [{ id: 'mappings', value: [valueMap({ 0: { text: 'detached', color: 'red' }, 1: { text: 'attached', color: 'green' } })] }])
    .overrideByRegexp('/degraded$/', [{ id: 'mappings', value: [valueMap({ 0: { text: 'ok', color: 'green' }, 1: { text: 'degraded', color: 'orange' } })] }])
    .height(8)
    .span(12);
}

function restartsPanel(id: number) {
  return timeseries(id)
    .title('Probe restarts')
    .description('bpftrace restarts since idlecrypt started, per VM (cumulative).')
    .withTarget(target('A', influxql('probe', (f) => `last(${f('restarts')})`, { fill: 'previous' }), '$tag_vm'))
    .lineInterpolation(LineInterpolation.StepAfter)
    .unit('short')
    .decimals(0)
    .min(0)
    .height(8)
    .span(6);
}

function samplesPanel(id: number) {
  return new TimeseriesPanel()
    .id(id)
    .title('Activity samples by source')
    .description('Activity samples per interval, per VM and source: a gap means no samples arrived (the probes stalled); qmp means degraded.')
    .datasource(DATASOURCE)
    .withTarget(target('A', influxql('activity', (f) => `count(${f('interval_s')})`, { groupBy: [TAG.vm, TAG.source], fill: '0' }), '$tag_vm $tag_source'))
    .drawStyle(GraphDrawStyle.Bars)
    .fillOpacity(60)
    .unit('short')
    .min(0)
    .tooltip(tooltip())
    .legend(legend())
    .height(8)
    .span(6);
}

/** The host agent's copies against max-jobs, and where its disks stand. */
function hostCopiesPanel(id: number) {
  return timeseries(id)
    .title('Host: copies, queue and disks')
    .description("The agent's copies in progress against host.max-jobs, the disks queued for a slot, waiting for their VM, encrypted and failed, per host (idlecrypt_agent, every 10 s).")
    .withTarget(
      target(
        'A',
        influxql(
          'agent',
          (f) =>
            `last(${f('copies_running')}) AS "copies", last(${f('max_jobs')}) AS "max-jobs", last(${f('queued')}) AS "queued", last(${f('waiting')}) AS "waiting", last(${f('encrypted')}) AS "encrypted", last(${f('failed')}) AS "failed"`,
          { vm: false, fill: 'previous' },
        ),
        '$tag_host $col',
      ),
    )
    .lineInterpolation(LineInterpolation.StepAfter)
    .unit('short')
    .decimals(0)
    .min(0)
    .height(8)
    .span(12);
}

/** What the agent costs the host, and how many VMs it watches. */
function agentCostPanel(id: number) {
  return timeseries(id)
    .title('Host: the agent\'s CPU')
    .description("The agent's CPU time in percent of one core (bpftrace not included), per host; the VMs it watches in the legend's tooltip.")
    .withTarget(target('A', influxql('agent', (f) => `mean(${f('cpu_percent')}) AS "cpu"`, { vm: false }), '$tag_host cpu %'))
    .withTarget(target('B', influxql('agent', (f) => `last(${f('vms_watched')}) AS "vms"`, { vm: false, fill: 'previous' }), '$tag_host VMs watched'))
    .unit('short')
    .min(0)
    .height(8)
    .span(6);
}

function agentMemoryPanel(id: number) {
  return timeseries(id)
    .title('Host: the agent\'s memory')
    .description("The agent's resident memory, per host.")
    .withTarget(target('A', influxql('agent', (f) => `last(${f('bytes_rss')}) AS "rss"`, { vm: false, fill: 'previous' }), '$tag_host'))
    .unit('bytes')
    .min(0)
    .height(8)
    .span(6);
}

function variable(name: (typeof VARIABLES)[number], label: string, query: string) {
  return new QueryVariableBuilder(name)
    .label(label)
    .datasource(DATASOURCE)
    .query(query)
    .refresh(VariableRefresh.OnTimeRangeChanged)
    .sort(VariableSort.AlphabeticalAsc)
    .multi(true)
    .includeAll(true)
    .current({ selected: true, text: ['All'], value: ['$__all'] });
}

export function buildDashboard(): Dashboard {
  let id = 0;
  const next = () => ++id;
  const row = (title: string) => new RowBuilder(title).id(next());
  const b = new DashboardBuilder('idlecrypt: background disk encryption')
    .uid(DASHBOARD_UID)
    .description('Guest activity, moderation, copy progress and probe health of idlecrypt runs (InfluxDB, database idlecrypt).')
    .tags(['idlecrypt', 'encryption', 'qemu'])
    .timezone('browser')
    .time({ from: 'now-1h', to: 'now' })
    .refresh('10s')
    .tooltip(DashboardCursorSync.Crosshair)
    .withVariable(variable('host', 'Host', `SHOW TAG VALUES FROM "${measurement('activity')}" WITH KEY = "${TAG.host}"`))
    .withVariable(variable('vm', 'VM', `SHOW TAG VALUES FROM "${measurement('activity')}" WITH KEY = "${TAG.vm}" WHERE ${match(TAG.host, 'host')}`))
    .withVariable(variable('device', 'Disk', `SHOW TAG VALUES FROM "${measurement('job')}" WITH KEY = "${TAG.device}" WHERE ${match(TAG.host, 'host')} AND ${match(TAG.vm, 'vm')}`))
    .withRow(row('Host (idlecrypt agent)'))
    .withPanel(hostCopiesPanel(next()))
    .withPanel(agentCostPanel(next()))
    .withPanel(agentMemoryPanel(next()))
    .withRow(row('Guest activity against the policy'));
  for (const s of SIGNALS) b.withPanel(signalPanel(s, next()));
  b.withPanel(latencyPanel(next()));
  b.withRow(row('Moderation')).withPanel(moderationStatePanel(next())).withPanel(decisionsPanel(next()));
  b.withRow(row('Copy job'))
    .withPanel(speedPanel(next()))
    .withPanel(jobControlPanel(next()))
    .withPanel(progressPanel(next()))
    .withPanel(bytesPanel(next()))
    .withPanel(etaPanel(next()));
  b.withRow(row('Probes')).withPanel(probeHealthPanel(next())).withPanel(restartsPanel(next())).withPanel(samplesPanel(next()));
  return b.build();
}
