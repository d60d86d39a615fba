/**
 * `idlecrypt agent`: the host service (src/agent/agent.ts) in the foreground, JSON logs on
 * stderr, as systemd runs it (contrib/systemd/idlecrypt-agent.service). SIGTERM and SIGINT
 * detach (every copy left paused for the next start), SIGHUP re-reads the configuration.
 * `--check` validates the configuration and its policy and exits.
 */
import { Command, Option } from 'commander';
import { Agent } from '../agent/agent.ts';
import { DEFAULT_AGENT_CONFIG, loadAgentConfig } from '../agent/config.ts';
import { createLogger } from '../log.ts';
import { parseChoice, parsePositiveInt } from './options.ts';

export function agentCommand(): Command {
  return new Command('agent')
    .description('run the host agent: encrypt every disk the configuration names, moderated, surviving restarts')
    .option('--config <file>', 'the agent configuration (YAML, hot-reloaded on change and SIGHUP)', DEFAULT_AGENT_CONFIG)
    .option('--check', 'validate the configuration (and its policy) and exit')
    .addOption(new Option('--source <source>', 'where guest activity comes from: auto (eBPF, else QMP blockstats), ebpf, qmp').default('auto'))
    .option('--iter-time <ms>', 'PBKDF time for the key slots, as cryptsetup --iter-time', '2000')
    .option('--log-level <level>', 'info (default), debug, warn, error', 'info')
    .action(async (flags: { config: string; check?: boolean; source: string; iterTime: string; logLevel: string }) => {
      if (flags.check) {
        const c = loadAgentConfig(flags.config);
        process.stdout.write(`${c.file}: valid; ${c.encrypt.length} entr${c.encrypt.length === 1 ? 'y' : 'ies'}, max-jobs ${c.host.maxJobs}, protect ${c.host.protect}\n`);
        return;
      }
      const source = parseChoice('--source', flags.source, ['auto', 'ebpf', 'qmp'] as const);
      const iterTimeMs = parsePositiveInt('--iter-time', flags.iterTime);
      const logger = createLogger({ level: flags.logLevel });
      const agent = new Agent({ configFile: flags.config, logger, source, iterTimeMs });
      await agent.start();
      await new Promise<void>((resolve) => {
        const stop = () => {
          process.off('SIGTERM', stop);
          process.off('SIGINT', stop);
          void agent.stop().then(resolve);
        };
        process.on('SIGTERM', stop);
        process.on('SIGINT', stop);
        process.on('SIGHUP', () => agent.reload());
      });
    });
}
