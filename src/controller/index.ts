/**
 * The moderation controller: guest activity and the policy in, the copy job's speed out.
 * types → classify (busy or idle, and why) → decide (hold-off, guarantee, desired state) →
 * reconcile (hold the job to it) → controller (wiring).
 */
export { ratesFromSample, toActivityRates, type CountSample } from './adapt.ts';
export { classify, describeReasons } from './classify.ts';
export { moderate, type ModerateOptions, type ModerationRun } from './controller.ts';
export {
  classifyActivity,
  decide,
  desiredDecision,
  guarantee,
  guaranteeStep,
  holdOff,
  pushSample,
  staleAfter,
  type DecideInput,
} from './decide.ts';
export {
  DEFAULT_PAUSED_SPEED,
  isTerminalError,
  plan,
  Reconciler,
  type Action,
  type Capabilities,
  type ModerationEnd,
  type SyncResult,
} from './reconcile.ts';
export type * from './types.ts';
