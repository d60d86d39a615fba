/** Run records (src/encrypt/runs.ts): atomic, found by target, owned by a live process or not. */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm, stat, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ownerAlive, RunStore, selfOwner, type RunRecord } from '../../src/encrypt/runs.ts';

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'idlecrypt-runs-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const rec = (tag: string, target: string, owner = selfOwner()): RunRecord => ({
  version: 1,
  tag,
  owner,
  vm: 'vm1',
  qmp: '/run/vm1.qmp',
  device: 'disk0',
  source: '/img/vm1.raw',
  target,
  format: 'luks',
  keyFile: '/etc/idlecrypt/vm1.key',
  phase: 'copying',
  createdAt: 1,
  copyStartedAt: 2,
});

describe('run records', () => {
  test('saved atomically, root-only, found by their target, removed', async () => {
    const store = new RunStore(path.join(dir, 'a'));
    assert.deepEqual(await store.list(), [], 'no directory yet: no records');
    await store.save(rec('aa', '/img/a.luks'));
    await store.save(rec('bb', '/img/b.luks'));
    await store.save({ ...rec('aa', '/img/a.luks'), phase: 'completing' });
    assert.deepEqual((await readdir(store.dir)).sort(), ['aa.json', 'bb.json'], 'no temporary files left');
    assert.equal((await stat(path.join(store.dir, 'aa.json'))).mode & 0o777, 0o600);
    assert.equal((await stat(store.dir)).mode & 0o777, 0o700);
    assert.equal((await store.forTarget('/img/a.luks'))?.phase, 'completing');
    assert.equal((await store.forTarget('/img/../img/b.luks'))?.tag, 'bb', 'by the absolute path');
    assert.equal(await store.forTarget('/img/c.luks'), undefined);
    await store.remove('aa');
    assert.deepEqual((await store.list()).map((r) => r.tag), ['bb']);
  });

  test('files that are not records are skipped', async () => {
    const store = new RunStore(path.join(dir, 'b'));
    await mkdir(store.dir, { recursive: true });
    await writeFile(path.join(store.dir, 'junk.json'), '{not json');
    await writeFile(path.join(store.dir, 'other.json'), '{"version":2,"tag":"x","target":"/t"}');
    await store.save(rec('cc', '/img/c.luks'));
    assert.deepEqual((await store.list()).map((r) => r.tag), ['cc']);
  });

  test('the owner is alive only while the same process (pid and start time) runs, and never this one', async () => {
    assert.equal(ownerAlive(rec('x', '/t')), false, 'this process reading its own record');
    const child = spawn('sleep', ['30']);
    try {
      const start = Number((await import('node:fs')).readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[19]);
      assert.equal(ownerAlive(rec('y', '/t', { pid: child.pid!, start })), true);
      assert.equal(ownerAlive(rec('y', '/t', { pid: child.pid!, start: start - 1 })), false, 'a reused pid is not the owner');
    } finally {
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
    }
    assert.equal(ownerAlive(rec('y', '/t', { pid: child.pid!, start: 0 })), false, 'a dead owner');
  });
});
