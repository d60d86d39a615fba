#!/usr/bin/python3
"""A diagnostic: who has the host's CPUs during a matrix cell, and who waits for them.

    python3 bench/diag/host-cpu.py record samples.jsonl          (every 250 ms, until killed)
    python3 bench/diag/host-cpu.py phases samples.jsonl CELL_DIR [REPORT.md]

record (about 3% of a CPU here): per process, the sum over its threads of /proc/PID/task/TID/schedstat (ns on a CPU,
ns runnable but waiting for one), one JSON line per sample: {"t": wall ms, "p": {label:
[run ns, wait ns]}}. Labels: `qemu:<guest name>#pid` (the matrix's mod, ref and cmp),
`qsd#pid` (qemu-storage-daemon), `node:bench` (bench/matrix.ts), `node` (the idlecrypt runs
and anything else in Node), `bpftrace`, and the kernel's workers (`k:kworker`).

phases: per busy phase of the cell (CELL_DIR/round1-mod.phases.json), from 0.5 s after its
start to its end: each guest's QEMU on a CPU and waiting for one (shares of one CPU), and,
given the cell's matrix-report.md, each guest's MiB/s per CPU-second (the report's busy-phase
rates over its QEMU's CPU). bench/README.md, "The sparse qcow2 writeback cell: two guests on
two cores".
"""
import json
import os
import re
import sys
import time


def label(pid):
    try:
        cmd = [a.decode(errors='replace') for a in open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0') if a]
    except OSError:
        return None
    if not cmd:
        try:
            return 'k:' + re.sub(r'[/:].*', '', open(f'/proc/{pid}/comm').read().strip())
        except OSError:
            return None
    exe = os.path.basename(cmd[0])
    if exe.startswith('qemu-system'):
        for i, a in enumerate(cmd[:-1]):
            if a == '-name':
                m = re.search(r'(?:guest=)?([^,]+)', cmd[i + 1])
                return f'qemu:{m.group(1) if m else "?"}#{pid}'
        return f'qemu:?#{pid}'
    if exe == 'qemu-storage-daemon':
        return f'qsd#{pid}'
    if exe == 'node':
        return 'node:bench' if any('bench/matrix' in a for a in cmd) else 'node'
    if exe == 'bpftrace':
        return 'bpftrace'
    return None


def record(path, interval=0.25):
    # By pid, with the name it had: reading every command line each time costs 5% of a CPU.
    # A process forked by Node is Node until it execs QEMU: its new name relabels it.
    labels = {}
    with open(path, 'w') as out:
        while True:
            t = time.time() * 1000
            agg = {}
            pids = [p for p in os.listdir('/proc') if p.isdigit()]
            for pid in list(labels):
                if pid not in pids:
                    del labels[pid]
            for pid in pids:
                try:
                    comm = open(f'/proc/{pid}/comm').read()
                except OSError:
                    continue
                if labels.get(pid, (None, None))[1] != comm:
                    labels[pid] = (label(pid), comm)
                lab = labels[pid][0]
                if lab is None or lab.startswith('k:') and lab != 'k:kworker':
                    continue
                run = wait = 0
                try:
                    for tid in os.listdir(f'/proc/{pid}/task'):
                        try:
                            a = open(f'/proc/{pid}/task/{tid}/schedstat').read().split()
                            run += int(a[0])
                            wait += int(a[1])
                        except OSError:
                            pass
                except OSError:
                    continue
                r = agg.setdefault(lab, [0, 0])
                r[0] += run
                r[1] += wait
            out.write(json.dumps({'t': round(t, 1), 'p': agg}) + '\n')
            out.flush()
            time.sleep(max(0, interval - (time.time() * 1000 - t) / 1000))


def phases(samples_path, cell_dir, report=None):
    samples = [json.loads(l) for l in open(samples_path)]
    busy = [p for p in json.load(open(os.path.join(cell_dir, 'round1-mod.phases.json'))) if p['kind'] == 'busy' and p.get('end') and p['n'] >= 1]
    rates = []
    if report:
        rates = [(float(m), float(r)) for m, r in re.findall(r'^- busy phase \d+: mod (\d+) MiB/s, ref (\d+) MiB/s', open(report).read(), re.M)]

    def at(t):
        return min(samples, key=lambda s: abs(s['t'] - t))

    def of(sample, who):
        run = wait = 0
        for k, v in sample['p'].items():
            if k.startswith(f'qemu:{who}#'):
                run += v[0]
                wait += v[1]
        return run, wait

    for i, p in enumerate(busy):
        a, b = at(p['start'] + 500), at(p['end'])
        ns = (b['t'] - a['t']) * 1e6
        if ns <= 0:
            continue
        row = {}
        for who in ('mod', 'ref'):
            (r0, w0), (r1, w1) = of(a, who), of(b, who)
            row[who] = ((r1 - r0) / ns, (w1 - w0) / ns)
        (mc, mw), (rc, rw) = row['mod'], row['ref']
        line = f'busy phase {p["n"]}: on a CPU mod {100 * mc:.0f}% ref {100 * rc:.0f}%, waiting for one mod {100 * mw:.0f}% ref {100 * rw:.0f}%'
        if i < len(rates) and mc > 0 and rc > 0:
            m, r = rates[i]
            line += f'; kept {100 * m / r:.1f}%; MiB per CPU-second mod {m / mc:.0f} ref {r / rc:.0f} ({100 * (m / mc) / (r / rc):.0f}%)'
        print(line)


if __name__ == '__main__':
    if len(sys.argv) >= 3 and sys.argv[1] == 'record':
        record(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == 'phases':
        phases(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        sys.exit(__doc__)
