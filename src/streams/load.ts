/**
 * Main-loop readings (cumulative busy ns, src/probes/mainloop.ts) → the share of each
 * interval the main loop (or the disk's iothread) was busy: 0.4 = on a CPU 40% of the time.
 */
import { filter, map, pairwise, type OperatorFunction } from 'rxjs';
import type { MainLoopReading } from '../probes/mainloop.ts';

export interface MainLoopLoad {
  /** End of the interval, epoch ms. */
  readonly time: number;
  /** Busy share of the interval. */
  readonly load: number;
}

export function mainLoopLoad(): OperatorFunction<MainLoopReading, MainLoopLoad> {
  return (source) =>
    source.pipe(
      pairwise(),
      filter(([a, b]) => b.time > a.time && b.busyNs >= a.busyNs && a.pid === b.pid && a.tid === b.tid),
      map(([a, b]) => ({ time: b.time, load: (b.busyNs - a.busyNs) / 1e6 / (b.time - a.time) })),
    );
}
