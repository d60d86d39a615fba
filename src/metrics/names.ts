/**
 * Every metric idlecrypt writes: the one module that owns measurement, tag and field names,
 * their types and units. The sinks (influx-sink.ts, file-sink.ts) serialise from this
 * table, the dashboards (dashboards/idlecrypt.ts) build their queries from it, and
 * test/metrics checks that src/metrics/README.md lists exactly these names.
 *
 * Scheme (after Telegraf's inputs.libvirt): one measurement per concern, `idlecrypt_*`;
 * identity in tags (host, vm, device, source); snake_case fields whose name carries the
 * unit (`_bps` bytes/s, `_per_s` per second, `_s` seconds, `bytes_` bytes; plain names are
 * counts), and 0/1 integers beside string states so that panels can graph them.
 *
 * Field types never change (InfluxDB fixes a field's type per shard and rejects a write
 * of another type): counts, bytes and flags are integers, rates and durations floats.
 * A value that is unknown (null: input and interrupts without eBPF) or not finite is left
 * out of the point, never written as 0: InfluxDB has no null, and 0 would read as "idle".
 */
import type { LearnableSignal, Signal } from '../policy/schema.ts';
import { msPerSecond, perSecond, type SampleCounts } from '../probes/counters.ts';

export type FieldType = 'integer' | 'float' | 'string';

export interface FieldSpec {
  readonly type: FieldType;
  /** For people (README, panel units): 'count', 'events/s', 's', 'bytes', 'bytes/s', '0/1', '%', 'text'. */
  readonly unit: string;
  readonly description: string;
}

export interface TagSpec {
  /** Required tags are on every point of the measurement; optional ones only where they apply. */
  readonly required: boolean;
  readonly description: string;
}

export interface MeasurementSpec {
  readonly name: string;
  readonly description: string;
  readonly tags: Readonly<Record<string, TagSpec>>;
  readonly fields: Readonly<Record<string, FieldSpec>>;
}

/** The tag names, shared by every measurement. */
export const TAG = { host: 'host', vm: 'vm', device: 'device', source: 'source' } as const;

const hostTag = { required: true, description: 'the host idlecrypt runs on (its hostname)' } as const;
const vmTag = { required: true, description: "the VM's name (QEMU -name, libvirt domain name)" } as const;
const deviceTag = { required: true, description: 'the disk being encrypted (its qdev id or node name, as --device)' } as const;

/** The activity signals that the policy's thresholds apply to, and the rate field each is compared with. */
export const SIGNAL_RATE_FIELD = {
  disk: 'disk_requests_per_s',
  keyboard: 'key_events_per_s',
  pointer: 'pointer_events_per_s',
  interrupts: 'interrupts_per_s',
  stall: 'vcpu_wait_ms_per_s',
  inflight: 'disk_busy_ms_per_s',
} as const satisfies Record<Signal, string>;

type RateField = (typeof SIGNAL_RATE_FIELD)[Signal];
/** The moderation field that carries a signal's threshold: `threshold_` + its rate field. */
export type ThresholdField = `threshold_${RateField}`;

export function thresholdField(signal: Signal): ThresholdField {
  return `threshold_${SIGNAL_RATE_FIELD[signal]}`;
}

/** The moderation fields of the latency control (`latency.margin`), written only when it is on. */
export const LATENCY_FIELDS = ['latency_ms', 'latency_baseline_ms', 'latency_limit_ms', 'latency_speed_bps'] as const;

/** The moderation field that carries a learnable signal's learnt background level (`thresholds: auto`). */
export function learntField(signal: LearnableSignal): `learnt_${LearnableSignal}_level_per_s` {
  return `learnt_${signal}_level_per_s`;
}

/** The moderation states, and the code each is graphed as (higher = busier). */
export const STATE_CODE = { idle: 0, holdoff: 1, busy: 2 } as const;
export type ModerationState = keyof typeof STATE_CODE;

export const MEASUREMENTS = {
  activity: {
    name: 'idlecrypt_activity',
    description:
      "One point per VM per activity sample (every sampling.interval): the guest's own requests and events in the sample's interval, and the same as rates. The copy's I/O is not counted.",
    tags: {
      host: hostTag,
      vm: vmTag,
      source: { required: true, description: "where the counts come from: `ebpf` (the probes, every counter) or `qmp` (degraded: query-blockstats, disk counters only)" },
    },
    fields: {
      disk_reads: { type: 'integer', unit: 'count', description: 'guest disk read requests in the interval' },
      disk_writes: { type: 'integer', unit: 'count', description: 'guest disk write requests in the interval' },
      disk_flushes: { type: 'integer', unit: 'count', description: 'guest disk flush requests in the interval' },
      disk_discards: { type: 'integer', unit: 'count', description: 'guest disk discard (unmap) requests in the interval' },
      key_events: { type: 'integer', unit: 'count', description: 'keyboard events (a key press is two: down and up); absent under `qmp`' },
      pointer_events: { type: 'integer', unit: 'count', description: 'pointer events (buttons and moves); absent under `qmp`' },
      interrupts: { type: 'integer', unit: 'count', description: 'interrupts delivered into the guest; absent under `qmp`' },
      vcpu_wait_us: { type: 'integer', unit: 'µs', description: "time the guest's vCPUs waited for QEMU's big lock in the interval (summed over vCPUs); absent under `qmp`" },
      disk_busy_us: { type: 'integer', unit: 'µs', description: "time the guest's disks had a request in flight (started, not completed) in the interval, summed over its disks; absent under `qmp`" },
      interval_s: { type: 'float', unit: 's', description: 'the measured length of the interval' },
      disk_requests_per_s: { type: 'float', unit: 'requests/s', description: '(reads + writes + flushes + discards) / interval_s: what the `disk` threshold is compared with' },
      key_events_per_s: { type: 'float', unit: 'events/s', description: 'key_events / interval_s (`keyboard` threshold)' },
      pointer_events_per_s: { type: 'float', unit: 'events/s', description: 'pointer_events / interval_s (`pointer` threshold)' },
      interrupts_per_s: { type: 'float', unit: 'interrupts/s', description: 'interrupts / interval_s (`interrupts` threshold)' },
      vcpu_wait_ms_per_s: { type: 'float', unit: 'ms/s', description: 'vcpu_wait_us / 1000 / interval_s: the guest held back by QEMU\'s main loop (`stall` threshold)' },
      disk_busy_ms_per_s: { type: 'float', unit: 'ms/s', description: 'disk_busy_us / 1000 / interval_s: the guest\'s requests waiting to complete (`inflight` threshold)' },
    },
  },
  moderation: {
    name: 'idlecrypt_moderation',
    description:
      "One point per VM per controller decision pass: the activity state, why, what the job was told, and the policy's thresholds in force (so that panels draw them beside the rates).",
    tags: {
      host: hostTag,
      vm: vmTag,
      device: { required: false, description: 'the disk whose copy is moderated, when the controller moderates one job' },
    },
    fields: {
      state: { type: 'string', unit: 'text', description: '`idle`, `busy` or `holdoff` (the quiet time after busy, at the busy speed)' },
      state_code: { type: 'integer', unit: 'code', description: 'the state as a number for graphs: idle 0, holdoff 1, busy 2' },
      busy: { type: 'integer', unit: '0/1', description: '1 while the job runs at the busy speed (state busy or holdoff)' },
      reason: { type: 'string', unit: 'text', description: 'why, for people: `disk 37.5/s > 5/s`, `hold-off 1s after ...`' },
      mode: { type: 'string', unit: 'text', description: 'what the job was told: `full`, `throttled` or `paused`' },
      threshold_disk_requests_per_s: { type: 'float', unit: 'requests/s', description: 'policy thresholds.disk in force (with `auto`, the learnt one); absent when `off`' },
      threshold_key_events_per_s: { type: 'float', unit: 'events/s', description: 'policy thresholds.keyboard in force; absent when `off`' },
      threshold_pointer_events_per_s: { type: 'float', unit: 'events/s', description: 'policy thresholds.pointer in force; absent when `off`' },
      threshold_interrupts_per_s: { type: 'float', unit: 'interrupts/s', description: 'policy thresholds.interrupts in force (with `auto`, the learnt one); absent when `off`' },
      threshold_vcpu_wait_ms_per_s: { type: 'float', unit: 'ms/s', description: 'policy thresholds.stall in force; absent when `off`' },
      threshold_disk_busy_ms_per_s: { type: 'float', unit: 'ms/s', description: 'policy thresholds.inflight in force; absent when `off`' },
      holdoff_s: { type: 'float', unit: 's', description: 'policy holdoff in force' },
      learnt_disk_level_per_s: { type: 'float', unit: 'requests/s', description: "the guest's background disk rate learnt with `thresholds.disk: auto`; absent while learning or when not auto" },
      learnt_interrupts_level_per_s: { type: 'float', unit: 'interrupts/s', description: "the guest's background interrupt rate learnt with `thresholds.interrupts: auto`; absent while learning or when not auto" },
      latency_ms: { type: 'float', unit: 'ms', description: "with `latency.margin`: the guest's disk request latency in QEMU at the controller's last judgement (query-blockstats: the median per kind of request where QEMU keeps a histogram, else the mean; weighted by the mix); absent when off" },
      latency_baseline_ms: { type: 'float', unit: 'ms', description: "with `latency.margin`: the guest's latency without the copy, for the same mix of reads, writes and flushes; absent while learning or when off" },
      latency_limit_ms: { type: 'float', unit: 'ms', description: 'with `latency.margin`: the baseline raised by the margin, which the graded copy keeps the guest under; absent while learning or when off' },
      latency_speed_bps: { type: 'integer', unit: 'bytes/s', description: 'with `latency.margin`: the speed the latency allows a guest busy with its disk, or idle but doing requests (0 = paused); absent when off or while an idle guest has the idle speed' },
    },
  },
  job: {
    name: 'idlecrypt_job',
    description: 'One point per copy job per progress reading (QMP query-block-jobs): its speed limit, measured speed, progress and ETA.',
    tags: { host: hostTag, vm: vmTag, device: deviceTag },
    fields: {
      speed_set_bps: { type: 'integer', unit: 'bytes/s', description: 'the speed limit in force (block-job-set-speed); 0 = unlimited' },
      unlimited: { type: 'integer', unit: '0/1', description: '1 when speed_set_bps is 0 (no limit), so that a graph need not show "0" for full speed' },
      speed_actual_bps: { type: 'float', unit: 'bytes/s', description: 'measured copy speed since the previous reading' },
      paused: { type: 'integer', unit: '0/1', description: '1 while the job is paused' },
      bytes_done: { type: 'integer', unit: 'bytes', description: 'bytes copied so far (QMP offset)' },
      bytes_total: { type: 'integer', unit: 'bytes', description: 'bytes to copy in all (QMP len; grows as the guest rewrites copied blocks)' },
      percent: { type: 'float', unit: '%', description: '100 * bytes_done / bytes_total' },
      eta_s: { type: 'float', unit: 's', description: 'estimated time to completion at the recent speed; absent while unknown (paused, no speed yet)' },
      status: { type: 'string', unit: 'text', description: 'QMP job status: `running`, `paused`, `ready`, ...' },
    },
  },
  probe: {
    name: 'idlecrypt_probe',
    description: "One point per VM when the activity source changes and at least every few seconds: the probes' health.",
    tags: { host: hostTag, vm: vmTag },
    fields: {
      source: { type: 'string', unit: 'text', description: '`ebpf`, or `qmp` when degraded to query-blockstats' },
      degraded: { type: 'integer', unit: '0/1', description: '1 while the source is `qmp` (input and interrupts unknown)' },
      attached: { type: 'integer', unit: '0/1', description: '1 while the source delivers samples (bpftrace attached, or QMP polled)' },
      restarts: { type: 'integer', unit: 'count', description: 'bpftrace restarts since idlecrypt started (cumulative)' },
      reason: { type: 'string', unit: 'text', description: 'why the probes are degraded or restarting; absent when healthy' },
    },
  },
  agent: {
    name: 'idlecrypt_agent',
    description: 'One point per host every 10 s while `idlecrypt agent` runs: what it watches, its copies and their queue, and its own cost.',
    tags: { host: hostTag },
    fields: {
      vms_watched: { type: 'integer', unit: 'count', description: 'QEMU processes on the host the agent follows' },
      disks_configured: { type: 'integer', unit: 'count', description: 'disks of running VMs that the configuration names, and named disks of VMs not running' },
      copies_running: { type: 'integer', unit: 'count', description: 'copies in progress (target creation, copying, pivot), paused ones included' },
      max_jobs: { type: 'integer', unit: 'count', description: 'host.max-jobs: the most copies at once' },
      queued: { type: 'integer', unit: 'count', description: 'disks waiting for a copy slot' },
      waiting: { type: 'integer', unit: 'count', description: 'disks whose VM is not running or cannot be reached' },
      encrypted: { type: 'integer', unit: 'count', description: 'disks running on their encrypted image' },
      failed: { type: 'integer', unit: 'count', description: 'disks whose attempt failed (for good until a reload, or retrying)' },
      cpu_percent: { type: 'float', unit: '%', description: "the agent's CPU time in the last interval, in percent of one core (bpftrace not included)" },
      bytes_rss: { type: 'integer', unit: 'bytes', description: "the agent's resident memory" },
    },
  },
} as const satisfies Record<string, MeasurementSpec>;

export type MeasurementKey = keyof typeof MEASUREMENTS;
export type MeasurementName = (typeof MEASUREMENTS)[MeasurementKey]['name'];
export const MEASUREMENT_KEYS = Object.keys(MEASUREMENTS) as MeasurementKey[];

type Spec<K extends MeasurementKey> = (typeof MEASUREMENTS)[K];
export type FieldName<K extends MeasurementKey> = keyof Spec<K>['fields'] & string;
export type TagName<K extends MeasurementKey> = keyof Spec<K>['tags'] & string;
type ValueOf<S> = S extends { readonly type: 'string' } ? string : number;

/** The fields of a point of K: each optional; null and non-finite values are left out. */
export type FieldsOf<K extends MeasurementKey> = {
  [F in FieldName<K>]?: ValueOf<Spec<K>['fields'][F]> | null;
};
/** The tags of a point of K: required tags must be given; an empty value is left out. */
export type TagsOf<K extends MeasurementKey> = {
  [T in TagName<K> as Spec<K>['tags'][T] extends { readonly required: true } ? T : never]: string;
} & {
  [T in TagName<K> as Spec<K>['tags'][T] extends { readonly required: true } ? never : T]?: string;
};

/** The name of measurement K, e.g. measurement('job') = 'idlecrypt_job'. */
export function measurement<K extends MeasurementKey>(key: K): Spec<K>['name'] {
  return MEASUREMENTS[key].name;
}

/** A field name of K, checked at compile time: field('job', 'eta_s') = 'eta_s'. */
export function field<K extends MeasurementKey, F extends FieldName<K>>(_key: K, name: F): F {
  return name;
}

/** The spec of a measurement by its InfluxDB name, for serialisers. */
const BY_NAME: ReadonlyMap<string, MeasurementSpec> = new Map(Object.values(MEASUREMENTS).map((m) => [m.name, m as MeasurementSpec]));

export function specOf(name: string): MeasurementSpec | undefined {
  return BY_NAME.get(name);
}

/**
 * A point ready for a sink. Built only by point() (or the helpers below), so that its
 * names are in the table and its values are of the field's type: integers are whole
 * numbers, floats are finite, strings are strings.
 */
export interface MetricPoint {
  readonly measurement: MeasurementName;
  /** Tag name -> value, in name order (InfluxDB's preferred order), no empty values. */
  readonly tags: Readonly<Record<string, string>>;
  /** Field name -> value, in name order; at least one. */
  readonly fields: Readonly<Record<string, number | string>>;
  /** Epoch milliseconds (may have a fraction: written with microsecond precision). */
  readonly time: number;
}

/** The value of a required tag given empty. */
export const UNKNOWN_TAG = 'unknown';

/** Line protocol cannot carry a newline in a tag or a string (both sinks rely on this). */
const oneLine = (s: string): string => s.replace(/[\r\n]+/g, ' ');

/**
 * The typed point builder. Returns null when nothing is left to write (every field null
 * or not finite): InfluxDB rejects a point without fields. Never throws.
 */
export function point<K extends MeasurementKey>(key: K, time: number, tags: TagsOf<K>, fields: FieldsOf<K>): MetricPoint | null {
  const spec: MeasurementSpec = MEASUREMENTS[key];
  const outTags: Record<string, string> = {};
  for (const name of Object.keys(spec.tags).sort()) {
    const v = (tags as Record<string, string | undefined>)[name];
    if (v === undefined || v === '') {
      // The types make required tags present; an empty one (a VM without a name) is
      // written as `unknown`, visible in the panels' selectors rather than lost.
      if (spec.tags[name]!.required) outTags[name] = UNKNOWN_TAG;
      continue;
    }
    outTags[name] = oneLine(v);
  }
  const outFields: Record<string, number | string> = {};
  for (const name of Object.keys(fields).sort()) {
    const f = spec.fields[name];
    const v = (fields as Record<string, number | string | null | undefined>)[name];
    if (!f || v === null || v === undefined) continue;
    if (f.type === 'string') {
      outFields[name] = oneLine(String(v));
    } else if (typeof v === 'number' && Number.isFinite(v)) {
      outFields[name] = f.type === 'integer' ? Math.round(v) : v;
    }
  }
  if (Object.keys(outFields).length === 0) return null;
  return { measurement: spec.name as MeasurementName, tags: outTags, fields: outFields, time };
}

// ---------------------------------------------------------------------------------------
// Domain builders: what the callers hold -> points. Typed structurally, so that this
// module imports neither the streams nor the controller.

/** The identity every point carries. */
export interface VmIdentity {
  readonly host: string;
  readonly vm: string;
}

/** Counts per interval as src/streams' ActivitySample carries them (src/probes/counters.ts); null = not measured. */
export type ActivityCounts = SampleCounts;

/**
 * One activity sample. The rates are count / interval, by the same functions as the
 * controller's ratesFromSample (src/controller/adapt.ts: perSecond, msPerSecond), so that the
 * panels show what the controller compared with its thresholds (before its window average).
 */
export function activityPoint(
  id: VmIdentity & { readonly time: number; readonly intervalS: number; readonly source: 'ebpf' | 'qmp' },
  c: ActivityCounts,
): MetricPoint | null {
  const perS = (n: number | null | undefined) => perSecond(n, id.intervalS);
  const diskKinds = [c.diskReads, c.diskWrites, c.diskFlushes, c.diskDiscards ?? null];
  const disk = diskKinds.every((n) => n === null) ? null : diskKinds.reduce<number>((a, n) => a + (n ?? 0), 0);
  return point('activity', id.time, { host: id.host, vm: id.vm, source: id.source }, {
    disk_reads: c.diskReads,
    disk_writes: c.diskWrites,
    disk_flushes: c.diskFlushes,
    disk_discards: c.diskDiscards ?? null,
    key_events: c.keyEvents,
    pointer_events: c.pointerEvents,
    interrupts: c.interrupts,
    vcpu_wait_us: c.vcpuWaitUs ?? null,
    disk_busy_us: c.diskBusyUs ?? null,
    interval_s: id.intervalS,
    disk_requests_per_s: perS(disk),
    key_events_per_s: perS(c.keyEvents),
    pointer_events_per_s: perS(c.pointerEvents),
    interrupts_per_s: perS(c.interrupts),
    vcpu_wait_ms_per_s: msPerSecond(c.vcpuWaitUs, id.intervalS),
    disk_busy_ms_per_s: msPerSecond(c.diskBusyUs, id.intervalS),
  });
}

/** A controller pass: the state after hold-off, the decision, and the policy in force. */
export function moderationPoint(
  id: VmIdentity & { readonly time: number; readonly device?: string },
  m: {
    readonly state: ModerationState;
    readonly reason: string;
    readonly mode?: 'full' | 'throttled' | 'paused';
    /** The policy's thresholds, events/s; null = off. */
    readonly thresholds?: Readonly<Record<Signal, number | null>>;
    readonly holdoffMs?: number;
    /** Background levels learnt (`auto`), per signal. */
    readonly levels?: Readonly<Partial<Record<Signal, { readonly level: number }>>>;
    /** The latency control (`latency.margin`), when on. */
    readonly latency?: { readonly latencyMs: number | null; readonly baselineMs: number | null; readonly margin: number; readonly speedBps: number };
  },
): MetricPoint | null {
  const t = m.thresholds;
  return point('moderation', id.time, { host: id.host, vm: id.vm, ...(id.device ? { device: id.device } : {}) }, {
    state: m.state,
    state_code: STATE_CODE[m.state],
    busy: m.state === 'idle' ? 0 : 1,
    reason: m.reason,
    mode: m.mode ?? null,
    threshold_disk_requests_per_s: t?.disk ?? null,
    threshold_key_events_per_s: t?.keyboard ?? null,
    threshold_pointer_events_per_s: t?.pointer ?? null,
    threshold_interrupts_per_s: t?.interrupts ?? null,
    threshold_vcpu_wait_ms_per_s: t?.stall ?? null,
    threshold_disk_busy_ms_per_s: t?.inflight ?? null,
    holdoff_s: m.holdoffMs === undefined ? null : m.holdoffMs / 1000,
    learnt_disk_level_per_s: m.levels?.disk?.level ?? null,
    learnt_interrupts_level_per_s: m.levels?.interrupts?.level ?? null,
    latency_ms: m.latency?.latencyMs ?? null,
    latency_baseline_ms: m.latency?.baselineMs ?? null,
    latency_limit_ms: m.latency && m.latency.baselineMs !== null ? m.latency.baselineMs * (1 + m.latency.margin) : null,
    latency_speed_bps: m.latency && Number.isFinite(m.latency.speedBps) ? Math.round(m.latency.speedBps) : null,
  });
}

/** A job reading: QMP BlockJobInfo's offset/len/speed/paused plus the measured speed and ETA. */
export function jobPoint(
  id: VmIdentity & { readonly time: number; readonly device: string },
  j: {
    /** The limit in force, bytes/s; 0 = unlimited (QMP's encoding). */
    readonly speedSetBps: number;
    readonly speedActualBps?: number | null;
    readonly paused: boolean;
    readonly bytesDone: number;
    readonly bytesTotal: number;
    readonly etaS?: number | null;
    readonly status?: string;
  },
): MetricPoint | null {
  return point('job', id.time, { host: id.host, vm: id.vm, device: id.device }, {
    speed_set_bps: j.speedSetBps,
    unlimited: j.speedSetBps === 0 ? 1 : 0,
    speed_actual_bps: j.speedActualBps ?? null,
    paused: j.paused ? 1 : 0,
    bytes_done: j.bytesDone,
    bytes_total: j.bytesTotal,
    percent: j.bytesTotal > 0 ? (100 * j.bytesDone) / j.bytesTotal : null,
    eta_s: j.etaS ?? null,
    status: j.status ?? null,
  });
}

/** The probes' health for one VM. */
export function probePoint(
  id: VmIdentity & { readonly time: number },
  p: { readonly source: 'ebpf' | 'qmp'; readonly attached: boolean; readonly restarts: number; readonly reason?: string | null },
): MetricPoint | null {
  return point('probe', id.time, { host: id.host, vm: id.vm }, {
    source: p.source,
    degraded: p.source === 'qmp' ? 1 : 0,
    attached: p.attached ? 1 : 0,
    restarts: p.restarts,
    reason: p.reason ?? null,
  });
}

/** What the agent counts of itself and its disks, every 10 s. */
export interface AgentCounts {
  readonly vmsWatched: number;
  readonly disksConfigured: number;
  readonly copiesRunning: number;
  readonly maxJobs: number;
  readonly queued: number;
  readonly waiting: number;
  readonly encrypted: number;
  readonly failed: number;
  readonly cpuPercent: number | null;
  readonly rssBytes: number;
}

export function agentPoint(id: { readonly host: string; readonly time: number }, c: AgentCounts): MetricPoint | null {
  return point('agent', id.time, { host: id.host }, {
    vms_watched: c.vmsWatched,
    disks_configured: c.disksConfigured,
    copies_running: c.copiesRunning,
    max_jobs: c.maxJobs,
    queued: c.queued,
    waiting: c.waiting,
    encrypted: c.encrypted,
    failed: c.failed,
    cpu_percent: c.cpuPercent,
    bytes_rss: c.rssBytes,
  });
}
