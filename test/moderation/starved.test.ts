/**
 * Issue 9 in the suite: the two cells of its matrix where a full-speed copy froze the guest
 * before (docs/starvation.md): a 64 GiB sparse raw disk, a guest doing one-at-a-time 64 KiB
 * O_DIRECT reads and writes in 8 s idle / 8 s busy phases, with the host's page cache
 * (writeback) and with cache=none. Run: `bash scripts/test.sh starved` (about 5 min).
 *
 * Three guests at once (test/helpers/matrix-cell.ts, which bench/matrix.ts runs for every cell):
 *   mod  encrypted by `idlecrypt encrypt` with the shipped default policy;
 *   ref  the same guest and workload with no job: the reference for busy-phase throughput;
 *   cmp  an idle guest on the same kind of disk, copied by `--no-moderation`: the unthrottled
 *        mirror the idle-phase speed is compared with, held paused by the harness except in
 *        one idle phase of mod's, during which keys typed into mod hold mod's job paused
 *        instead, so the two copies never compete.
 * A 64 GiB copy takes minutes; the run measures three busy phases of the copy and then
 * cancels it (Ctrl-C), which must leave mod on its source disk with no target left.
 *
 * Issue 9's acceptance asks, in every cell: the guest keeps >= 93% of its busy-phase
 * throughput (ratio of the medians, mod against ref over the same phases), the copy slows
 * within 0.5 s of every busy phase that begins while it runs, and its idle-phase speed
 * (after the hold-off) is >= 80% of the unthrottled mirror's. Every figure is printed.
 *
 * Since 2026-12-05 the copy goes through the storage daemon (idlecrypt's default for a LUKS
 * target: the guest's QEMU no longer encrypts in the main loop that serves the guest), and
 * this test asserts >= 85% kept, every reaction within 0.5 s, and an idle speed >= 60% of
 * the unthrottled mirror's (also through the daemon, O_DIRECT: with writeback too neither
 * copy fills the page cache). Measured so: in the first fresh-clone run, 105.1% and 99.8%
 * kept, reactions 20-165 ms, idle 128% and 88-113%, issue 9's bounds met in both cells at
 * the first attempt; in three matrix rounds of these two cells, 101-140% kept.
 *
 * Before, with the guest's QEMU encrypting, this test asserted only what the copy did to
 * these guests before issue 9 could never pass (18% kept, a copy that never slowed): >= 70%
 * kept, reactions within 1 s, idle >= 45% (40% with writeback, whose two copies then
 * competed for the host's page cache). Its figures then: kept 74.6-105%, idle 47-126%, one
 * reaction of 764 ms (CI and local runs, 2026-11-30 to 12-02; docs/starvation.md).
 * bench/matrix.ts measures the issue's bounds in repeated rounds. The run may be repeated
 * once when only these figures fall short (see moderation.test.ts).
 */
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ensureImage } from '../../vm-images/launch.ts';
import { writeKey } from '../helpers/images.ts';
import { loggedBufSize } from '../helpers/cli.ts';
import { GuestLab, MiB, measurable, mibps, untilNoShortfall } from '../helpers/moderation-lab.ts';
import { issue9Bounds, measureCell } from '../helpers/matrix-cell.ts';

const ATTEMPTS = 2;
/** What this test asserts (see the file comment); issue 9's own bounds are printed. */
const KEPT_MIN = 0.85;
const IDLE_MIN = { none: 0.6, writeback: 0.6 } as const;
const REACTION_MAX_MS = 500;

let dir: string;
let keyFile: string;
const lab = new GuestLab();

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'ic-starved-'));
  keyFile = path.join(dir, 'key');
  await writeKey(keyFile, 'starved guest key');
});

after(async () => {
  await lab.stopAll();
  await rm(dir, { recursive: true, force: true });
});

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

async function sideBySide(t: TestContext, base: string, cache: 'writeback' | 'none', attempt: number): Promise<string[]> {
  const f = await measureCell(lab, base, { disk: 'sparse-raw', cache, workload: 'oneatatime', keyFile, note: (l) => t.diagnostic(`${cache}, attempt ${attempt}: ${l}`) });

  // Cancelled: exit 130, the target removed, the guest still on its source.
  assert.equal(f.code, 130, `idlecrypt encrypt should have been cancelled:\n${f.stderr.slice(-3000)}`);
  assert.ok(f.targetGone, 'the cancelled run removed its target');
  assert.ok(f.guestOnSource, 'the guest still runs on its source');
  assert.equal(loggedBufSize(f.stderr), 2 * MiB, 'a mostly unallocated source copied into raw LUKS has the 2 MiB buffer');
  assert.ok(f.cmpBps !== undefined && f.cmpBps > 30 * MiB, `the comparison mirror ran: ${mibps(f.cmpBps)} MiB/s`);
  assert.ok(f.busy.length >= 3, `the copy spanned ${f.busy.length} whole busy phases; 3 expected`);
  assert.ok(f.idle.length === 2 && f.idle.every((x) => x.bps !== undefined), 'both measured idle phases were long enough, and polled');
  const running = f.reactions.filter((x) => measurable(x.r));
  assert.ok(running.length >= 1, `the job ran at full speed at ${running.length} busy-phase starts; at least 1 needed`);
  const shortfalls: string[] = [];
  if (!(f.kept >= KEPT_MIN)) shortfalls.push(`the guest kept ${pct(f.kept)} of the reference's busy-phase throughput (need >= ${pct(KEPT_MIN)})`);
  if (!(f.idleRel >= IDLE_MIN[cache])) shortfalls.push(`idle-phase job speed ${mibps(f.idleBps)} MiB/s is ${pct(f.idleRel)} of the unthrottled ${mibps(f.cmpBps)} MiB/s (need >= ${pct(IDLE_MIN[cache])})`);
  for (const { n, r } of running) {
    assert.ok(r.ms !== undefined, `busy phase ${n}: the job slowed`);
    if (!(r.ms <= REACTION_MAX_MS)) shortfalls.push(`busy phase ${n}: the job slowed ${r.ms.toFixed(0)} ms after the phase began (need <= ${REACTION_MAX_MS} ms)`);
  }
  t.diagnostic(`${cache}, attempt ${attempt}: issue 9's bounds (93% kept, 80% of unthrottled, 0.5 s): ${issue9Bounds(f).all ? 'met' : 'not all met'}`);
  // CI shows only the failure's message: it carries the figures of the attempt.
  return shortfalls.length === 0 ? [] : [...shortfalls, `its figures: ${f.lines.join('; ')}`];
}

describe('moderation sees a guest that a full-speed copy would freeze (issue 9)', () => {
  for (const cache of ['writeback', 'none'] as const) {
    test(`64 GiB sparse raw, cache=${cache}, one-at-a-time 64 KiB I/O: the copy no longer freezes the guest (>= ${pct(KEPT_MIN)} of its busy throughput kept, the copy slowed within ${REACTION_MAX_MS} ms of every busy phase, >= ${pct(IDLE_MIN[cache])} of an unthrottled mirror's speed while the guest is idle), and a cancelled copy leaves it on its source`, async (t) => {
      await untilNoShortfall(t, { dir, name: cache, attempts: ATTEMPTS, lab }, (base, attempt) => sideBySide(t, base, cache, attempt));
    });
  }
});
