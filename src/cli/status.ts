/** `idlecrypt status`: which image each disk runs on, whether it is encrypted, and jobs. */
import { Command } from 'commander';
import { QmpClient } from '../qmp/client.ts';
import { diskLabel, listDisks } from '../encrypt/disks.ts';
import { fmtBytes } from '../encrypt/preflight.ts';
import { createLogger } from '../log.ts';

export function statusCommand(): Command {
  return new Command('status')
    .description("show the VM's disks, the image each runs on, whether it is encrypted, and block jobs")
    .requiredOption('--qmp <socket>', "path of the VM's QMP unix socket")
    .option('--json', 'print one JSON object')
    .action(async (flags: { qmp: string; json?: boolean }) => {
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

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}
