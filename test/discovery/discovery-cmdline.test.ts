/** VM discovery: QEMU command lines (pure) and the procfs backend on a fake /proc. */
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deepStrictEqual, equal } from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQemuSystem, parseQemuCmdline, parseQemuOpts } from '../../src/discovery/cmdline.ts';
import { ProcfsDiscovery, parseStartTicks } from '../../src/discovery/procfs.ts';

describe('parseQemuCmdline', () => {
  it('reads -name guest=NAME,... and the bare -name NAME', () => {
    equal(parseQemuCmdline(['qemu-system-x86_64', '-name', 'guest=web1,debug-threads=on']).name, 'web1');
    equal(parseQemuCmdline(['qemu-system-x86_64', '-name', 'db']).name, 'db');
    equal(parseQemuCmdline(['qemu-system-x86_64', '--name', 'db,process=qemu-db']).name, 'db');
    equal(parseQemuCmdline(['qemu-system-x86_64', '-name', 'guest=a,,b']).name, 'a,b');
    equal(parseQemuCmdline(['qemu-system-x86_64', '-m', '256']).name, null);
  });

  it('finds QMP sockets given as -qmp unix:PATH (any suffix) and as -chardev socket + -mon mode=control', () => {
    const argv = [
      'qemu-system-x86_64',
      '-qmp', 'unix:/run/a.sock,server=on,wait=off',
      '-qmp', 'unix:/run/b.sock',
      '-qmp-pretty', 'unix:path=/run/c,,odd.sock,server,nowait',
      '-qmp', 'tcp:127.0.0.1:4444,server=on',
      '-chardev', 'socket,id=mon0,path=/run/d.sock,server=on,wait=off',
      '-mon', 'chardev=mon0,mode=control',
      '-chardev', 'socket,id=hmp0,path=/run/hmp.sock,server=on,wait=off',
      '-mon', 'chardev=hmp0', // readline (HMP), not QMP
      '-chardev', 'socket,id=charmonitor,fd=27,server=on,wait=off', // libvirt: an fd, no path
      '-mon', 'chardev=charmonitor,id=monitor,mode=control',
      '-serial', 'unix:/run/serial.sock,server=on,wait=off',
    ];
    deepStrictEqual(parseQemuCmdline(argv).qmpSockets, ['/run/a.sock', '/run/b.sock', '/run/c,odd.sock', '/run/d.sock']);
  });

  it('resolves relative socket paths against the process\'s working directory', () => {
    deepStrictEqual(parseQemuCmdline(['qemu-system-x86_64', '-qmp', 'unix:vm/qmp.sock,server=on'], '/srv/vms').qmpSockets, ['/srv/vms/vm/qmp.sock']);
  });

  it('reads options after flags, and never inside another option\'s value', () => {
    const argv = ['qemu-system-x86_64', '-nodefaults', '-S', '-append', 'console=ttyS0 -name evil -qmp unix:/evil', '-display', 'none', '-name', 'real', '-qmp', 'unix:/x'];
    deepStrictEqual(parseQemuCmdline(argv), { name: 'real', qmpSockets: ['/x'] });
  });

  it('splits QemuOpts with ",," escapes and implied keys', () => {
    deepStrictEqual(parseQemuOpts('x,,y,server,id=a', 'path'), [['path', 'x,y'], ['server', 'on'], ['id', 'a']]);
  });

  it('knows a QEMU system emulator by its executable name', () => {
    equal(isQemuSystem('/usr/bin/qemu-system-x86_64'), true);
    equal(isQemuSystem('qemu-system-aarch64'), true);
    equal(isQemuSystem('/usr/bin/qemu-system-x86_64 (deleted)'), true);
    equal(isQemuSystem('/usr/bin/qemu-img'), false);
    equal(isQemuSystem('/usr/bin/qemu-x86_64'), false);
  });
});

describe('ProcfsDiscovery on a fake /proc', () => {
  it('lists QEMU processes with pid, name, sockets, exe, accel and start time, and nothing else', async () => {
    const root = await mkdtemp(join(tmpdir(), 'idlecrypt-proc-'));
    try {
      const proc = async (pid: number, argv: string[], exe: string, fds: string[] = []) => {
        const dir = join(root, String(pid));
        await mkdir(join(dir, 'fd'), { recursive: true });
        await writeFile(join(dir, 'cmdline'), argv.join('\0') + '\0');
        await writeFile(join(dir, 'stat'), `${pid} (qemu-system-x86) S 1 ${pid} ${pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 777 1 1`);
        await symlink(exe, join(dir, 'exe'));
        await symlink('/srv', join(dir, 'cwd'));
        for (const [i, target] of fds.entries()) await symlink(target, join(dir, 'fd', String(i)));
      };
      await proc(100, ['qemu-system-x86_64', '-name', 'guest=tcg1', '-qmp', 'unix:q.sock,server=on'], '/usr/bin/qemu-system-x86_64', ['/dev/null']);
      await proc(200, ['/usr/bin/qemu-system-x86_64', '-name', 'kvm1'], '/usr/bin/qemu-system-x86_64', ['/dev/kvm', 'anon_inode:kvm-vm']);
      await proc(300, ['bash', '-c', 'qemu-system-x86_64 -name fake'], '/usr/bin/bash');
      await mkdir(join(root, 'self'));
      const vms = await new ProcfsDiscovery({ procRoot: root }).list();
      deepStrictEqual(vms, [
        { pid: 100, name: 'tcg1', qmpSockets: ['/srv/q.sock'], exe: '/usr/bin/qemu-system-x86_64', startTicks: 777, accel: 'tcg' },
        { pid: 200, name: 'kvm1', qmpSockets: [], exe: '/usr/bin/qemu-system-x86_64', startTicks: 777, accel: 'kvm' },
      ]);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it('reads the start time after a comm that holds spaces and parentheses', () => {
    equal(parseStartTicks('42 (a b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 12345 1 1'), 12345);
  });
});
