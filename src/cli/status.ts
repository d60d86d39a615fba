/** `idlecrypt status`: which image each disk runs on, whether it is encrypted, and jobs. */
import { Command } from 'commander';
import { QmpClient } from '../qmp/client.ts';
import { diskLabel, listDisks } from '../encrypt/disks.ts';
import { fmtBytes } from '../encrypt/preflight.ts';
import { createLogger } from '../log.ts';
import { runDir, type AgentStatus, type DiskStatus } from '../agent/agent.ts';
import { askAgent } from '../agent/status-server.ts';
import path from 'node:path';
import { IdlecryptError } from '../errors.ts';
import { LibvirtClient } from '../libvirt/client.ts';
import { BLOCK_JOB_TYPE_COPY } from '../libvirt/types.ts';

export function statusCommand(): Command {
  return new Command('status')
    .description("without --qmp: the host agent's VMs and disks (queued, copying, paused and why, encrypted, failed and why); with --qmp: one VM's disks, images and block jobs")
    .option('--qmp <socket>', "path of the VM's QMP unix socket (default: ask the running agent)")
    .option('--domain <name>', 'a libvirt domain: per disk, the image it runs on and the one its next boot will use, and block copies')
    .option('--connect <uri>', 'with --domain, the libvirt URI', 'qemu:///system')
    .option('--json', 'print one JSON object')
    .action(async (flags: { qmp?: string; domain?: string; connect: string; json?: boolean }) => {
      if (flags.qmp !== undefined && flags.domain !== undefined) throw new IdlecryptError('USAGE', '--qmp and --domain: choose one');
      if (flags.domain !== undefined) {
        process.stdout.write(await domainStatus(flags.domain, flags.connect, !!flags.json));
        return;
      }
      if (flags.qmp === undefined) {
        const st = (await askAgent(path.join(runDir(), 'agent.sock'))) as AgentStatus;
        process.stdout.write(flags.json ? `${JSON.stringify(st)}\n` : agentTable(st));
        return;
      }
      const client = await QmpClient.connect(flags.qmp, { logger: createLogger() });
      try {
        const disks = await listDisks(client);
        const jobs = await client.execute('query-block-jobs');
        if (flags.json) {
          process.stdout.write(
            JSON.stringify({
              disks: disks.map((d) => ({
                device: diskLabel(d),
                qdev_id: d.qdevId,
                drive: d.device,
                node: d.nodeName,
                image: d.file,
                format: d.driver,
                virtual_size: d.virtualSize,
                encrypted: d.encrypted,
                cache: { direct: d.cache.direct, 'no-flush': d.cache.noFlush },
              })),
              jobs: jobs.map((j) => ({
                id: j.device,
                type: j.type,
                status: j.status,
                offset: j.offset,
                len: j.len,
                speed: j.speed,
                paused: j.paused,
                ready: j.ready,
              })),
            }) + '\n',
          );
          return;
        }
        const rows = [['DEVICE', 'NODE', 'FORMAT', 'SIZE', 'ENCRYPTED', 'IMAGE']];
        for (const d of disks) rows.push([diskLabel(d), d.nodeName, d.driver, fmtBytes(d.virtualSize), d.encrypted ? 'yes' : 'no', d.file]);
        let text = table(rows);
        if (jobs.length === 0) text += '\nno block jobs\n';
        else {
          const jrows = [['JOB', 'TYPE', 'STATUS', 'PROGRESS', 'SPEED LIMIT']];
          for (const j of jobs) {
            const pct = j.len > 0 ? ((100 * j.offset) / j.len).toFixed(1) : '0.0';
            jrows.push([j.device, j.type, j.paused ? `${j.status} (paused)` : j.status, `${pct}% ${fmtBytes(j.offset)} / ${fmtBytes(j.len)}`, j.speed === 0 ? 'unlimited' : `${fmtBytes(j.speed)}/s`]);
          }
          text += '\n' + table(jrows);
        }
        process.stdout.write(text);
      } finally {
        await client.close();
      }
    });
}

/** One row per disk: the running image and the next boot's, which must agree once encrypted. */
async function domainStatus(domain: string, uri: string, json: boolean): Promise<string> {
  const client = await LibvirtClient.connect({ uri, logger: createLogger() });
  try {
    const dom = await client.domain(domain);
    const live = await client.disks(domain);
    const next = dom.persistent ? await client.disks(domain, true) : [];
    const disks = await Promise.all(
      live
        .filter((d) => d.target !== null)
        .map(async (d) => {
          const n = next.find((x) => x.target === d.target);
          const job = dom.active ? await client.jobInfo(domain, d.target!) : null;
          return {
            disk: d.target!,
            image: d.source,
            format: d.format,
            encrypted: d.encryption !== null,
            secret: d.encryption?.secret ?? null,
            next_boot: dom.persistent ? (n?.source ?? null) : null,
            next_boot_encrypted: dom.persistent ? n?.encryption != null : null,
            differs: dom.persistent && (n?.source ?? null) !== d.source,
            job: job ? { type: job.type === BLOCK_JOB_TYPE_COPY ? 'copy' : String(job.type), destination: d.mirror?.source ?? null, offset: job.cur, len: job.end, speed: job.bandwidth, ready: d.mirror?.ready === 'yes' } : null,
          };
        }),
    );
    if (json) return JSON.stringify({ domain: dom.name, uuid: dom.uuid, active: dom.active, persistent: dom.persistent, disks }) + '\n';
    let text = `domain ${dom.name} (${dom.active ? 'running' : 'shut off'}, ${dom.persistent ? 'persistent' : 'transient: no next boot'})\n`;
    const rows = [['DISK', 'ENCRYPTED', 'IMAGE', 'NEXT BOOT']];
    for (const d of disks) rows.push([d.disk, d.encrypted ? 'yes' : 'no', d.image ?? '-', d.next_boot === null ? '-' : d.differs ? `${d.next_boot} (differs!)` : 'same']);
    text += table(rows);
    for (const d of disks) {
      if (d.differs) text += `warning: ${d.disk} runs on ${d.image} but the next boot will use ${d.next_boot}${d.next_boot_encrypted ? '' : ' (not encrypted)'}\n`;
      if (d.job) {
        const pct = d.job.len > 0 ? ((100 * d.job.offset) / d.job.len).toFixed(1) : '0.0';
        text += `${d.disk}: block ${d.job.type} into ${d.job.destination ?? '?'}, ${pct}% ${fmtBytes(d.job.offset)} / ${fmtBytes(d.job.len)}${d.job.ready ? ', ready' : ''}, speed limit ${d.job.speed === 0 ? 'unlimited' : `${fmtBytes(d.job.speed)}/s`}\n`;
      }
    }
    return text;
  } finally {
    await client.close();
  }
}

function agentTable(st: AgentStatus): string {
  const running = st.disks.filter((d) => d.state === 'creating-target' || d.state === 'copying' || d.state === 'completing').length;
  let text = `agent pid ${st.pid} on ${st.host}, ${st.config}: ${st.vms.length} VMs watched, ${running}/${st.maxJobs} copies running\n`;
  if (st.disks.length === 0) return `${text}no configured disk on a running VM\n`;
  const rows = [['VM', 'DISK', 'STATE', 'PROGRESS', 'SPEED', 'ETA', 'WHY', 'TARGET']];
  for (const d of st.disks) rows.push([d.vm, d.disk, d.state, progressText(d), speedText(d), etaText(d), d.reason ?? '', d.target]);
  text += table(rows);
  // learnt thresholds (thresholds: auto), one line per VM that has them
  const learnt = new Map(st.disks.filter((d) => d.progress?.learnt).map((d) => [d.vm, d.progress!.learnt!]));
  for (const [vm, l] of learnt) text += `${vm}: thresholds learnt: ${l}\n`;
  return text;
}

function progressText(d: DiskStatus): string {
  const p = d.progress;
  if (!p || p.len === 0) return d.state === 'encrypted' ? '100%' : '';
  return `${((100 * p.offset) / p.len).toFixed(1)}% ${fmtBytes(p.offset)} / ${fmtBytes(p.len)}`;
}

function speedText(d: DiskStatus): string {
  const r = d.progress?.rateBps;
  return r === undefined || r === null || d.state === 'encrypted' ? '' : `${fmtBytes(r)}/s`;
}

function etaText(d: DiskStatus): string {
  const e = d.progress?.etaS;
  if (e === undefined || e === null || d.state === 'encrypted') return '';
  return e >= 3600 ? `${Math.floor(e / 3600)}h${String(Math.round((e % 3600) / 60)).padStart(2, '0')}m` : e >= 60 ? `${Math.floor(e / 60)}m${String(Math.round(e % 60)).padStart(2, '0')}s` : `${Math.round(e)}s`;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}
