/**
 * Types for the QMP commands and events idlecrypt uses, as QEMU 7.2 defines them.
 *
 * Source: QEMU's QAPI schema (qapi/block-core.json, job.json, block.json, qom.json, ui.json,
 * control.json, run-state.json, introspect.json), cross-checked against `query-qmp-schema`
 * of the Debian 12 QEMU 7.2 binary. Names and optionality follow the schema; where we
 * deliberately narrow it (fewer union branches, a member made required) a comment says so.
 * QEMU may add members in later versions (qmp-spec.rst, "Compatibility Considerations"),
 * so replies are typed as "at least these members".
 *
 * Anything not listed here can still be sent with QmpClient.executeRaw().
 */

/** A command that returns nothing returns `{}` (qmp-spec.rst, "Success"). */
export type Empty = Record<string, never>;

// ---- common enums ---------------------------------------------------------------------

/** qapi/job.json JobStatus */
export type JobStatus =
  | 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby'
  | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';

/** qapi/job.json JobType */
export type JobType =
  | 'commit' | 'stream' | 'mirror' | 'backup' | 'create' | 'amend'
  | 'snapshot-load' | 'snapshot-save' | 'snapshot-delete';

/** qapi/run-state.json RunState */
export type RunState =
  | 'debug' | 'inmigrate' | 'internal-error' | 'io-error' | 'paused' | 'postmigrate'
  | 'prelaunch' | 'finish-migrate' | 'restore-vm' | 'running' | 'save-vm' | 'shutdown'
  | 'suspended' | 'watchdog' | 'guest-panicked' | 'colo';

export type BlockDeviceIoStatus = 'ok' | 'failed' | 'nospace';
export type BlockdevOnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';
export type BlockdevDetectZeroesOptions = 'off' | 'on' | 'unmap';

// ---- qapi/control.json, qapi/misc.json, qapi/run-state.json ----------------------------

export interface VersionInfo {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface StatusInfo {
  running: boolean;
  singlestep: boolean;
  status: RunState;
}

/** qapi/introspect.json SchemaInfo (the reply of query-qmp-schema). Type names are opaque. */
export type SchemaInfo = { name: string; features?: string[] } & (
  | { 'meta-type': 'builtin'; 'json-type': string }
  | { 'meta-type': 'enum'; members: { name: string; features?: string[] }[]; values: string[] }
  | { 'meta-type': 'array'; 'element-type': string }
  | {
      'meta-type': 'object';
      members: { name: string; type: string; default?: unknown; features?: string[] }[];
      tag?: string;
      variants?: { case: string; type: string }[];
    }
  | { 'meta-type': 'alternate'; members: { type: string }[] }
  | { 'meta-type': 'command'; 'arg-type': string; 'ret-type': string; 'allow-oob'?: boolean }
  | { 'meta-type': 'event'; 'arg-type': string }
);

// ---- qapi/block-core.json: queries ------------------------------------------------------

export interface ImageInfo {
  filename: string;
  format: string;
  'dirty-flag'?: boolean;
  'actual-size'?: number;
  'virtual-size': number;
  'cluster-size'?: number;
  encrypted?: boolean;
  compressed?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: {
    id: string;
    name: string;
    'vm-state-size': number;
    'date-sec': number;
    'date-nsec': number;
    'vm-clock-sec': number;
    'vm-clock-nsec': number;
    icount?: number;
  }[];
  'backing-image'?: ImageInfo;
  /** ImageInfoSpecific: {type: 'qcow2'|'vmdk'|'luks'|'rbd', data: {...}} */
  'format-specific'?: { type: string; data: Record<string, unknown> };
}

/** BlockDeviceInfo: one node (query-named-block-nodes) or a device's root (query-block). */
export interface BlockDeviceInfo {
  file: string;
  'node-name'?: string;
  ro: boolean;
  drv: string;
  backing_file?: string;
  backing_file_depth: number;
  encrypted: boolean;
  detect_zeroes: BlockdevDetectZeroesOptions;
  bps: number;
  bps_rd: number;
  bps_wr: number;
  iops: number;
  iops_rd: number;
  iops_wr: number;
  image: ImageInfo;
  cache: { writeback: boolean; direct: boolean; 'no-flush': boolean };
  write_threshold: number;
  'dirty-bitmaps'?: {
    name?: string;
    count: number;
    granularity: number;
    recording: boolean;
    busy: boolean;
    persistent: boolean;
    inconsistent?: boolean;
  }[];
  bps_max?: number;
  bps_rd_max?: number;
  bps_wr_max?: number;
  iops_max?: number;
  iops_rd_max?: number;
  iops_wr_max?: number;
  bps_max_length?: number;
  bps_rd_max_length?: number;
  bps_wr_max_length?: number;
  iops_max_length?: number;
  iops_rd_max_length?: number;
  iops_wr_max_length?: number;
  iops_size?: number;
  group?: string;
}

/** qapi/misc.json IOThreadInfo (the polling tunables left out). */
export interface IOThreadInfo {
  id: string;
  'thread-id': number;
}

export interface BlockInfo {
  device: string;
  qdev?: string;
  type: string;
  removable: boolean;
  locked: boolean;
  inserted?: BlockDeviceInfo;
  tray_open?: boolean;
  'io-status'?: BlockDeviceIoStatus;
}

export interface BlockDeviceTimedStats {
  interval_length: number;
  min_rd_latency_ns: number;
  max_rd_latency_ns: number;
  avg_rd_latency_ns: number;
  min_wr_latency_ns: number;
  max_wr_latency_ns: number;
  avg_wr_latency_ns: number;
  min_flush_latency_ns: number;
  max_flush_latency_ns: number;
  avg_flush_latency_ns: number;
  avg_rd_queue_depth: number;
  avg_wr_queue_depth: number;
}

export interface BlockDeviceStats {
  rd_bytes: number;
  wr_bytes: number;
  unmap_bytes: number;
  rd_operations: number;
  wr_operations: number;
  flush_operations: number;
  unmap_operations: number;
  rd_total_time_ns: number;
  wr_total_time_ns: number;
  flush_total_time_ns: number;
  unmap_total_time_ns: number;
  wr_highest_offset: number;
  rd_merged: number;
  wr_merged: number;
  unmap_merged: number;
  idle_time_ns?: number;
  failed_rd_operations: number;
  failed_wr_operations: number;
  failed_flush_operations: number;
  failed_unmap_operations: number;
  invalid_rd_operations: number;
  invalid_wr_operations: number;
  invalid_flush_operations: number;
  invalid_unmap_operations: number;
  account_invalid: boolean;
  account_failed: boolean;
  timed_stats: BlockDeviceTimedStats[];
  rd_latency_histogram?: { boundaries: number[]; bins: number[] };
  wr_latency_histogram?: { boundaries: number[]; bins: number[] };
  flush_latency_histogram?: { boundaries: number[]; bins: number[] };
}

export interface BlockStats {
  device?: string;
  qdev?: string;
  'node-name'?: string;
  stats: BlockDeviceStats;
  'driver-specific'?: { driver: string; [extra: string]: unknown };
  parent?: BlockStats;
  backing?: BlockStats;
}

/** query-block-jobs. Note `type` is a plain string here, unlike JobInfo's JobType. */
export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  'io-status': BlockDeviceIoStatus;
  ready: boolean;
  status: JobStatus;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

/** query-jobs (qapi/job.json JobInfo). */
export interface JobInfo {
  id: string;
  type: JobType;
  status: JobStatus;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

// ---- qapi/block-core.json: blockdev-add -------------------------------------------------

/** BlockdevOptionsBase members shared by every driver. */
export interface BlockdevOptionsBase {
  'node-name'?: string;
  discard?: 'ignore' | 'unmap';
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  'read-only'?: boolean;
  'auto-read-only'?: boolean;
  'force-share'?: boolean;
  'detect-zeroes'?: BlockdevDetectZeroesOptions;
}

/** BlockdevRef: a node-name, or a nested node definition. */
export type BlockdevRef = string | BlockdevOptions;

export interface BlockdevOptionsFile extends BlockdevOptionsBase {
  driver: 'file';
  filename: string;
  'pr-manager'?: string;
  locking?: 'auto' | 'on' | 'off';
  aio?: 'threads' | 'native' | 'io_uring';
  'aio-max-batch'?: number;
  'drop-cache'?: boolean;
}

export interface BlockdevOptionsLuks extends BlockdevOptionsBase {
  driver: 'luks';
  file: BlockdevRef;
  /** Optional in the schema (metadata-only probes); required for any node we read or write. */
  'key-secret': string;
}

export interface BlockdevOptionsQcow2 extends BlockdevOptionsBase {
  driver: 'qcow2';
  file: BlockdevRef;
  backing?: BlockdevRef | null;
  'data-file'?: BlockdevRef;
  'lazy-refcounts'?: boolean;
  'cache-size'?: number;
  'l2-cache-size'?: number;
  'cache-clean-interval'?: number;
  /** BlockdevQcow2Encryption; the legacy 'aes' format is left out on purpose. */
  encrypt?: { format: 'luks'; 'key-secret': string };
}

export interface BlockdevOptionsRaw extends BlockdevOptionsBase {
  driver: 'raw';
  file: BlockdevRef;
  offset?: number;
  size?: number;
}

/** The node types idlecrypt adds; a narrowing of the schema's BlockdevOptions union. */
export type BlockdevOptions =
  | BlockdevOptionsFile
  | BlockdevOptionsLuks
  | BlockdevOptionsQcow2
  | BlockdevOptionsRaw;

// ---- qapi/block-core.json: x-blockdev-amend ---------------------------------------------

/** QCryptoBlockAmendOptionsLUKS (qapi/crypto.json): add or erase key slots. */
export interface LuksAmendOptions {
  state: 'active' | 'inactive';
  'new-secret'?: string;
  'old-secret'?: string;
  keyslot?: number;
  'iter-time'?: number;
  secret?: string;
}

export type BlockdevAmendOptions =
  | ({ driver: 'luks' } & LuksAmendOptions)
  | { driver: 'qcow2'; encrypt?: { format: 'luks' } & LuksAmendOptions };

// ---- qapi/block-core.json: blockdev-create ----------------------------------------------

/** QCryptoBlockCreateOptionsLUKS (qapi/crypto.json) */
export interface LuksCreateOptions {
  'key-secret'?: string;
  'cipher-alg'?: 'aes-128' | 'aes-192' | 'aes-256' | 'serpent-128' | 'serpent-192'
    | 'serpent-256' | 'twofish-128' | 'twofish-192' | 'twofish-256' | 'cast5-128' | 'des' | '3des';
  'cipher-mode'?: 'ecb' | 'cbc' | 'xts' | 'ctr';
  'ivgen-alg'?: 'plain' | 'plain64' | 'essiv';
  'ivgen-hash-alg'?: 'md5' | 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512' | 'ripemd160';
  'hash-alg'?: 'md5' | 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512' | 'ripemd160';
  /** Milliseconds of PBKDF work per key slot (default 2000). */
  'iter-time'?: number;
}

export interface BlockdevCreateOptionsFile {
  driver: 'file';
  filename: string;
  size: number;
  preallocation?: PreallocMode;
  nocow?: boolean;
  'extent-size-hint'?: number;
}

export interface BlockdevCreateOptionsLuks extends LuksCreateOptions {
  driver: 'luks';
  /** Optional in the schema; a LUKS image cannot be created without one. */
  'key-secret': string;
  file: BlockdevRef;
  size: number;
  preallocation?: PreallocMode;
}

export interface BlockdevCreateOptionsQcow2 {
  driver: 'qcow2';
  file: BlockdevRef;
  size: number;
  version?: 'v2' | 'v3';
  'backing-file'?: string;
  'backing-fmt'?: string;
  /** QCryptoBlockCreateOptions; the legacy 'qcow' (AES) format is left out on purpose. */
  encrypt?: { format: 'luks'; 'key-secret': string } & LuksCreateOptions;
  'cluster-size'?: number;
  preallocation?: PreallocMode;
  'lazy-refcounts'?: boolean;
  'refcount-bits'?: number;
  'compression-type'?: 'zlib' | 'zstd';
}

export type BlockdevCreateOptions =
  | BlockdevCreateOptionsFile
  | BlockdevCreateOptionsLuks
  | BlockdevCreateOptionsQcow2;

// ---- qapi/block-core.json: blockdev-mirror ----------------------------------------------

export interface BlockdevMirrorArgs {
  'job-id'?: string;
  device: string;
  target: string;
  replaces?: string;
  sync: 'top' | 'full' | 'none' | 'incremental' | 'bitmap';
  /** Bytes per second; 0 = unlimited. */
  speed?: number;
  granularity?: number;
  'buf-size'?: number;
  'on-source-error'?: BlockdevOnError;
  'on-target-error'?: BlockdevOnError;
  'filter-node-name'?: string;
  'copy-mode'?: 'background' | 'write-blocking';
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

// ---- qapi/qom.json: object-add ----------------------------------------------------------

/**
 * object-add of a `secret` (SecretProperties): from a file QEMU reads (the operator's key,
 * which so never crosses QMP), or inline (`data`: only a run's own random opening key,
 * src/encrypt/target.ts). The QMP client logs no argument values.
 */
export type SecretObjectArgs = {
  'qom-type': 'secret';
  id: string;
  format?: 'raw' | 'base64';
  keyid?: string;
  iv?: string;
} & ({ file: string } | { data: string });

// ---- qapi/ui.json: input-send-event -----------------------------------------------------

export type InputEvent =
  | { type: 'key'; data: { key: { type: 'number'; data: number } | { type: 'qcode'; data: string }; down: boolean } }
  | {
      type: 'btn';
      data: {
        button: 'left' | 'middle' | 'right' | 'wheel-up' | 'wheel-down' | 'side' | 'extra'
          | 'wheel-left' | 'wheel-right';
        down: boolean;
      };
    }
  | { type: 'rel' | 'abs'; data: { axis: 'x' | 'y'; value: number } };

// ---- the command map --------------------------------------------------------------------

type JobId = { id: string };
type Device = { device: string };

/** `args: undefined` = the command takes no arguments. */
export interface QmpCommands {
  qmp_capabilities: { args: { enable?: 'oob'[] }; ret: Empty };
  'query-version': { args: undefined; ret: VersionInfo };
  'query-status': { args: undefined; ret: StatusInfo };
  'query-commands': { args: undefined; ret: { name: string }[] };
  'query-qmp-schema': { args: undefined; ret: SchemaInfo[] };
  'query-block': { args: undefined; ret: BlockInfo[] };
  'query-named-block-nodes': { args: { flat?: boolean }; ret: BlockDeviceInfo[] };
  /** Each `-object iothread`: its id and the host thread that runs its event loop. */
  'query-iothreads': { args: undefined; ret: IOThreadInfo[] };
  /** A QOM property; a link (a device's `iothread`) reads as the target's path, or '' when unset. */
  'qom-get': { args: { path: string; property: string }; ret: unknown };
  'query-blockstats': { args: { 'query-nodes'?: boolean }; ret: BlockStats[] };
  /** Per-device latency histograms, in query-blockstats; no boundaries at all = none kept. */
  'block-latency-histogram-set': {
    args: { id: string; boundaries?: readonly number[]; 'boundaries-read'?: readonly number[]; 'boundaries-write'?: readonly number[]; 'boundaries-flush'?: readonly number[] };
    ret: Empty;
  };
  'query-block-jobs': { args: undefined; ret: BlockJobInfo[] };
  'query-jobs': { args: undefined; ret: JobInfo[] };
  'blockdev-create': { args: { 'job-id': string; options: BlockdevCreateOptions }; ret: Empty };
  /** Experimental in QEMU 5.1-9.x (qapi/block-core.json); a job. Key slots of an open LUKS node. */
  'x-blockdev-amend': { args: { 'job-id': string; 'node-name': string; options: BlockdevAmendOptions; force?: boolean }; ret: Empty };
  'blockdev-add': { args: BlockdevOptions; ret: Empty };
  'blockdev-del': { args: { 'node-name': string }; ret: Empty };
  'blockdev-mirror': { args: BlockdevMirrorArgs; ret: Empty };
  'block-job-set-speed': { args: Device & { speed: number }; ret: Empty };
  'block-job-pause': { args: Device; ret: Empty };
  'block-job-resume': { args: Device; ret: Empty };
  'block-job-complete': { args: Device; ret: Empty };
  'block-job-cancel': { args: Device & { force?: boolean }; ret: Empty };
  'job-pause': { args: JobId; ret: Empty };
  'job-resume': { args: JobId; ret: Empty };
  'job-complete': { args: JobId; ret: Empty };
  'job-cancel': { args: JobId; ret: Empty };
  'job-dismiss': { args: JobId; ret: Empty };
  'job-finalize': { args: JobId; ret: Empty };
  'object-add': { args: SecretObjectArgs; ret: Empty };
  'object-del': { args: { id: string }; ret: Empty };
  'input-send-event': { args: { device?: string; head?: number; events: InputEvent[] }; ret: Empty };
  quit: { args: undefined; ret: Empty };
  stop: { args: undefined; ret: Empty };
  cont: { args: undefined; ret: Empty };
}

// ---- events -------------------------------------------------------------------------------

/** Members shared by BLOCK_JOB_READY / _COMPLETED / _CANCELLED. `device` is the job id. */
export interface BlockJobEventBase {
  type: JobType;
  device: string;
  len: number;
  offset: number;
  speed: number;
}

export interface QmpEventMap {
  BLOCK_JOB_READY: BlockJobEventBase;
  /** `error` is present when the job failed. */
  BLOCK_JOB_COMPLETED: BlockJobEventBase & { error?: string };
  BLOCK_JOB_CANCELLED: BlockJobEventBase;
  BLOCK_JOB_ERROR: { device: string; operation: 'read' | 'write'; action: 'ignore' | 'report' | 'stop' };
  JOB_STATUS_CHANGE: { id: string; status: JobStatus };
  SHUTDOWN: {
    guest: boolean;
    reason:
      | 'none' | 'host-error' | 'host-qmp-quit' | 'host-qmp-system-reset' | 'host-signal'
      | 'host-ui' | 'guest-shutdown' | 'guest-reset' | 'guest-panic' | 'subsystem-reset'
      | 'snapshot-load';
  };
  /** STOP and RESUME carry no data; the client supplies `{}`. */
  STOP: Empty;
  RESUME: Empty;
}
