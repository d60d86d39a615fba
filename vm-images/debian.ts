/**
 * The Debian 12 test guest (vm-images/debian/build.sh): systemd, PostgreSQL 15 and fio on
 * an ext4 filesystem that fills its one virtio disk, booted under TCG with the same kernel
 * as the busybox guest. Tests and benchmarks drive it through its agent on a virtio-serial
 * port, so they need no network:
 *
 *   const g = await startDebianVm({ name: 'pg', disk: await copyDebianDisk(dir) });
 *   await g.vm.ready;                          // the agent is up and PostgreSQL accepts connections
 *   const r = await g.agent.run('sudo -u postgres pgbench -i -s 5');
 *   // r.code, r.lines
 *   await g.agent.run('systemctl poweroff').catch(() => {}); await g.vm.exited;
 *
 * The guest's serial console (boot messages, the agent's own `IDLECRYPT-AGENT` lines) is
 * the TestVm's `lines`; the agent's protocol is in vm-images/debian/README.md.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startTestVm, type DiskFormat, type TestVm } from './launch.ts';

const execFileP = promisify(execFile);

/** vm-images/out/debian: a symlink, made by build.sh, to the cached image's directory. */
export const DEBIAN_LINK: string = resolve(dirname(fileURLToPath(import.meta.url)), 'out', 'debian');

export interface DebianImage {
  readonly dir: string;
  /** The pristine disk (raw, sparse): never booted; copy it (copyDebianDisk). */
  readonly disk: string;
  readonly kernel: string;
  readonly initrd: string;
  /** The kernel command line the image was built for (build.sh writes it beside the image). */
  readonly cmdline: string;
}

/** The built image, or an error that says how to build it. */
export function debianImage(): DebianImage {
  const dir = DEBIAN_LINK;
  const files = { disk: join(dir, 'debian.raw'), kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initrd.img'), cmdline: join(dir, 'cmdline') };
  const missing = Object.values(files).filter((p) => !existsSync(p));
  if (missing.length > 0) throw new Error(`Debian test guest missing: run npm run setup (no ${missing.join(', ')})`);
  return { dir, disk: files.disk, kernel: files.kernel, initrd: files.initrd, cmdline: readFileSync(files.cmdline, 'utf8').trim() };
}

/** The image's recipe hash and package versions, as build.sh recorded them. */
export function debianManifest(): string {
  return readFileSync(join(debianImage().dir, 'manifest.txt'), 'utf8');
}

/** A private, sparse copy of the pristine disk at `dir`/`name` (the guest writes to its disk). */
export async function copyDebianDisk(dir: string, name = 'debian.raw'): Promise<string> {
  const out = join(dir, name);
  await execFileP('cp', ['--sparse=always', '--reflink=auto', debianImage().disk, out]);
  return out;
}

export interface DebianVmOptions {
  name: string;
  /** A copy of the image's disk (copyDebianDisk), or the LUKS image idlecrypt made of it. */
  disk: string;
  format?: DiskFormat;
  /** With a LUKS disk: its passphrase file. */
  keyFile?: string;
  /** Default 'none' (O_DIRECT), as production hosts commonly run their disks. */
  cache?: 'writeback' | 'none';
  /** Default 1024. */
  memoryMiB?: number;
  /** Default 180 s: systemd and PostgreSQL under TCG. */
  readyTimeoutMs?: number;
}

export interface DebianVm {
  readonly vm: TestVm;
  readonly agent: GuestAgent;
  /** Stops QEMU (SIGTERM, then SIGKILL) and removes the run directory. */
  stop(): Promise<void>;
}

const AGENT_PORT = 'org.idlecrypt.ctl';

/** Boots the Debian guest; `vm.ready` resolves when its agent says READY on the console. */
export async function startDebianVm(o: DebianVmOptions): Promise<DebianVm> {
  const img = debianImage();
  const dir = await mkdtemp(join(tmpdir(), 'idlecrypt-deb-'));
  const sock = join(dir, 'agent.sock');
  let vm: TestVm;
  try {
    vm = await startTestVm({
      name: o.name,
      disk: o.disk,
      ...(o.format ? { format: o.format } : {}),
      ...(o.keyFile ? { keyFile: o.keyFile } : {}),
      cache: o.cache ?? 'none',
      memoryMiB: o.memoryMiB ?? 1024,
      dir,
      input: true,
      boot: {
        kernel: img.kernel,
        initrd: img.initrd,
        append: img.cmdline,
        ready: /IDLECRYPT-AGENT READY/,
        error: /IDLECRYPT-AGENT ERROR/,
        readyTimeoutMs: o.readyTimeoutMs ?? 180_000,
        extraArgs: [
          '-device', 'virtio-serial-pci,id=serial1',
          '-chardev', `socket,id=agent0,path=${sock.replaceAll(',', ',,')},server=on,wait=off`,
          '-device', `virtserialport,chardev=agent0,name=${AGENT_PORT}`,
        ],
      },
    });
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
  const agent = new GuestAgent(sock, o.name);
  await agent.connect();
  const stop = async () => {
    agent.close();
    await vm.stop();
    await rm(dir, { recursive: true, force: true });
  };
  return { vm, agent, stop };
}

export interface RunResult {
  readonly code: number;
  /** The command's stdout and stderr, merged, one entry per line. */
  readonly lines: readonly string[];
}

/** A command that exited non-zero, with what it printed. */
export class GuestCommandError extends Error {
  constructor(
    readonly command: string,
    readonly result: RunResult,
  ) {
    super(`guest command failed (exit ${result.code}): ${command}\n${result.lines.slice(-20).join('\n')}`);
  }
}

interface Pending {
  readonly command: string;
  readonly lines: string[];
  readonly resolve: (r: RunResult) => void;
  readonly reject: (e: Error) => void;
  readonly onLine?: (line: string) => void;
}

/**
 * The host's end of the guest agent: `RUN <id> <base64 command>` out, `OUT <id> <line>` and
 * `DONE <id> <code>` back. Commands run concurrently in the guest, as root.
 */
export class GuestAgent {
  #socket: Socket | undefined;
  #partial = '';
  #nextId = 1;
  #pending = new Map<string, Pending>();
  #closed = false;
  #ready: Promise<void> | undefined;
  #readyResolve: (() => void) | undefined;

  constructor(
    readonly path: string,
    readonly name: string,
  ) {}

  /** Connects (QEMU's chardev serves the socket from its start); retries for 15 s. */
  async connect(): Promise<void> {
    this.#ready = new Promise<void>((res) => {
      this.#readyResolve = res;
    });
    const deadline = Date.now() + 15_000;
    for (;;) {
      const s = await new Promise<Socket | undefined>((res) => {
        const c = connect(this.path);
        c.once('connect', () => res(c));
        c.once('error', () => res(undefined));
      });
      if (s) {
        this.#socket = s;
        break;
      }
      if (Date.now() > deadline) throw new Error(`guest ${this.name}: no agent socket at ${this.path}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const s = this.#socket;
    s.setEncoding('utf8');
    s.on('data', (chunk: string) => {
      const parts = (this.#partial + chunk).split('\n');
      this.#partial = parts.pop() ?? '';
      for (const p of parts) this.#onLine(p.replace(/\r$/, ''));
    });
    s.on('error', () => {});
    s.on('close', () => {
      this.#closed = true;
      this.#fail(new Error(`guest ${this.name}: the agent's connection closed`));
    });
  }

  /** Resolves when the agent has said READY on its port. */
  get ready(): Promise<void> {
    return this.#ready ?? Promise.reject(new Error('not connected'));
  }

  /** Runs `command` (bash) in the guest; rejects with GuestCommandError on a non-zero exit unless `allowFail`. */
  async run(command: string, opts: { allowFail?: boolean; onLine?: (line: string) => void; timeoutMs?: number } = {}): Promise<RunResult> {
    if (this.#closed || !this.#socket) throw new Error(`guest ${this.name}: the agent's connection closed`);
    const id = String(this.#nextId++);
    const result = await new Promise<RunResult>((resolve, reject) => {
      const timer = opts.timeoutMs
        ? setTimeout(() => {
            this.#pending.delete(id);
            reject(new Error(`guest ${this.name}: no answer to '${command}' within ${opts.timeoutMs} ms`));
          }, opts.timeoutMs)
        : undefined;
      const done = <T>(f: (x: T) => void) => (x: T) => {
        clearTimeout(timer);
        f(x);
      };
      this.#pending.set(id, { command, lines: [], resolve: done(resolve), reject: done(reject), ...(opts.onLine ? { onLine: opts.onLine } : {}) });
      this.#socket!.write(`RUN ${id} ${Buffer.from(command).toString('base64')}\n`);
    });
    if (result.code !== 0 && !opts.allowFail) throw new GuestCommandError(command, result);
    return result;
  }

  close(): void {
    this.#closed = true;
    this.#socket?.destroy();
    this.#fail(new Error(`guest ${this.name}: agent closed`));
  }

  #onLine(line: string): void {
    const m = /^(\S+)(?: (\S+))?(?: (.*))?$/.exec(line);
    if (!m) return;
    const [, verb, id, rest] = m;
    if (verb === 'READY') {
      this.#readyResolve?.();
      return;
    }
    const p = id === undefined ? undefined : this.#pending.get(id);
    if (!p) return;
    if (verb === 'OUT') {
      p.lines.push(rest ?? '');
      p.onLine?.(rest ?? '');
    } else if (verb === 'DONE') {
      this.#pending.delete(id!);
      p.resolve({ code: Number(rest), lines: p.lines });
    } else if (verb === 'ERR') {
      this.#pending.delete(id!);
      p.reject(new Error(`guest ${this.name}: the agent refused '${p.command}': ${rest ?? ''}`));
    }
  }

  #fail(e: Error): void {
    for (const p of this.#pending.values()) p.reject(e);
    this.#pending.clear();
  }
}
