/**
 * `idlecrypt policy check FILE`: validates a moderation policy as `encrypt --policy` would
 * read it (merged over the shipped default) and says what it does, or lists every problem
 * as `FILE:LINE:COL: key.path: problem`, one per line on stdout, the form editors and CI
 * annotate. It then fails with the first problem (and how many more) as its one-line error;
 * a file with a single problem gets that one line only.
 */
import { Command } from 'commander';
import { isIdlecryptError } from '../errors.ts';
import { describePolicy, formatIssue, loadPolicy, type PolicyIssue } from '../policy/index.ts';

export interface PolicyCommandIo {
  readonly stdout: { write(s: string): unknown };
}

export function policyCommand(io: PolicyCommandIo = { stdout: process.stdout }): Command {
  const policy = new Command('policy').description('work with moderation policies (YAML)');
  policy
    .command('check')
    .description('validate a policy file and summarise what it does')
    .argument('<file>', 'the policy file (YAML)')
    .action((file: string) => {
      try {
        const p = loadPolicy(file);
        io.stdout.write(`${file}: ok\n${describePolicy(p).map((l) => `  ${l}\n`).join('')}`);
      } catch (e) {
        const issues = isIdlecryptError(e) ? (e.context.issues as PolicyIssue[] | undefined) : undefined;
        if (issues && issues.length > 1) io.stdout.write(issues.map((i) => `${formatIssue(i)}\n`).join(''));
        throw e;
      }
    });
  return policy;
}
