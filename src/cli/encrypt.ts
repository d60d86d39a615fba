/** `idlecrypt encrypt`: mirror a running guest's disk into an encrypted image and pivot. */
import { Command, Option } from 'commander';
import { encryptDisk, type EncryptResult } from '../encrypt/encrypt.ts';
import { fmtBytes } from '../encrypt/preflight.ts';
import { FORMAT_CHOICES } from '../encrypt/target.ts';
import { ENCRYPTERS } from '../encrypt/storage-daemon.ts';
import { IdlecryptError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { openMetricsSink, parseInfluxUrl } from '../metrics/index.ts';
import type { MetricsSink } from '../metrics/sink.ts';
import { parseBytes, parseChoice, parsePositiveInt } from './options.ts';
import { barView, jsonView, plainView, type View } from './progress-view.ts';
import type { Progress } from '../encrypt/progress.ts';
import { encryptDomainDisk, type DomainEncryptResult } from '../libvirt/encrypt.ts';
import type { LibvirtPauseMode } from '../libvirt/copy-job.ts';

interface EncryptFlags {
  qmp?: string;
  device?: string;
  domain?: string;
  disk?: string;
  connect?: string;
  secret?: string;
  target: string;
  keyFile?: string;
  format: string;
  encrypter?: string;
  speed?: string;
  policy?: string;
  moderation: boolean;
  source: string;
  influx?: string;
  metricsFile?: string;
  iterTime: string;
  json?: boolean;
  pause?: string;
}

export function encryptCommand(): Command {
  return new Command('encrypt')
    .description("copy a running VM's disk into an encrypted (LUKS) image in the background and switch the guest onto it")
    .option('--qmp <socket>', "a VM run by hand: the path of its QMP unix socket (with --device)")
    .option('--device <id>', 'with --qmp, the disk: qdev id, drive name or node name')
    .option('--domain <name>', 'a libvirt domain (with --disk): the copy goes through libvirt, and its definition follows')
    .option('--disk <target>', "with --domain, the disk's target name, as virsh domblklist shows it (vda)")
    .option('--connect <uri>', 'with --domain, the libvirt URI', 'qemu:///system')
    .requiredOption('--target <path>', 'the encrypted image to create (must not exist, unless an earlier run into it died: then that run is resumed)')
    .option('--key-file <file>', 'file holding the passphrase; all bytes are the key, as cryptsetup --key-file')
    .option('--secret <uuid>', 'with --domain, instead of --key-file: an existing libvirt secret holding the passphrase (libvirt then makes the image)')
    .addOption(
      new Option('--pause <how>', "with --domain, how moderation pauses the copy: speed (1 byte/s through libvirt) or qemu (QEMU's job-pause through libvirt's monitor pass-through; libvirt then marks the domain tainted)").choices(['speed', 'qemu']),
    )
    .addOption(new Option('--format <format>', "the target's format: luks (raw LUKS, as cryptsetup), qcow2 (qcow2 with LUKS encryption: a thin disk stays thin), or auto (qcow2 for a qcow2 disk, else luks)").default('auto'))
    .addOption(
      new Option(
        '--encrypter <who>',
        "with --qmp, who encrypts: storage-daemon (default: a qemu-storage-daemon of idlecrypt's, which the VM's QEMU writes to over a private NBD socket until the switch, so that the VM's QEMU stays free to serve the guest; docs/starvation.md) or qemu (the VM's QEMU, in the main loop that serves the guest's disk). With --domain, libvirt makes the copy and QEMU encrypts",
      ),
    )
    .option('--policy <file>', 'moderation policy (YAML, hot-reloaded on change and SIGHUP); default: the shipped policy/default.yaml')
    .option('--speed <bytes/s>', 'no moderation: a fixed copy speed, bytes/s with optional K/M/G suffix; 0 = unlimited')
    .option('--no-moderation', 'no moderation: copy at full speed')
    .addOption(new Option('--source <source>', 'where guest activity comes from: auto (eBPF, else QMP blockstats), ebpf, qmp').default('auto'))
    .option('--iter-time <ms>', 'PBKDF time for the key slot, as cryptsetup --iter-time', '2000')
    .option('--influx <url>', 'send metrics to InfluxDB 1.x, e.g. http://127.0.0.1:8086/idlecrypt (host, port, database)')
    .option('--metrics-file <path>', 'without --influx: the line-protocol file for metrics (default ./idlecrypt-metrics/<vm>-<time>.lp)')
    .option('--json', 'one JSON object per line on stdout instead of a progress bar')
    .action(async (flags: EncryptFlags) => {
      await runEncrypt(flags);
    });
}

async function runEncrypt(flags: EncryptFlags): Promise<void> {
  const libvirt = flags.domain !== undefined;
  if (libvirt === (flags.qmp !== undefined)) throw new IdlecryptError('USAGE', 'name the VM: --qmp SOCKET --device ID, or --domain NAME --disk TARGET (libvirt)');
  if (libvirt && flags.disk === undefined) throw new IdlecryptError('USAGE', '--domain needs --disk (the target name, as virsh domblklist shows it)');
  if (libvirt && flags.device !== undefined) throw new IdlecryptError('USAGE', 'with --domain, name the disk with --disk (as virsh domblklist shows it), not --device');
  if (!libvirt && flags.device === undefined) throw new IdlecryptError('USAGE', '--qmp needs --device');
  if (!libvirt && flags.disk !== undefined) throw new IdlecryptError('USAGE', 'with --qmp, name the disk with --device');
  if (!libvirt && flags.secret !== undefined) throw new IdlecryptError('USAGE', '--secret names a libvirt secret: it goes with --domain');
  if (!libvirt && flags.pause !== undefined) throw new IdlecryptError('USAGE', '--pause chooses how a libvirt copy is paused: it goes with --domain (with --qmp the pause is always QEMU\'s)');
  if ((flags.keyFile === undefined) === (flags.secret === undefined)) {
    throw new IdlecryptError('USAGE', libvirt ? 'give the key as --key-file FILE or --secret UUID (one of them)' : 'give the key as --key-file FILE');
  }
  if (flags.secret !== undefined && !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(flags.secret)) {
    throw new IdlecryptError('USAGE', `--secret: '${flags.secret}' is not a UUID (virsh secret-list)`);
  }
  const device = (libvirt ? flags.disk : flags.device)!;
  const format = parseChoice('--format', flags.format, FORMAT_CHOICES);
  // Unsaid: the engine's default for the target's format (encryptDisk, defaultEncrypter).
  const encrypter = flags.encrypter === undefined ? undefined : parseChoice('--encrypter', flags.encrypter, ENCRYPTERS);
  if (libvirt && encrypter !== undefined && encrypter !== 'qemu') throw new IdlecryptError('USAGE', '--encrypter storage-daemon goes with --qmp: through libvirt, libvirt makes the copy and QEMU encrypts');
  if (flags.speed !== undefined && !flags.moderation) throw new IdlecryptError('USAGE', '--speed and --no-moderation: choose one');
  if (flags.policy !== undefined && (flags.speed !== undefined || !flags.moderation)) {
    throw new IdlecryptError('USAGE', `--policy moderates the copy; it cannot go with ${flags.speed !== undefined ? '--speed' : '--no-moderation'}`);
  }
  const source = parseChoice('--source', flags.source, ['auto', 'ebpf', 'qmp'] as const);
  const moderated = flags.moderation && flags.speed === undefined;
  const speed = flags.speed === undefined ? 0 : parseBytes('--speed', flags.speed);
  const iterTimeMs = parsePositiveInt('--iter-time', flags.iterTime, 10);
  if (flags.influx !== undefined && flags.metricsFile !== undefined) throw new IdlecryptError('USAGE', '--influx and --metrics-file: choose one');
  if (flags.influx !== undefined) parseInfluxUrl(flags.influx); // a bad URL fails before anything starts
  const view: View = flags.json ? jsonView() : process.stderr.isTTY ? barView(libvirt ? `${flags.domain} ${device}` : device) : plainView();
  const log = createLogger();

  // Ctrl-C (or SIGTERM from a service manager) cancels the job cleanly; a second one is
  // answered with what is still going on rather than leaving nodes behind in QEMU.
  const abort = new AbortController();
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    if (signals++ === 0) {
      process.stderr.write(`\nidlecrypt: ${sig}: cancelling the copy; the guest stays on its original disk\n`);
      abort.abort();
    } else {
      process.stderr.write('idlecrypt: still cancelling, please wait\n');
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  let sink: MetricsSink | undefined;
  const common = {
    target: flags.target,
    format,
    speed,
    iterTimeMs,
    signal: abort.signal,
    logger: log,
    onProgress: (p: Progress) => view.progress(p),
    onNote: (text: string, record: Record<string, unknown>) => view.note(text, record),
    metrics: async (vm: string) =>
      (sink = await openMetricsSink({
        vm,
        logger: log,
        ...(flags.influx !== undefined ? { influx: flags.influx } : {}),
        ...(flags.metricsFile !== undefined ? { file: flags.metricsFile } : {}),
      })),
  };
  try {
    if (libvirt) {
      if (source === 'qmp') throw new IdlecryptError('USAGE', '--source qmp needs the VM\'s QMP socket, which libvirt keeps to itself: use ebpf');
      const result = await encryptDomainDisk({
        ...common,
        uri: flags.connect!,
        domain: flags.domain!,
        disk: device,
        ...(flags.keyFile !== undefined ? { keyFile: flags.keyFile } : { secret: flags.secret! }),
        ...(flags.pause !== undefined ? { pause: flags.pause as LibvirtPauseMode } : {}),
        ...(moderated ? { moderation: { source: 'ebpf' as const, ...(flags.policy !== undefined ? { policyFile: flags.policy } : {}) } } : {}),
        onPhase: (phase, disk) => view.phase(phase, disk ? { device, source: disk.source } : undefined),
      });
      await sink?.close();
      view.done({ ...domainSummaryRecord(result), ...(sink ? { metrics: metricsRecord(sink) } : {}) }, domainSummaryText(result) + (sink ? `\nidlecrypt: metrics: ${(sink as MetricsSink).description}` : ''));
      return;
    }
    const result = await encryptDisk({
      ...common,
      qmpSocket: flags.qmp!,
      device,
      keyFile: flags.keyFile!,
      ...(encrypter ? { encrypter } : {}),
      ...(moderated ? { moderation: { source, ...(flags.policy !== undefined ? { policyFile: flags.policy } : {}) } } : {}),
      onPhase: (phase, disk) => view.phase(phase, disk ? { device, source: disk.file } : undefined),
    });
    await sink?.close();
    view.done({ ...summaryRecord(result), ...(sink ? { metrics: metricsRecord(sink) } : {}) }, summaryText(result) + (sink ? `\nidlecrypt: metrics: ${(sink as MetricsSink).description}` : ''));
  } catch (e) {
    if (e instanceof IdlecryptError) view.error(e.code, e.message);
    view.stop();
    throw e;
  } finally {
    await sink?.close();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function summaryRecord(r: EncryptResult): Record<string, unknown> {
  return {
    device: r.device,
    source: r.source,
    target: r.target,
    node: r.targetNode,
    format: r.format,
    virtual_size: r.virtualSize,
    bytes_copied: r.bytesCopied,
    elapsed_s: Math.round(r.elapsedS * 100) / 100,
  };
}

function domainSummaryRecord(r: DomainEncryptResult): Record<string, unknown> {
  return {
    domain: r.domain,
    device: r.device,
    source: r.source,
    target: r.target,
    format: r.format,
    secret: r.secret,
    persistence: r.persistence,
    virtual_size: r.virtualSize,
    bytes_copied: r.bytesCopied,
    elapsed_s: Math.round(r.elapsedS * 100) / 100,
  };
}

function domainSummaryText(r: DomainEncryptResult): string {
  const rate = r.elapsedS > 0 ? fmtBytes(r.bytesCopied / r.elapsedS) : '-';
  const next =
    r.persistence === 'transient'
      ? 'The domain is transient: it has no definition for a next boot.'
      : `Its persistent definition names the encrypted image too (${r.persistence === 'updated' ? 'updated by idlecrypt' : 'rewritten by libvirt'}), with libvirt secret ${r.secret}.`;
  return (
    `idlecrypt: domain ${r.domain} ${r.device} now runs on the encrypted image ${r.target} (${r.format}).\n` +
    `idlecrypt: copied ${fmtBytes(r.bytesCopied)} in ${r.elapsedS.toFixed(1)} s (${rate}/s). ${next} ` +
    `The original ${r.source} is unchanged and no longer used by the guest.`
  );
}

function metricsRecord(sink: MetricsSink): Record<string, unknown> {
  const st = sink.stats();
  return { target: sink.description, delivered: st.delivered, dropped: st.dropped, buffered: st.buffered, max_buffer: st.maxBuffer, failures: st.failures };
}

function summaryText(r: EncryptResult): string {
  const rate = r.elapsedS > 0 ? fmtBytes(r.bytesCopied / r.elapsedS) : '-';
  return (
    `idlecrypt: ${r.device} now runs on the encrypted image ${r.target} (${r.format}, node ${r.targetNode}).\n` +
    `idlecrypt: copied ${fmtBytes(r.bytesCopied)} in ${r.elapsedS.toFixed(1)} s (${rate}/s): the ${fmtBytes(r.virtualSize)} disk` +
    (r.bytesCopied > r.virtualSize ? ` plus ${fmtBytes(r.bytesCopied - r.virtualSize)} the guest rewrote during the copy. ` : '. ') +
    `The original ${r.source} is unchanged and no longer used by the guest.`
  );
}
