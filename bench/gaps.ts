/**
 * The gaps in a guest's disk requests (bench/start-stall.ts, bench/start-stall-libvirt.ts):
 * reads the request count every `pollMs` until `until()` says stop, and returns the times
 * between two reads that saw it move (a gap still open at the end counts too), the time
 * measured and the requests seen.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { now } from '../test/helpers/moderation-lab.ts';

export async function requestGaps(count: () => Promise<number>, until: () => boolean, pollMs = 20): Promise<{ gaps: number[]; spanMs: number; requests: number }> {
  const out: number[] = [];
  const t0 = now();
  const n0 = await count();
  let lastMove = t0;
  let last = n0;
  while (!until()) {
    await sleep(pollMs);
    const n = await count();
    const t = now();
    if (n !== last) {
      out.push(t - lastMove);
      lastMove = t;
      last = n;
    }
  }
  out.push(now() - lastMove);
  return { gaps: out, spanMs: now() - t0, requests: last - n0 };
}
