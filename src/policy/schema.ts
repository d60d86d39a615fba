/**
 * The policy's keys and what each accepts: the one place that owns these names. The shipped
 * policy/default.yaml must set every key here (it is validated with this schema, nothing
 * optional), and a test checks that the two agree. A user's file sets only what it changes
 * and is merged over the defaults before validation (load.ts).
 *
 * YAML keys and TypeScript fields are the same words; values are normalised: durations in
 * ms, speeds in bytes/s (`UNLIMITED` = Infinity, `PAUSED` = 0), thresholds in events/s
 * (null = off).
 */
import { MIN_INTERVAL_MS } from '../probes/runner.ts';
import { z } from 'zod';
import { parseDeadline, parseDuration, parseFloor, parseFlush, parseHeadroom, parseLatencyMargin, parseLearnableThreshold, parseSpeed, parseThreshold, show, type Parsed } from './units.ts';

/** Turns one of units.ts's parsers into a schema whose problem is the parser's sentence. */
export function scalar<T>(parse: (v: unknown) => Parsed<T>) {
  return z.unknown().transform((v, ctx): T => {
    const r = parse(v);
    if (r.ok) return r.value;
    ctx.issues.push({ code: 'custom', message: r.problem, input: v });
    return z.NEVER;
  });
}

/** A mapping with exactly these keys (unknown keys are errors, named by load.ts). */
function section<S extends z.core.$ZodLooseShape>(shape: S) {
  return z.strictObject(shape, {
    error: (iss) => (iss.code === 'invalid_type' ? `expected a mapping (key: value lines), got ${show(iss.input)}` : undefined),
  });
}

const threshold = scalar(parseThreshold);
/** A rate, off, or auto: learnt per guest, never below the source design's value (controller/calibrate.ts). */
const learnable = scalar(parseLearnableThreshold);

/** Everything that may differ between VMs. */
export const moderationShape = {
  /**
   * The guest is busy while any of these rates (per second, over sampling.window) is above its
   * threshold. `thresholds: auto` in a file is short for disk: auto and interrupts: auto (load.ts).
   */
  thresholds: section({
    disk: learnable,
    keyboard: threshold,
    pointer: threshold,
    interrupts: learnable,
    /** ms per second the guest's vCPUs waited for QEMU's big lock (probes/qemu-stall.bt). */
    stall: threshold,
    /** ms per second the guest's disks had a request in flight (probes/qemu-inflight.bt). */
    inflight: threshold,
  }),
  speed: section({
    idle: scalar(parseSpeed),
    busy: scalar(parseSpeed),
    /** Share of QEMU's main loop the copy leaves free (0.15); null = off (controller/headroom.ts). */
    headroom: scalar(parseHeadroom),
  }),
  /** ms the guest must stay quiet before the idle speed returns. */
  holdoff: scalar(parseDuration),
  guarantee: section({
    /** bytes/s the job never goes below; 0 = no floor. */
    floor: scalar(parseFloor),
    deadline: scalar(parseDeadline),
    /** When the deadline engages, plan to finish after time-left / margin, so that a job that grows still makes it. */
    margin: scalar((v): Parsed<number> => {
      if (typeof v !== 'number' || !Number.isFinite(v)) return { ok: false, problem: `expected a number such as 1.25, got ${show(v)}` };
      if (v < 1) return { ok: false, problem: `must be at least 1 (1.25 aims to finish with a fifth of the time to spare), got ${v}` };
      return { ok: true, value: v };
    }),
  }),
  /**
   * Harm judged by the guest's own disk latency (controller/latency.ts): while the guest is
   * busy with its disk, the copy runs at the highest speed that keeps the guest's latency
   * within `margin` of its latency without the copy.
   */
  latency: section({
    /** 0.15 = 15%; null = off (the busy speed applies, as without it). */
    margin: scalar(parseLatencyMargin),
    /** ms of graded copying after which the copy pauses (until a settled quiet judgement, 1-1.5 s) to measure the baseline again. */
    refresh: scalar(parseDuration),
  }),
  /** The pivot onto the encrypted image once the copy has caught up (READY). */
  pivot: section({
    /** ms to wait at READY for a quiet guest (idle, nothing left to copy) before pivoting anyway. */
    'quiet-wait': scalar(parseDuration),
    /** ms of full speed the convergence push may last; 0 = never push (decide.ts pushStep). */
    push: scalar(parseDuration),
    /** ms the work left must stay within one push before a push (and between pushes). */
    'push-after': scalar(parseDuration),
  }),
  /** The target in the host's page cache (src/encrypt/writeback.ts). */
  target: section({
    /** Bytes of copying after which a target opened through the page cache is flushed; null = off. */
    flush: scalar(parseFlush),
  }),
};

export const moderationSchema = section(moderationShape);

/** The probes sample every QEMU on the host at once, so sampling is one setting for all VMs. */
export const samplingSchema = section({
  /** ms between activity samples. */
  interval: scalar(parseDuration),
  /** ms over which rates are averaged before they are compared with the thresholds. */
  window: scalar(parseDuration),
}).superRefine((s, ctx) => {
  // Faster than once a second so that the job can slow within the 250 ms of issue 4; not
  // below 50 ms, the shortest interval the probes report at (src/probes/runner.ts).
  if (s.interval < MIN_INTERVAL_MS || s.interval > 1000) {
    ctx.addIssue({ code: 'custom', path: ['interval'], message: `must be between ${MIN_INTERVAL_MS}ms and 1s, got ${s.interval}ms` });
  }
  if (s.window < s.interval) {
    ctx.addIssue({ code: 'custom', path: ['window'], message: `must be at least sampling.interval (${s.interval}ms), got ${s.window}ms` });
  } else if (s.window > 60_000) {
    ctx.addIssue({ code: 'custom', path: ['window'], message: `must be at most 1m, got ${s.window}ms` });
  }
});

export const policySchema = section({
  sampling: samplingSchema,
  ...moderationShape,
  /** Per-VM overrides by VM name (QEMU -name / libvirt domain name), merged over the rest. */
  vms: z.record(z.string(), z.unknown(), {
    error: (iss) => (iss.code === 'invalid_type' ? `expected a mapping of VM names, got ${show(iss.input)}` : undefined),
  }),
});

export type Moderation = z.output<typeof moderationSchema>;
export type Sampling = z.output<typeof samplingSchema>;
export type Signal = keyof Moderation['thresholds'];
export const SIGNALS = Object.keys(moderationShape.thresholds.shape) as Signal[];
/** The unit of a signal's rate and threshold: time per second (stall, inflight) or events per second. */
export const rateUnit = (signal: Signal): 'ms/s' | '/s' => (signal === 'stall' || signal === 'inflight' ? 'ms/s' : '/s');
/** The signals `auto` may learn per guest (src/controller/calibrate.ts). */
export const LEARNABLE = ['disk', 'interrupts'] as const satisfies readonly Signal[];
export type LearnableSignal = (typeof LEARNABLE)[number];
/** The source design's values: a learnt threshold never goes below them, and they apply until one is learnt. */
export const LEARN_FLOOR: Readonly<Record<LearnableSignal, number>> = { disk: 5, interrupts: 1000 };
export const isLearnable = (s: Signal): s is LearnableSignal => (LEARNABLE as readonly string[]).includes(s);

/** The thresholds before anything is learnt: each `auto` at the source design's value. */
export function fixedThresholds(t: Moderation['thresholds']): Record<Signal, number | null> {
  return Object.fromEntries(SIGNALS.map((s) => [s, t[s] === 'auto' ? (isLearnable(s) ? LEARN_FLOOR[s] : null) : t[s]])) as Record<Signal, number | null>;
}

/** A loaded policy: the top-level settings, and each VM's settings fully resolved. */
export interface Policy extends Moderation {
  /** Where it came from: a file path, or the shipped default's path. */
  readonly source: string;
  readonly sampling: Sampling;
  readonly vms: Readonly<Record<string, Moderation>>;
}

/** What the controller of one VM runs on: that VM's settings and the shared sampling. */
export interface EffectivePolicy extends Moderation {
  readonly source: string;
  readonly sampling: Sampling;
  /** The VM whose override applied, if any. */
  readonly override?: string;
}

/** The keys a mapping at `path` may have, for "unknown key" messages; [] if not a mapping. */
export function knownKeys(path: readonly (string | number)[]): string[] {
  // vms.<name> takes the per-VM keys; everything else follows the schema's shapes.
  let shape: Record<string, unknown> | undefined = policySchema.shape;
  for (let i = 0; i < path.length; i++) {
    const seg = String(path[i]);
    if (i === 0 && seg === 'vms') {
      if (path.length === 1) return [];
      shape = moderationShape;
      i++; // skip the VM name
      continue;
    }
    const next: unknown = shape?.[seg];
    shape = next instanceof z.ZodObject ? (next.shape as Record<string, unknown>) : next instanceof z.ZodPipe && next.in instanceof z.ZodObject ? (next.in.shape as Record<string, unknown>) : undefined;
    if (!shape) return [];
  }
  return shape ? Object.keys(shape) : [];
}
