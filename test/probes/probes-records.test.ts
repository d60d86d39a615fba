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

  it('keeps nanosecond times exact to the microsecond, even after 104 days of uptime', () => {
    equal(nsToMs(9_007_199_254_740_993_123n), 9_007_199_254_740.993);
  });
});
