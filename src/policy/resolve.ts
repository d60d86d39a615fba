/** From a loaded policy to what one VM runs on, and how a policy reads to a person. */
import { fixedThresholds, rateUnit, SIGNALS, type EffectivePolicy, type Moderation, type Policy, type Signal } from './schema.ts';
import { formatBytes, formatDuration, formatRate, formatSpeed } from './units.ts';

/** The settings for the VM named `vm`: its override when the policy has one, else the top level. */
export function resolvePolicy(policy: Policy, vm: string): EffectivePolicy {
  const own = Object.hasOwn(policy.vms, vm) ? policy.vms[vm] : undefined;
  const m: Moderation = own ?? policy;
  return {
    thresholds: m.thresholds,
    speed: m.speed,
    holdoff: m.holdoff,
    guarantee: m.guarantee,
    latency: m.latency,
    pivot: m.pivot,
    target: m.target,
    sampling: policy.sampling,
    source: policy.source,
    ...(own ? { override: vm } : {}),
  };
}

/**
 * Whether any VM's settings use a signal (its threshold is not `off`): the probes a signal
 * alone needs (thresholds.inflight: probes/qemu-inflight.bt) run only then. They are chosen
 * when the observation starts; a reload that turns the signal on takes the next start.
 */
export function signalInUse(policy: Policy, signal: Signal): boolean {
  return policy.thresholds[signal] !== null || Object.values(policy.vms).some((m) => m.thresholds[signal] !== null);
}

/** What one event of each signal is, for a threshold of 0 ("busy while: any keyboard event"). */
const ONE_EVENT: Record<Signal, string> = { disk: 'disk request', keyboard: 'keyboard event', pointer: 'pointer event', interrupts: 'interrupt', stall: 'stall', inflight: 'request in flight' };

/** A few lines that say what a policy does, for `idlecrypt policy check`. */
export function describePolicy(policy: Policy): string[] {
  const lines = [
    `sampling: every ${formatDuration(policy.sampling.interval)}, rates over ${formatDuration(policy.sampling.window)}`,
    ...describeModeration(policy),
  ];
  const names = Object.keys(policy.vms);
  if (names.length > 0) lines.push(`per-VM overrides: ${names.join(', ')}`);
  lines.push(...strayNotes(policy));
  return lines;
}

function describeModeration(m: Moderation): string[] {
  const fixed = fixedThresholds(m.thresholds);
  const busy = SIGNALS.filter((s) => m.thresholds[s] !== null).map((s) => {
    const unit = rateUnit(s);
    if (m.thresholds[s] === 'auto') return `${s} above the level learnt for each guest (never under ${formatRate(fixed[s]!)}${unit})`;
    return fixed[s] === 0 ? `any ${ONE_EVENT[s]}` : `${s} > ${formatRate(fixed[s]!)}${unit}`;
  });
  const g = m.guarantee;
  const deadline = g.deadline === null ? 'no deadline' : 'after' in g.deadline ? `finish within ${formatDuration(g.deadline.after)} of the job's start` : `finish by ${new Date(g.deadline.at).toISOString()}`;
  return [
    `busy while: ${busy.length > 0 ? busy.join(', ') : 'never (every signal is off)'}`,
    `speed: idle ${formatSpeed(m.speed.idle)}, busy ${formatSpeed(m.speed.busy)}; idle speed again after ${formatDuration(m.holdoff)} quiet${m.thresholds.stall === null && m.thresholds.inflight === null ? '' : ' (after a stall or requests in flight alone, one sampling window)'}`,
    m.speed.headroom === null ? 'headroom: off (the idle speed may take all of QEMU\'s main loop)' : `headroom: the copy leaves ${Math.round(m.speed.headroom * 100)}% of QEMU's main loop free`,
    m.latency.margin === null
      ? 'latency: off (a guest busy with its disk gets the busy speed)'
      : `latency: a guest busy with its disk gets the highest speed that keeps its disk latency within ${Math.round(m.latency.margin * 100)}% of its latency without the copy (baseline re-measured every ${formatDuration(m.latency.refresh)})`,
    `guarantee: ${deadline}${g.deadline === null ? '' : ` (margin ${g.margin})`}, floor ${g.floor === 0 ? 'none' : formatSpeed(g.floor)}`,
    `pivot: once caught up, waits up to ${formatDuration(m.pivot['quiet-wait'])} for a quiet guest; ${
      m.pivot.push > 0 ? `pushes at full speed for up to ${formatDuration(m.pivot.push)} when the copy has not caught up for ${formatDuration(m.pivot['push-after'])}` : 'never pushes'
    }`,
    m.target.flush === null
      ? "target: not flushed (with writeback, the kernel writes the copy's writes back when it likes)"
      : `target: flushed to its disk after every ${formatBytes(m.target.flush)} copied, when it is opened through the host's page cache (writeback)`,
  ];
}

/** A person at the console: never a stray event (the shipped keyboard threshold is 0 on purpose). */
const INPUT: ReadonlySet<Signal> = new Set(['keyboard', 'pointer']);

/**
 * Issue 4 asks that a single stray request at idle not stop the job for long. A threshold
 * at or under one event per window makes a single event count as busy: say so, except for
 * input (INPUT).
 */
function strayNotes(policy: Policy): string[] {
  const perWindow = 1000 / policy.sampling.window;
  const notes: string[] = [];
  for (const [who, m] of [['', policy] as const, ...Object.entries(policy.vms).map(([n, v]) => [`vms.${n}.`, v] as const)]) {
    const fixed = fixedThresholds(m.thresholds);
    for (const s of SIGNALS) {
      if (INPUT.has(s)) continue;
      const t = fixed[s];
      if (t !== null && perWindow > t) {
        notes.push(`note: ${who}thresholds.${s}: one event in the ${formatDuration(policy.sampling.window)} window is ${formatRate(perWindow)}/s, over ${formatRate(t)}/s: a single stray event counts as busy`);
      }
    }
  }
  return notes;
}
