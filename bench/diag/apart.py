#!/usr/bin/python3
"""A matrix cell taken apart, phase by phase (bench/diag/README.md).

    python3 bench/diag/apart.py CELL_DIR LAT_OUT THREADS_JSONL [GUEST ...]

CELL_DIR: a cell's directory from bench/matrix.ts (round1-mod.phases.json, .lp, .progress.ndjson);
LAT_OUT: bench/diag/request-latency.bt's output; THREADS_JSONL: bench/diag/qemu-threads.py's.
GUEST: the QEMU -name values to show (default guest=mod guest=ref). For each of the moderated
guest's phases after the first 1.5 s (the window and hold-off), per guest: its completed flushes
a second, their mean and slowest latency in QEMU, its writes' mean, its QEMU's slowest
fdatasync; its vCPU thread's time on a CPU and waiting for one, its main thread's; and for mod
the stall idlecrypt counted (the vCPUs' wait for the big lock, ms/s, and the share of 50 ms
samples over 800 ms/s) and the copy's speed from its progress records.
"""
import collections
import functools
import json
import re
import sys
from datetime import datetime

cell, lat_path, threads_path = sys.argv[1:4]
guests = sys.argv[4:] or ['guest=mod', 'guest=ref']
SKIP_MS = 1500

phases = json.load(open(f'{cell}/round1-mod.phases.json'))
phases = [p for p in phases if p.get('end')]
t0, t1 = phases[0]['start'], phases[-1]['end']

samples = [json.loads(line) for line in open(threads_path)]
mono_to_wall = samples[-1]['w'] - samples[-1]['m']
pids = {}
for s in samples:
    if t0 <= s['w'] <= t1:
        for pid, v in s['p'].items():
            pids[v['n']] = pid

lat = []  # (wall ms, map, key tuple, value)
at = None
for line in open(lat_path):
    line = line.strip()
    if line.startswith('T '):
        at = int(line[2:]) / 1e6 + mono_to_wall
        continue
    m = re.match(r'@(\w+)\[([\d, ]+)\]: (\d+)', line)
    if m and at is not None:
        lat.append((at, m.group(1), tuple(int(x) for x in m.group(2).split(',')), int(m.group(3))))

progress = []
for line in open(f'{cell}/round1-mod.progress.ndjson'):
    r = json.loads(line)
    if r.get('event') == 'progress':
        progress.append((datetime.fromisoformat(r['time'].replace('Z', '+00:00')).timestamp() * 1000, r['offset']))

stall = []  # (wall ms, wait us, interval s)
for line in open(f'{cell}/round1-mod.lp'):
    if line.startswith('idlecrypt_activity'):
        w = re.search(r'vcpu_wait_us=(\d+)i', line)
        iv = re.search(r'interval_s=([\d.]+)', line)
        ts = int(line.rsplit(' ', 1)[1]) / 1e6
        if w and iv:
            stall.append((ts, int(w.group(1)), float(iv.group(1))))


def thread_rates(pid, a, b):
    ss = [s for s in samples if a <= s['w'] <= b and pid in s['p']]
    if len(ss) < 2:
        return {}
    first, last = ss[0]['p'][pid]['t'], ss[-1]['p'][pid]['t']
    dt = (ss[-1]['w'] - ss[0]['w']) / 1000
    return {tid: ((v[1] - first[tid][1]) / 1000 / dt, (v[2] - first[tid][2]) / 1000 / dt) for tid, v in last.items() if tid in first}


@functools.cache
def vcpu_of(pid):
    """The thread other than the main one that ran most over the cell: the (single) vCPU."""
    r = thread_rates(pid, t0, t1)
    return max((tid for tid in r if tid != pid), key=lambda tid: r[tid][0], default=None)


def row(name, p):
    pid = pids.get(name)
    if pid is None:
        return f'{name}: not found'
    a, b = p['start'] + SKIP_MS, p['end']
    ip = int(pid)
    c = collections.Counter()
    mx = collections.Counter()
    for w, mp, key, v in lat:
        if a <= w < b and key[0] == ip:
            k = mp + (str(key[1]) if len(key) > 1 else '')
            if 'max' in mp:
                mx[k] = max(mx[k], v)
            else:
                c[k] += v
    secs = (b - a) / 1000
    r = thread_rates(pid, a, b)
    vc = vcpu_of(pid)
    vrun, vwait = r.get(vc, (0, 0))
    mrun, mwait = r.get(pid, (0, 0))
    out = (f"{p['kind']:4} {p['n']:2} {name:10} {c['n3'] / secs:5.1f} {c['sum_us3'] / max(c['n3'], 1) / 1000:6.1f} {mx['max_us3'] / 1000:6.1f}"
           f" {c['sum_us2'] / max(c['n2'], 1) / 1000:6.1f} {mx['fsync_max_us'] / 1000:6.1f} | {vrun:4.0f} {vwait:4.0f} | {mrun:4.0f} {mwait:4.0f}")
    if name.endswith('mod'):
        st = [x for x in stall if a <= x[0] <= b]
        tot = sum(x[2] for x in st) or 1
        over = sum(1 for x in st if x[1] / 1000 / x[2] > 800) / max(len(st), 1)
        pr = [x for x in progress if a <= x[0] <= b]
        speed = (pr[-1][1] - pr[0][1]) / (pr[-1][0] - pr[0][0]) * 1000 / 2**20 if len(pr) > 1 else 0
        out += f' | {sum(x[1] for x in st) / 1000 / tot:5.0f} {over:4.0%} | {speed:5.0f}'
    return out


print('phase   guest      fl/s  flush mean/max ms  write mean  fsync max | vCPU run/wait ms/s | main run/wait | stall ms/s, >800 | copy MiB/s')
for p in phases:
    for g in guests:
        print(row(g, p))
