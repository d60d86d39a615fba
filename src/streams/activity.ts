/**
 * activity$: per-VM guest activity samples, one per VM per interval, from the eBPF probes
 * or (degraded) from QMP query-blockstats. This is the edge where processes, sockets and
 * /proc meet the pure operators (samples.ts, rates.ts):
 *
 *   discovery (procfs) ─┐
 *   bpftrace (runner) ──┴─> TotalsEvent ─> totalsToSamples() ─> ActivitySample
 *   or QMP blockstats ──┘
 *
 * Sources ('source' option):
 *   ebpf  the probes only; a probe failure ends the stream with its error.
 *   qmp   query-blockstats only: disk counts; input and interrupts null.
 *   auto  (default) ebpf, and if bpftrace is unavailable (or keeps failing), qmp.
 *
 * Ending: when `stop$` emits, the stream flushes the last, partial interval (bpftrace's
 * final report, or a last QMP poll) as samples with final: true, then completes.
 */
import { existsSync } from 'node:fs';
import {
  Observable,
  ReplaySubject,
  asyncScheduler,
  catchError,
  concat,
  concatMap,
  defer,
  from,
  switchMap,
  takeUntil,
  throwError,
  type SchedulerLike,
} from 'rxjs';
import { IdlecryptError, describeError } from '../errors.ts';
import { silentLogger, type Logger } from '../log.ts';
import { ProcfsDiscovery } from '../discovery/procfs.ts';
import type { VmDiscovery, VmInfo } from '../discovery/types.ts';
import { COUNTER_KEYS, type CounterKey } from '../probes/counters.ts';
import {
  SCRIPT_QEMU_BINARY,
  composeProgram,
  hostHasKvmTracepoints,
  isProbeableQemu,
  loadScripts,
  type ComposedProgram,
  type ScriptId,
} from '../probes/program.ts';
import { QMP_MEASURED, BlockstatsReader, type BlockstatsReaderOptions } from '../probes/qmp-blockstats.ts';
import { restartWithBackoff } from '../probes/restart.ts';
import { isRetryableProbeError, runBpftrace, systemClock, type Clock, type ProbeEvent } from '../probes/runner.ts';
import { pollEvery } from './poll.ts';
import { totalsToSamples } from './samples.ts';
import type { ActivitySample, SampleTarget, TotalsEvent } from './types.ts';

export type SourceChoice = 'auto' | 'ebpf' | 'qmp';

export type ActivityStatus =
  | { type: 'probes-spawned'; run: number; pid: number }
  | { type: 'probes-attached'; run: number }
  /** Counting has begun with this source (first attach, or the QMP poller started). */
  | { type: 'counting'; source: 'ebpf' | 'qmp' }
  | { type: 'probes-restarting'; reason: string; failures: number; delayMs: number }
  | { type: 'fallback'; reason: string }
  | { type: 'unmeasured'; pid: number; vm: string | null; counters: CounterKey[]; why: string };

export interface ActivityOptions {
  /** Sampling interval, ms (>= 50). */
  intervalMs: number;
  /** Only these QEMU pids (default: every QEMU VM on the host). */
  pids?: readonly number[];
  source?: SourceChoice;
  /** The bpftrace binary (see runner.ts). */
  bpftrace?: string;
  discovery?: VmDiscovery;
  logger?: Logger;
  /** Emit once to end: the last partial interval is flushed, then the stream completes. */
  stop$?: Observable<unknown>;
  clock?: Clock;
  scheduler?: SchedulerLike;
  /** Progress for people and tests: attach, restarts, fallback (also logged at info level). */
  onStatus?: (status: ActivityStatus) => void;
  qmp?: BlockstatsReaderOptions;
  restart?: { initialMs?: number; maxMs?: number; maxFailures?: number };
  /**
   * Count interrupts (default true). Under TCG that is one uprobe hit per interrupt, on the
   * guest's critical path, about as many as disk requests on a disk-bound guest: leaving
   * them out halves the probes' cost there (bench/README-probes.md). Interrupts are then null.
   */
  interrupts?: boolean;
  /**
   * Time the disks have a request in flight (default true): a second uprobe hit per disk
   * request, on its end, which the kernel single-steps in Debian's QEMU (probes/
   * qemu-inflight.bt: 14-19 us a hit on the project's hosts). diskBusyUs is then null.
   */
  inflight?: boolean;
}

export function activity$(options: ActivityOptions): Observable<ActivitySample> {
  return defer(() => {
    // stop$ may fire before or while we subscribe to parts of the pipeline: remember it.
    const stopped$ = new ReplaySubject<void>(1);
    const stopSub = options.stop$?.subscribe(() => stopped$.next());
    const ctx: Ctx = {
      ...options,
      log: (options.logger ?? silentLogger).child({ component: 'activity' }),
      discovery: options.discovery ?? new ProcfsDiscovery({ scheduler: options.scheduler }),
      clock: options.clock ?? systemClock,
      scheduler: options.scheduler ?? asyncScheduler,
      status: options.onStatus ?? (() => {}),
      stopped$,
    };
    const source = options.source ?? 'auto';
    const out$ =
      source === 'qmp'
        ? qmpActivity$(ctx)
        : ebpfActivity$(ctx).pipe(
            catchError((err: unknown) => {
              const probeError = err instanceof IdlecryptError && (err.code === 'PROBE_UNAVAILABLE' || err.code === 'PROBE_FAILED');
              if (source !== 'auto' || !probeError) return throwError(() => err);
              const reason = describeError(err);
              ctx.log.info({ reason }, 'eBPF probes unavailable; falling back to QMP query-blockstats (input and interrupts unknown)');
              ctx.status({ type: 'fallback', reason });
              return qmpActivity$(ctx);
            }),
          );
    return new Observable<ActivitySample>((subscriber) => {
      const sub = out$.subscribe(subscriber);
      return () => {
        sub.unsubscribe();
        stopSub?.unsubscribe();
      };
    });
  });
}

interface Ctx extends ActivityOptions {
  log: Logger;
  discovery: VmDiscovery;
  clock: Clock;
  scheduler: SchedulerLike;
  status: (s: ActivityStatus) => void;
  stopped$: ReplaySubject<void>;
}

function selected(ctx: Ctx, vms: readonly VmInfo[]): VmInfo[] {
  return ctx.pids ? vms.filter((v) => ctx.pids!.includes(v.pid)) : [...vms];
}

/** Follows the VM list for the lifetime of a subscription; `current()` is the latest. */
function followVms(ctx: Ctx, initial: VmInfo[]): { current: () => VmInfo[]; stop: () => void } {
  let vms = initial;
  const sub = ctx.discovery.watch().subscribe({
    next: (v) => (vms = v),
    error: (err: unknown) => ctx.log.warn({ err: describeError(err) }, 'VM discovery failed; keeping the last VM list'),
  });
  return { current: () => vms, stop: () => sub.unsubscribe() };
}

// ---- eBPF ---------------------------------------------------------------------------------

interface EbpfSetup {
  vms: VmInfo[];
  program: ComposedProgram;
  binaries: ReadonlySet<string>;
  kvmTracepoints: boolean;
  interrupts: boolean;
  inflight: boolean;
}

/** The probe scripts the observation runs: every one but those its options leave out. */
export function probeScripts(o: { interrupts: boolean; inflight: boolean; kvmTracepoints: boolean }): ScriptId[] {
  return [
    'disk',
    ...(o.inflight ? (['inflight'] as const) : []),
    'input',
    ...(o.interrupts ? (['irqQemu'] as const) : []),
    ...(o.interrupts && o.kvmTracepoints ? (['irqKvm'] as const) : []),
    'stall',
  ];
}

/** The counters those scripts measure for a VM (under KVM, interrupts only with the kvm tracepoints). */
export function probedCounters(o: { interrupts: boolean; inflight: boolean; kvmTracepoints: boolean }, accel: VmInfo['accel']): ReadonlySet<CounterKey> {
  const off: CounterKey[] = [];
  if (!o.inflight) off.push('diskBusyUs');
  if (!o.interrupts || (accel === 'kvm' && !o.kvmTracepoints)) off.push('interrupts');
  return new Set(COUNTER_KEYS.filter((k) => !off.includes(k)));
}

async function ebpfSetup(ctx: Ctx): Promise<EbpfSetup> {
  const vms = await ctx.discovery.list();
  const binaries = new Set<string>();
  if (existsSync(SCRIPT_QEMU_BINARY)) binaries.add(SCRIPT_QEMU_BINARY);
  for (const vm of vms) if (vm.exe && isProbeableQemu(vm.exe)) binaries.add(vm.exe);
  const interrupts = ctx.interrupts ?? true;
  const kvmTracepoints = interrupts && (await hostHasKvmTracepoints());
  const inflight = ctx.inflight ?? true;
  const ids = probeScripts({ interrupts, inflight, kvmTracepoints });
  const program = composeProgram(await loadScripts(ids), [...binaries]);
  ctx.log.debug({ binaries: [...binaries], kvmTracepoints, scripts: ids }, 'probe program composed');
  return { vms, program, binaries, kvmTracepoints, interrupts, inflight };
}

/** What the probes measure for one VM, and why not the rest. */
function measuredFor(vm: VmInfo, setup: EbpfSetup): { measured: ReadonlySet<CounterKey>; why?: string } {
  if (!vm.exe || !setup.binaries.has(vm.exe)) {
    return { measured: new Set(), why: `its QEMU binary (${vm.exe ?? 'unreadable'}) is not probed` };
  }
  const measured = probedCounters(setup, vm.accel);
  if (setup.interrupts && vm.accel === 'kvm' && !setup.kvmTracepoints) {
    return { measured, why: 'it runs under KVM and this host has no kvm tracepoints' };
  }
  return { measured };
}

function ebpfActivity$(ctx: Ctx): Observable<ActivitySample> {
  return defer(() => from(ebpfSetup(ctx))).pipe(
    switchMap(
      (setup) =>
        new Observable<ActivitySample>((subscriber) => {
          const vms = followVms(ctx, setup.vms);
          const warned = new Set<string>();
          let counting = false;
          const targets = (): SampleTarget[] =>
            selected(ctx, vms.current()).map((vm) => {
              const { measured, why } = measuredFor(vm, setup);
              const key = `${vm.pid}/${vm.startTicks}`;
              if (why && !warned.has(key)) {
                warned.add(key);
                const counters = COUNTER_KEYS.filter((k) => !measured.has(k));
                ctx.log.info({ pid: vm.pid, vm: vm.name, counters }, `counts unknown for this VM: ${why}`);
                ctx.status({ type: 'unmeasured', pid: vm.pid, vm: vm.name, counters, why });
              }
              return { pid: vm.pid, vm: vm.name, measured };
            });
          const toTotals = (e: ProbeEvent): TotalsEvent[] => {
            switch (e.type) {
              case 'spawned':
                ctx.status({ type: 'probes-spawned', run: e.run, pid: e.pid });
                return [];
              case 'attached':
                ctx.status({ type: 'probes-attached', run: e.run });
                if (!counting) {
                  counting = true;
                  ctx.status({ type: 'counting', source: 'ebpf' });
                }
                return [{ type: 'baseline', run: `ebpf:${e.run}`, monoMs: e.monoMs }];
              case 'report':
                return [{
                  type: 'totals',
                  run: `ebpf:${e.run}`,
                  monoMs: e.monoMs,
                  epochMs: e.epochMs,
                  final: e.final,
                  source: 'ebpf',
                  scope: 'all',
                  totals: e.totals,
                  targets: targets(),
                }];
            }
          };
          const sub = defer(() =>
            runBpftrace({
              program: setup.program,
              intervalMs: ctx.intervalMs,
              bpftrace: ctx.bpftrace,
              logger: ctx.logger,
              stop$: ctx.stopped$,
              clock: ctx.clock,
            }),
          )
            .pipe(
              restartWithBackoff<ProbeEvent>({
                ...ctx.restart,
                isRetryable: isRetryableProbeError,
                isHealthy: (e) => e.type === 'attached',
                until$: ctx.stopped$,
                scheduler: ctx.scheduler,
                onRestart: (err, failures, delayMs) => {
                  const reason = describeError(err);
                  ctx.log.info({ reason, failures, delayMs }, 'bpftrace died; restarting it (events until it is attached again are not counted)');
                  ctx.status({ type: 'probes-restarting', reason, failures, delayMs });
                },
              }),
              concatMap(toTotals),
              totalsToSamples(),
            )
            .subscribe(subscriber);
          return () => {
            sub.unsubscribe();
            vms.stop();
          };
        }),
    ),
  );
}

// ---- QMP fallback -------------------------------------------------------------------------

function qmpActivity$(ctx: Ctx): Observable<ActivitySample> {
  return defer(() => from(ctx.discovery.list())).pipe(
    switchMap(
      (initial) =>
        new Observable<ActivitySample>((subscriber) => {
          const vms = followVms(ctx, initial);
          const readers = new Map<string, BlockstatsReader>();
          const epochOffset = ctx.clock.epochMs() - ctx.clock.monoMs();
          const runOf = (vm: VmInfo) => `qmp:${vm.pid}/${vm.startTicks ?? ''}`;

          const pollOnce = async (final: boolean): Promise<TotalsEvent[]> => {
            const targets = selected(ctx, vms.current());
            const live = new Set(targets.map(runOf));
            for (const [run, r] of readers) {
              if (!live.has(run)) {
                readers.delete(run);
                void r.close();
              }
            }
            const events = await Promise.all(
              targets.map(async (vm): Promise<TotalsEvent | undefined> => {
                const run = runOf(vm);
                let reader = readers.get(run);
                if (!reader) {
                  reader = new BlockstatsReader(vm, { logger: ctx.logger, ...ctx.qmp });
                  readers.set(run, reader);
                }
                const t0 = ctx.clock.monoMs();
                const totals = await reader.read();
                if (!totals) return undefined;
                // QEMU read its counters somewhere between sending and receiving.
                const monoMs = (t0 + ctx.clock.monoMs()) / 2;
                return {
                  type: 'totals',
                  run,
                  monoMs,
                  epochMs: monoMs + epochOffset,
                  final,
                  source: 'qmp',
                  scope: 'listed',
                  totals: new Map([[vm.pid, totals]]),
                  targets: [{ pid: vm.pid, vm: vm.name, measured: QMP_MEASURED }],
                };
              }),
            );
            return events.filter((e): e is TotalsEvent => e !== undefined);
          };

          ctx.status({ type: 'counting', source: 'qmp' });
          const sub = concat(
            pollEvery(ctx.intervalMs, () => defer(() => from(pollOnce(false))), ctx.scheduler).pipe(takeUntil(ctx.stopped$)),
            defer(() => from(pollOnce(true))),
          )
            .pipe(concatMap((events) => events), totalsToSamples())
            .subscribe(subscriber);
          return () => {
            sub.unsubscribe();
            vms.stop();
            for (const r of readers.values()) void r.close();
          };
        }),
    ),
  );
}
