/**
 * Errors of the QMP client. One base class (QmpError, itself an IdlecryptError) and one
 * subclass per way a QMP conversation can fail, each with a stable `code` and the context a
 * caller needs to react (command name, QMP error class, socket path).
 *
 * Privacy: no message or context here ever holds command argument values or event data;
 * those can carry secrets or key events. QmpCommandError keeps argument *keys* only.
 */
import { IdlecryptError, type ErrorCode, type ErrorOptions } from '../errors.ts';

type QmpErrorCode = Extract<ErrorCode, `QMP_${string}`>;

/** "5 s", "0.3 s": timeouts are configured in ms but read by people in seconds. */
export function seconds(ms: number): string {
  return `${ms / 1000} s`;
}

export class QmpError extends IdlecryptError {
  constructor(code: QmpErrorCode, message: string, options: ErrorOptions = {}) {
    super(code, message, options);
  }
}

/** The socket could not be connected: missing, not a socket, refused, permission denied. */
export class QmpConnectError extends QmpError {
  readonly socketPath: string;
  constructor(socketPath: string, message: string, options: ErrorOptions = {}) {
    super('QMP_CONNECT', message, { ...options, context: { socketPath, ...options.context } });
    this.socketPath = socketPath;
  }
}

/** Connected, but the peer did not greet like a QMP server (or did not greet at all). */
export class QmpNotQmpError extends QmpError {
  readonly socketPath: string;
  constructor(socketPath: string, why: string, options: ErrorOptions = {}) {
    super('QMP_NOT_QMP', `${socketPath} is not a QMP socket (${why})`, {
      ...options,
      context: { socketPath, ...options.context },
    });
    this.socketPath = socketPath;
  }
}

/** QEMU answered {"error": {"class", "desc"}} (qmp-spec.rst, "Error"). */
export class QmpCommandError extends QmpError {
  readonly command: string;
  readonly errorClass: string;
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string, argKeys: string[] = []) {
    // The spec says clients should not parse `desc`; it is for people, so it is the message.
    super('QMP_COMMAND', `${command}: ${desc}`, { context: { command, errorClass, argKeys } });
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

export class QmpTimeoutError extends QmpError {
  readonly command: string;
  readonly timeoutMs: number;
  constructor(command: string, timeoutMs: number) {
    super('QMP_TIMEOUT', `${command}: no reply from QEMU within ${seconds(timeoutMs)}`, {
      context: { command, timeoutMs },
    });
    this.command = command;
    this.timeoutMs = timeoutMs;
  }
}

export interface DisconnectInfo {
  /** The command whose reply was still outstanding, if any. */
  command?: string;
  /** Something else being waited for, e.g. "the QMP greeting". */
  waitingFor?: string;
  /** Why, in plain words; default: "did QEMU exit?". */
  why?: string;
  cause?: unknown;
}

/** The connection ended (QEMU exited, close() was called, or a protocol error). */
export class QmpDisconnectedError extends QmpError {
  readonly command: string | undefined;
  constructor(info: DisconnectInfo = {}) {
    const waiting = info.command ?? info.waitingFor;
    super(
      'QMP_DISCONNECTED',
      `QMP connection closed${waiting ? ` while waiting for ${waiting}` : ''} (${info.why ?? 'did QEMU exit?'})`,
      { cause: info.cause, context: info.command ? { command: info.command } : {} },
    );
    this.command = info.command;
  }
}

/** A method was called in a state that does not allow it (e.g. execute after close). */
export class QmpStateError extends QmpError {
  constructor(message: string, options: ErrorOptions = {}) {
    super('QMP_STATE', message, options);
  }
}

/** The peer broke the protocol: a line that is not JSON, an id-less error, a bad reply. */
export class QmpProtocolError extends QmpError {
  constructor(message: string, options: ErrorOptions = {}) {
    super('QMP_PROTOCOL', message, options);
  }
}
