/**
 * Structured logging (pino) to stderr, so stdout stays clean for progress and `--json`
 * records. Level from IDLECRYPT_LOG (default: warn on a terminal run, so the progress view
 * stays readable; tests raise it to debug and read the lines).
 *
 * Privacy rule: nothing here ever receives key material, key codes, pointer positions or
 * pixels. The redact list is a second line of defence for fields that could carry secrets.
 */
import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(options: { level?: string; destination?: number | string } = {}): Logger {
  const level = options.level ?? process.env.IDLECRYPT_LOG ?? 'warn';
  return pino(
    {
      name: 'idlecrypt',
      level,
      base: { pid: process.pid },
      redact: { paths: ['*.data', '*.key', '*.secret', 'args.data'], censor: '[redacted]' },
    },
    pino.destination({ dest: options.destination ?? 2, sync: true }),
  );
}

/** A logger that drops everything; for library callers and unit tests. */
export const silentLogger: Logger = pino({ level: 'silent' });
