/**
 * The moderation policy: which guest activity counts as busy, how fast the copy runs when
 * busy and idle, and the completion guarantee. Read from YAML (policy/default.yaml ships
 * the defaults), validated with positions, resolved per VM, and followed as it changes.
 */
export { DEFAULT_POLICY_FILE, defaultPolicy, formatIssue, loadPolicy, parsePolicy, policyError, type PolicyIssue } from './load.ts';
export { describePolicy, resolvePolicy, signalInUse } from './resolve.ts';
export { SIGNALS, type EffectivePolicy, type Moderation, type Policy, type Sampling, type Signal } from './schema.ts';
export { formatBytes, formatDuration, formatRate, formatSpeed, PAUSED, UNLIMITED, type Deadline } from './units.ts';
export { watchPolicy, type WatchPolicyOptions } from './watch.ts';
