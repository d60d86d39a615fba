/**
 * The controller's inputs and outputs, decoupled from the probe layer (src/probes,
 * src/streams) and from QMP (src/jobs): whatever measures the guest delivers
 * `ActivityRates`; whatever runs the copy implements `JobControl`.
 */
import type { Signal } from '../policy/schema.ts';
import type { LatencyView } from './latency.ts';

export type { Signal };

/**
 * The kinds of guest disk request. The disk signal is their sum; `thresholds: auto` also
 * learns each kind's own level (calibrate.ts), so that a kind the guest's background never
 * does (reads, beside a database's log writes) is seen at the source design's 5/s.
 */
export const DISK_KINDS = ['reads', 'writes', 'flushes', 'discards'] as const;
export type DiskKind = (typeof DISK_KINDS)[number];

/**
 * One activity sample of one VM: event rates per second over the sample's own interval
 * (count / measured interval), not yet averaged. The controller averages them over the
 * policy's `sampling.window` itself, so that the window is a policy setting.
 */
export interface ActivityRates {
  /** End of the sample, ms (the scheduler's clock: epoch ms in production). */
  readonly time: number;
  readonly vm: string;
  readonly pid?: number;
  /**
   * The measured length of this sample, ms. When absent it is taken as the time since the
   * previous sample (and as `sampling.interval` for the first).
   */
  readonly intervalMs?: number;
  /** Guest disk requests (read + write + flush + discard) per second. */
  readonly diskPerS: number;
  /** The same by kind, where the source counts them apart (both do). */
  readonly diskKindsPerS?: Readonly<Record<DiskKind, number>>;
  /** null = unknown (degraded mode, no eBPF): an unknown signal never makes the guest busy. */
  readonly keyPerS: number | null;
  readonly pointerPerS: number | null;
  readonly interruptsPerS: number | null;
  /**
   * Milliseconds per second the guest's vCPUs waited for QEMU's big lock (probes/qemu-stall.bt):
   * the guest held back by QEMU's main loop. Absent or null = unknown.
   */
  readonly stallMsPerS?: number | null;
  /**
   * Milliseconds per second the guest's disks had a request in flight, started and not yet
   * completed (probes/qemu-inflight.bt): a request the copy holds up shows here while it waits,
   * where the requests' count sees nothing until it completes. Absent or null = unknown.
   */
  readonly inflightMsPerS?: number | null;
  readonly source: 'ebpf' | 'qmp';
}

/** The thresholds in force where the policy says `auto`, and the background levels they come from. */
export interface LearntThresholds {
  readonly thresholds: Readonly<Record<Signal, number | null>>;
  /** Per learnt signal: its background level and threshold; a signal still learning is absent. */
  readonly levels: Readonly<Partial<Record<Signal, { readonly level: number; readonly threshold: number }>>>;
  /** With `disk: auto`: each kind of request's level and threshold, once learnt. */
  readonly kinds?: Readonly<Partial<Record<DiskKind, { readonly level: number; readonly threshold: number }>>>;
  /** "disk level 18/s, busy above 27/s, interrupts learning (busy above 1000/s until 60 s are seen)" */
  readonly summary: string;
}

/** The copy's progress, for the deadline: QAPI BlockJobInfo offset/len (len grows as the guest dirties copied blocks). */
export interface JobProgress {
  readonly offset: number;
  readonly len: number;
  /**
   * QEMU's `ready` (the mirror is in sync), when known. A mirror shows offset == len a
   * moment before it is ready, and a paused one stays so without ever getting there.
   */
  readonly ready?: boolean;
  /** The job is paused (by us or anyone), when known. */
  readonly paused?: boolean;
}

export interface Reason {
  readonly signal: Signal;
  /** The windowed rate, per second. */
  readonly value: number;
  readonly threshold: number;
  /** The threshold was learnt for this guest (`auto`), not the policy's number. */
  readonly learnt?: true;
  /** A disk reason of one kind of request over that kind's learnt threshold (the sum was not over its own). */
  readonly kind?: DiskKind;
}

export interface Classification {
  readonly state: 'busy' | 'idle';
  /** Every signal above its threshold; empty when idle. */
  readonly reasons: readonly Reason[];
}

/** A classification of the windowed rates at `time`. */
export interface Classified extends Classification {
  readonly time: number;
  /**
   * The guest's disk requests per second in this sample alone (not windowed, classified or
   * not): whether a guest the copy held did anything at all (decide.ts holdOff). Absent =
   * unknown, taken as some.
   */
  readonly diskPerS?: number;
  /** The thresholds it was made with, when some are learnt (`auto`): what calibrate.ts learnt. */
  readonly learnt?: LearntThresholds;
  /** Why the guest counts as idle when that is not simply "every rate under its threshold". */
  readonly note?: string;
}

/**
 * The activity state after the hold-off: 'holdoff' is the quiet time after busy, during
 * which the job keeps the busy speed.
 */
export type ActivityState = 'idle' | 'busy' | 'holdoff';

export interface StateChange {
  readonly state: ActivityState;
  /** For people and logs: "disk 37.5/s > 5/s", "hold-off 1s after disk 37.5/s > 5/s". */
  readonly reason: string;
  /**
   * Busy (or holding off) because of a person at the console or a stalled vCPU, not only
   * the guest's disk and interrupts: never graded by latency (latency.ts).
   */
  readonly urgent?: true;
  /**
   * The hold-off after a spell in which the copy held the guest: the stall began it and the
   * guest did no work but what it had been kept from submitting (decide.ts holdOff). The
   * headroom lowers its cap for it (headroom.ts).
   */
  readonly held?: true;
  /**
   * With `held`: the guest submitted no disk request from the spell's start to its end. An
   * idle guest's vCPU waits for the lock too (its timer interrupts), most on a host short of
   * CPUs; the copy's speed is no harm to a guest that does nothing, so the headroom sets no
   * ceiling for such a spell (headroom.ts heldStep).
   */
  readonly heldIdle?: true;
}

/** What the deadline asks for: the busy speed it needs, if it needs one. */
export interface Guarantee {
  /** bytes/s the job must at least run at in every state; 0 = nothing asked, Infinity = full speed (see overdue). */
  readonly requiredBps: number;
  /** The deadline, epoch ms (scheduler clock), when the policy has one. */
  readonly deadlineAt: number | null;
  /** Full speed before the deadline: the copy is past the finish time it was planned for. */
  readonly overdue?: true;
}

/**
 * The desired state of the job. `speed` is in QMP's encoding: bytes/s, 0 = unlimited
 * (block-job-set-speed); it is 0 and meaningless when `mode` is 'paused'.
 */
export interface Decision {
  readonly mode: 'full' | 'throttled' | 'paused';
  readonly speed: number;
  readonly state: ActivityState;
  readonly reason: string;
  /** The completion guarantee raised the speed above the policy's (a deadline at risk). */
  readonly guaranteed?: true;
  /**
   * The speed is the headroom's cap (controller/headroom.ts): what keeps `speed.headroom` of
   * QEMU's main loop free, and the loop's busy share last measured at the idle speed;
   * `ceiling` when the cap is the ceiling set after a spell that held the guest.
   */
  readonly headroom?: { readonly capBps: number; readonly load: number | null; readonly ceiling?: true };
  /** The learnt thresholds (`thresholds: auto`) in force when the state was judged. */
  readonly learnt?: LearntThresholds;
  /** From the state: the hold-off after a spell in which the copy held the guest (StateChange.held). */
  readonly held?: true;
  /** From the state: that guest submitted no disk request in the spell (StateChange.heldIdle). */
  readonly heldIdle?: true;
  /** The latency control (`latency.margin`), when on: the guest's latency, its baseline, the graded speed. */
  readonly latency?: LatencyView;
}
