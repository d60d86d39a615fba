/**
 * The headroom (src/controller/headroom.ts): the idle speed is a limit that keeps the policy's
 * share of QEMU's main loop free, found from the loop's measured load as the copy runs.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BehaviorSubject, of, Subject } from 'rxjs';
import {
  CEILING_RISE,
  HEADROOM_MIN_BPS,
  HEADROOM_START_BPS,
  INITIAL_HEADROOM,
  headroomCap,
  headroomStep,
  heldStep,
  STALL_CUT,
  withHeadroom,
  type HeadroomMemory,
} from '../../src/controller/headroom.ts';
import { loadPolicy } from '../../src/policy/load.ts';
import { resolvePolicy } from '../../src/policy/resolve.ts';
import type { Decision } from '../../src/controller/types.ts';

const MiB = 1024 * 1024;
const P = resolvePolicy(loadPolicy(undefined), 'vm');

/** Runs the copy against a model QEMU: the loop's load is `perMiB` per MiB/s copied, the copy makes `eff` of its cap up to `maxBps`. */
function simulate(steps: number, model: { perMiB: number; eff: number; maxBps: number }, headroom = 0.15, start: HeadroomMemory = INITIAL_HEADROOM) {
  let mem = start;
  let offset = 0;
  const caps: number[] = [];
  const loads: number[] = [];
  for (let i = 0; i <= steps; i++) {
    const t = i * 250;
    const rate = Math.min(model.maxBps, mem.capBps * model.eff);
    const load = (rate / MiB) * model.perMiB;
    if (i > 0) offset += rate / 4;
    mem = headroomStep(mem, { time: t, load: i === 0 ? 0 : load, offset, offsetAt: t, full: true }, headroom);
    caps.push(mem.capBps);
    loads.push(load);
  }
  return { mem, caps, loads };
}

describe('headroomStep', () => {
  test('a copy starts at 64 MiB/s and settles where the main loop is busy 85% of the time, from below', () => {
    // The sparse cache=none copy of docs/starvation.md: 106% busy at 200 MiB/s unthrottled.
    const r = simulate(40, { perMiB: 1.06 / 200, eff: 0.83, maxBps: 200 * MiB });
    assert.equal(r.caps[0], HEADROOM_START_BPS);
    const last = r.loads.slice(-8);
    for (const l of last) assert.ok(l > 0.8 && l <= 0.87, `load ${l.toFixed(3)} settles at the target`);
    assert.ok(r.loads.every((l) => l <= 0.95), `never far past the target: ${r.loads.map((l) => l.toFixed(2)).join(' ')}`);
  });

  test('a loop that gets busier (a slower region, the guest) cuts the cap at once, by the smoothed load, at most by a quarter per step (by half when saturated)', () => {
    const mem: HeadroomMemory = { capBps: 200 * MiB, load: 0.85, prev: { offset: 0, offsetAt: 0, full: true } };
    const next = headroomStep(mem, { time: 250, load: 1.05, offset: 0.25 * 170 * MiB, offsetAt: 250, full: true }, 0.15);
    assert.equal(next.load, 0.95);
    assert.equal(next.capBps, Math.round((200 * 0.85) / 0.95) * MiB);
    const busier = headroomStep(mem, { time: 250, load: 1.1, offset: 0.25 * 170 * MiB, offsetAt: 250, full: true }, 0.15);
    assert.ok(Math.abs(busier.load! - 0.975) < 1e-9);
    assert.equal(busier.capBps, Math.round((200 * 0.85) / 0.975) * MiB, 'under 100% busy: by the load, at most a quarter');
    const worst = headroomStep(mem, { time: 250, load: 5, offset: 0.25 * 170 * MiB, offsetAt: 250, full: true }, 0.15);
    assert.equal(worst.capBps, 100 * MiB, 'saturated: at most by half');
  });

  test('a saturated loop is relieved within a second: from 106% busy to under the target in four steps', () => {
    // sparse cache=none (docs/starvation.md): 106% busy at 200 MiB/s, the copy makes 83% of its cap
    const model = { perMiB: 1.06 / 200, eff: 0.83, maxBps: 200 * MiB };
    let mem: HeadroomMemory = { capBps: 400 * MiB, load: 1.06, prev: { offset: 0, offsetAt: 0, full: true } };
    let offset = 0;
    const loads: number[] = [];
    for (let i = 1; i <= 4; i++) {
      const rate = Math.min(model.maxBps, mem.capBps * model.eff);
      offset += rate / 4;
      loads.push((rate / MiB) * model.perMiB);
      mem = headroomStep(mem, { time: i * 250, load: loads.at(-1)!, offset, offsetAt: i * 250, full: true }, 0.15);
    }
    const rate = Math.min(model.maxBps, mem.capBps * model.eff);
    assert.ok((rate / MiB) * model.perMiB <= 0.85, `load after four steps: ${((rate / MiB) * model.perMiB).toFixed(3)} (${loads.map((l) => l.toFixed(2)).join(' ')})`);
  });

  test('a copy held back by something else (the disk) keeps its cap while the loop has room', () => {
    const mem: HeadroomMemory = { capBps: 300 * MiB, load: 0.3, prev: { offset: 0, offsetAt: 0, full: true } };
    const next = headroomStep(mem, { time: 1000, load: 0.3, offset: 100 * MiB, offsetAt: 1000, full: true }, 0.15);
    assert.equal(next.capBps, 300 * MiB);
  });

  test('nothing is learnt while the job is paused or throttled for a busy guest, nor from the first sample after', () => {
    const mem: HeadroomMemory = { capBps: 150 * MiB, load: 0.8, prev: { offset: 0, offsetAt: 0, full: true } };
    const paused = headroomStep(mem, { time: 250, load: 0.1, offset: 0, offsetAt: 250, full: false }, 0.15);
    assert.equal(paused.capBps, 150 * MiB);
    const resumed = headroomStep(paused, { time: 500, load: 0.1, offset: 10 * MiB, offsetAt: 500, full: true }, 0.15);
    assert.equal(resumed.capBps, 150 * MiB, 'the span since the pause is not one of full speed');
  });

  test('never under the minimum, whatever the load', () => {
    const mem: HeadroomMemory = { capBps: 10 * MiB, load: 1, prev: { offset: 0, offsetAt: 0, full: true } };
    const next = headroomStep(mem, { time: 250, load: 3, offset: 2 * MiB, offsetAt: 250, full: true }, 0.15);
    assert.equal(next.capBps, HEADROOM_MIN_BPS);
  });
});

describe('a spell that held the guest (heldStep)', () => {
  test('puts a ceiling at 85% of what the copy was let do (its rate where the cap did not bind), which then rises 1% a step at the idle speed and is gone after 5 s without another spell', () => {
    // the sparse disk's copy: the cap far above the copy's 150 MiB/s, the loop with room
    let mem = simulate(40, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }).mem;
    assert.ok(mem.capBps > 150 * MiB / 0.8, 'the cap does not bind');
    assert.deepEqual(mem.recent, [150 * MiB, 150 * MiB, 150 * MiB, 150 * MiB]);
    mem = heldStep(mem);
    assert.equal(mem.ceilingBps, 150 * MiB * STALL_CUT);
    assert.equal(mem.capBps, 128 * MiB);
    // at the idle speed again (the first sample only starts the measurement) the ceiling
    // rises with each step, and the cap with it
    const after = simulate(15, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }, 0.15, mem);
    assert.ok(Math.abs(after.mem.ceilingBps! - 150 * MiB * STALL_CUT * CEILING_RISE ** 15) < 1);
    assert.ok(after.caps.every((c, i) => c <= 150 * MiB * STALL_CUT * CEILING_RISE ** i + MiB / 2), 'the cap stays under the ceiling');
    assert.ok(after.caps.at(-1)! > mem.capBps, 'and rises with it');
    // 5 s at the idle speed without another spell: the ceiling is gone, the loop's cap is back
    const later = simulate(8, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }, 0.15, after.mem);
    assert.equal(later.mem.ceilingBps, undefined);
    assert.ok(later.mem.capBps > 150 * MiB / 0.8);
  });

  test('a second spell cuts from the most the copy was let do in the second before it (not the step the stall froze); never under the minimum', () => {
    // the step just before the spell: the stall froze the copy with the loop (4 MiB/s)
    let mem: HeadroomMemory = { capBps: 120 * MiB, load: 0.5, prev: null, recent: [110 * MiB, 120 * MiB, 118 * MiB, 4 * MiB], ceilingBps: 125 * MiB };
    mem = heldStep(mem);
    assert.equal(mem.ceilingBps, 120 * MiB * STALL_CUT, 'from the most of the second before, not the frozen step');
    assert.equal(mem.capBps, 102 * MiB);
    for (let i = 0; i < 30; i++) mem = heldStep(mem);
    assert.equal(mem.ceilingBps, HEADROOM_MIN_BPS);
    assert.equal(mem.capBps, HEADROOM_MIN_BPS);
  });

  /** A copy (the simulated one) right after the guest's busy phase paused it for 8 s; sample() adds a 250 ms reading, held() a held spell's end. */
  const afterBusyPhase = () => {
    const copy = {
      mem: simulate(40, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }).mem,
      t: 10_000,
      offset: 1e10,
      sample(full: boolean, bps = 0) {
        copy.t += 250;
        copy.offset += bps / 4;
        copy.mem = headroomStep(copy.mem, { time: copy.t, load: 0.3, offset: copy.offset, offsetAt: copy.t, full }, 0.15);
      },
      held() {
        copy.mem = heldStep(copy.mem);
      },
    };
    for (let i = 0; i < 32; i++) copy.sample(false);
    return copy;
  };

  /** afterBusyPhase(), then the copy back at the idle speed for half a second and a spell: exempt. */
  const afterExemptSpell = () => {
    const copy = afterBusyPhase();
    const capBefore = copy.mem.capBps;
    // back at the idle speed: the first sample starts the measurement, then two steps at the ramp's rates
    copy.sample(true);
    copy.sample(true, 20 * MiB);
    copy.sample(true, 40 * MiB);
    // the spell (the end of the guest's own busy phase) pauses the copy, and ends held
    copy.sample(false);
    copy.held();
    assert.equal(copy.mem.ceilingBps, undefined, 'no ceiling from a copy that had run half a second');
    assert.equal(copy.mem.capBps, capBefore);
    return { copy, capBefore };
  };

  test('a spell within a second of the copy resuming after a busy phase of the guest\'s sets no ceiling; the next spell, after that one, does', () => {
    const { copy } = afterExemptSpell();
    const { sample, held } = copy;
    // the copy runs again, for a single reading (no step), and another spell holds the guest: the copy's this time
    sample(true);
    sample(false);
    held();
    assert.equal(copy.mem.ceilingBps, 150 * MiB * STALL_CUT, 'a spell after a held one is the copy\'s, however short the stretch');
    // spells every half second: the copy back for a single reading (no step) between them; each cuts
    for (let i = 0; i < 3; i++) {
      const before = copy.mem.ceilingBps!;
      sample(true);
      sample(false);
      held();
      assert.ok(copy.mem.ceilingBps! < before, `spell ${i + 2} after a held one cuts the ceiling again (${copy.mem.ceilingBps! / MiB} MiB/s)`);
    }
    // and a spell after a second at the idle speed is the copy's too, whatever paused it before
    let again = simulate(40, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }).mem;
    for (const full of [false, true]) again = headroomStep(again, { time: 20_000 + (full ? 250 : 0), load: 0.3, offset: 0, offsetAt: 20_000 + (full ? 250 : 0), full }, 0.15);
    for (let i = 1; i <= 4; i++) again = headroomStep(again, { time: 20_250 + i * 250, load: 0.3, offset: i * 37.5 * MiB, offsetAt: 20_250 + i * 250, full: true }, 0.15);
    again = heldStep(again);
    assert.equal(again.ceilingBps, 150 * MiB * STALL_CUT);
  });

  test('a short spell whose held decision comes before the copy is seen paused still makes the next spell the copy\'s', () => {
    const copy = afterBusyPhase();
    const { sample, held } = copy;
    sample(true);
    sample(true, 20 * MiB);
    // a spell shorter than a load sample: its held decision arrives while the last sample still saw the copy run
    held();
    assert.equal(copy.mem.ceilingBps, undefined);
    sample(false); // the hold-off after it
    sample(true);
    sample(false);
    held();
    assert.equal(copy.mem.ceilingBps, 150 * MiB * STALL_CUT, 'the spell after a held one is the copy\'s, in either order');
  });

  test('spells back to back, the copy resuming between them for less than a load sample: only the first after a busy phase is exempt', () => {
    // seen in the sparse trickle cells (2026-12-05): after the exempt spell the copy ran 0.1-0.25 s
    // at a time between spells, unseen by any load sample, and three more spells went by uncut
    const { copy, capBefore } = afterExemptSpell();
    const { sample, held } = copy;
    sample(false); // its hold-off; the copy then runs for 100 ms, between two load samples
    held();
    assert.equal(copy.mem.ceilingBps, 150 * MiB * STALL_CUT, 'the second spell is the copy\'s');
    assert.ok(copy.mem.capBps < capBefore);
    const ceiling = copy.mem.ceilingBps!;
    sample(false);
    held();
    assert.ok(copy.mem.ceilingBps! < ceiling, 'and each after it cuts again');
  });

  test('a spell in which the guest submitted no request (heldIdle) sets no ceiling, and still makes the next spell the copy\'s', () => {
    // the sparse disk's copy as in the first test: a cut would put the ceiling at 127.5 MiB/s
    let mem = simulate(40, { perMiB: 0.004, eff: 0.9, maxBps: 150 * MiB }).mem;
    const capBefore = mem.capBps;
    mem = heldStep(mem, true);
    assert.equal(mem.ceilingBps, undefined, 'no ceiling for an idle guest');
    assert.equal(mem.capBps, capBefore);
    assert.equal(mem.resumeAfterHeld, true);
    // and one that did something, right after: cut
    mem = heldStep(mem);
    assert.equal(mem.ceilingBps, 150 * MiB * STALL_CUT);
  });

  test('headroomCap: a decision marked held lowers the cap at once, once', () => {
    const base$ = new Subject<Decision>();
    const load$ = new Subject<{ time: number; load: number }>();
    const progress$ = new BehaviorSubject({ offset: 0, time: 0 });
    const caps: number[] = [];
    load$.pipe(headroomCap(base$, progress$, of(P))).subscribe((m) => caps.push(m.capBps));
    const full: Decision = { mode: 'full', speed: 0, state: 'idle', reason: 'quiet' };
    base$.next(full);
    load$.next({ time: 0, load: 0.2 });
    assert.deepEqual(caps, [HEADROOM_START_BPS]);
    base$.next({ mode: 'paused', speed: 0, state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', held: true });
    assert.deepEqual(caps, [HEADROOM_START_BPS, Math.round((64 * STALL_CUT)) * MiB]);
    base$.next(full);
    assert.equal(caps.length, 2);
    // an idle guest's spell (heldIdle): the cap stays
    base$.next({ mode: 'paused', speed: 0, state: 'holdoff', reason: 'quiet; hold-off 250ms after stall 900ms/s > 800ms/s', held: true, heldIdle: true });
    base$.next(full);
    load$.next({ time: 250, load: 0.2 });
    assert.ok(caps.every((c) => c >= Math.round(64 * STALL_CUT) * MiB), `no second cut: ${caps.map((c) => c / MiB).join(', ')}`);
  });
});

describe('withHeadroom', () => {
  const mem: HeadroomMemory = { capBps: 120 * MiB, load: 0.84, prev: null };
  const full: Decision = { mode: 'full', speed: 0, state: 'idle', reason: 'quiet' };

  test('the idle speed becomes the cap; the mode stays full', () => {
    assert.deepEqual(withHeadroom(full, mem, P), { ...full, speed: 120 * MiB, headroom: { capBps: 120 * MiB, load: 0.84 } });
  });

  test('a cap that is the ceiling after a held spell says so', () => {
    assert.deepEqual(withHeadroom(full, { ...mem, ceilingBps: 120.2 * MiB }, P).headroom, { capBps: 120 * MiB, load: 0.84, ceiling: true });
    assert.equal(withHeadroom(full, { ...mem, ceilingBps: 150 * MiB }, P).headroom?.ceiling, undefined, 'a ceiling above the cap is not what holds it');
  });

  test('a pause, and a throttled speed under the cap, are left alone; a faster one is capped', () => {
    const paused: Decision = { mode: 'paused', speed: 0, state: 'busy', reason: 'disk 40/s > 5/s' };
    assert.equal(withHeadroom(paused, mem, P), paused);
    const slow: Decision = { mode: 'throttled', speed: 20 * MiB, state: 'busy', reason: 'r' };
    assert.equal(withHeadroom(slow, mem, P), slow);
    const fast: Decision = { mode: 'throttled', speed: 500 * MiB, state: 'idle', reason: 'r' };
    assert.equal(withHeadroom(fast, mem, P).speed, 120 * MiB);
  });

  test('headroom: off leaves every decision as it was', () => {
    const off = { ...P, speed: { ...P.speed, headroom: null } };
    assert.equal(withHeadroom(full, mem, off), full);
  });
});
