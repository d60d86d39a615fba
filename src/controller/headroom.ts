/**
 * Headroom: "full speed" that never takes all of QEMU's main loop.
 *
 * QEMU (7.2, no iothread) runs the guest's disk requests, the mirror's coroutines with their
 * LUKS encryption, and QMP in one main loop that holds the big QEMU lock while it works. An
 * unthrottled mirror can keep that loop busy all the time: then the guest's requests never
 * reach QEMU (under TCG the vCPU cannot even take the lock to kick its virtqueue), the
 * probes count nothing, and moderation sees an idle guest while the copy freezes it
 * (docs/starvation.md has the measurements). So the idle speed `unlimited` is run as a speed
 * limit that keeps the main loop's busy share (src/probes/mainloop.ts) at or under
 * 1 - `speed.headroom`: a speed just under the saturation point, measured as the copy runs.
 * A disk with an iothread is served, and copied, in that thread's loop instead: then the
 * load is that thread's (src/encrypt/moderation.ts steer), and the same rule keeps it.
 *
 * The rule, on every main-loop sample while the job runs at the idle speed (pure, below):
 *   load above the target   cap := base x target / load, at most -25% per step (-50% when
 *                           the loop is saturated): the loop's work is proportional to what
 *                           the copy is let do, which is the cap while it binds (the copy
 *                           makes >= 80% of it: QEMU's 100 ms rate-limit slices deliver a
 *                           steady 80-90% of a set speed), else the rate it makes (the copy
 *                           is held back by something else)
 *   load under the target   while the cap binds, raise it to cap x target / load, at most
 *                           +25% per step; a copy held back by something else (the disk)
 *                           keeps its cap
 * The load is smoothed over about two samples (half a second): one sample spans only two
 * or three rate-limit slices; a raise also heeds the newest sample, which the smoothed load
 * lags behind. A new copy starts at 64 MiB/s and reaches 300 MiB/s within
 * seven steps (under two seconds) if the loop allows.
 * The cap learnt stays across busy phases: the next idle phase starts where the last ended.
 *
 * The guest's side of the same limit: a spell in which the copy held the guest (the stall
 * began it, and no work followed but the requests it released: decide.ts holdOff) sets a
 * ceiling at STALL_CUT of the most the copy was let do over the second before, and the cap
 * stays under it; the ceiling rises by CEILING_RISE per step at the idle speed, is cut again
 * by the next such spell, and is gone after CEILING_STEPS steps at the idle speed without one.
 * The main thread's busy share does not see what a vCPU waits for: beside a sparse disk's
 * copy a guest trickling 15 synchronous writes a second waited for the big lock over 800 ms/s
 * every half second, with the cap (250-300 MiB/s) far above the copy's 150, and each spell
 * paused the copy. With the ceiling its vCPUs were held so in 1% of the idle phases' samples
 * instead of 9-12%, the copy as fast (docs/starvation.md). A spell in which the guest
 * submitted no request at all (an idle guest's timer interrupts waited) sets none.
 */
import {
  combineLatest,
  distinctUntilChanged,
  filter,
  map,
  merge,
  scan,
  startWith,
  withLatestFrom,
  type Observable,
  type OperatorFunction,
} from 'rxjs';
import type { EffectivePolicy } from '../policy/schema.ts';
import type { Decision } from './types.ts';

const MiB = 1024 * 1024;
/** Where a copy's cap starts: low enough not to freeze any guest, reached again in ~1 s. */
export const HEADROOM_START_BPS = 64 * MiB;
/** Never lower: the copy still makes progress while the loop is loaded by others. */
export const HEADROOM_MIN_BPS = 8 * MiB;
/**
 * The cap binds when the copy runs at this share of it or more (QEMU's slices deliver a
 * steady 80-90% of a set speed). Only a binding cap is raised: a cap raised while the copy
 * was held back by the disk would run away, and the copy then saturates the loop the
 * moment the disk lets it (seen: a 1.6 s stall while the cap came down again).
 */
const BINDING = 0.8;
/** Per step (250 ms): a saturated loop is relieved within a second, and noise moves little. */
const MAX_RAISE = 1.25;
const MAX_CUT = 0.75;
/** A saturated loop (on a CPU all the time) is relieved faster. */
const MAX_CUT_SATURATED = 0.5;
/** Weight of the newest load sample (exponential smoothing over about two samples). */
const SMOOTHING = 0.5;
/** A spell that held the guest puts the ceiling at this share of what the copy was let do. */
export const STALL_CUT = 0.85;
/** Per step at the idle speed the ceiling rises by this factor (+4% a second). */
export const CEILING_RISE = 1.01;
/**
 * A spell's cut is from the most the copy was let do over this many steps (1 s): the stall
 * that makes a spell freezes the loop, and with it the copy, in the step just before.
 */
const RECENT_STEPS = 4;
/**
 * After this many steps at the idle speed (5 s) without another spell the ceiling is gone:
 * spells that come this seldom are not the copy's speed (one an idle phase was seen at any
 * ceiling, and a ceiling cut once each phase only sank).
 */
export const CEILING_STEPS = 20;

/** One main-loop sample with what the job did up to it. */
export interface HeadroomInput {
  /** When the load was read (ms, the controller's clock). */
  readonly time: number;
  /** Busy share of the main loop over the last interval (src/streams/load.ts). */
  readonly load: number;
  /** The job's bytes copied, and when that was read (ms, the controller's clock). */
  readonly offset: number;
  readonly offsetAt: number;
  /** The job ran at the idle speed (decision 'full', not paused) at this sample. */
  readonly full: boolean;
}

export interface HeadroomMemory {
  readonly capBps: number;
  /** Last load measured while the job ran at the idle speed, for views. */
  readonly load: number | null;
  readonly prev: { readonly offset: number; readonly offsetAt: number; readonly full: boolean } | null;
  /**
   * What the copy was let do at the last RECENT_STEPS steps at the idle speed (the cap where
   * it bound, else its rate), newest last.
   */
  readonly recent?: readonly number[];
  /** Set by a spell that held the guest (heldStep): the cap stays under it. */
  readonly ceilingBps?: number;
  /** Steps at the idle speed since the ceiling was set. */
  readonly ceilingSteps?: number;
  /**
   * The copy's current stretch at the idle speed, or its last once the copy runs otherwise
   * (steps at the idle speed), and whether it began as the guest's own busy phase ended (not
   * at the copy's start, not after a spell that held the guest). A spell's ceiling is judged
   * by the stretch it ended (heldStep).
   */
  readonly run?: RunStretch;
  /**
   * A held spell came since the last stretch, so the next begins after one: set by heldStep,
   * taken by the stretch that begins next (the held decision may come before or after the
   * readings that see the copy stop, when the spell is shorter than a reading). While it is
   * set, a further spell is not exempt as the tail of a busy phase.
   */
  readonly resumeAfterHeld?: boolean;
}

export interface RunStretch {
  readonly steps: number;
  readonly afterBusy: boolean;
}

export const INITIAL_HEADROOM: HeadroomMemory = { capBps: HEADROOM_START_BPS, load: null, prev: null };

const roundMiB = (bps: number) => Math.max(HEADROOM_MIN_BPS, Math.round(bps / MiB) * MiB);

/** One sample → the new cap. Pure. `headroom` is the share of the loop to leave free (0.1). */
export function headroomStep(mem: HeadroomMemory, s: HeadroomInput, headroom: number): HeadroomMemory {
  const prev = { offset: s.offset, offsetAt: s.offsetAt, full: s.full };
  const p = mem.prev;
  // A stretch at the idle speed begins at its first reading (which holds no step yet) and
  // ends where the copy runs otherwise (paused, throttled); it stays in `run` until the next.
  if (!s.full) return { ...mem, prev };
  if (!p?.full) {
    const afterBusy = p !== null && !mem.resumeAfterHeld;
    return { ...mem, prev, run: { steps: 0, afterBusy }, resumeAfterHeld: false };
  }
  if (!(s.offsetAt > p.offsetAt)) return { ...mem, prev };
  const run: RunStretch = { steps: (mem.run?.steps ?? 0) + 1, afterBusy: mem.run?.afterBusy ?? false };
  const target = 1 - headroom;
  // One 250 ms sample holds two or three of QEMU's 100 ms rate-limit slices: smooth it.
  const load = mem.load === null ? s.load : SMOOTHING * s.load + (1 - SMOOTHING) * mem.load;
  const rate = Math.max(0, (s.offset - p.offset) / ((s.offsetAt - p.offsetAt) / 1000));
  // The loop's work follows what the copy is let do: the cap while the copy keeps up with
  // it (QEMU's slices deliver a steady 80-90% of a set speed, noisily over 250 ms), else
  // the rate it makes (the copy is held back by something else: the disk).
  const binding = rate >= BINDING * mem.capBps;
  const base = binding ? mem.capBps : rate;
  let cap = mem.capBps;
  if (load > target) cap = Math.max(cap * (load >= 1 ? MAX_CUT_SATURATED : MAX_CUT), (base * target) / load);
  // Raise only as far as the newest sample allows too: the smoothed load lags a rising one.
  else if (binding) cap = Math.min(cap * MAX_RAISE, (base * target) / Math.max(load, s.load, 0.05));
  const recent = [...(mem.recent ?? []), base].slice(-RECENT_STEPS);
  const ceilingSteps = (mem.ceilingSteps ?? 0) + 1;
  const stretch = { run, ...(mem.resumeAfterHeld ? { resumeAfterHeld: true } : {}) };
  if (mem.ceilingBps === undefined || ceilingSteps >= CEILING_STEPS) return { capBps: roundMiB(cap), load, prev, recent, ...stretch };
  const ceilingBps = mem.ceilingBps * CEILING_RISE;
  return { capBps: roundMiB(Math.min(cap, ceilingBps)), load, prev, recent, ceilingBps, ceilingSteps, ...stretch };
}

/**
 * A spell that held the guest ended (the copy paused for a stall, and the guest did no work
 * after it): the ceiling goes to STALL_CUT of the most the copy was let do in the second
 * before it, or lower where it already is, and the cap under it. Pure.
 *
 * `guestIdle`: the guest submitted no disk request in the spell (Decision.heldIdle). An idle
 * guest's vCPU waits for the lock for its timer interrupts, over the stall's threshold in
 * spells on a host short of CPUs, at any speed of the copy (seen at a main loop 56% busy,
 * in the copy's first ramp). Nothing the guest does is slowed, so no ceiling: one cut from
 * such a spell held a whole idle phase at 43% of the unthrottled speed (test/moderation,
 * 2026-12-05). The spell still counts as held for the stretch after it.
 */
export function heldStep(mem: HeadroomMemory, guestIdle = false): HeadroomMemory {
  if (guestIdle) return { ...mem, resumeAfterHeld: true };
  // The stretch the spell ended: a copy back at its idle speed for under a second after a
  // pause of the guest's (a busy phase, not a held spell) is not what held the guest; the
  // spell is the tail of the guest's own busy phase, and the rates before it are the copy's
  // ramp, no measure of what it can do (cuts from them set ceilings of 8-65 MiB/s that whole
  // idle phases then kept: docs/starvation.md). The spell is still held off; the next one cuts,
  // even when the copy ran between them too briefly for a load sample to start a stretch (it
  // resumed for 0.1-0.25 s at a time between spells, and three more went by uncut: 2026-12-05).
  if (mem.run?.afterBusy && mem.run.steps < RECENT_STEPS && !mem.resumeAfterHeld) return { ...mem, resumeAfterHeld: true };
  const before = Math.min(mem.recent?.length ? Math.max(...mem.recent) : mem.capBps, mem.capBps);
  const ceilingBps = Math.max(HEADROOM_MIN_BPS, Math.min(mem.ceilingBps ?? Infinity, before * STALL_CUT));
  return { ...mem, ceilingBps, ceilingSteps: 0, capBps: roundMiB(Math.min(mem.capBps, ceilingBps)), resumeAfterHeld: true };
}

/** The job's progress as the controller sees it, with the time it was read. */
export interface TimedProgress {
  readonly offset: number;
  readonly time: number;
  readonly paused?: boolean;
}

/**
 * Main-loop loads → the cap, given the decisions before headroom (`base$`) and the job's
 * progress. Emits the cap when it changes.
 */
export function headroomCap(
  base$: Observable<Decision>,
  progress$: Observable<TimedProgress>,
  policy$: Observable<EffectivePolicy>,
): OperatorFunction<{ time: number; load: number }, HeadroomMemory> {
  return (load$) => {
    // Each spell that held the guest, once: its decision is distinct from those around it.
    const held$ = base$.pipe(
      filter((d) => d.held === true),
      withLatestFrom(policy$),
      filter(([, pol]) => pol.speed.headroom !== null),
      map(([d]) => (d.heldIdle ? ('heldIdle' as const) : ('held' as const))),
    );
    const sample$ = load$.pipe(withLatestFrom(base$, progress$, policy$));
    return merge(sample$, held$).pipe(
      scan((mem, e) => {
        if (e === 'held' || e === 'heldIdle') return heldStep(mem, e === 'heldIdle');
        const [l, d, p, pol] = e;
        return pol.speed.headroom === null
          ? { ...mem, prev: null }
          : headroomStep(mem, { time: l.time, load: l.load, offset: p.offset, offsetAt: p.time, full: d.mode === 'full' && !p.paused }, pol.speed.headroom);
      }, INITIAL_HEADROOM),
      distinctUntilChanged((a, b) => a.capBps === b.capBps && a.load === b.load),
    );
  };
}

/**
 * A decision with the headroom applied: a job at the idle speed or throttled never runs
 * faster than the cap. 'full' stays 'full' (as fast as the guest allows), with the cap
 * as its speed. Pure.
 */
export function withHeadroom(d: Decision, mem: HeadroomMemory, p: EffectivePolicy): Decision {
  if (p.speed.headroom === null || d.mode === 'paused') return d;
  const cap = mem.capBps;
  if (d.mode === 'throttled' && d.speed <= cap) return d;
  const ceiling = mem.ceilingBps !== undefined && roundMiB(mem.ceilingBps) <= cap ? { ceiling: true as const } : {};
  return { ...d, speed: cap, headroom: { capBps: cap, load: mem.load, ...ceiling } };
}

/** decide()'s last stage: base decisions, capped by what the main loop allows. */
export function applyHeadroom(
  base$: Observable<Decision>,
  load$: Observable<{ time: number; load: number }>,
  progress$: Observable<TimedProgress>,
  policy$: Observable<EffectivePolicy>,
): Observable<Decision> {
  const cap$ = load$.pipe(headroomCap(base$, progress$, policy$), startWith(INITIAL_HEADROOM));
  return combineLatest([base$, cap$, policy$]).pipe(map(([d, mem, p]) => withHeadroom(d, mem, p)));
}
