/** Test guests' lifetime within a test file. */
import { afterEach } from 'node:test';
import type { TestVm } from '../../vm-images/launch.ts';

/**
 * Stops the guests in `vms` when each test of the file ends, and empties the list: one left
 * running (a writer, a bursty guest) takes the CPU from the next test's guests under TCG (a
 * later test took 97 s so, 35 s alone). Call it at the file's top level.
 */
export function stopGuestsAfterEachTest(vms: TestVm[]): void {
  afterEach(async () => {
    await Promise.all(vms.splice(0).map((vm) => vm.stop()));
  });
}
