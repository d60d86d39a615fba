/** ProcfsDiscovery on this host's real /proc, with real (guest-less, instant) QEMU processes. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deepStrictEqual, ok } from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { filter, firstValueFrom } from 'rxjs';
import { ProcfsDiscovery } from '../../src/discovery/procfs.ts';

let dir: string;
const children: ChildProcess[] = [];

function qemu(args: string[]): ChildProcess {
  // -machine none: no guest at all, QEMU just serves its monitors
  const c = spawn('qemu-system-x86_64', ['-machine', 'none', '-accel', 'tcg', '-display', 'none', '-nodefaults', ...args], { stdio: 'ignore', cwd: dir });
  children.push(c);
  return c;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ic-disc-'));
});
after(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(dir, { recursive: true, force: true });
});

describe('ProcfsDiscovery on /proc', () => {
  it('follows QEMU processes as they come and go, with name, QMP sockets, binary and accelerator', async () => {
    const d = new ProcfsDiscovery({ pollMs: 50 });
    const lists: number[][] = [];
    const sub = d.watch().subscribe((vms) => lists.push(vms.map((v) => v.pid)));
    const a = qemu(['-name', 'guest=disc-a,debug-threads=on', '-qmp', 'unix:a.sock,server=on,wait=off',
      '-chardev', `socket,id=m,path=${join(dir, 'b.sock')},server=on,wait=off`, '-mon', 'chardev=m,mode=control']);
    const withA = await firstValueFrom(d.watch().pipe(filter((vms) => vms.some((v) => v.pid === a.pid))));
    deepStrictEqual(withA.find((v) => v.pid === a.pid), {
      pid: a.pid!,
      name: 'disc-a',
      qmpSockets: [join(dir, 'a.sock'), join(dir, 'b.sock')],
      exe: '/usr/bin/qemu-system-x86_64',
      startTicks: withA.find((v) => v.pid === a.pid)!.startTicks,
      accel: 'tcg',
    });
    a.kill('SIGKILL');
    await firstValueFrom(d.watch().pipe(filter((vms) => !vms.some((v) => v.pid === a.pid))));
    await new Promise((r) => setTimeout(r, 200));
    sub.unsubscribe();
    ok(lists.some((l) => l.includes(a.pid!)) && !lists.at(-1)!.includes(a.pid!), 'watch() saw it come and go');
  });
});
