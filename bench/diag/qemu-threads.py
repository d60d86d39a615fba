#!/usr/bin/python3
"""A diagnostic: every QEMU thread's time on a CPU and waiting for one, every 50 ms.

    python3 bench/diag/qemu-threads.py threads.jsonl     (until killed)

Reads /proc/PID/task/TID/schedstat (run ns, runqueue wait ns) of every qemu-system-x86_64
process; one JSON line per sample: {"w": wall ms, "m": CLOCK_MONOTONIC ms, "p": {pid:
{"n": its -name, "t": {tid: [comm, run us, wait us]}}}}. Without -name ...,debug-threads=on
every thread is called qemu-system-x86: the main thread has the pid as tid, and a guest's
vCPU is the thread that runs while the guest works (bench/diag/README.md).
"""
import json
import os
import sys
import time

QEMU = b'qemu-system-x86_64'


def name_of(pid):
    cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
    if not cmd or not cmd[0].endswith(QEMU):
        return None
    for i, a in enumerate(cmd[:-1]):
        if a == b'-name':
            return cmd[i + 1].decode()
    return pid


def main(out_path, interval=0.05):
    names = {}
    with open(out_path, 'w') as out:
        while True:
            mono = time.monotonic()
            rec = {'w': round(time.time() * 1000, 1), 'm': round(mono * 1000, 1), 'p': {}}
            for pid in os.listdir('/proc'):
                if not pid.isdigit():
                    continue
                try:
                    # By the process's name first: a QEMU started by a program is that program
                    # for a moment (forked, not yet exec'd), and must not be taken for it.
                    if not open(f'/proc/{pid}/comm').read().startswith('qemu-system'):
                        continue
                    if pid not in names:
                        names[pid] = name_of(pid)
                    if names[pid] is None:
                        continue
                    threads = {}
                    for tid in os.listdir(f'/proc/{pid}/task'):
                        try:
                            comm = open(f'/proc/{pid}/task/{tid}/comm').read().strip()
                            run, wait, _ = open(f'/proc/{pid}/task/{tid}/schedstat').read().split()
                            threads[tid] = [comm, int(run) // 1000, int(wait) // 1000]
                        except OSError:
                            pass
                    rec['p'][pid] = {'n': names[pid], 't': threads}
                except OSError:
                    pass
            out.write(json.dumps(rec) + '\n')
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - mono)))


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: qemu-threads.py OUT.jsonl')
    main(sys.argv[1])
