/**
 * Moderation of one encryption run: the wiring of probes → streams → controller onto the
 * run's mirror job.
 *
 *   activity$ (src/streams, eBPF or QMP) ─ this VM's samples ─┐
 *   mainLoop$ (src/probes/mainloop.ts; the disk's iothread if any) ─ mainLoopLoad ─┤
 *   watchPolicy (src/policy, hot-reloaded) ───────────────────┼─ moderate (src/controller) ─ JobControl
 *
 * Observation starts before the mirror does (it overlaps LUKS key-slot creation), so that
 * the job never runs unmoderated while bpftrace attaches.
 */
import { realpath } from 'node:fs/promises';
import { firstValueFrom, filter, share, shareReplay, Subject, take, takeUntil, timeout, type Observable, type Subscription } from 'rxjs';
import { IdlecryptError, describeError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { JobControl, JobSnapshot } from '../jobs/types.ts';
import { ProcfsDiscovery } from '../discovery/procfs.ts';
import type { VmDiscovery, VmInfo } from '../discovery/types.ts';
import { activity$, type SourceChoice } from '../streams/activity.ts';
import { mainLoop$, type LoopThread } from '../probes/mainloop.ts';
import { mainLoopLoad } from '../streams/load.ts';
import type { ActivitySample } from '../streams/types.ts';
import { watchPolicy } from '../policy/watch.ts';
import type { EffectivePolicy, Policy } from '../policy/schema.ts';
import { resolvePolicy, signalInUse } from '../policy/resolve.ts';
import { moderate, toActivityRates, type ModerationRun } from '../controller/index.ts';
import type { Decision } from '../controller/types.ts';
import { LearntStore } from './learnt.ts';
import { TargetFlusher, flushingTarget } from './writeback.ts';

export interface ModerationOptions {
  /** The policy file; the shipped default when absent. */
  readonly policyFile?: string;
  /** The policy in force as a stream (the agent's, from its configuration): used instead of policyFile. */
  readonly policy$?: Observable<Policy>;
  /**
   * Shared observation: every VM's samples from one bpftrace for the host (the agent's),
   * and this run's VM in it. Without them the run starts its own observation of its VM.
   */
  readonly shared?: { readonly samples$: Observable<ActivitySample>; readonly vm: VmInfo & { name: string } };
  /** The VM to observe, when the backend knows it (libvirt's domain and its QEMU pid). */
  readonly vm?: VmInfo & { name: string };
  /** The speed that stands in for a pause on a job that cannot pause (libvirt's copies). */
  readonly pausedSpeed?: number;
  /** Wraps the job the controller steers (the agent's host-wide speed ceiling). */
  readonly wrapJob?: (job: JobControl) => JobControl;
  readonly source?: SourceChoice;
  /** bpftrace binary (tests point this elsewhere). */
  readonly bpftrace?: string;
  readonly discovery?: VmDiscovery;
  readonly logger: Logger;
  /** Every sample of this VM, for progress views and metrics. */
  readonly onSample?: (s: ActivitySample) => void;
  /** Probe lifecycle: probes-spawned, probes-attached, probes-restarting, fallback, ... */
  readonly onStatus?: (type: string, reason?: string) => void;
  /** The state directory, where what was learnt of each guest is kept (learnt.ts); default $IDLECRYPT_STATE_DIR or /var/lib/idlecrypt. */
  readonly stateDir?: string;
}

/** How often the main loop's load is read for the headroom (as often as the reconciler reads the job). */
const MAIN_LOOP_SAMPLE_MS = 250;

/** The copy's target, as the moderation needs it: a file on this host, and whether it is opened with O_DIRECT. */
export interface SteeredTarget {
  readonly path: string;
  readonly direct: boolean;
}

export class RunModeration {
  private run?: ModerationRun;
  private last?: Decision;
  /** The controller's newest reading of the job, with when it came (performance.now()). */
  private reading?: { readonly snap: JobSnapshot; readonly at: number };
  private lastSource?: 'ebpf' | 'qmp';
  private effective?: EffectivePolicy;
  /** When steering began (epoch ms): what a deadline such as `4h` counts from. */
  private steeredAt?: number;
  private readonly subs: Subscription[] = [];
  private closed = false;
  private learnt?: LearntStore;
  private flusher?: TargetFlusher;
  /** The completion guarantee has raised the job's speed at some point in this run. */
  guaranteeEngaged = false;

  private constructor(
    readonly vm: VmInfo & { name: string },
    readonly policy$: Observable<Policy>,
    private readonly samples$: Observable<ActivitySample>,
    private readonly stop$: Subject<void>,
    private readonly log: Logger,
    private readonly wrapJob: ((job: JobControl) => JobControl) | undefined,
    private readonly pausedSpeed: number | undefined,
    private readonly stateDir: string | undefined,
  ) {}

  /**
   * Finds the VM behind the QMP socket, loads the policy (a bad policy fails here, before
   * anything is created), and starts observing. `attached` resolves with the first sample.
   */
  static async start(client: QmpClient | undefined, o: ModerationOptions): Promise<{ moderation: RunModeration; attached: Promise<void> }> {
    const log = o.logger.child({ component: 'moderation' });
    const policy$ = (o.policy$ ?? watchPolicy(o.policyFile, { logger: log })).pipe(shareReplay({ bufferSize: 1, refCount: false }));
    const policy = await firstValueFrom(policy$); // throws the policy's own file:line:col error
    const vm = o.shared?.vm ?? o.vm ?? (client ? await findVm(client, o.discovery ?? new ProcfsDiscovery()) : undefined);
    if (!vm) throw new IdlecryptError('PROBE_UNAVAILABLE', 'no VM to observe');
    const stop$ = new Subject<void>();
    const own$: Observable<ActivitySample> = o.shared ? o.shared.samples$ : activity$({
      intervalMs: policy.sampling.interval,
      pids: [vm.pid],
      source: o.source ?? 'auto',
      inflight: signalInUse(policy, 'inflight'),
      logger: log,
      stop$,
      ...(o.bpftrace !== undefined ? { bpftrace: o.bpftrace } : {}),
      onStatus: (s) => {
        const reason = 'reason' in s ? s.reason : undefined;
        log.info({ status: s.type, ...(reason !== undefined ? { reason } : {}) }, `observation: ${s.type}`);
        o.onStatus?.(s.type, reason);
      },
    });
    const samples$ = own$.pipe(
      filter((s) => s.pid === vm.pid),
      takeUntil(stop$),
      share(),
    );
    const m = new RunModeration(vm, policy$, samples$, stop$, log, o.wrapJob, o.pausedSpeed, o.stateDir);
    m.subs.push(policy$.subscribe({ next: (p) => (m.effective = resolvePolicy(p, vm.name)), error: () => undefined }));
    m.subs.push(
      samples$.subscribe({
        next: (s) => {
          m.lastSource = s.source;
          o.onSample?.(s);
        },
        error: (e: unknown) => log.error({ err: describeError(e) }, 'observation failed; the job runs at the idle speed from now on'),
      }),
    );
    // bpftrace compiles and attaches in 1-3 s; QEMU's LUKS key-slot creation overlaps it.
    const attached = firstValueFrom(samples$.pipe(take(1), timeout({ first: 60_000 }))).then(
      () => undefined,
      (e: unknown) => {
        throw new IdlecryptError('PROBE_FAILED', `could not observe VM '${vm.name}' (pid ${vm.pid}): ${describeError(e)}`, { cause: e });
      },
    );
    attached.catch(() => undefined);
    return { moderation: m, attached };
  }

  /**
   * Hands the running job to the controller. `startedAt` (epoch ms): when the copy first
   * started, for a job a dead run left (a deadline counts from the copy's start, not ours).
   */
  steer(job: JobControl, startedAt = Date.now(), target?: SteeredTarget, loop?: LoopThread): void {
    this.steeredAt = startedAt;
    // The headroom reads the thread that serves the disk and runs the copy: the main loop,
    // or the disk's iothread (src/probes/mainloop.ts).
    const tid = loop?.tid ?? this.vm.pid;
    if (loop?.iothread !== undefined) this.log.info({ iothread: loop.iothread, tid }, `the disk is served by iothread '${loop.iothread}' (thread ${tid}): the headroom reads its load there, not the main loop's`);
    // A target in the host's page cache is flushed as the copy goes (policy target.flush).
    if (target && !target.direct) {
      this.flusher = new TargetFlusher(target.path, () => this.effective?.target.flush ?? null, this.log);
      job = flushingTarget(job, this.flusher);
    }
    // What was learnt of this guest (thresholds: auto) by earlier runs, and saved as it learns.
    const learnt = (this.learnt = new LearntStore(this.vm.name, this.log, this.stateDir));
    const initial = learnt.load();
    this.run = moderate({
      learning: { ...(initial ? { initial } : {}), onLearnt: (c) => learnt.offer(c) },
      activity$: this.samples$.pipe(toActivityRates(this.vm.name)),
      policy$: this.policy$,
      job: this.wrapJob ? this.wrapJob(job) : job,
      vmName: this.vm.name,
      logger: this.log,
      startedAt: this.steeredAt,
      ...(this.pausedSpeed !== undefined ? { pausedSpeed: this.pausedSpeed } : {}),
      // The headroom's input: how busy the loop that runs the copy is, read every reconcile tick.
      load$: mainLoop$({ pid: this.vm.pid, tid, intervalMs: MAIN_LOOP_SAMPLE_MS }).pipe(mainLoopLoad(), takeUntil(this.stop$), share()),
    });
    this.subs.push(
      this.run.decisions$.subscribe((d) => {
        this.last = d;
        if (d.guaranteed) this.guaranteeEngaged = true;
      }),
      this.run.snapshots$.subscribe((snap) => (this.reading = { snap, at: performance.now() })),
    );
  }

  /**
   * The controller's newest reading of the job, with when it came (performance.now()), if
   * that was after `after` (a caller's own last reading); else undefined. The reconciler
   * reads the job at least once per resync tick (250 ms): a progress loop that polls at
   * that period takes its readings instead of sending QEMU a second stream of
   * query-block-jobs. Every command queued in QEMU ahead of a `job-pause` delays the pause
   * by a pass of a main loop that the copy keeps 90% busy (test/moderation, 2026-12-03:
   * block-job-set-speed answered in 25 ms by the median while the copy ran; job-pause in
   * 72-101 ms as a busy phase began).
   */
  snapshotSince(after: number): { readonly snap: JobSnapshot; readonly at: number } | undefined {
    const r = this.reading;
    return r && r.at > after ? r : undefined;
  }

  get decision(): Decision | undefined {
    return this.last;
  }

  /** This VM's policy in force (hot reloads included). */
  get policy(): EffectivePolicy | undefined {
    return this.effective;
  }

  get source(): 'ebpf' | 'qmp' | undefined {
    return this.lastSource;
  }

  /** The finish-by deadline of this VM's policy in force (epoch ms), or null. */
  deadlineAt(): number | null {
    const d = this.effective?.guarantee.deadline;
    if (!d || this.steeredAt === undefined) return null;
    return 'after' in d ? this.steeredAt + d.after : d.at;
  }

  /** Ends steering and leaves the job resumed at unlimited speed, ready to complete. */
  async release(): Promise<void> {
    await this.run?.stop({ release: true });
  }

  /** Ends steering without touching the job (it is being cancelled or is gone). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.run?.stop({ release: false }).catch(() => undefined);
    this.stop$.next();
    for (const s of this.subs) s.unsubscribe();
    this.learnt?.flush();
    await this.flusher?.close();
  }
}

/**
 * The QEMU process behind the QMP socket: by the socket path on its command line, else by
 * its name (`query-name`, QEMU's -name). A libvirt backend would answer this from the
 * domain instead.
 */
async function findVm(client: QmpClient, discovery: VmDiscovery): Promise<VmInfo & { name: string }> {
  const named = (await client.executeRaw('query-name')) as { name?: string };
  const vms = await discovery.list();
  const want = await realpath(client.socketPath).catch(() => client.socketPath);
  let vm: VmInfo | undefined;
  for (const v of vms) {
    for (const s of v.qmpSockets) if ((await realpath(s).catch(() => s)) === want) vm = v;
  }
  vm ??= named.name ? vms.find((v) => v.name === named.name) : undefined;
  if (!vm) {
    throw new IdlecryptError(
      'PROBE_UNAVAILABLE',
      `cannot find the QEMU process behind ${client.socketPath} to observe it; use --speed or --no-moderation`,
    );
  }
  return { ...vm, name: vm.name ?? named.name ?? `pid-${vm.pid}` };
}
