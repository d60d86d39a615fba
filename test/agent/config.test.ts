/** The agent's configuration (src/agent/config.ts): keys, defaults, and every problem with its place. */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { expand, globMatch, parseAgentConfig } from '../../src/agent/config.ts';
import { IdlecryptError } from '../../src/errors.ts';

const F = '/etc/idlecrypt/agent.yaml';

function problems(text: string): string[] {
  try {
    parseAgentConfig(text, F);
  } catch (e) {
    assert.ok(e instanceof IdlecryptError && e.code === 'CONFIG', String(e));
    return (e.context.issues as { line: number; col: number; path: string; message: string }[]).map((i) => `${i.line}:${i.col} ${i.path}: ${i.message}`);
  }
  return [];
}

describe('agent configuration', () => {
  it('reads the keys of the issue, with defaults for what is left out', () => {
    const c = parseAgentConfig(
      [
        'influx: http://127.0.0.1:8086/idlecrypt',
        'host:',
        '  max-speed: 200M',
        'encrypt:',
        '  - vm: "web*"',
        '    disks: [vd0]',
        '    target: /var/lib/idlecrypt/{vm}-{disk}.luks',
        '    key-file: /etc/idlecrypt/keys/{vm}.key',
        '  - vm: db',
        '    disks: all',
        '    target: /srv/{vm}-{disk}.qcow2',
        '    key-file: /etc/idlecrypt/keys/db.key',
        '    format: qcow2',
        '    encrypter: qemu',
        '    qmp: /run/qemu/{vm}.qmp',
      ].join('\n'),
      F,
    );
    assert.deepEqual(c.host, { maxJobs: 1, maxSpeed: 200 * 1024 * 1024, protect: 'storage' });
    assert.equal(c.influx, 'http://127.0.0.1:8086/idlecrypt');
    assert.equal(c.backend, 'auto', 'QMP where a VM has a socket, libvirt where libvirt runs it');
    assert.equal(c.connect, 'qemu:///system');
    const lv = parseAgentConfig('backend: libvirt\nconnect: qemu+ssh://host/system\n', F);
    assert.deepEqual([lv.backend, lv.connect, lv.libvirtPause], ['libvirt', 'qemu+ssh://host/system', 'speed']);
    assert.equal(parseAgentConfig('libvirt-pause: qemu\n', F).libvirtPause, 'qemu');
    assert.equal(c.policy.thresholds.stall, 800, 'the shipped policy when none is named');
    // No encrypter: the backend's own (the QMP backend's qemu-storage-daemon, libvirt's copy).
    assert.deepEqual(c.encrypt, [
      { vm: 'web*', disks: ['vd0'], target: '/var/lib/idlecrypt/{vm}-{disk}.luks', keyFile: '/etc/idlecrypt/keys/{vm}.key', format: 'auto' },
      { vm: 'db', disks: 'all', target: '/srv/{vm}-{disk}.qcow2', keyFile: '/etc/idlecrypt/keys/db.key', format: 'qcow2', encrypter: 'qemu', qmp: '/run/qemu/{vm}.qmp' },
    ]);
  });

  it('names each problem by file:line:column and key, unknown keys with a suggestion', () => {
    assert.deepEqual(
      problems(['host:', '  max-jobs: 0', '  protekt: vm', 'encrypt:', '  - vm: "web*"', '    disks: [vd0]', '    target: /x/{vm}.luks', '    key-file: keys/{vm}.key', '    format: luks2', '    encrypter: gpu'].join('\n')),
      [
        '2:13 host.max-jobs: must be at least 1',
        '3:3 host.protekt: unknown key (did you mean protect?); expected one of max-jobs, max-speed, protect',
        '8:15 encrypt.0.key-file: the key file path must be an absolute path',
        '9:13 encrypt.0.format: expected auto, luks or qcow2, got "luks2"',
        '10:16 encrypt.0.encrypter: expected qemu or storage-daemon, got "gpu"',
      ],
    );
    assert.deepEqual(problems('encrypt:\n  - vm: a\n    disks: all\n    target: /x/{vm}.luks\n    key-file: /k\n'), ['4:13 encrypt.0.target: needs {disk} when the entry names more than one disk (each disk gets its own image)']);
    assert.deepEqual(problems('encrypt:\n  - vm: "a*"\n    disks: [d]\n    target: /x/{vm}-{disk}.luks\n    key-file: /k/{host}\n'), ['5:15 encrypt.0.key-file: unknown placeholder {host}; the placeholders are {vm} and {disk}']);
    assert.deepEqual(problems('influx: ftp://x\n').length, 1);
    assert.deepEqual(problems('backend: virsh\nconnect: localhost\n'), ['1:10 backend: expected auto, qmp or libvirt, got "virsh"', '2:10 connect: expected a libvirt URI such as qemu:///system']);
    assert.deepEqual(problems('libvirt-pause: pause\n'), ['1:16 libvirt-pause: expected speed or qemu, got "pause"']);
    assert.deepEqual(problems('host: [1]\n'), ['1:7 host: expected a mapping (key: value lines), got a list']);
    assert.match(problems('host:\n  max-jobs: 1\n max-speed: 2\n')[0]!, /^3:\d+ .*YAML syntax/);
  });

  it('validates an inline policy as a policy file, at its lines in this file', () => {
    const c = parseAgentConfig('host:\n  max-jobs: 2\npolicy:\n  thresholds:\n    disk: 50\n', F);
    assert.equal(c.policy.thresholds.disk, 50);
    assert.equal(c.policy.thresholds.keyboard, 0, 'merged over the shipped default');
    assert.throws(() => parseAgentConfig('host:\n  max-jobs: 2\npolicy:\n  thresholds:\n    disk: lots\n', F), (e: IdlecryptError) => {
      assert.equal(e.code, 'POLICY');
      assert.match(e.message, /^\/etc\/idlecrypt\/agent\.yaml:5:11: thresholds\.disk: /);
      return true;
    });
  });

  it('matches VM names by glob and fills in the placeholders', () => {
    assert.ok(globMatch('web*', 'web-1'));
    assert.ok(!globMatch('web*', 'db-web'));
    assert.ok(globMatch('db-?', 'db-1') && !globMatch('db-?', 'db-12'));
    assert.ok(globMatch('vm[0-9]', 'vm7') && !globMatch('vm[!0-9]', 'vm7'));
    assert.ok(globMatch('a.b', 'a.b') && !globMatch('a.b', 'axb'));
    assert.equal(expand('/v/{vm}-{disk}.luks', 'web/1', 'vd0'), '/v/web_1-vd0.luks');
  });
});
