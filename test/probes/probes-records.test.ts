/** bpftrace -f json lines -> typed records (src/probes/records.ts), on lines bpftrace 0.17 really prints. */
import { deepStrictEqual, equal } from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BpftraceJsonParser, nsToMs } from '../../src/probes/records.ts';

describe('BpftraceJsonParser', () => {
  it('collects map lines into one report per marker, keyed by pid', () => {
    const p = new BpftraceJsonParser();
    deepStrictEqual(p.push('{"type": "attached_probes", "data": {"probes": 9}}'), { type: 'probe_count', probes: 9 });
    equal(p.push('{"type": "map", "data": {"@disk_reads": {"6865": 2480, "6641": 3}}}'), undefined);
    equal(p.push('{"type": "map", "data": {"@key_events": {"6641": 2}}}'), undefined);
    const r = p.push('{"type": "printf", "data": "idlecrypt-report 538497133370\\n"}');
    deepStrictEqual(r, {
      type: 'report',
      monoMs: 538497.133,
      final: false,
      totals: new Map([[6865, { diskReads: 2480 }], [6641, { diskReads: 3, keyEvents: 2 }]]),
    });
    // the next report starts empty (an empty map prints no line at all)
    deepStrictEqual(p.push('{"type": "printf", "data": "idlecrypt-final 538997133370\\n"}'), {
      type: 'report', monoMs: 538997.133, final: true, totals: new Map(),
    });
  });

  it('recognises the attach notice, lost events, and leaves anything else as "other"', () => {
    const p = new BpftraceJsonParser();
    deepStrictEqual(p.push('__BPFTRACE_NOTIFY_PROBES_ATTACHED'), { type: 'attached' });
    deepStrictEqual(p.push('{"type": "lost_events", "data": {"events": 3}}'), { type: 'lost_events', events: 3 });
    deepStrictEqual(p.push('No probes to attach'), { type: 'other', line: 'No probes to attach' });
    deepStrictEqual(p.push('{"type": "map", "data": {"@someone_elses": {"1": 2}}}'), {
      type: 'other', line: '{"type": "map", "data": {"@someone_elses": {"1": 2}}}',
    });
    deepStrictEqual(p.push('{"type": "printf", "data": "hello\\n"}'), { type: 'other', line: '{"type": "printf", "data": "hello\\n"}' });
    equal(p.push('   '), undefined);
  });

  it('counts each wait in progress up to the report, never lets a total go back, and caps a wait whose end was missed', () => {
    const p = new BpftraceJsonParser();
    const report = (ns: bigint) => {
      const r = p.push(`{"type": "printf", "data": "idlecrypt-report ${ns}\\n"}`);
      return r?.type === 'report' ? Object.fromEntries(r.totals) : r;
    };
    const s = 1_000_000_000n; // 1 s in ns
    // 40 ms of finished waits; two vCPUs of VM 7 waiting since 100 ms and 250 ms before the report
    p.push('{"type": "map", "data": {"@vcpu_wait_us": {"7": 40000}}}');
    // (a third vCPU, 7,10, is not waiting: 0)
    p.push(`{"type": "map", "data": {"@vcpu_waiting_since": {"7,8": ${100n * s - 100_000_000n}, "7,9": ${100n * s - 250_000_000n}, "7,10": 0}}}`);
    deepStrictEqual(report(100n * s), { 7: { vcpuWaitUs: 40_000 + 100_000 + 250_000 } });
    // 50 ms later one wait is still going (now 300 ms); the other ended between the prints,
    // in neither map: the total stays where it was until the next report has it
    p.push('{"type": "map", "data": {"@vcpu_wait_us": {"7": 40000}}}');
    p.push(`{"type": "map", "data": {"@vcpu_waiting_since": {"7,8": 0, "7,9": ${100n * s - 250_000_000n}}}}`);
    deepStrictEqual(report(100n * s + 50_000_000n), { 7: { vcpuWaitUs: 390_000 } });
    p.push('{"type": "map", "data": {"@vcpu_wait_us": {"7": 190000}}}');
    p.push(`{"type": "map", "data": {"@vcpu_waiting_since": {"7,9": ${100n * s - 250_000_000n}}}}`);
    deepStrictEqual(report(100n * s + 100_000_000n), { 7: { vcpuWaitUs: 190_000 + 350_000 } });
    // a wait open for a minute (its thread died in it) counts 10 s, and then no more
    p.push('{"type": "map", "data": {"@vcpu_wait_us": {"7": 190000}}}');
    p.push(`{"type": "map", "data": {"@vcpu_waiting_since": {"7,9": ${40n * s}}}}`);
    deepStrictEqual(report(100n * s + 100_000_000n), { 7: { vcpuWaitUs: 190_000 + 10_000_000 } });
    // a VM with only an open wait is reported too
    p.push(`{"type": "map", "data": {"@vcpu_waiting_since": {"12,13": ${200n * s - 5_000_000n}}}}`);
    deepStrictEqual(report(200n * s), { 12: { vcpuWaitUs: 5_000 } });
  });

  it('keeps nanosecond times exact to the microsecond, even after 104 days of uptime', () => {
    equal(nsToMs(9_007_199_254_740_993_123n), 9_007_199_254_740.993);
  });
});
