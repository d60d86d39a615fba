/**
 * Acceptance of issue 4 against real QEMU guests under TCG, with the real bpftrace and the
 * real `idlecrypt encrypt` command. Run: `bash scripts/test.sh moderation.test` (about 3.5 min).
 *
 * 1. Moderation beside a reference. Three guests run at once:
 *    mod  bursty workload (8 s idle / 8 s busy), 8 GiB pattern-filled raw disk, encrypted by
 *         `idlecrypt encrypt` as shipped: the default policy (no --policy, no --speed) and
 *         the default encrypter (qemu-storage-daemon, since 2026-12-05);
 *    ref  the same guest and workload with no job: the reference for busy-phase throughput;
 *    cmp  an idle guest with a 3 GiB disk of the same recipe, copied by `idlecrypt encrypt
 *         --no-moderation`: the unthrottled mirror the idle-phase speed is compared with.
 *
 *    The unthrottled mirror is measured in the same run, under the same conditions as the
 *    moderated job's idle phases and without competing with it: the harness holds the cmp
 *    job paused (job-pause on cmp's own QMP socket) except during the idle phase in which
 *    keys are typed into mod, when mod's job is held paused by the keys and both bursty
 *    guests are idle. That phase lies between the moderated job's full-speed idle phases,
 *    so drift on this shared, noisy machine hits both measurements alike. (Running both
 *    copies at once would halve each; measuring the unthrottled copy before or after the
 *    run would compare different minutes of a machine whose copy speed wanders 250-450 MiB/s.)
 *
 *    All three disks are opened with cache=none (O_DIRECT), as production hosts commonly run
 *    them (Proxmox's and OpenStack's default), and idlecrypt opens the target the same way.
 *    With the host's page cache (QEMU's default, writeback) the copy put 14 GiB of the source
 *    and target into it; on this 24 GiB host the kernel then reclaimed memory during the
 *    measured phases, stalled the guests for up to 1.4 s, and the test failed three full
 *    suites in four. With O_DIRECT the page cache stays under 0.4 GiB throughout.
 *
 *    Why 8 GiB pattern-filled raw: the copy must be running at two busy-phase starts at
 *    least, and should span several busy phases: one busy phase's throughput differs
 *    between two identical guests side by side by up to ±15% on this shared machine, so the
 *    median needs several. Through the daemon an idle window copies 2.2-2.8 GiB here
 *    (312-442 MiB/s after the hold-off, cache=none, 2026-12-05): 8 GiB spans three or four
 *    whole busy phases, the keyboard's idle phase included, three of them begun with the job
 *    running.
 *    (With the guest's QEMU encrypting, 150-200 MiB/s, a 4 GiB disk did as much; that run,
 *    `--encrypter qemu`, fell short in about one fresh-clone run in three, and in all three
 *    attempts of the CI run of 2026-12-05: reactions of 257-366 ms from the first request,
 *    91.1% kept. Its in-qemu figures are bench/matrix.ts's `--encrypter qemu`.) A sparse raw
 *    source is no shortcut (QEMU writes encrypted zeros into LUKS at about the speed of real
 *    data: 307 vs 318 MiB/s measured), and pattern data is what a real disk holds, and
 *    shows any plaintext leaking into the target.
 *
 *    Timeline (mod's phases). The command starts 2 s into the first idle phase; the copy
 *    starts 8-10 s later (in the first busy phase), once bpftrace is attached, the LUKS
 *    header written and the daemon serving it:
 *      first idle phase after the copy starts   full speed after the hold-off: measured
 *      busy phases                              the job must slow within 0.5 s of the start (75th percentile; 1 s in every phase),
 *                                               and 250 ms of the guest's first request
 *      second idle phase                        keys typed from +2 s to +7.9 s: the job must
 *                                               pause and stay paused; cmp runs unthrottled
 *      later idle phases                        full speed: measured, until the copy is done
 *                                               and the guest pivots onto the LUKS image
 *
 *    Measured from the host: phases by the arrival of the guest's PHASE lines, guest
 *    throughput by query-blockstats (the guest's own requests, not the mirror's), the job by
 *    query-block-jobs, both polled every 100 ms on the harness's own QMP socket, and the
 *    moment a job really stopped by QEMU's JOB_STATUS_CHANGE events.
 *
 * 2. The deadline: a guest that never goes idle (workload `disk`) under a policy with
 *    `guarantee.deadline: 30s` on a 256 MiB disk is encrypted within 30 s of the copy's
 *    start, and the image decrypts to exactly the source.
 *
 * IDLECRYPT_TEST_DUMP=FILE writes everything test 1 measured as JSON (FILE.1, FILE.2, ... per attempt),
 * and test 2's polls, CLI output and metrics file (FILE.never.json, FILE.never.lp), for a closer look.
 */
import { execFileSync } from 'node:child_process';
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ensureImage, makeDiskImage } from '../../vm-images/launch.ts';
import { compareWithEncrypted, fileContains, writeKey } from '../helpers/images.ts';
import {
  EncryptRun,
  GuestLab,
  GuestRecorder,
  MiB,
  firstCaughtUp,
  firstRequestAt,
  guestBytes,
  jobBefore,
  jobOffset,
  measurable,
  median,
  mibps,
  now,
  otherQemus,
  parseActivity,
  percentile,
  rateOver,
  reactionAt,
  sleepUntil,
  startSideBySide,
  typeKeys,
  untilNoShortfall,
  type Phase,
} from '../helpers/moderation-lab.ts';

const KEY = 'moderation acceptance key';
/**
 * Harness polls of each guest's QMP. Not faster: every poll is a command QEMU's main loop
 * must answer, the same loop the copy and idlecrypt's own commands run in. State changes
 * of the jobs come from QEMU's JOB_STATUS_CHANGE events, which cost nothing.
 */
const POLL_MS = 100;
/** Full speed returns window + hold-off (1.25 s) after the last busy request: measure from +1.5 s. */
const AFTER_HOLDOFF_MS = 1500;

let dir: string;
let keyFile: string;
const lab = new GuestLab();

before(async () => {
  ensureImage();
  dir = await mkdtemp(path.join(tmpdir(), 'ic-mod-'));
  keyFile = path.join(dir, 'key');
  await writeKey(keyFile, KEY);
});

after(async () => {
  await lab.stopAll();
  await rm(dir, { recursive: true, force: true });
});

const s = (ms: number) => (ms / 1000).toFixed(2);
/** Consecutive repeats folded: ['a', 'a', 'b'] → ['a ×2', 'b']. */
const runsOf = (xs: readonly string[]): string[] =>
  xs.reduce<{ v: string; n: number }[]>((acc, v) => (acc.at(-1)?.v === v ? (acc.at(-1)!.n++, acc) : [...acc, { v, n: 1 }]), []).map(({ v, n }) => (n > 1 ? `${v} ×${n}` : v));
const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

/**
 * Performance criteria are decided by this shared 2-core host as much as by idlecrypt:
 * one busy phase of two identical guests side by side differs by up to ±15%, and a
 * full-suite run once measured 89.9% (one busy phase at 54%) where runs alone measured
 * 100.4-102.9%. So the side-by-side run may be repeated once, on fresh guests, when only
 * these figures fall short (they are returned, not asserted): the two throughput ratios,
 * 0.5 s from each busy phase's start and 250 ms from its first request. Everything else
 * (the job slowing at all, the keyboard pause, convergence, the decrypted image) is
 * asserted in every attempt. Every attempt's figures are printed. bench/moderation.ts and
 * bench/matrix.ts measure the same in repeated rounds and quote medians.
 * Through the daemon, six runs alone and two fresh-clone suites (2026-12-05; two runs with a
 * 10 GiB disk): 96.2-101.9% kept at the first attempt in all but one run (90.9%, every busy
 * phase at 89-95%: both guests short of CPU, docs/starvation.md; its repeat kept 104.9%),
 * reactions within 144 ms of the phase start and of the first request, idle phases at
 * 74-109% of the unthrottled mirror (the first one lowest, medians 88-108%). With the guest's QEMU
 * encrypting (before), the margins were a few points and a few tens of ms, and three
 * attempts were allowed: the idle copy sat at 85-90% of the mirror (the main loop's
 * headroom), and one reaction in three to ten ran late by host noise.
 */
const ATTEMPTS = 2;
/** mod's and cmp's disks (see the file comment) */
const MOD_MIB = 8192;
const CMP_MIB = 3072;

/** One side-by-side run (see the file comment); returns the throughput shortfalls. */
async function sideBySide(t: TestContext, base: string, attempt: number): Promise<string[]> {
  const bursty = { idle: 8, busy: 8 };
  // The images outlive an attempt (the attempt's directory does not): a repeat starts on
  // the same pattern at once instead of writing 11 GiB again (38 s). Each guest's busy
  // loop rewrites the blocks it reads (vm-images/guest/workloads.sh, disk_loop), and cmp's
  // guest is idle, so the content stays the pattern; each attempt compares its target
  // against its source as that attempt left it anyway.
  const images = { mod: path.join(dir, 'side-by-side-mod.raw'), ref: path.join(dir, 'side-by-side-ref.raw'), cmp: path.join(dir, 'side-by-side-cmp.raw') };
  // Same recipe (pattern-filled raw), sizes to need: ref's loop touches only its first
  // 64 MiB; cmp copies for at most ~5.2 s (2.1 GiB at the fastest seen here, 417 MiB/s;
  // a cmp that catches up is measured until then).
  if (attempt === 1) {
    const t0 = now();
    await Promise.all([
      makeDiskImage(images.mod, { sizeMiB: MOD_MIB, format: 'raw', fill: 'pattern' }),
      makeDiskImage(images.cmp, { sizeMiB: CMP_MIB, format: 'raw', fill: 'pattern' }),
      makeDiskImage(images.ref, { sizeMiB: 256, format: 'raw', fill: 'pattern' }),
    ]);
    t.diagnostic(`the three disks written in ${s(now() - t0)} s`);
  }
  // 11 GiB just written (by the first attempt): flush it now, or the kernel writes it back
  // during the measured phases and throttles whichever guest dirties pages at that moment.
  // Then drop the page cache, which earlier test files and these images filled: reclaiming
  // it during a busy phase stalled QEMU's main loop, and the guest's first request reached
  // QEMU 0.6-1.4 s after the guest began (7-60 ms otherwise). The guests run with
  // cache=none (O_DIRECT) and the targets inherit it, so the run itself adds next to
  // nothing to the page cache.
  execFileSync('sync');
  await writeFile('/proc/sys/vm/drop_caches', '1').catch(() => t.diagnostic('could not drop the page cache (not root?)'));
  // The unthrottled comparison job is started at once and held paused until its window;
  // the moderated run 2 s into mod's first idle phase.
  const { mod, ref, cmp, others, cmpRun, cmpJob, idle0, run, target, done, jobStart } = await startSideBySide(lab, base, {
    mod: { name: 'mod', disk: images.mod, cache: 'none', workload: 'bursty', params: bursty },
    ref: { name: 'ref', disk: images.ref, cache: 'none', workload: 'bursty', params: bursty },
    cmp: { name: 'cmp', disk: images.cmp, cache: 'none', workload: 'idle' },
    keyFile,
    pollMs: POLL_MS,
    runTimeoutMs: 200_000,
  });

  // idle#1 of the job: nothing to do but measure. idle#2: the keys and the cmp window.
  const idleA = await mod.rec.nextPhase('idle', jobStart);
  const idleK = await mod.rec.nextPhase('idle', idleA + 1000);
  const stillCopying = jobBefore(mod.rec.samples, idleK);
  assert.ok(stillCopying && !stillCopying.ready, 'the copy ended before the keyboard phase: the disk is too small for this machine, or the job ran while it should not');
  const keysFrom = idleK + 2000;
  const keysTo = idleK + 7900;
  let cmpResumeSent = 0;
  let cmpPauseSent = 0;
  const [keys] = await Promise.all([
    typeKeys(mod.rec.client, keysFrom, keysTo),
    (async () => {
      // Resume cmp once the moderated job has stopped for the keys (at most +2.6 s), and
      // pause it in time to be stopped before mod's job may resume (+7.75 s) and before
      // the next busy phase (+8 s): a full-speed mirror answers QMP slowly.
      await sleepUntil(keysFrom);
      while (now() < idleK + 2600 && !mod.rec.jobEvents.some((e) => e.t > keysFrom && e.status === 'paused')) await sleepUntil(now() + 10);
      cmpResumeSent = now();
      await cmp.rec.client.execute('job-resume', { id: cmpJob });
      await sleepUntil(idleK + 7200);
      cmpPauseSent = now();
      await cmp.rec.client.execute('job-pause', { id: cmpJob });
    })(),
  ]);

  const result = await done;
  const finishedAt = now();
  await sleepUntil(finishedAt + 300);
  await lab.stopRecorders();
  cmpRun.cli.child.kill('SIGINT'); // cancels the cmp copy and removes its target
  await cmpRun.result(60_000);
  const othersAfter = await otherQemus(lab.pids());

  assert.equal(result.code, 0, `idlecrypt encrypt failed:\n${result.stderr.slice(-3000)}`);
  assert.equal(cmpRun.completed(), undefined, 'the comparison copy was still going when cancelled');
  const completing = run.phaseAt('completing')!;
  const copying = run.phaseAt('copying')!;
  assert.ok(run.completed(), 'a completed record');

  // ---------------------------------------------------------------- measurements
  const mp = mod.rec.phases();
  const rp = ref.rec.phases();
  const caughtUp = Math.min(firstCaughtUp(mod.rec.samples), completing);
  const lines: string[] = [];
  const note = (l: string) => {
    lines.push(l);
    t.diagnostic(`attempt ${attempt}: ${l}`);
  };
  note(`other qemu-system processes on the host: ${others} at the start, ${othersAfter} at the end`);
  note(`job: started ${s(jobStart - idle0)} s after mod's first idle phase; caught up ${s(caughtUp - jobStart)} s later; completing ${s(completing - copying)} s after copying began; ${(Number(run.completed()!.bytes_copied) / MiB).toFixed(0)} MiB copied`);

  // The unthrottled mirror: offset rate from 0.3 s after it really ran again until the
  // pause was asked for.
  const cmpRunning = cmp.rec.jobEvents.find((e) => e.t >= cmpResumeSent - 50 && e.status === 'running')?.t ?? cmpResumeSent;
  const cmpStopped = cmp.rec.jobEvents.find((e) => e.t >= cmpPauseSent && e.status === 'paused')?.t;
  const cmpRate = rateOver(cmp.rec.samples, cmpRunning + 300, Math.min(cmpPauseSent, firstCaughtUp(cmp.rec.samples)), jobOffset);
  assert.ok(cmpRate !== undefined && cmpRate > 50 * MiB, `the comparison mirror ran: ${mibps(cmpRate)} MiB/s`);
  note(`unthrottled mirror (cmp, --no-moderation) in mod's keyboard phase: ${mibps(cmpRate)} MiB/s over ${s(cmpPauseSent - cmpRunning - 300)} s; it ran from +${s(cmpRunning - idleK)} s to +${cmpStopped ? s(cmpStopped - idleK) : '?'} s of that phase`);

  // Keys: the job pauses and stays paused.
  // From the first key QEMU took (the harness may run late on a loaded host).
  const firstKey = keys[0]!;
  const lastKey = keys.at(-1)!;
  const keyReaction = reactionAt(mod.rec.samples, mod.rec.jobEvents, firstKey);
  const keyRate = rateOver(mod.rec.samples, firstKey + 500, lastKey, jobOffset)!;
  const gaps = keys.slice(1).map((k, i) => k - keys[i]!);
  note(`keys: ${keys.length} keystrokes (${keys.length * 2} events) from +${s(firstKey - idleK)} s to +${s(lastKey - idleK)} s of the idle phase, ${median(gaps).toFixed(0)} ms apart (longest gap ${Math.max(...gaps).toFixed(0)} ms); job before: ${keyReaction.before}, paused ${keyReaction.ms?.toFixed(0)} ms after the first key; job ${mibps(keyRate)} MiB/s = ${pct(keyRate / cmpRate)} of unthrottled while typing (from 0.5 s after the first key)`);

  // Idle phases after the hold-off, while there was something to copy.
  const idleWindows = mp
    .filter((p) => p.kind === 'idle' && p.start > jobStart && p.start !== idleK && p.start + AFTER_HOLDOFF_MS < caughtUp)
    .map((p) => ({ p, from: p.start + AFTER_HOLDOFF_MS, to: Math.min(p.end, caughtUp) }))
    .filter((w) => w.to - w.from >= 1500);
  const idleRates = idleWindows.map((w) => rateOver(mod.rec.samples, w.from, w.to, jobOffset));
  idleWindows.forEach((w, i) => note(`idle phase ${w.p.n}: job ${mibps(idleRates[i])} MiB/s = ${pct(idleRates[i]! / cmpRate)} of unthrottled over ${s(w.to - w.from)} s (from +${s(AFTER_HOLDOFF_MS)} s)`));

  // Busy phases while the job existed and the guest still ran on its source.
  const busy = mp.filter((p) => p.kind === 'busy' && p.start >= jobStart && p.end <= completing);
  const pair = (p: Phase) => rp.filter((q) => q.kind === 'busy').sort((a, b) => Math.abs(a.start - p.start) - Math.abs(b.start - p.start))[0]!;
  const tput = (rec: GuestRecorder, p: Phase, skipMs: number) => rateOver(rec.samples, p.start + skipMs, p.end, guestBytes)!;
  const modFull = busy.map((p) => tput(mod.rec, p, 0));
  const refFull = busy.map((p) => tput(ref.rec, pair(p), 0));
  const modLate = busy.map((p) => tput(mod.rec, p, 500));
  const refLate = busy.map((p) => tput(ref.rec, pair(p), 500));
  busy.forEach((p, i) => note(`busy phase ${p.n}: mod ${mibps(modFull[i])} MiB/s, ref ${mibps(refFull[i])} MiB/s (${pct(modFull[i]! / refFull[i]!)}); without the first 0.5 s: ${pct(modLate[i]! / refLate[i]!)}; ref's phase starts ${s(pair(p).start - p.start)} s after mod's`));
  const kept = median(modFull) / median(refFull);
  const paired = median(modFull.map((m, i) => m / refFull[i]!));
  note(`busy-phase throughput kept: ${pct(kept)} (ratio of the medians over ${busy.length} whole phases; median of the per-phase ratios ${pct(paired)}); without each phase's first 0.5 s: ${pct(median(modLate) / median(refLate))}`);

  // Reactions to every busy phase the job saw.
  // Also from the guest's first request of the phase (issue 4: "within 250 ms of the guest's
  // first busy request"): the start of the probe interval that holds it, from the samples
  // idlecrypt wrote to its metrics file, on bpftrace's clock: an upper bound.
  const activity = parseActivity(await readFile(path.join(base, 'mod.lp'), 'utf8'));
  // A phase that begins less than 1 s (the hard bound) before the copy caught up is not
  // judged: the job finishes (READY: only the guest's new writes are left, and idlecrypt
  // waits for a quiet guest to pivot) instead of slowing (seen in CI, 2026-12-01).
  const reactions = mp
    .filter((p) => p.kind === 'busy' && p.start > jobStart && p.start < caughtUp - 1000)
    .map((p) => {
      const first = firstRequestAt(activity, p.start);
      // The harness may read the PHASE line after the guest's first requests (its own event
      // loop polls three guests): a job paused in between was not "slowed at the start".
      const t0 = first !== undefined && first < p.start ? first : p.start;
      const r = reactionAt(mod.rec.samples, mod.rec.jobEvents, t0);
      return { p, r, fromRequest: first === undefined || r.ms === undefined ? undefined : t0 + r.ms - first, firstAfterLine: first === undefined ? undefined : first - p.start };
    });
  for (const { p, r, fromRequest, firstAfterLine } of reactions) {
    note(`busy phase ${p.n} reaction: job ${r.before} at the phase start; slowed after ${r.ms?.toFixed(0)} ms (paused event ${r.eventMs?.toFixed(0)} ms, first poll showing it ${r.pollMs?.toFixed(0)} ms); ${fromRequest?.toFixed(0)} ms after the start of the probe interval with the first request (${firstAfterLine?.toFixed(0)} ms from the PHASE line)`);
  }
  if (process.env.IDLECRYPT_TEST_DUMP) {
    // Everything measured, for a closer look: IDLECRYPT_TEST_DUMP=/some/file.json
    await writeFile(`${process.env.IDLECRYPT_TEST_DUMP}.${attempt}`, JSON.stringify({
      notes: lines, idle0, jobStart, idleK, keysFrom, keysTo, cmpResumeSent, cmpPauseSent, cmpRunning, completing, copying,
      mod: { lines: mod.rec.lines, samples: mod.rec.samples, events: mod.rec.jobEvents }, ref: { lines: ref.rec.lines, samples: ref.rec.samples }, cmp: { samples: cmp.rec.samples, events: cmp.rec.jobEvents },
      cli: { stdout: run.cli.stdout(), stderr: run.cli.stderr() }, cmpCli: { stdout: cmpRun.cli.stdout(), stderr: cmpRun.cli.stderr() },
    }));
  }

  // ---------------------------------------------------------------- assertions
  assert.ok(busy.length >= 2, `the copy spanned ${busy.length} whole busy phases; at least 2 needed`);
  assert.ok(idleWindows.length >= 1, 'at least one idle phase at full speed was measured');
  idleWindows.forEach((w, i) => assert.ok(idleRates[i] !== undefined, `idle phase ${w.p.n}: the polls cover its window`));
  const idleMedian = median(idleRates.filter((r) => r !== undefined));
  const shortfalls: string[] = [];
  if (!(kept >= 0.93)) shortfalls.push(`the moderated guest kept ${pct(kept)} of the reference's busy-phase throughput (need >= 93%)`);
  if (!(idleMedian >= 0.8 * cmpRate)) shortfalls.push(`idle-phase job speed ${mibps(idleMedian)} MiB/s is ${pct(idleMedian / cmpRate)} of the unthrottled ${mibps(cmpRate)} MiB/s (need >= 80%)`);
  // A latency like the busy-phase reactions below: host noise can delay one run (1073 ms
  // once in CI on 2026-12-01, with every other figure in bounds), so a miss is a shortfall
  // that another attempt may meet, not an error; a job that never paused fails every attempt.
  if (!(keyReaction.ms !== undefined && keyReaction.ms <= 500)) shortfalls.push(`the job paused ${keyReaction.ms?.toFixed(0) ?? 'never'} ms after the first key (need <= 500 ms)`);
  assert.ok(keyRate < 0.1 * cmpRate, `while keys were typed the job ran at ${pct(keyRate / cmpRate)} of unthrottled (need < 10%)`);
  const running = reactions.filter((x) => measurable(x.r));
  assert.ok(running.length >= 2, `the job was running at ${running.length} busy-phase starts; at least 2 needed`);
  // Reaction times are latencies: judged at the 75th percentile of the run's busy phases
  // (nearest rank), with a hard bound of 1 s on every phase. Over the three or four busy
  // phases begun with the job running, the 75th percentile is the second slowest or the
  // slowest: with the guest's QEMU encrypting, on the 2026-12-01 hosts one phase in three
  // to ten reacted 500-924 ms late by host noise (three TCG guests and the command on two
  // cores), and on 2026-12-05 one in four 257-366 ms from its first request. Through the
  // daemon every phase measured so far reacted within 125 ms. A moderation that does not
  // react fails the hard bound or the percentile all the same.
  const fromPhase: number[] = [];
  const fromFirst: number[] = [];
  for (const { p, r, fromRequest } of reactions) {
    assert.ok(r.ms !== undefined, `busy phase ${p.n}: the job slowed`);
    // From the PHASE line: the guest announces the phase, then works; on a starved host it
    // was once 604 ms late to its own first request, so this figure is host timing too.
    fromPhase.push(r.ms);
    if (!(r.ms <= 1000)) shortfalls.push(`busy phase ${p.n}: the job slowed ${r.ms.toFixed(0)} ms after the phase began (need <= 1000 ms in every phase)`);
    if (!measurable(r)) continue;
    assert.ok(fromRequest !== undefined, `busy phase ${p.n}: the probes recorded its first request`);
    fromFirst.push(fromRequest);
  }
  const p75Phase = percentile(fromPhase, 75);
  const p75First = percentile(fromFirst, 75);
  note(`reactions: ${percentile(fromPhase, 50).toFixed(0)} ms (median), ${p75Phase.toFixed(0)} ms (75th percentile), ${Math.max(...fromPhase).toFixed(0)} ms (slowest) from the phase start; ${fromFirst.length ? `${percentile(fromFirst, 50).toFixed(0)}, ${p75First.toFixed(0)} and ${Math.max(...fromFirst).toFixed(0)} ms from the guest's first request` : 'none measurable from the first request'}`);
  if (!(p75Phase <= 500)) shortfalls.push(`the job slowed ${p75Phase.toFixed(0)} ms after the phase began at the 75th percentile of ${fromPhase.length} busy phases (need <= 500 ms)`);
  if (fromFirst.length && !(p75First <= 250)) shortfalls.push(`the job slowed ${p75First.toFixed(0)} ms after the probe interval with the guest's first request at the 75th percentile of ${fromFirst.length} busy phases (need <= 250 ms)`);

  // The guest runs on the encrypted image, which decrypts to exactly the source.
  // Both read the whole target (qemu-img decrypting, 8 GiB in ~42 s here): at once.
  await mod.vm.stop();
  const compareFrom = now();
  const [cmpImg, plaintext] = await Promise.all([compareWithEncrypted(images.mod, target, 'luks', keyFile), fileContains(target, 'IDLECRYPT-DATA')]);
  t.diagnostic(`attempt ${attempt}: the target compared with the source and searched for plaintext in ${s(now() - compareFrom)} s`);
  assert.ok(cmpImg.same, cmpImg.output);
  assert.equal(plaintext, false, 'no plaintext in the target');
  // CI shows only the failure's message: it carries the figures of the attempt.
  return shortfalls.length === 0 ? [] : [...shortfalls, `its figures: ${lines.join('; ')}`];
}

describe('moderation of a real guest (issue 4 acceptance)', () => {
  test('beside the same guest with no job: the guest keeps >= 93% of its busy throughput, the job uses >= 80% of an unthrottled mirror in idle phases, < 10% while keys are typed, and slows within 0.5 s of the start of its busy phases at the 75th percentile (250 ms of their first request), and within 1 s in every one', async (t) => {
    await untilNoShortfall(t, { dir, name: 'side-by-side', attempts: ATTEMPTS, lab }, (base, attempt) => sideBySide(t, base, attempt));
  });
  test('a guest that never goes idle is still fully encrypted within the policy deadline (30 s for 256 MiB), and the image decrypts to the source', async (t) => {
    t.after(lab.stopAll);
    const src = path.join(dir, 'never.raw');
    const target = path.join(dir, 'never.luks');
    const policy = path.join(dir, 'deadline.yaml');
    await makeDiskImage(src, { sizeMiB: 256, format: 'raw', fill: 'pattern' });
    // Everything else as shipped: paused while busy, unlimited while idle, margin 1.25.
    await writeFile(policy, 'guarantee:\n  deadline: 30s\n');
    const { vm, rec } = await lab.boot(dir, { name: 'never', disk: src, workload: 'disk' });
    await rec.poll({ intervalMs: 250, stats: true, jobs: true });
    const run = new EncryptRun(['--qmp', vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile, '--iter-time', '50', '--policy', policy], path.join(dir, 'never.lp'));
    const result = await run.result(120_000);
    await sleepUntil(now() + 600); // polls past the pivot, so that the guest's rate covers the whole copy
    await rec.stop();
    if (process.env.IDLECRYPT_TEST_DUMP) {
      const d = process.env.IDLECRYPT_TEST_DUMP;
      await writeFile(`${d}.never.json`, JSON.stringify({ samples: rec.samples, cli: { stdout: run.cli.stdout(), stderr: run.cli.stderr() } }));
      await copyFile(path.join(dir, 'never.lp'), `${d}.never.lp`).catch(() => {});
    }
    assert.equal(result.code, 0, `idlecrypt encrypt failed:\n${result.stderr.slice(-3000)}`);

    const copying = run.phaseAt('copying')!;
    const completing = run.phaseAt('completing')!;
    const done = run.completed()!;
    const doneAt = Date.parse(done.time);
    const progress = run.records().filter((r) => r.event === 'progress');
    const states = new Map<string, number>();
    for (const p of progress) states.set(String(p.state), (states.get(String(p.state)) ?? 0) + 1);
    const raised = progress.filter((p) => /raised to|full speed/.test(String(p.reason)));
    const speeds = [...new Set(raised.map((p) => Number(p.speed_limit_bps)))].map((b) => (b === 0 ? 'full' : (b / MiB).toFixed(0)));
    const guest = rateOver(rec.samples, copying, completing, guestBytes);
    t.diagnostic(`never-idle guest: copy began ${s(copying - run.startedAt)} s after the command, completing after ${s(completing - copying)} s, completed after ${s(doneAt - copying)} s (deadline 30 s); ${(Number(done.bytes_copied) / MiB).toFixed(0)} MiB copied for a 256 MiB disk`);
    t.diagnostic(`states in progress records: ${[...states].map(([k, v]) => `${k} ${v}`).join(', ')}; speeds the deadline asked for (MiB/s): ${speeds.join(' ')}; guest disk ${mibps(guest)} MiB/s meanwhile`);
    // The loop never stops, but on a loaded host the guest itself may stall for a second
    // (no request for window + hold-off), which counts as idle: allow a little of it.
    const counted = (states.get('busy') ?? 0) + (states.get('holdoff') ?? 0) + (states.get('idle') ?? 0);
    // CI shows only the failure's message: it carries the records' states and reasons in order.
    // Figures are folded (disk 68/s → disk #/s) so that a long busy stretch is one entry.
    const trace = runsOf(progress.map((p) => `${String(p.state)} (${String(p.reason).replace(/\d+(\.\d+)?/g, '#')})`)).join(' → ');
    // And the guest's side: an ERROR line if its loop stopped (workloads.sh prints it and
    // idles), and the longest gap between its IO lines (about one a second while it runs).
    const fromGuest = rec.lines.filter((l) => /^ERROR/.test(l.line)).map((l) => `${l.line} at ${s(l.t - copying)} s of the copy`);
    const ioAt = rec.lines.filter((l) => /^IO /.test(l.line) && l.t >= copying - 1000 && l.t <= doneAt + 1000).map((l) => l.t);
    const ioGap = ioAt.slice(1).reduce((m, t, i) => Math.max(m, t - ioAt[i]!), 0);
    fromGuest.push(`${ioAt.length} IO lines from 1 s before the copy to 1 s after it, the longest gap ${s(ioGap)} s`);
    assert.ok((states.get('idle') ?? 0) <= 0.1 * counted, `the guest was busy nearly throughout: ${[...states].map(([k, v]) => `${k} ${v}`).join(', ')}; records: ${trace}; the guest: ${fromGuest.join('; ')}`);
    assert.ok(raised.length > 0, 'the deadline raised the speed');
    assert.ok(doneAt - copying <= 30_000, `completed ${s(doneAt - copying)} s after the copy began (deadline 30 s)`);

    await vm.stop();
    const cmp = await compareWithEncrypted(src, target, 'luks', keyFile);
    assert.ok(cmp.same, cmp.output);
  });
});

