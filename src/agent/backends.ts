/**
 * How the agent reaches a VM: the backends. The reconcile loop (agent.ts) knows VMs, disks
 * and runs; a backend opens a session to one VM, lists its disks, and runs the engine on
 * one of them:
 *
 *   QmpBackend      the VM's QMP socket (its first -qmp, or the configuration's qmp:),
 *                   one QmpClient per VM; the engine is src/encrypt (encryptDisk)
 *   LibvirtBackend  the domain of that name in libvirt (whose pid file names this QEMU),
 *                   one libvirt connection for the host; the engine is src/libvirt
 *
 * `backend: auto` takes QMP for a VM that has a socket, libvirt for one that libvirt runs.
 * The backends share nothing with each other; the loop treats their runs alike (states,
 * retries, max-jobs, neighbours, SIGTERM leaves each copy for the next start).
 */
import type { Observable } from 'rxjs';
import { describeError, IdlecryptError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { VmInfo } from '../discovery/types.ts';
import type { ActivitySample } from '../streams/types.ts';
import type { Policy } from '../policy/schema.ts';
import type { JobControl } from '../jobs/types.ts';
import type { MetricsSink } from '../metrics/sink.ts';
import type { Progress } from '../encrypt/progress.ts';
import type { FormatChoice } from '../encrypt/target.ts';
import type { Encrypter } from '../encrypt/storage-daemon.ts';
import { QmpClient } from '../qmp/client.ts';
import { diskLabel, listDisks } from '../encrypt/disks.ts';
import { encryptDisk } from '../encrypt/encrypt.ts';
import { RunStore } from '../encrypt/runs.ts';
import { LibvirtClient } from '../libvirt/client.ts';
import { domainVm } from '../libvirt/domains.ts';
import { encryptDomainDisk, libvirtRunStore } from '../libvirt/encrypt.ts';
import type { LibvirtPauseMode } from '../libvirt/copy-job.ts';
import { rollBackOrphans } from './orphans.ts';
import { expand, type BackendChoice, type EncryptEntry } from './config.ts';

/** A disk as the loop sees it, whatever the backend. */
export interface AgentDisk {
  /** Its name in keys, targets ({disk}) and status: the qdev id (QMP) or target dev (libvirt). */
  readonly label: string;
  /** Every name the configuration's `disks:` may use for it. */
  readonly ids: readonly string[];
  /** The image it runs on. */
  readonly file: string;
  readonly encrypted: boolean;
}

export type RunPhase = 'creating-target' | 'copying' | 'completing';

export interface RunParams {
  readonly disk: AgentDisk;
  readonly target: string;
  readonly keyFile: string;
  readonly format: FormatChoice;
  /** Undefined: the backend's own (encryptDisk's defaultEncrypter for the target's format; libvirt's copy). */
  readonly encrypter: Encrypter | undefined;
  readonly speed: number;
  readonly iterTimeMs: number;
  readonly logger: Logger;
  readonly detach: AbortSignal;
  readonly policy$: Observable<Policy>;
  readonly samples$: Observable<ActivitySample>;
  readonly wrapJob?: (job: JobControl) => JobControl;
  readonly metrics: (vmName: string) => Promise<MetricsSink>;
  readonly onPhase: (phase: RunPhase) => void;
  readonly onProgress: (p: Progress) => void;
  readonly onNote: (text: string, record: Record<string, unknown>) => void;
}

/** An open way to one VM. */
export interface VmSession {
  readonly vm: VmInfo & { name: string };
  readonly backend: 'qmp' | 'libvirt';
  /** The session still works (its QMP connection or libvirt's is up). */
  readonly live: boolean;
  /**
   * Bumped whenever the VM's disks or block jobs change (QMP events: a device added or
   * removed, a job ended); the loop may then reuse what it last listed. Undefined: no such
   * events, list again on every pass.
   */
  readonly generation?: number;
  disks(): Promise<AgentDisk[]>;
  /** Copies of ours that no readable record describes, rolled back (QMP only: orphans.ts). */
  rollBackOrphans(known: ReadonlySet<string>, fresh: () => Promise<Set<string>>, log: Logger): Promise<void>;
  /** One encryption run on one disk; throws the engine's IdlecryptError (DETACHED on SIGTERM). */
  encrypt(p: RunParams): Promise<void>;
}

/** The run records the backends keep: every target a dead run may have left a copy for. */
export async function recordTargets(stores: { qmp: RunStore; libvirt: ReturnType<typeof libvirtRunStore> }): Promise<Set<string>> {
  const [a, b] = await Promise.all([stores.qmp.list(), stores.libvirt.list()]);
  return new Set([...a, ...b].map((r) => r.target));
}

/**
 * Opens sessions: per VM, by the configured backend. Keeps one QMP session per VM and one
 * libvirt connection for the host; forgets a session when its connection drops.
 */
export class Sessions {
  private readonly qmp = new Map<string, { session: VmSession & { changed(): void }; client: QmpClient }>();
  private readonly connecting = new Set<string>();
  private libvirt: LibvirtClient | undefined;
  private libvirtConnecting: Promise<LibvirtClient> | undefined;
  /** Why a VM's session could not be opened, by VM name (for its disks' status). */
  readonly errors = new Map<string, string>();

  constructor(
    private readonly o: {
      readonly log: Logger;
      readonly stores: { qmp: RunStore; libvirt: ReturnType<typeof libvirtRunStore> };
      readonly onClosed: () => void;
      /** A VM's disks or jobs changed (its session's generation moved on). */
      readonly onChanged: () => void;
      readonly backend: () => BackendChoice;
      readonly uri: () => string;
      /** How libvirt copies are paused (config `libvirt-pause`). */
      readonly libvirtPause: () => LibvirtPauseMode;
    },
  ) {}

  /** The VM's session, or undefined (and `errors` says why) when it cannot be had now. */
  async open(vm: VmInfo & { name: string }, entry: EncryptEntry): Promise<VmSession | undefined> {
    const choice = this.o.backend();
    const socket = entry.qmp !== undefined ? expand(entry.qmp, vm.name, '') : vm.qmpSockets[0];
    if (choice === 'qmp' || (choice === 'auto' && socket)) {
      if (!socket) return this.fail(vm, 'no QMP socket on its command line; name one with qmp: in the configuration');
      return this.openQmp(vm, socket);
    }
    return this.openLibvirt(vm, choice === 'auto');
  }

  async close(): Promise<void> {
    await Promise.all([...this.qmp.values()].map((s) => s.client.close().catch(() => undefined)));
    this.qmp.clear();
    await this.libvirt?.close().catch(() => undefined);
    this.libvirt = undefined;
  }

  private fail(vm: VmInfo & { name: string }, why: string): undefined {
    if (this.errors.get(vm.name) !== why) this.o.log.warn({ vm: vm.name, pid: vm.pid, why }, `cannot reach VM ${vm.name}: ${why}`);
    this.errors.set(vm.name, why);
    return undefined;
  }

  private async openQmp(vm: VmInfo & { name: string }, socket: string): Promise<VmSession | undefined> {
    const id = `${vm.pid}/${vm.startTicks ?? ''}`;
    const have = this.qmp.get(id);
    if (have && have.client.state === 'running') return have.session;
    if (this.connecting.has(id)) return undefined;
    this.connecting.add(id);
    try {
      const client = await QmpClient.connect(socket, { logger: this.o.log });
      const session = qmpSession(vm, client, socket, this.o.stores.qmp);
      this.qmp.set(id, { session, client });
      client.events$.subscribe((e) => {
        if (!CHANGE_EVENTS.has(e.event) || (e.event === 'JOB_STATUS_CHANGE' && e.data?.status !== 'null')) return;
        session.changed();
        this.o.onChanged();
      });
      client.closed$.subscribe(() => {
        this.qmp.delete(id);
        this.o.onClosed();
      });
      this.errors.delete(vm.name);
      this.o.log.info({ vm: vm.name, pid: vm.pid, qmp: socket }, 'QMP session opened');
      return session;
    } catch (e) {
      return this.fail(vm, `cannot open its QMP session: ${describeError(e)}`);
    } finally {
      this.connecting.delete(id);
    }
  }

  private async openLibvirt(vm: VmInfo & { name: string }, auto: boolean): Promise<VmSession | undefined> {
    let client: LibvirtClient;
    try {
      client = await this.libvirtClient();
    } catch (e) {
      return this.fail(vm, auto ? `no QMP socket on its command line, and libvirt cannot be reached: ${describeError(e)}` : describeError(e));
    }
    try {
      const dom = await client.domain(vm.name);
      const theirs = await domainVm(dom);
      if (theirs.pid !== vm.pid) return this.fail(vm, `libvirt's domain '${vm.name}' is QEMU pid ${theirs.pid}, not this one (pid ${vm.pid})`);
      this.errors.delete(vm.name);
      return libvirtSession(vm, client, this.o.stores.libvirt, this.o.libvirtPause);
    } catch (e) {
      if (e instanceof IdlecryptError && e.code === 'UNKNOWN_DOMAIN' && auto) return this.fail(vm, 'no QMP socket on its command line, and no libvirt domain of that name runs it; name a socket with qmp: in the configuration');
      return this.fail(vm, describeError(e));
    }
  }

  /** The host's one libvirt connection, opened on first need and again after it drops. */
  private async libvirtClient(): Promise<LibvirtClient> {
    if (this.libvirt && this.libvirt.closedReason === undefined) return this.libvirt;
    this.libvirtConnecting ??= LibvirtClient.connect({ uri: this.o.uri(), logger: this.o.log }).then(
      (c) => {
        this.libvirt = c;
        this.libvirtConnecting = undefined;
        this.o.log.info({ uri: c.uri }, 'libvirt connected');
        c.closed$.subscribe((why) => {
          this.o.log.warn({ why }, 'the libvirt connection dropped');
          this.o.onClosed();
        });
        return c;
      },
      (e: unknown) => {
        this.libvirtConnecting = undefined;
        throw e;
      },
    );
    return this.libvirtConnecting;
  }
}

/** QMP events after which a VM's disks or jobs differ: devices come or go, a job ends. */
const CHANGE_EVENTS = new Set(['DEVICE_ADDED', 'DEVICE_DELETED', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED', 'JOB_STATUS_CHANGE']);

function qmpSession(vm: VmInfo & { name: string }, client: QmpClient, socket: string, store: RunStore): VmSession & { changed(): void } {
  let generation = 0;
  return {
    vm,
    backend: 'qmp',
    get live() {
      return client.state === 'running';
    },
    get generation() {
      return generation;
    },
    changed() {
      generation++;
    },
    async disks() {
      return (await listDisks(client)).map((d) => ({ label: diskLabel(d), ids: [d.qdevId, d.device, d.nodeName].filter((x) => x !== ''), file: d.file, encrypted: d.encrypted }));
    },
    async rollBackOrphans(known, fresh, log) {
      await rollBackOrphans(client, vm.name, new Set(known), fresh, log);
    },
    async encrypt(p) {
      await encryptDisk({
        qmpSocket: socket,
        client,
        device: p.disk.label,
        target: p.target,
        keyFile: p.keyFile,
        format: p.format,
        ...(p.encrypter !== undefined ? { encrypter: p.encrypter } : {}),
        speed: p.speed,
        iterTimeMs: p.iterTimeMs,
        logger: p.logger,
        runStore: store,
        detach: p.detach,
        moderation: { policy$: p.policy$, shared: { samples$: p.samples$, vm }, ...(p.wrapJob ? { wrapJob: p.wrapJob } : {}) },
        metrics: p.metrics,
        onPhase: (ph) => {
          if (ph === 'creating-target' || ph === 'copying' || ph === 'completing') p.onPhase(ph);
        },
        onProgress: p.onProgress,
        onNote: p.onNote,
      });
    },
  };
}

function libvirtSession(vm: VmInfo & { name: string }, client: LibvirtClient, store: ReturnType<typeof libvirtRunStore>, pause: () => LibvirtPauseMode): VmSession {
  return {
    vm,
    backend: 'libvirt',
    get live() {
      return client.closedReason === undefined;
    },
    async disks() {
      return (await client.disks(vm.name))
        .filter((d) => d.target !== null && d.device === 'disk' && d.source !== null)
        .map((d) => ({ label: d.target!, ids: [d.target!], file: d.source!, encrypted: d.encryption !== null }));
    },
    async rollBackOrphans() {
      // A copy libvirt runs into a file no record names is not known to be ours: left alone.
    },
    async encrypt(p) {
      if (p.encrypter !== undefined && p.encrypter !== 'qemu') {
        throw new IdlecryptError('USAGE', `encrypter: ${p.encrypter} needs the qmp backend: through libvirt, libvirt makes the copy and QEMU encrypts`);
      }
      await encryptDomainDisk({
        client,
        domain: vm.name,
        disk: p.disk.label,
        target: p.target,
        keyFile: p.keyFile,
        format: p.format,
        speed: p.speed,
        iterTimeMs: p.iterTimeMs,
        logger: p.logger,
        runStore: store,
        pause: pause(),
        detach: p.detach,
        moderation: { policy$: p.policy$, shared: { samples$: p.samples$, vm }, ...(p.wrapJob ? { wrapJob: p.wrapJob } : {}) },
        metrics: p.metrics,
        onPhase: (ph) => {
          if (ph === 'creating-target' || ph === 'copying' || ph === 'completing') p.onPhase(ph);
        },
        onProgress: p.onProgress,
        onNote: p.onNote,
      });
    },
  };
}
