/**
 * `idlecrypt cancel`: remove what a run that died (killed, crashed, host rebooted) left
 * behind: its job in QEMU, its nodes and secret, its target file, its record. The guest
 * stays on (or goes back to nothing but) its original disk. A run that is still alive is
 * not touched: Ctrl-C (SIGINT) cancels it and cleans up by itself.
 */
import { Command } from 'commander';
import { cancelDeadRun } from '../encrypt/recover.ts';
import { createLogger } from '../log.ts';

export function cancelCommand(): Command {
  return new Command('cancel')
    .description('remove the job, nodes, secret and target an interrupted `idlecrypt encrypt` left behind')
    .requiredOption('--target <path>', 'the encrypted image the interrupted run was writing')
    .option('--qmp <socket>', "the VM's QMP socket (default: the one the run used)")
    .option('--json', 'print one JSON object')
    .action(async (flags: { target: string; qmp?: string; json?: boolean }) => {
      const r = await cancelDeadRun({ target: flags.target, ...(flags.qmp !== undefined ? { qmp: flags.qmp } : {}), logger: createLogger() });
      if (flags.json) {
        process.stdout.write(
          JSON.stringify({
            target: r.record.target,
            vm: r.record.vm,
            device: r.record.device,
            source: r.record.source,
            removed: r.removed,
            already_done: r.alreadyDone,
            vm_gone: r.vmGone,
            ...(r.guestOn !== undefined ? { guest_on: r.guestOn } : {}),
          }) + '\n',
        );
        return;
      }
      const what = `VM '${r.record.vm}' disk ${r.record.device}`;
      if (r.alreadyDone) {
        process.stdout.write(`idlecrypt: nothing to cancel: ${what} already runs on the encrypted image ${r.record.target}; its record was removed\n`);
      } else if (r.vmGone) {
        process.stdout.write(`idlecrypt: removed ${r.removed.join(', ') || 'the record only'} (${what}; the VM no longer runs)\n`);
      } else {
        process.stdout.write(`idlecrypt: removed ${r.removed.join(', ') || 'the record only'}; ${what} runs on ${r.guestOn}\n`);
      }
    });
}
