/**
 * What moderation learnt of each guest (`thresholds: auto`, src/controller/calibrate.ts),
 * kept across runs and agent restarts: $IDLECRYPT_STATE_DIR (else /var/lib/idlecrypt) in
 * learnt/<vm>.json, root-only, written atomically at most every SAVE_EVERY_MS and when the
 * run ends. Rates only: how many disk requests and interrupts a second, never what they
 * were. A file this version cannot read is set aside with a warning and learning starts
 * afresh: a guess would set the guest's thresholds.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log.ts';
import type { Calibration } from '../controller/calibrate.ts';
import { stateDir } from './runs.ts';

export const SAVE_EVERY_MS = 30_000;

interface LearntFile {
  readonly version: 1;
  readonly vm: string;
  readonly savedAt: number;
  readonly calibration: Calibration;
}

export class LearntStore {
  private lastSave = 0;
  private pending: Calibration | undefined;

  readonly dir: string;

  /** `base`: the state directory, beside the run records. */
  constructor(
    readonly vm: string,
    private readonly log: Logger,
    base = stateDir(),
  ) {
    this.dir = path.join(base, 'learnt');
  }

  get file(): string {
    // a VM name is the user's: keep it to one path component
    return path.join(this.dir, `${encodeURIComponent(this.vm)}.json`);
  }

  load(): Calibration | undefined {
    let text: string;
    try {
      text = readFileSync(this.file, 'utf8');
    } catch {
      return undefined;
    }
    try {
      const f = JSON.parse(text) as LearntFile;
      if (f.version !== 1 || f.vm !== this.vm || !Array.isArray(f.calibration?.seconds)) throw new Error(`not a version-1 file for VM ${this.vm}`);
      this.log.info({ file: this.file, seconds: f.calibration.seconds.length }, 'moderation: starting from what was learnt of this guest before');
      return f.calibration;
    } catch (e) {
      this.log.warn({ file: this.file, err: (e as Error).message }, 'moderation: cannot read what was learnt of this guest; learning afresh');
      return undefined;
    }
  }

  /** Saves now if the last save is SAVE_EVERY_MS old, else keeps it for flush(). */
  offer(c: Calibration, now = Date.now()): void {
    this.pending = c;
    if (now - this.lastSave >= SAVE_EVERY_MS) this.flush(now);
  }

  flush(now = Date.now()): void {
    const c = this.pending;
    if (!c) return;
    this.pending = undefined;
    this.lastSave = now;
    try {
      mkdirSync(this.dir, { recursive: true, mode: 0o700 });
      const tmp = `${this.file}.${process.pid}.tmp`;
      const f: LearntFile = { version: 1, vm: this.vm, savedAt: now, calibration: c };
      writeFileSync(tmp, JSON.stringify(f) + '\n', { mode: 0o600 });
      renameSync(tmp, this.file);
    } catch (e) {
      this.log.warn({ file: this.file, err: (e as Error).message }, 'moderation: cannot save what was learnt of this guest');
    }
  }
}
