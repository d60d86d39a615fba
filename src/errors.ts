/**
 * One root error type for the whole tool. Every failure an operator can see is an
 * IdlecryptError with a stable `code` (for scripts and tests) and a one-line `message`
 * (for people). The CLI prints `idlecrypt: <message>` and exits with `exitCode`.
 *
 * Messages must never contain key material: callers pass key *file paths*, never keys.
 */
export type ErrorCode =
  // usage and input
  | 'USAGE'
  | 'KEY_FILE'
  | 'TARGET_EXISTS'
  | 'NO_SPACE'
  | 'UNKNOWN_DEVICE'
  | 'JOB_EXISTS'
  | 'POLICY'
  | 'CONFIG'
  | 'AGENT_RUNNING'
  | 'UNKNOWN_DOMAIN'
  // libvirt
  | 'LIBVIRT'
  // QMP
  | 'QMP_CONNECT'
  | 'QMP_NOT_QMP'
  | 'QMP_COMMAND'
  | 'QMP_TIMEOUT'
  | 'QMP_DISCONNECTED'
  | 'QMP_STATE'
  | 'QMP_PROTOCOL'
  // jobs
  | 'JOB_FAILED'
  | 'VM_EXITED'
  | 'CANCELLED'
  | 'DETACHED'
  // probes
  | 'PROBE_UNAVAILABLE'
  | 'PROBE_FAILED'
  | 'INTERNAL';

export interface ErrorOptions {
  cause?: unknown;
  /** Extra machine-readable context (never secrets). */
  context?: Record<string, unknown>;
  exitCode?: number;
}

export class IdlecryptError extends Error {
  readonly code: ErrorCode;
  readonly context: Record<string, unknown>;
  readonly exitCode: number;

  constructor(code: ErrorCode, message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.context = options.context ?? {};
    // 130 follows the shell convention for SIGINT; everything else is a plain failure.
    this.exitCode = options.exitCode ?? (code === 'CANCELLED' ? 130 : code === 'USAGE' ? 2 : 1);
  }
}

export function isIdlecryptError(e: unknown): e is IdlecryptError {
  return e instanceof IdlecryptError;
}

/** The one line an operator sees for any error. */
export function describeError(e: unknown): string {
  if (e instanceof IdlecryptError) return e.message;
  if (e instanceof Error) return `internal error: ${e.message}`;
  return `internal error: ${String(e)}`;
}
