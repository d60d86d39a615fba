/** `idlecrypt encrypt`: mirror a running guest's disk into an encrypted image and pivot. */
import { Command, Option } from 'commander';
import { encryptDisk, type EncryptResult } from '../encrypt/encrypt.ts';
import { fmtBytes } from '../encrypt/preflight.ts';
import { IdlecryptError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { openMetricsSink, parseInfluxUrl } from '../metrics/index.ts';
import type { MetricsSink } from '../metrics/sink.ts';
import { parseBytes, parseChoice, parsePositiveInt } from './options.ts';
import { barView, jsonView, plainView, type View } from './progress-view.ts';

interface EncryptFlags {
  qmp: string;
  device: string;
  target: string;
  keyFile: string;
  format: string;
  speed?: string;
  policy?: string;
  moderation: boolean;
  source: string;
  influx?: string;
  metricsFile?: string;
  iterTime: string;
  json?: boolean;
}

export function encryptCommand(): Command {
  return new Command('encrypt')
    .description("copy a running VM's disk into an encrypted (LUKS) image in the background and switch the guest onto it")
    .requiredOption('--qmp <socket>', "path of the VM's QMP unix socket")
    .requiredOption('--device <id>', 'the disk: qdev id (virsh domblklist target), drive name or node name')
    .requiredOption('--target <path>', 'the encrypted image to create (must not exist, unless an earlier run into it died: then that run is resumed)')
    .requiredOption('--key-file <file>', 'file holding the passphrase, read by QEMU; all bytes are the key, as cryptsetup --key-file')
    .addOption(new Option('--format <format>', 'luks (raw LUKS, as cryptsetup) or qcow2 (qcow2 with LUKS encryption)').default('luks'))
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
  const format = parseChoice('--format', flags.format, ['luks', 'qcow2'] as const);
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
  const view: View = flags.json ? jsonView() : process.stderr.isTTY ? barView(flags.device) : plainView();
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
  try {
    const result = await encryptDisk({
      qmpSocket: flags.qmp,
      device: flags.device,
      target: flags.target,
      keyFile: flags.keyFile,
      format,
      speed,
      iterTimeMs,
      signal: abort.signal,
      logger: log,
      ...(moderated ? { moderation: { source, ...(flags.policy !== undefined ? { policyFile: flags.policy } : {}) } } : {}),
      onPhase: (phase, disk) => view.phase(phase, disk ? { device: flags.device, source: disk.file } : undefined),
      onProgress: (p) => view.progress(p),
      onNote: (text, record) => view.note(text, record),
      metrics: async (vm) =>
        (sink = await openMetricsSink({
          vm,
          logger: log,
          ...(flags.influx !== undefined ? { influx: flags.influx } : {}),
          ...(flags.metricsFile !== undefined ? { file: flags.metricsFile } : {}),
        })),
    });
    await sink?.close();
    view.done({ ...summaryRecord(result), ...(sink ? { metrics: metricsRecord(sink) } : {}) }, summaryText(result) + (sink ? `\nidlecrypt: metrics: ${sink.description}` : ''));
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
