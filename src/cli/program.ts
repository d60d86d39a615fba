/**
 * The `idlecrypt` command. Every failure ends as one line on stderr, `idlecrypt: <what>`,
 * and a non-zero exit (2 for usage errors, 130 for a cancelled run, 1 otherwise).
 */
import { Command, CommanderError } from 'commander';
import { describeError, IdlecryptError } from '../errors.ts';
import { encryptCommand } from './encrypt.ts';
import { statusCommand } from './status.ts';
import { observeCommand } from './observe.ts';
import { policyCommand } from './policy.ts';
import { cancelCommand } from './cancel.ts';
import { agentCommand } from './agent.ts';

export function buildProgram(): Command {
  const program = new Command('idlecrypt')
    .description('Encrypt the disks of running QEMU/KVM virtual machines in the guest\'s idle time')
    .version('0.1.0')
    .showSuggestionAfterError()
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s.startsWith('error:') ? `idlecrypt: ${s.slice(7)}` : s) });
  for (const cmd of [encryptCommand(), cancelCommand(), agentCommand(), statusCommand(), observeCommand(), policyCommand()]) {
    program.addCommand(cmd.exitOverride());
  }
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      // help and version exit 0; commander already printed its own one-line error otherwise
      return e.exitCode === 0 ? 0 : 2;
    }
    process.stderr.write(`idlecrypt: ${describeError(e)}\n`);
    return e instanceof IdlecryptError ? e.exitCode : 1;
  }
}


