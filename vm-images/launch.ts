/**
 * Boots the idlecrypt test guest (vm-images/out/vmlinuz + initrd.img, built by
 * vm-images/build.sh) under QEMU for tests, the demo and benchmarks, and makes the test
 * disk images it runs on.
 *
 *   const vm = await startTestVm({ name: 't1', disk: '/tmp/d.qcow2', workload: 'writer' });
 *   await vm.ready;                       // 'IDLECRYPT-GUEST READY ...' seen on the serial
 *   // ... drive idlecrypt against vm.toolQmpSocket, watch vm.lines$ ...
 *   await vm.stop();
 *
 * The guest's serial console is QEMU's stdout (`-chardev stdio`): every line it prints
 * arrives here, \r stripped, in `lines`, `lines$` and the file `serialLog`. The formats of
 * those lines are in vm-images/README.md; parseGuestLine() reads them.
 *
 * Two QMP monitors: `qmpSocket` for the harness, `toolQmpSocket` for idlecrypt under test.
 * A QMP socket serves one client at a time (a second one gets no greeting until the first
 * leaves), so the two users must not share one.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Observable, Subject } from 'rxjs';

const execFileP = promisify(execFile);

export type Workload = 'idle' | 'disk' | 'bursty' | 'writer' | 'trickle';

export interface TestVmOptions {
  /** QEMU `-name guest=<name>`. */
  name: string;
  /** Disk image path. The launcher never copies or deletes it. */
  disk: string;
  /** Default: the format `qemu-img info` reports. 'luks' needs `keyFile`. */
  format?: DiskFormat;
  /**
   * The passphrase file of a LUKS image (an image idlecrypt encrypted), given to QEMU as
   * `-object secret,file=` (never on its command line). Only with the first disk.
   */
  keyFile?: string;
  /**
   * 'blockdev' (default): `-blockdev` file node `disk0-file` + format node `disk0-fmt` +
   * `-device virtio-blk-pci,drive=disk0-fmt,id=disk0`.
   * 'drive': `-drive file=..,format=..,if=none,id=drive0` +
   * `-device virtio-blk-pci,drive=drive0,id=disk0` (QEMU names the nodes itself).
   */
  diskStyle?: 'blockdev' | 'drive';
  /**
   * Host cache mode of the disk, as `-drive cache=`: default 'writeback' (QEMU's default).
   * With 'blockdev' it is set on the file node only, which is where it takes effect.
   */
  cache?: 'writeback' | 'none' | 'unsafe';
  /**
   * More disks, untouched by the guest's workload (which uses vda): each as `-blockdev`
   * nodes `diskN-file` / `diskN-fmt` and `-device virtio-blk-pci,id=diskN` (N = 1, 2, ...),
   * raw or qcow2 by `qemu-img info`, with the same cache mode as the first.
   */
  extraDisks?: readonly string[];
  /** Default 'idle'. */
  workload?: Workload;
  /** Appended to the kernel command line as idlecrypt.<k>=<v>. */
  params?: Record<string, string | number>;
  /** Default 256. */
  memoryMiB?: number;
  /**
   * Where the QMP sockets and the serial log go. Default: a fresh directory under
   * os.tmpdir(), which stop() removes again (a directory you pass is left in place).
   */
  dir?: string;
  /** Default 'tcg' (KVM does not boot guests on the project's machines). */
  accel?: 'tcg' | 'kvm';
  /**
   * Default true: a virtio keyboard (id `keyboard0`) and a virtio tablet (id `tablet0`),
   * driven by the guest's virtio_input driver, so QMP `input-send-event` key and absolute
   * pointer events have targets. The pc machine's built-in i8042 (PS/2 keyboard and
   * mouse) stays present either way, even with -nodefaults.
   */
  input?: boolean;
  /**
   * Another guest than the busybox test guest (vm-images/debian.ts): its kernel, initramfs,
   * command line, the serial line that means it is ready (and one that means it failed), and
   * more QEMU arguments. `workload` and `params` are the busybox guest's and are refused
   * with it.
   */
  boot?: GuestBoot;
  /** More QEMU arguments, last (an iothread for the disks: `-object iothread,id=io0 -global virtio-blk-pci.iothread=io0`). */
  qemuArgs?: readonly string[];
}

export type DiskFormat = 'raw' | 'qcow2' | 'luks';

export interface GuestBoot {
  readonly kernel: string;
  readonly initrd: string;
  readonly append: string;
  /** A serial line matching this resolves `ready`. */
  readonly ready: RegExp;
  /** A serial line matching this rejects `ready`. */
  readonly error?: RegExp;
  /** Default 60 s. */
  readonly readyTimeoutMs?: number;
  readonly extraArgs?: readonly string[];
}

export interface TestVm {
  readonly pid: number;
  readonly name: string;
  readonly dir: string;
  /** For the harness or test itself. */
  readonly qmpSocket: string;
  /** A second monitor, for idlecrypt under test. */
  readonly toolQmpSocket: string;
  /** A file with every serial line (written as lines arrive; complete once `exited` settles). */
  readonly serialLog: string;
  /** Serial lines so far, \r stripped. */
  readonly lines: string[];
  /** Serial lines as they arrive (hot: no replay); completes when QEMU exits. */
  readonly lines$: Observable<string>;
  /** QEMU's command line, for error messages and the curious. */
  readonly argv: readonly string[];
  /** QEMU's stderr so far (first 64 KiB). */
  readonly stderr: string;
  /** Resolves with the first matching line, including lines already received. */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  /** Resolves at the ready line ('IDLECRYPT-GUEST READY', or boot.ready); rejects if QEMU exits or the guest reports an error first, or after 60 s (boot.readyTimeoutMs). */
  readonly ready: Promise<void>;
  /** QEMU's exit code (null if a signal killed it), once it has exited and the log is flushed. */
  readonly exited: Promise<number | null>;
  /** SIGTERM, SIGKILL after 5 s; idempotent; resolves once QEMU has exited. */
  stop(): Promise<void>;
}

/** Absolute path of vm-images/out. */
export const IMAGE_DIR: string = resolve(dirname(fileURLToPath(import.meta.url)), 'out');
export const KERNEL_PATH: string = join(IMAGE_DIR, 'vmlinuz');
export const INITRD_PATH: string = join(IMAGE_DIR, 'initrd.img');

const QEMU = 'qemu-system-x86_64';
const READY_TIMEOUT_MS = 60_000;
const QMP_TIMEOUT_MS = 15_000;
const STOP_GRACE_MS = 5_000;
const DEFAULT_WAIT_MS = 30_000;
const STDERR_LIMIT = 64 * 1024;
/** sun_path is 108 bytes including the NUL. */
const MAX_SOCKET_PATH = 107;

/** Throws if the guest image has not been built. */
export function ensureImage(): void {
  const missing = [KERNEL_PATH, INITRD_PATH].filter((p) => !existsSync(p));
  if (missing.length > 0) {
    throw new Error(`test guest image missing: run npm run setup (no ${missing.join(', ')})`);
  }
}

/** A failure to start or boot a test VM, with what QEMU and the guest said. */
export class TestVmError extends Error {
  constructor(
    message: string,
    readonly stderr: string,
    readonly lastLines: readonly string[],
    readonly argv: readonly string[],
  ) {
    super(
      `${message}` +
        (stderr.trim() ? `\n--- qemu stderr ---\n${stderr.trimEnd()}` : '') +
        (lastLines.length ? `\n--- last serial lines ---\n${lastLines.join('\n')}` : ''),
    );
    this.name = 'TestVmError';
  }
}

// QEMUs still running when this process exits get SIGKILL. (When the process dies without
// running exit handlers, setpriv's parent-death signal below does the job.)
const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function track(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of live) c.kill('SIGKILL');
    });
  }
  live.add(child);
}

/** QEMU's option syntax: a comma inside a value is written twice. */
function optValue(s: string): string {
  return s.replaceAll(',', ',,');
}

const PARAM_KEY = /^[a-z0-9_]+$/;
const PARAM_VALUE = /^[!-~]+$/; // printable ASCII, no spaces: one kernel command-line word

export function kernelCommandLine(workload: Workload, params: Record<string, string | number>): string {
  const words = ['console=ttyS0', 'quiet', 'panic=1', `idlecrypt.workload=${workload}`];
  for (const [key, raw] of Object.entries(params)) {
    const value = String(raw);
    if (!PARAM_KEY.test(key) || key === 'workload') {
      throw new Error(`bad guest parameter name '${key}' (use [a-z0-9_], and the workload option for the workload)`);
    }
    if (!PARAM_VALUE.test(value) || value.includes('"')) {
      throw new Error(`bad value for guest parameter ${key}: '${value}'`);
    }
    words.push(`idlecrypt.${key}=${value}`);
  }
  return words.join(' ');
}

async function detectFormat(disk: string): Promise<DiskFormat> {
  // -U: read the header even if another QEMU holds the image's lock.
  const { stdout } = await execFileP('qemu-img', ['info', '-U', '--output=json', disk]);
  const format = (JSON.parse(stdout) as { format?: unknown }).format;
  if (format !== 'raw' && format !== 'qcow2' && format !== 'luks') {
    throw new Error(`${disk}: unsupported image format ${String(format)} (want raw, qcow2 or luks)`);
  }
  return format;
}

function diskArgs(disk: string, format: DiskFormat, style: 'blockdev' | 'drive', cache: 'writeback' | 'none' | 'unsafe', n = 0, keyFile?: string): string[] {
  if (style === 'blockdev') {
    const cacheOpts = { direct: cache === 'none', 'no-flush': cache === 'unsafe' };
    const secret = format === 'luks' ? ['-object', `secret,id=disk${n}-key,format=raw,file=${optValue(keyFile!)}`] : [];
    const key = format === 'luks' ? { 'key-secret': `disk${n}-key` } : {};
    // JSON syntax: no comma escaping needed for the file name.
    return [
      ...secret,
      '-blockdev', JSON.stringify({ driver: 'file', filename: disk, 'node-name': `disk${n}-file`, cache: cacheOpts }),
      '-blockdev', JSON.stringify({ driver: format, file: `disk${n}-file`, 'node-name': `disk${n}-fmt`, ...key }),
      '-device', `virtio-blk-pci,drive=disk${n}-fmt,id=disk${n}`,
    ];
  }
  return [
    '-drive', `file=${optValue(disk)},format=${format},if=none,id=drive0,cache=${cache}`,
    '-device', 'virtio-blk-pci,drive=drive0,id=disk0',
  ];
}

/** Resolves once something accepts connections on the unix socket `path`. */
async function waitForSocket(path: string, deadline: number, alive: () => boolean): Promise<void> {
  for (;;) {
    const ok = await new Promise<boolean>((res) => {
      const s = connect(path);
      s.once('connect', () => {
        // Leave at once: QMP greets only one client at a time.
        s.destroy();
        res(true);
      });
      s.once('error', () => res(false));
    });
    if (ok) return;
    if (!alive()) throw new Error('QEMU exited');
    if (Date.now() > deadline) throw new Error(`no QMP server on ${path}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Boots a test VM; resolves once both QMP sockets accept connections (the guest is still booting: await `ready`). */
export async function startTestVm(options: TestVmOptions): Promise<TestVm> {
  const boot = options.boot;
  if (boot && (options.workload !== undefined || options.params !== undefined)) {
    throw new Error('workload and params are the busybox test guest\'s: not with boot');
  }
  if (!boot) ensureImage();
  const cmdline = boot ? boot.append : kernelCommandLine(options.workload ?? 'idle', options.params ?? {});
  const readyLine = boot ? boot.ready : /^IDLECRYPT-GUEST READY/;
  const errorLine = boot ? boot.error : /^IDLECRYPT-GUEST ERROR/;
  const readyTimeoutMs = boot?.readyTimeoutMs ?? READY_TIMEOUT_MS;
  const format = options.format ?? (await detectFormat(options.disk));
  if (format === 'luks' && (options.keyFile === undefined || (options.diskStyle ?? 'blockdev') !== 'blockdev')) {
    throw new Error(`${options.disk}: a LUKS disk needs a keyFile and diskStyle 'blockdev'`);
  }
  const extra = await Promise.all(
    (options.extraDisks ?? []).map(async (p) => {
      const f = await detectFormat(p);
      if (f === 'luks') throw new Error(`${p}: an extra disk must be raw or qcow2`);
      return { path: p, format: f };
    }),
  );
  const memoryMiB = options.memoryMiB ?? 256;
  const ownDir = options.dir === undefined;
  const dir = ownDir ? await mkdtemp(join(tmpdir(), 'idlecrypt-vm-')) : resolve(options.dir!);
  if (!ownDir) await mkdir(dir, { recursive: true });
  const qmpSocket = join(dir, 'qmp.sock');
  const toolQmpSocket = join(dir, 'tool-qmp.sock');
  const serialLog = join(dir, 'serial.log');
  const cleanupDir = async () => {
    if (ownDir) await rm(dir, { recursive: true, force: true });
  };

  if (toolQmpSocket.length > MAX_SOCKET_PATH) {
    await cleanupDir();
    throw new Error(`socket path too long for a unix socket (${toolQmpSocket.length} > ${MAX_SOCKET_PATH}): use a shorter dir`);
  }
  await rm(qmpSocket, { force: true });
  await rm(toolQmpSocket, { force: true });

  const argv = [
    '-name', `guest=${optValue(options.name)}`,
    '-accel', options.accel ?? 'tcg',
    '-machine', 'pc',
    '-m', String(memoryMiB),
    '-smp', '1',
    '-nodefaults',
    '-display', 'none',
    '-no-reboot', // guest poweroff, reboot or panic (panic=1) ends QEMU
    // signal=off: a ^C in our stdin (there is none; it is a pipe) must not kill QEMU.
    '-chardev', 'stdio,id=serial0,signal=off',
    '-serial', 'chardev:serial0',
    '-qmp', `unix:${optValue(qmpSocket)},server=on,wait=off`,
    '-qmp', `unix:${optValue(toolQmpSocket)},server=on,wait=off`,
    '-kernel', boot?.kernel ?? KERNEL_PATH,
    '-initrd', boot?.initrd ?? INITRD_PATH,
    '-append', cmdline,
    ...diskArgs(options.disk, format, options.diskStyle ?? 'blockdev', options.cache ?? 'writeback', 0, options.keyFile),
    ...extra.flatMap((d, i) => diskArgs(d.path, d.format, 'blockdev', options.cache ?? 'writeback', i + 1)),
    ...(options.input ?? true
      ? ['-device', 'virtio-keyboard-pci,id=keyboard0', '-device', 'virtio-tablet-pci,id=tablet0']
      : []),
    ...(boot?.extraArgs ?? []),
    ...(options.qemuArgs ?? []),
  ];

  // setpriv --pdeathsig: QEMU gets SIGTERM if this process dies without stopping it
  // (a crashed or killed test runner), so no guest outlives its test. The pid stays
  // QEMU's: setpriv execs it.
  const viaSetpriv = existsSync('/usr/bin/setpriv');
  const child = viaSetpriv
    ? spawn('/usr/bin/setpriv', ['--pdeathsig', 'TERM', '--', QEMU, ...argv], { stdio: ['pipe', 'pipe', 'pipe'] })
    : spawn(QEMU, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
  track(child);

  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (s: string) => {
    if (stderr.length < STDERR_LIMIT) stderr += s.slice(0, STDERR_LIMIT - stderr.length);
  });

  const lines: string[] = [];
  const subject = new Subject<string>();
  const log = createWriteStream(serialLog, { flags: 'w' });
  const lastLines = () => lines.slice(-20);

  let spawnError: Error | undefined;
  let running = true;
  let exitCode: number | null = null;
  let exitSignal: NodeJS.Signals | null = null;

  let resolveReady!: () => void;
  let rejectReady!: (e: Error) => void;
  const ready = new Promise<void>((res, rej) => {
    resolveReady = res;
    rejectReady = rej;
  });
  ready.catch(() => {}); // nobody has to await it
  const readyTimer = setTimeout(
    () => rejectReady(new TestVmError(`guest ${options.name} not ready after ${readyTimeoutMs / 1000} s`, stderr, lastLines(), argv)),
    readyTimeoutMs,
  );
  readyTimer.unref();
  void ready.then(
    () => clearTimeout(readyTimer),
    () => clearTimeout(readyTimer),
  );

  const onLine = (line: string) => {
    lines.push(line);
    log.write(line + '\n');
    if (readyLine.test(line)) resolveReady();
    else if (errorLine?.test(line)) {
      rejectReady(new TestVmError(`guest ${options.name} failed to start: ${line}`, stderr, lastLines(), argv));
    }
    subject.next(line);
  };

  let partial = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    for (const p of parts) onLine(p.replaceAll('\r', ''));
  });

  const exited = new Promise<number | null>((res) => {
    child.once('error', (e) => {
      spawnError = e;
    });
    child.once('close', (code, signal) => {
      running = false;
      live.delete(child);
      exitCode = code;
      exitSignal = signal;
      const rest = partial.replaceAll('\r', '');
      partial = '';
      if (rest) onLine(rest);
      const how = spawnError ? `could not run ${QEMU}: ${spawnError.message}` : `QEMU exited (code ${code}, signal ${signal})`;
      rejectReady(new TestVmError(`guest ${options.name} not ready: ${how}`, stderr, lastLines(), argv));
      subject.complete();
      log.end(() => res(code));
    });
  });

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      if (running) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
        await exited;
        clearTimeout(timer);
      } else {
        await exited;
      }
      await cleanupDir();
    })();
    return stopping;
  };

  try {
    const deadline = Date.now() + QMP_TIMEOUT_MS;
    await waitForSocket(qmpSocket, deadline, () => running);
    await waitForSocket(toolQmpSocket, deadline, () => running);
  } catch (e) {
    await stop();
    const why = spawnError
      ? `could not run ${QEMU}: ${spawnError.message}`
      : !running
        ? `QEMU exited during startup (code ${exitCode}, signal ${exitSignal})`
        : (e as Error).message;
    throw new TestVmError(`test VM ${options.name}: ${why}`, stderr, lastLines(), argv);
  }

  const waitForLine = (pattern: RegExp, timeoutMs = DEFAULT_WAIT_MS): Promise<RegExpMatchArray> => {
    // A global or sticky RegExp keeps state between matches; use a plain copy.
    const re = new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ''));
    for (const l of lines) {
      const m = l.match(re);
      if (m) return Promise.resolve(m);
    }
    return new Promise<RegExpMatchArray>((res, rej) => {
      const timer = setTimeout(() => {
        sub.unsubscribe();
        rej(new TestVmError(`guest ${options.name}: no line matching ${re} within ${timeoutMs} ms`, stderr, lastLines(), argv));
      }, timeoutMs);
      const sub = subject.subscribe({
        next: (l) => {
          const m = l.match(re);
          if (m) {
            clearTimeout(timer);
            sub.unsubscribe();
            res(m);
          }
        },
        complete: () => {
          clearTimeout(timer);
          rej(new TestVmError(`guest ${options.name}: QEMU exited before a line matching ${re}`, stderr, lastLines(), argv));
        },
      });
    });
  };

  return {
    pid: child.pid!,
    name: options.name,
    dir,
    qmpSocket,
    toolQmpSocket,
    serialLog,
    lines,
    lines$: subject.asObservable(),
    argv,
    get stderr() {
      return stderr;
    },
    waitForLine,
    ready,
    exited,
    stop,
  };
}

// --- disk images ----------------------------------------------------------------------

const MiB = 1024 * 1024;
/** Bytes in one unit of the data pattern: `IDLECRYPT-DATA mib=00000042` + 4 spaces + '\n'. */
export const PATTERN_UNIT_BYTES = 32;

/** The 1 MiB that makeDiskImage(fill: 'pattern') puts at MiB number `mib`. */
export function patternMiB(mib: number): Buffer {
  const unit = `IDLECRYPT-DATA mib=${String(mib).padStart(8, '0')}    \n`;
  if (unit.length !== PATTERN_UNIT_BYTES) throw new Error(`mib ${mib} too large for the pattern`);
  return Buffer.alloc(MiB, unit, 'latin1');
}

/**
 * Creates a test disk image at `path`, refusing to overwrite anything there.
 * fill 'sparse': all zeros, nothing allocated (raw: a hole; qcow2: no clusters).
 * fill 'pattern': MiB n is the 32-byte line `IDLECRYPT-DATA mib=<n, 8 digits>    \n`
 * repeated, so every 512-byte sector holds readable plaintext and says where it came from
 * (see patternMiB); fully allocated. With `dataMiB`, the pattern fills only the first
 * dataMiB and the rest is unallocated (a thin disk holding data).
 */
export async function makeDiskImage(
  path: string,
  opts: { sizeMiB: number; format: 'raw' | 'qcow2'; fill: 'sparse' | 'pattern'; dataMiB?: number },
): Promise<void> {
  const { sizeMiB, format, fill } = opts;
  if (!Number.isInteger(sizeMiB) || sizeMiB < 1) throw new Error(`sizeMiB must be a positive integer, not ${sizeMiB}`);
  const dataMiB = Math.min(sizeMiB, opts.dataMiB ?? sizeMiB);
  // Claim the path first ('wx' fails if it exists), so we never clobber someone's file.
  let fh: FileHandle;
  try {
    fh = await open(path, 'wx', 0o644);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new Error(`makeDiskImage: refusing to overwrite ${path}`);
    throw e;
  }
  let tmp: string | undefined;
  try {
    if (format === 'raw') {
      if (fill === 'pattern') for (let i = 0; i < dataMiB; i++) await fh.write(patternMiB(i), 0, MiB, i * MiB);
      await fh.truncate(sizeMiB * MiB);
      await fh.close();
      return;
    }
    await fh.close();
    if (fill === 'sparse') {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', path, `${sizeMiB}M`]);
      return;
    }
    // qcow2 with data: write the raw pattern beside it, then convert into the claimed path.
    tmp = `${path}.tmp-${process.pid}.raw`;
    const th = await open(tmp, 'wx', 0o600);
    try {
      for (let i = 0; i < dataMiB; i++) await th.write(patternMiB(i), 0, MiB, i * MiB);
      await th.truncate(sizeMiB * MiB);
    } finally {
      await th.close();
    }
    await execFileP('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', tmp, path]);
  } catch (e) {
    await fh.close().catch(() => {});
    await rm(path, { force: true });
    throw e;
  } finally {
    if (tmp) await rm(tmp, { force: true });
  }
}

// --- the writer workload, host side -----------------------------------------------------

export const WRITER_BLOCK_BYTES = 4096;
const WRITER_PAD = '0123456789abcdef';

/** Byte offset of writer block `seq` on a disk of `diskBytes` (same as writer_offset in guest/workloads.sh). */
export function writerOffset(seq: number, diskBytes: number): number {
  let t = seq;
  if (t % 4 === 3) {
    t = Math.floor(t / 2);
    if (t % 4 === 3) t -= 1;
  }
  let h = Number((BigInt(t + 1) * 2654435761n) & 0xffffffffn);
  h = (h ^ (h >>> 16)) >>> 0;
  return (h % Math.floor(diskBytes / WRITER_BLOCK_BYTES)) * WRITER_BLOCK_BYTES;
}

/** The 4096 bytes the writer workload writes as block `seq` at `off`. */
export function writerBlock(seq: number, off: number): Buffer {
  const text = `IDLECRYPT-BLOCK seq=${seq} off=${off}\n` + WRITER_PAD.repeat(WRITER_BLOCK_BYTES / WRITER_PAD.length);
  return Buffer.from(text.slice(0, WRITER_BLOCK_BYTES), 'latin1');
}

/** From serial lines, each offset the writer reported with the last seq written there. */
export function latestWrites(lines: Iterable<string>): Map<number, number> {
  const latest = new Map<number, number>();
  for (const line of lines) {
    const r = parseGuestLine(line);
    if (r?.kind === 'wrote' && (latest.get(r.off) ?? -1) < r.seq) latest.set(r.off, r.seq);
  }
  return latest;
}

// --- serial records ---------------------------------------------------------------------

export type GuestRecord =
  | { kind: 'ready'; workload: string; diskBytes: number }
  | { kind: 'io'; t: number; rd: number; wr: number; ms: number }
  | { kind: 'phase'; phase: 'idle' | 'busy'; t: number }
  | { kind: 'wrote'; seq: number; off: number }
  | { kind: 'writer-done'; count: number; t: number }
  | { kind: 'bursty-done'; cycles: number; t: number }
  | { kind: 'config'; fields: Record<string, string> }
  | { kind: 'error'; fields: Record<string, string> };

const RECORDS: [RegExp, (m: RegExpMatchArray) => GuestRecord][] = [
  [/^IDLECRYPT-GUEST READY workload=(\w+) disk_bytes=(\d+)$/, (m) => ({ kind: 'ready', workload: m[1]!, diskBytes: Number(m[2]) })],
  [/^IO t=(\d+) rd=(\d+) wr=(\d+) ms=(\d+)$/, (m) => ({ kind: 'io', t: Number(m[1]), rd: Number(m[2]), wr: Number(m[3]), ms: Number(m[4]) })],
  [/^PHASE (idle|busy) t=(\d+)$/, (m) => ({ kind: 'phase', phase: m[1] as 'idle' | 'busy', t: Number(m[2]) })],
  [/^WROTE seq=(\d+) off=(\d+)$/, (m) => ({ kind: 'wrote', seq: Number(m[1]), off: Number(m[2]) })],
  [/^WRITER DONE count=(\d+) t=(\d+)$/, (m) => ({ kind: 'writer-done', count: Number(m[1]), t: Number(m[2]) })],
  [/^BURSTY DONE cycles=(\d+) t=(\d+)$/, (m) => ({ kind: 'bursty-done', cycles: Number(m[1]), t: Number(m[2]) })],
  [/^CONFIG (.*)$/, (m) => ({ kind: 'config', fields: keyValues(m[1]!) })],
  [/^(?:IDLECRYPT-GUEST )?ERROR (.*)$/, (m) => ({ kind: 'error', fields: keyValues(m[1]!) })],
];

function keyValues(s: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const word of s.split(' ')) {
    const eq = word.indexOf('=');
    if (eq > 0) out[word.slice(0, eq)] = word.slice(eq + 1);
  }
  return out;
}

/** Parses one serial line of the test guest; undefined for anything else (kernel messages). */
export function parseGuestLine(line: string): GuestRecord | undefined {
  for (const [re, make] of RECORDS) {
    const m = line.match(re);
    if (m) return make(m);
  }
  return undefined;
}
