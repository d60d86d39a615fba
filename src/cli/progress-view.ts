/**
 * How a run looks to the operator: a progress bar on a terminal, one JSON object per line
 * with --json (for scripts and log shippers), and plain periodic lines otherwise.
 */
import cliProgress from 'cli-progress';
import type { Progress } from '../encrypt/encrypt.ts';
import { fmtBytes } from '../encrypt/preflight.ts';

export interface View {
  phase(phase: string, detail?: Record<string, unknown>): void;
  progress(p: Progress): void;
  done(summary: Record<string, unknown>, text: string): void;
  error(code: string, message: string): void;
  /** Something the operator should know that is not progress (a dead run resumed, say). */
  note(text: string, record: Record<string, unknown>): void;
  stop(): void;
}

export function fmtEta(s: number | null): string {
  if (s === null) return '--';
  if (s < 60) return `${Math.ceil(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.ceil(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

function progressFields(p: Progress) {
  return {
    status: p.status,
    offset: p.offset,
    len: p.len,
    percent: Math.round(p.percent * 10) / 10,
    rate_bps: Math.round(p.rate),
    speed_limit_bps: p.speedLimit,
    paused: p.paused,
    eta_s: p.etaS === null ? null : Math.round(p.etaS * 10) / 10,
    ...(p.moderation
      ? {
          state: p.moderation.state,
          mode: p.moderation.mode,
          reason: p.moderation.reason,
          activity_source: p.moderation.source,
          ...(p.moderation.headroom
            ? { speed_cap_bps: p.moderation.headroom.capBps, main_loop_load: p.moderation.headroom.load === null ? null : Math.round(p.moderation.headroom.load * 100) / 100 }
            : {}),
          ...(p.moderation.learnt ? { learnt: p.moderation.learnt } : {}),
          ...(p.moderation.latency
            ? {
                latency_phase: p.moderation.latency.phase,
                latency_ms: p.moderation.latency.latencyMs,
                latency_baseline_ms: p.moderation.latency.baselineMs,
                latency_margin: p.moderation.latency.margin,
                latency_speed_bps: Number.isFinite(p.moderation.latency.speedBps) ? p.moderation.latency.speedBps : null,
                latency_scope: p.moderation.latency.scope,
                latency_statistic: p.moderation.latency.statistic,
              }
            : {}),
        }
      : {}),
  };
}

export function jsonView(out: NodeJS.WritableStream = process.stdout): View {
  const emit = (o: Record<string, unknown>) => out.write(JSON.stringify({ time: new Date().toISOString(), ...o }) + '\n');
  return {
    phase: (phase, detail) => emit({ event: 'phase', phase, ...detail }),
    progress: (p) => emit({ event: 'progress', ...progressFields(p) }),
    done: (summary) => emit({ event: 'completed', ...summary }),
    error: (code, message) => emit({ event: 'error', code, message }),
    note: (text, record) => emit({ event: 'note', message: text, ...record }),
    stop: () => {},
  };
}

/** What a phase change says in words; quiet before the copy starts, so that a refusal is
 * the only line an operator sees. */
const PHASE_TEXT: Record<string, string | undefined> = {
  copying: 'copying',
  completing: 'copy done; switching the guest onto the encrypted image',
  cancelling: 'cancelling the copy',
};

export function plainView(out: NodeJS.WritableStream = process.stderr, everyMs = 2000): View {
  let last = 0;
  let learnt: string | undefined;
  return {
    phase: (phase, detail) => {
      const text = PHASE_TEXT[phase];
      if (text) out.write(`idlecrypt: ${text}${phase === 'copying' && detail ? ` ${String(detail.source)}` : ''}\n`);
    },
    progress: (p) => {
      // what was learnt of the guest, said when it changes (every few seconds at most)
      if (p.moderation?.learnt && p.moderation.learnt !== learnt) out.write(`idlecrypt: thresholds learnt: ${(learnt = p.moderation.learnt)}\n`);
      const now = Date.now();
      if (now - last < everyMs) return;
      last = now;
      const m = p.moderation ? `, guest ${p.moderation.state}: ${p.moderation.reason}` : p.paused ? ', paused' : '';
      out.write(`idlecrypt: ${p.percent.toFixed(1)}% ${fmtBytes(p.offset)} / ${fmtBytes(p.len)}, ${fmtBytes(p.rate)}/s, ETA ${fmtEta(p.etaS)}${m}\n`);
    },
    done: (_s, text) => process.stdout.write(text + '\n'),
    error: () => {},
    note: (text) => out.write(`idlecrypt: ${text}\n`),
    stop: () => {},
  };
}

export function barView(label: string): View {
  const bar = new cliProgress.SingleBar(
    {
      format: `${label} [{bar}] {percentage}% | {done_h} / {total_h} | {rate_h}/s | ETA {eta_h} | {state}`,
      barCompleteChar: '=',
      barIncompleteChar: ' ',
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
      etaBuffer: 1,
      stream: process.stderr,
    },
    cliProgress.Presets.legacy,
  );
  let started = false;
  let state = 'starting';
  let last: Progress | undefined;
  const payload = (p: Progress | undefined = last) => ({
    // cli-progress owns {value}, {total}, {eta}...: our own tokens get their own names
    done_h: fmtBytes(p?.offset ?? 0),
    total_h: fmtBytes(p?.len ?? 0),
    rate_h: fmtBytes(p?.rate ?? 0),
    eta_h: fmtEta(p?.etaS ?? null),
    state,
  });
  return {
    phase: (phase) => {
      state = phase;
      if (started) bar.update(payload());
    },
    progress: (p) => {
      last = p;
      const total = Math.max(1, p.len);
      if (!started) {
        bar.start(total, p.offset, payload(p));
        started = true;
      }
      bar.setTotal(total);
      state = p.moderation ? `${p.moderation.mode} (${p.moderation.reason})` : p.paused ? 'paused' : p.status;
      bar.update(p.offset, payload(p));
    },
    done: (_s, text) => {
      if (started) bar.stop();
      started = false;
      process.stdout.write(text + '\n');
    },
    error: () => {
      if (started) bar.stop();
      started = false;
    },
    note: (text) => {
      if (started) bar.stop();
      started = false;
      process.stderr.write(`idlecrypt: ${text}\n`);
    },
    stop: () => {
      if (started) bar.stop();
      started = false;
    },
  };
}
