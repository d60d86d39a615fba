/**
 * The host agent: one service per KVM host that encrypts every disk its configuration
 * names, moderated by what the guests do, and survives its own restarts.
 *
 *   config (agent.yaml, hot-reloaded) ──────────── desired: (VM, disk) → target
 *   discovery (/proc, every second) ─┐
 *   a session per VM (backends.ts) ──┼──────────── observed: disks, jobs; run records
 *   one bpftrace for the host ───────┘                        │
 *                                      reconcile (keyed by VM/disk, level-triggered)
 *                                                             │
 *        per disk, the engine `idlecrypt encrypt` runs: src/encrypt over QMP, or src/libvirt
 *
 * The loop runs on every change (config, VM list, a run ending) and every few seconds
 * anyway; one pass at a time. Each disk is in one state (queued, copying, ..., encrypted,
 * failed); at most host.max-jobs runs at once, in the order of the configuration's entries,
 * then VM name, then the VM's disk order. A run that fails for a reason that may pass (its
 * VM exited, QMP dropped) is queued again after a backoff; one that cannot (a key file
 * missing, a disk another tool's job holds) ends that disk's attempt with its reason,
 * until the configuration changes. A run is the engine's, so a dead agent's run records
 * (src/encrypt/runs.ts) are adopted by the next agent exactly as `idlecrypt encrypt`
 * adopts its own.
 */
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { watch as watchFs, type FSWatcher } from 'node:fs';
import path from 'node:path';
import { BehaviorSubject, Subject, of, share, shareReplay, switchMap, takeUntil, tap, timer, type Observable, type Subscription } from 'rxjs';
import { describeError, IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { ProcfsDiscovery } from '../discovery/procfs.ts';
import type { VmDiscovery, VmInfo } from '../discovery/types.ts';
import { activity$, type SourceChoice } from '../streams/activity.ts';
import type { ActivitySample } from '../streams/types.ts';
import { watchPolicy } from '../policy/watch.ts';
import type { Policy } from '../policy/schema.ts';
import { signalInUse } from '../policy/resolve.ts';
import type { Progress } from '../encrypt/encrypt.ts';
import { processAlive, RunStore, selfOwner, stateDir, type RunRecord } from '../encrypt/runs.ts';
import { rollBackIfVmGone } from '../encrypt/recover.ts';
import { decorateJob, type JobControl } from '../jobs/types.ts';
import { agentPoint, hostTag, openMetricsSink, type MetricsSink } from '../metrics/index.ts';
import { expand, globMatch, loadAgentConfig, type AgentConfig, type EncryptEntry } from './config.ts';
import { deviceOf, imageDevices, withNeighbours } from './neighbours.ts';
import { StatusServer } from './status-server.ts';
import { recordTargets, Sessions, type AgentDisk, type RunPhase, type VmSession } from './backends.ts';
import { libvirtRunStore } from '../libvirt/encrypt.ts';

export type DiskState = 'waiting-for-vm' | 'queued' | 'creating-target' | 'copying' | 'completing' | 'encrypted' | 'failed';

export interface DiskStatus {
  readonly vm: string;
  readonly disk: string;
  readonly target: string;
  readonly state: DiskState;
  /** Why it is failed, or waiting; the moderation's reason while copying. */
  readonly reason?: string;
  readonly progress?: {
    readonly offset: number;
    readonly len: number;
    readonly rateBps: number | null;
    readonly etaS: number | null;
    readonly moderation?: string;
    /** What was learnt of the guest, with `thresholds: auto`. */
    readonly learnt?: string;
  };
  readonly attempts: number;
  /** Epoch ms of the last state change. */
  readonly since: number;
}

export interface AgentStatus {
  readonly pid: number;
  readonly host: string;
  readonly config: string;
  readonly startedAt: number;
  readonly vms: readonly { readonly name: string; readonly pid: number; readonly qmp: string | null; readonly backend?: 'qmp' | 'libvirt' }[];
  readonly disks: readonly DiskStatus[];
  readonly maxJobs: number;
}

export interface AgentOptions {
  readonly configFile: string;
  readonly logger: Logger;
  /** Run records and metrics files (default $IDLECRYPT_STATE_DIR or /var/lib/idlecrypt). */
  readonly stateDir?: string;
  /** The lock and the status socket (default $IDLECRYPT_RUN_DIR or /run/idlecrypt). */
  readonly runDir?: string;
  readonly discovery?: VmDiscovery;
  readonly source?: SourceChoice;
  readonly bpftrace?: string;
  /** PBKDF time of the key slots, ms (default 2000, as cryptsetup). */
  readonly iterTimeMs?: number;
  /** Level-triggered resync period, ms (default 5000). */
  readonly resyncMs?: number;
  /** How often the agent writes its own point, ms (default 10000). */
  readonly metricsMs?: number;
}

export function runDir(): string {
  return process.env.IDLECRYPT_RUN_DIR || '/run/idlecrypt';
}

/** Errors that end a disk's attempt: retrying cannot help until the configuration changes. */
const TERMINAL = new Set(['KEY_FILE', 'TARGET_EXISTS', 'NO_SPACE', 'UNKNOWN_DEVICE', 'JOB_EXISTS', 'USAGE', 'JOB_FAILED', 'POLICY']);
const BACKOFF_MS = [2_000, 5_000, 15_000, 60_000];
/** How long the observation outlives the last copy (the next disk often follows at once). */
const OBSERVE_LINGER_MS = 30_000;
/** How long a settled VM's disk listing is trusted without a change event. */
const SETTLED_RESYNC_MS = 60_000;

interface Worker {
  readonly key: string;
  readonly done: Promise<void>;
}

export class Agent {
  private config: AgentConfig;
  private readonly config$: BehaviorSubject<AgentConfig>;
  private readonly log: Logger;
  private readonly store: RunStore;
  private readonly libvirtStore: ReturnType<typeof libvirtRunStore>;
  private readonly stop$ = new Subject<void>();
  private readonly detach = new AbortController();
  private readonly sessions: Sessions;
  /** The backend of each VM's last session, by name (for status). */
  private readonly backendOf = new Map<string, 'qmp' | 'libvirt'>();
  private readonly warnedRecords = new Set<string>();
  private readonly rollBackFailed = new Set<string>();
  private readonly workers = new Map<string, Worker>();
  private readonly status = new Map<string, DiskStatus>();
  private readonly retryAt = new Map<string, number>();
  /** Each session's last listing of disks, reused while nothing changed (see reconcile). */
  private readonly listed = new WeakMap<VmSession, { generation: number; until: number; disks: AgentDisk[] }>();
  private readonly subs: Subscription[] = [];
  private vms: VmInfo[] = [];
  /** No pass before the first VM list: every configured VM would look stopped. */
  private discovered = false;
  private samples$!: Observable<ActivitySample>;
  private policy$!: Observable<Policy>;
  private pass: Promise<void> | undefined;
  private again = false;
  private stopping = false;
  private resync?: NodeJS.Timeout;
  private fileWatch?: FSWatcher;
  private server?: StatusServer;
  private metrics?: MetricsSink;
  private metricsTimer?: NodeJS.Timeout;
  private lastCpu = { usage: process.cpuUsage(), at: performance.now() };
  private readonly startedAt = Date.now();
  private readonly runDir: string;
  private readonly stateDir: string;

  constructor(private readonly o: AgentOptions) {
    this.log = o.logger.child({ component: 'agent' });
    this.config = loadAgentConfig(o.configFile); // a bad file fails the start, with its place
    this.config$ = new BehaviorSubject(this.config);
    this.stateDir = o.stateDir ?? stateDir();
    this.runDir = o.runDir ?? runDir();
    this.store = new RunStore(this.stateDir);
    this.libvirtStore = libvirtRunStore(this.stateDir);
    this.sessions = new Sessions({
      log: this.log,
      stores: { qmp: this.store, libvirt: this.libvirtStore },
      onClosed: () => this.kick(),
      onChanged: () => this.kick(),
      backend: () => this.config.backend,
      uri: () => this.config.connect,
      libvirtPause: () => this.config.libvirtPause,
    });
  }

  /** Takes the host's agent lock, starts observing and reconciling. */
  async start(): Promise<void> {
    await this.lock();
    this.server = new StatusServer(path.join(this.runDir, 'agent.sock'), () => this.snapshot(), this.log);
    await this.server.listen();
    const c = this.config;
    this.log.info({ config: c.file, backend: c.backend, maxJobs: c.host.maxJobs, maxSpeed: c.host.maxSpeed, protect: c.host.protect, entries: c.encrypt.length }, 'agent started');
    this.policy$ = this.config$.pipe(
      switchMap((cfg) => (cfg.policyFile ? watchPolicy(cfg.policyFile, { logger: this.log }) : of(cfg.policy))),
      shareReplay({ bufferSize: 1, refCount: false }),
    );
    this.subs.push(this.policy$.subscribe({ error: (e: unknown) => this.log.error({ err: describeError(e) }, 'policy') }));
    // One observation for the host: every QEMU, followed as VMs come and go. One VM list
    // for the observation and the loop. It runs while there is a copy to moderate: the runs
    // subscribe, bpftrace starts with the first and stops OBSERVE_LINGER_MS after the last,
    // so a host with nothing to copy pays no probes (bench/agent-scale.ts). Copies a dead
    // agent left are to be moderated again at once: with run records at the start, the
    // observation starts with the agent.
    const discovery = this.o.discovery ?? new ProcfsDiscovery();
    this.samples$ = activity$({
      intervalMs: c.policy.sampling.interval,
      source: this.o.source ?? 'auto',
      inflight: signalInUse(c.policy, 'inflight'),
      logger: this.log,
      stop$: this.stop$,
      ...(this.o.bpftrace !== undefined ? { bpftrace: this.o.bpftrace } : {}),
      discovery,
      onStatus: (s) => this.log.info({ status: s.type, ...('reason' in s ? { reason: s.reason } : {}) }, `observation: ${s.type}`),
    }).pipe(
      tap({ error: (e: unknown) => this.log.error({ err: describeError(e) }, 'observation failed; copies run at their idle speed') }),
      share({ resetOnRefCountZero: () => timer(OBSERVE_LINGER_MS) }),
    );
    if ((await recordTargets({ qmp: this.store, libvirt: this.libvirtStore })).size > 0) {
      const early = this.samples$.subscribe({ error: () => undefined });
      this.subs.push(early);
      setTimeout(() => early.unsubscribe(), OBSERVE_LINGER_MS).unref();
    }
    this.subs.push(
      discovery.watch().pipe(takeUntil(this.stop$)).subscribe({
        next: (vms) => {
          this.vms = vms;
          this.discovered = true;
          this.kick();
        },
        error: (e: unknown) => this.log.error({ err: describeError(e) }, 'VM discovery failed'),
      }),
    );
    this.watchConfig();
    this.resync = setInterval(() => this.kick(), this.o.resyncMs ?? 5000);
    // The agent's own points, for as long as it runs (idlecrypt_agent, src/metrics/names.ts).
    this.metrics = await openMetricsSink({
      vm: 'agent',
      ...(c.influx ? { influx: c.influx } : { file: path.join(this.stateDir, 'metrics', `agent-${new Date().toISOString().replace(/[:.]/g, '-')}.lp`) }),
    });
    this.writeAgentPoint();
    this.metricsTimer = setInterval(() => this.writeAgentPoint(), this.o.metricsMs ?? 10_000);
    this.kick();
  }

  /** Re-reads the configuration; a bad file is reported and the last good one stays. */
  reload(): void {
    try {
      const next = loadAgentConfig(this.o.configFile);
      this.config = next;
      // A disk that failed for good is tried again under a new configuration.
      for (const [k, s] of this.status) if (s.state === 'failed') this.status.delete(k);
      this.retryAt.clear();
      this.config$.next(next);
      this.log.info({ config: next.file, entries: next.encrypt.length }, 'configuration reloaded');
      this.kick();
    } catch (e) {
      this.log.error({ err: describeError(e) }, 'configuration not reloaded; the last good one stays in force');
    }
  }

  /**
   * SIGTERM: every copy is left paused with its record, for the next start to resume; no
   * guest is disturbed while nobody moderates. Resolves once all runs have let go.
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.log.info({ running: this.workers.size }, 'stopping: copies are left paused for the next start');
    this.detach.abort();
    if (this.resync) clearInterval(this.resync);
    this.fileWatch?.close();
    await Promise.all([...this.workers.values()].map((w) => w.done));
    await this.pass?.catch(() => undefined);
    this.stop$.next();
    for (const s of this.subs) s.unsubscribe();
    await this.sessions.close();
    await this.server?.close();
    if (this.metricsTimer) clearInterval(this.metricsTimer);
    this.writeAgentPoint();
    await this.metrics?.close().catch(() => undefined);
    await rm(path.join(this.runDir, 'agent.pid'), { force: true });
    this.log.info({}, 'agent stopped');
  }

  snapshot(): AgentStatus {
    return {
      pid: process.pid,
      host: hostTag(),
      config: this.config.file,
      startedAt: this.startedAt,
      vms: this.vms.map((v) => {
        const backend = v.name !== null ? this.backendOf.get(v.name) : undefined;
        return { name: v.name ?? `pid-${v.pid}`, pid: v.pid, qmp: v.qmpSockets[0] ?? null, ...(backend ? { backend } : {}) };
      }),
      disks: [...this.status.values()].sort((a, b) => a.vm.localeCompare(b.vm) || a.disk.localeCompare(b.disk)),
      maxJobs: this.config.host.maxJobs,
    };
  }

  private writeAgentPoint(): void {
    const now = performance.now();
    const usage = process.cpuUsage();
    const cpuUs = usage.user + usage.system - (this.lastCpu.usage.user + this.lastCpu.usage.system);
    const elapsedMs = now - this.lastCpu.at;
    this.lastCpu = { usage, at: now };
    const disks = [...this.status.values()];
    const count = (...states: DiskState[]) => disks.filter((d) => states.includes(d.state)).length;
    const p = agentPoint(
      { host: hostTag(), time: Date.now() },
      {
        vmsWatched: this.vms.length,
        disksConfigured: disks.length,
        copiesRunning: this.workers.size,
        maxJobs: this.config.host.maxJobs,
        queued: count('queued'),
        waiting: count('waiting-for-vm'),
        encrypted: count('encrypted'),
        failed: count('failed'),
        cpuPercent: elapsedMs > 100 ? (cpuUs / 1000 / elapsedMs) * 100 : null,
        rssBytes: process.memoryUsage().rss,
      },
    );
    if (p) this.metrics?.write([p]);
  }

  // ---- the reconcile loop -------------------------------------------------------------------

  /** Asks for a pass; passes never overlap, and a request during one runs another after it. */
  private kick(): void {
    if (this.stopping || !this.discovered) return;
    if (this.pass) {
      this.again = true;
      return;
    }
    this.pass = this.reconcile()
      .catch((e: unknown) => this.log.error({ err: describeError(e) }, 'reconcile pass failed'))
      .finally(() => {
        this.pass = undefined;
        if (this.again) {
          this.again = false;
          this.kick();
        }
      });
  }

  private async reconcile(): Promise<void> {
    const cfg = this.config;
    // Records this version cannot read: said once each, never guessed at (orphans.ts).
    const scan = await this.store.scan();
    const known = new Set(scan.records.map((r) => r.tag));
    for (const u of scan.unreadable) {
      if (this.warnedRecords.has(u.file)) continue;
      this.warnedRecords.add(u.file);
      this.log.warn({ file: u.file, why: u.why }, `ignoring run record ${u.file}: ${u.why}; what it described is reconciled from QEMU alone`);
    }
    await this.rollBackExited(scan.records);
    const wanted: { key: string; entry: EncryptEntry; order: number; vm: VmInfo & { name: string }; disk: AgentDisk; target: string; session: VmSession }[] = [];
    const seen = new Set<string>();
    for (const vm of this.vms) {
      const name = vm.name;
      if (name === null) continue;
      const entryIndex = cfg.encrypt.findIndex((e) => globMatch(e.vm, name));
      if (entryIndex < 0) continue;
      const entry = cfg.encrypt[entryIndex]!;
      const session = await this.sessions.open({ ...vm, name }, entry);
      if (!session) {
        // Shown, not dropped: the operator sees why nothing happens to this VM.
        const why = this.sessions.errors.get(name) ?? 'connecting to it';
        for (const d of entry.disks === 'all' ? ['all'] : entry.disks) {
          const key = `${name}/${d}`;
          seen.add(key);
          if (!this.workers.has(key)) this.set(key, { vm: name, disk: d, target: expand(entry.target, name, d), state: 'waiting-for-vm', reason: why });
        }
        continue;
      }
      this.backendOf.set(name, session.backend);
      const running = [...this.workers.keys()].some((k) => k.startsWith(`${name}/`));
      // A VM with no run of ours and no change its session has seen since the last listing
      // is not asked again before SETTLED_RESYNC_MS: 100 watched VMs cost the agent 130 QMP
      // commands a second otherwise (bench/agent-scale.ts).
      const last = this.listed.get(session);
      const generation = session.generation;
      let disks: AgentDisk[];
      if (!running && last && generation !== undefined && last.generation === generation && Date.now() < last.until) {
        disks = last.disks;
      } else {
        try {
          disks = await session.disks();
        } catch (e) {
          this.log.warn({ vm: name, err: describeError(e) }, 'cannot list the VM\'s disks');
          continue;
        }
        // Copies of ours no readable record describes: rolled back, the disk queued again.
        // Not while a run of ours works on this VM (its record may be newer than our reading).
        if (!running) {
          const fresh = async () => new Set((await this.store.scan()).records.map((r) => r.tag));
          await session.rollBackOrphans(known, fresh, this.log).catch((e: unknown) =>
            this.log.error({ vm: name, err: describeError(e) }, 'rolling back a copy with no run record failed'),
          );
        }
        if (running || generation === undefined) this.listed.delete(session);
        // Spread over ±25%, so that 100 VMs listed at the start are not all asked again at once.
        else this.listed.set(session, { generation, until: Date.now() + SETTLED_RESYNC_MS * (0.75 + Math.random() / 2), disks });
      }
      const chosen: (AgentDisk | { missing: string })[] =
        entry.disks === 'all' ? disks : entry.disks.map((id) => disks.find((d) => d.ids.includes(id)) ?? { missing: id });
      chosen.forEach((disk, i) => {
        const missing = 'missing' in disk ? disk.missing : undefined;
        const label = 'missing' in disk ? disk.missing : disk.label;
        const key = `${name}/${label}`;
        const target = expand(entry.target, name, label);
        seen.add(key);
        if (missing !== undefined || 'missing' in disk) {
          this.set(key, { vm: name, disk: label, target, state: 'failed', reason: `the VM has no disk '${missing}' (it has ${disks.map((d) => d.label).join(', ') || 'none'})` });
          return;
        }
        wanted.push({ key, entry, order: entryIndex * 1000 + i, vm: session.vm, disk, target, session });
      });
    }
    // Entries naming one VM that is not running: watched for, started when it appears.
    for (const e of cfg.encrypt) {
      if (/[*?[]/.test(e.vm) || this.vms.some((v) => v.name === e.vm) || e.disks === 'all') continue;
      for (const d of e.disks) {
        const key = `${e.vm}/${d}`;
        seen.add(key);
        if (!this.workers.has(key)) this.set(key, { vm: e.vm, disk: d, target: expand(e.target, e.vm, d), state: 'waiting-for-vm', reason: 'the VM is not running' });
      }
    }
    for (const k of [...this.status.keys()]) if (!seen.has(k) && !this.workers.has(k)) this.status.delete(k);

    // Observed state: encrypted already, or running; the rest queue in order.
    const queue = [];
    for (const w of wanted.sort((a, b) => a.order - b.order || a.vm.name.localeCompare(b.vm.name))) {
      if (this.workers.has(w.key)) continue;
      if (w.disk.encrypted) {
        this.set(w.key, { vm: w.vm.name, disk: w.disk.label, target: w.target, state: 'encrypted', reason: w.disk.file });
        continue;
      }
      const prev = this.status.get(w.key);
      if (prev?.state === 'failed' && !this.retryAt.has(w.key)) continue; // for good, until a reload
      if ((this.retryAt.get(w.key) ?? 0) > Date.now()) continue;
      if (prev?.state !== 'queued') this.set(w.key, { vm: w.vm.name, disk: w.disk.label, target: w.target, state: 'queued' });
      queue.push(w);
    }
    // A dead run's copy is already in QEMU: adopt those first.
    const adoptable = await recordTargets({ qmp: this.store, libvirt: this.libvirtStore });
    queue.sort((a, b) => Number(adoptable.has(b.target)) - Number(adoptable.has(a.target)));
    for (const w of queue) {
      if (this.workers.size >= cfg.host.maxJobs || this.stopping) break;
      this.startRun(w.key, w.entry, w.session, w.disk, w.target);
    }
  }

  /**
   * Dead runs' copies whose VM has exited (recover.ts rollBackIfVmGone): their jobs went with
   * their QEMU, and a paused copy's qemu-storage-daemon would keep the key and the target
   * until the VM came back. Rolled back at once; the disk is copied afresh when the VM runs
   * again. A record of this agent's own runs is its worker's to handle.
   */
  private async rollBackExited(records: readonly RunRecord[]): Promise<void> {
    const self = selfOwner();
    for (const rec of records) {
      if (rec.owner.pid === self.pid && rec.owner.start === self.start) continue;
      // A VM of that name or on that socket runs: its next run adopts the copy or rolls it back.
      if (this.rollBackFailed.has(rec.tag) || this.vms.some((v) => v.name === rec.vm || v.qmpSockets.includes(rec.qmp))) continue;
      try {
        const removed = await rollBackIfVmGone(this.store, rec, this.log);
        if (removed) {
          this.log.warn(
            { vm: rec.vm, device: rec.device, target: rec.target, removed },
            `VM '${rec.vm}' exited while its copy into ${rec.target} had no run: rolled back (removed ${removed.join(', ') || 'nothing'}); the guest never ran on it, and its next run copies ${rec.source} afresh`,
          );
        }
      } catch (e) {
        // Said once; `idlecrypt cancel --target` or the VM's next run tries again.
        this.rollBackFailed.add(rec.tag);
        this.log.error({ vm: rec.vm, target: rec.target, err: describeError(e) }, `rolling back the copy into ${rec.target} of VM '${rec.vm}', which exited, failed`);
      }
    }
  }

  private startRun(key: string, entry: EncryptEntry, session: VmSession, disk: AgentDisk, target: string): void {
    const vm = session.vm;
    const label = disk.label;
    const attempts = (this.status.get(key)?.attempts ?? 0) + 1;
    const base = { vm: vm.name, disk: label, target, attempts };
    this.set(key, { ...base, state: 'creating-target' }, attempts);
    const log = this.log.child({ vm: vm.name, disk: label });
    const cfg = this.config;
    const cap = cfg.host.maxSpeed > 0 ? Math.floor(cfg.host.maxSpeed / cfg.host.maxJobs) : 0;
    const done = (async () => {
      // Neighbours: VMs start, stop and open images, so they are looked up again every
      // 10 s; `protect` is read from the configuration in force (a reload applies at once).
      const near = new Set<number>();
      const none: ReadonlySet<number> = new Set();
      const samples$ = this.samples$.pipe(withNeighbours(vm.pid, () => (this.config.host.protect === 'storage' ? near : none)));
      const lookup = () => this.neighboursOf(vm.pid, disk.file, target, near).catch((e: unknown) => log.warn({ err: describeError(e) }, 'cannot find the neighbours on this storage'));
      const refresh = setInterval(() => void lookup(), 10_000);
      let phase: RunPhase = 'creating-target';
      try {
        await lookup();
        await session.encrypt({
          disk,
          target,
          keyFile: expand(entry.keyFile, vm.name, label),
          format: entry.format,
          encrypter: entry.encrypter,
          speed: cap,
          iterTimeMs: this.o.iterTimeMs ?? 2000,
          logger: log,
          detach: this.detach.signal,
          policy$: this.policy$,
          samples$,
          ...(cap > 0 ? { wrapJob: (j: JobControl) => capped(j, cap) } : {}),
          metrics: (vmName) => openMetricsSink({ vm: vmName, ...(cfg.influx ? { influx: cfg.influx } : { file: path.join(this.stateDir, 'metrics', `${safe(vmName)}-${safe(label)}-${Date.now()}.lp`) }) }),
          onPhase: (p) => {
            phase = p;
            this.set(key, { ...base, state: p, ...this.progressOf(key) });
          },
          onProgress: (p) => this.set(key, { ...base, state: phase === 'completing' ? 'completing' : 'copying', progress: progressView(p), ...(p.moderation ? { reason: `${p.moderation.state}, ${p.moderation.reason}` } : {}) }),
          onNote: (text, rec) => log.info({ ...rec }, text),
        });
        this.retryAt.delete(key);
        this.set(key, { ...base, state: 'encrypted', reason: target });
        log.info({ target }, 'encrypted: the guest runs on its encrypted image');
      } catch (e) {
        const err = e instanceof IdlecryptError ? e : undefined;
        if (err?.code === 'DETACHED') {
          this.set(key, { ...base, state: 'queued', reason: 'agent stopping: the copy is left paused' });
          return;
        }
        const terminal = err !== undefined && TERMINAL.has(err.code);
        const reason = describeError(e);
        if (terminal) {
          this.retryAt.delete(key);
          this.set(key, { ...base, state: 'failed', reason });
          log.error({ err: reason, code: err.code }, 'disk failed; the others go on');
        } else {
          const wait = BACKOFF_MS[Math.min(attempts - 1, BACKOFF_MS.length - 1)]!;
          this.retryAt.set(key, Date.now() + wait);
          this.set(key, { ...base, state: 'failed', reason: `${reason} (retrying in ${wait / 1000} s)` });
          log.warn({ err: reason, code: err?.code, retryInMs: wait }, 'run failed; queued again after a backoff');
          setTimeout(() => this.kick(), wait + 10).unref();
        }
      } finally {
        clearInterval(refresh);
        this.workers.delete(key);
        this.kick();
      }
    })();
    this.workers.set(key, { key, done });
  }

  /** The VMs whose images share a host device with this job's source or target. */
  private async neighboursOf(pid: number, source: string, target: string, into: Set<number>): Promise<void> {
    const devs = new Set<number>();
    for (const p of [source, target]) {
      const d = await deviceOf(p);
      if (d !== undefined) devs.add(d);
    }
    const found = new Set<number>();
    for (const vm of this.vms) {
      if (vm.pid === pid) continue;
      const theirs = await imageDevices(vm.pid);
      if ([...theirs].some((d) => devs.has(d))) found.add(vm.pid);
    }
    if (found.size !== into.size || [...found].some((p) => !into.has(p))) {
      const names = this.vms.filter((v) => found.has(v.pid)).map((v) => v.name ?? `pid-${v.pid}`);
      this.log.info({ pid, neighbours: names }, `neighbours on the same storage: ${names.join(', ') || 'none'}`);
    }
    into.clear();
    for (const p of found) into.add(p);
  }

  private progressOf(key: string): Pick<DiskStatus, 'progress'> {
    const p = this.status.get(key)?.progress;
    return p ? { progress: p } : {};
  }

  private set(key: string, s: Omit<DiskStatus, 'since' | 'attempts'> & { attempts?: number }, attempts?: number): void {
    const prev = this.status.get(key);
    const next: DiskStatus = { ...s, attempts: attempts ?? s.attempts ?? prev?.attempts ?? 0, since: prev?.state === s.state ? prev.since : Date.now() };
    this.status.set(key, next);
    if (prev?.state !== s.state) this.log.info({ vm: s.vm, disk: s.disk, state: s.state, ...(s.reason ? { reason: s.reason } : {}) }, `${s.vm}/${s.disk}: ${s.state}`);
  }

  // ---- lock and configuration file -----------------------------------------------------------

  /** One agent per host: the lock file names its owner; a dead owner's lock is taken over. */
  private async lock(): Promise<void> {
    await mkdir(this.runDir, { recursive: true, mode: 0o700 });
    const file = path.join(this.runDir, 'agent.pid');
    for (let i = 0; i < 2; i++) {
      try {
        const fh = await open(file, 'wx', 0o600);
        await fh.writeFile(`${JSON.stringify(selfOwner())}\n`);
        await fh.close();
        return;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        const owner = await readFile(file, 'utf8').then((t) => JSON.parse(t) as { pid: number; start: number }, () => undefined);
        if (owner && processAlive(owner)) {
          throw new IdlecryptError('AGENT_RUNNING', `another idlecrypt agent (pid ${owner.pid}) is running on this host (${file})`);
        }
        await rm(file, { force: true });
      }
    }
    throw new IdlecryptError('AGENT_RUNNING', `cannot take the agent lock ${file}`);
  }

  private watchConfig(): void {
    const dir = path.dirname(this.o.configFile);
    const base = path.basename(this.o.configFile);
    let timer: NodeJS.Timeout | undefined;
    try {
      // The directory, not the file: editors replace a file by renaming a new one over it.
      this.fileWatch = watchFs(dir, (_ev, name) => {
        if (name !== base) return;
        clearTimeout(timer);
        timer = setTimeout(() => this.reload(), 200);
      });
    } catch (e) {
      this.log.warn({ err: describeError(e) }, 'cannot watch the configuration file; reload with SIGHUP');
    }
  }
}

/** The controller's speeds, held under the host's ceiling share (0 from it means unlimited). */
function capped(job: JobControl, cap: number): JobControl {
  return decorateJob(job, { setSpeed: (bps) => job.setSpeed(bps === 0 ? cap : Math.min(bps, cap)) });
}

function progressView(p: Progress): DiskStatus['progress'] {
  return {
    offset: p.offset,
    len: p.len,
    rateBps: p.rate,
    etaS: p.etaS,
    ...(p.moderation ? { moderation: `${p.moderation.state}, ${p.moderation.reason}` } : {}),
    ...(p.moderation?.learnt ? { learnt: p.moderation.learnt } : {}),
  };
}

function safe(s: string): string {
  return s.replace(/[^\w.-]/g, '_');
}
