/**
 * Issue 13 in the suite: a real OS and a real database. The Debian 12 test guest
 * (vm-images/debian/) runs PostgreSQL 15 under pgbench while `idlecrypt encrypt`, with the
 * shipped default policy, copies its root disk into a LUKS image and pivots it there. Then:
 *   - the database passes its own checks (pg_amcheck on every relation of every database,
 *     heap and B-tree indexes, every heap tuple found in its indexes);
 *   - the guest is shut down and started again on the encrypted image (with the key), and
 *     the database is still consistent and holds every transaction pgbench reported
 *     committed (one pgbench_history row each, TPC-B-like);
 *   - the LUKS image holds no plaintext: a marker row written before the copy is in the
 *     source disk and not in the target.
 * Run: `bash scripts/test.sh realos`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { copyDebianDisk, debianImage, startDebianVm, type DebianVm } from '../../vm-images/debian.ts';
import { jsonLines, startCli } from '../helpers/cli.ts';
import { fileContains, imageInfo, writeKey } from '../helpers/images.ts';

/** pgbench's scale: 2 x 100,000 accounts, about 30 MiB, initialised in ~7 s under TCG. */
const SCALE = 2;
/** Long enough for the copy to start (probes attached, LUKS header written) and be held while the database is busy. */
const BENCH_SECONDS = 20;
const MARKER = `IDLECRYPT-PLAINTEXT-MARKER-${process.pid}-${Date.now()}`;

let dir: string;
let keyFile: string;
const guests: DebianVm[] = [];

before(async () => {
  debianImage();
  dir = await mkdtemp(path.join(tmpdir(), 'ic-realos-'));
  keyFile = path.join(dir, 'key');
  await writeKey(keyFile, 'real os guest key');
});
after(async () => {
  await Promise.all(guests.map((g) => g.stop()));
  await rm(dir, { recursive: true, force: true });
});

const psql = (sql: string) => `runuser -u postgres -- psql -X -q -t -A -v ON_ERROR_STOP=1 -c ${shellQuote(sql)}`;
function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}
const AMCHECK = 'runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_amcheck --all --install-missing --heapallindexed';

async function boot(name: string, disk: string, extra: { format?: 'luks'; keyFile?: string } = {}): Promise<DebianVm> {
  const g = await startDebianVm({ name, disk, ...extra });
  guests.push(g);
  await g.vm.ready;
  await g.agent.ready;
  return g;
}

/** `p`, or 'timeout' after `ms` (the timer does not outlive the race: it would hold the test process). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

async function powerOff(g: DebianVm): Promise<number | null> {
  // The agent may be stopped before it reports the command done: that is the shutdown.
  await g.agent.run('systemctl --no-block poweroff').catch((e: Error) => {
    if (!/connection closed/.test(e.message)) throw e;
  });
  const code = await within(g.vm.exited, 120_000);
  assert.notEqual(code, 'timeout', 'the guest powered off within 2 min');
  return code as number | null;
}

describe('a real OS: PostgreSQL under pgbench, encrypted live (issue 13)', () => {
  test(`pgbench runs while its disk is encrypted with the default policy; the database passes pg_amcheck, and after a restart on the LUKS image it is consistent and holds every committed transaction`, async (t) => {
    const disk = await copyDebianDisk(dir);
    const target = path.join(dir, 'debian.luks');
    const t0 = Date.now();
    const g = await boot('pg', disk);
    t.diagnostic(`boot to ready: ${((Date.now() - t0) / 1000).toFixed(1)} s`);

    await g.agent.run(psql(`CREATE TABLE idlecrypt_marker(t text); INSERT INTO idlecrypt_marker VALUES ('${MARKER}'); CHECKPOINT;`));
    await g.agent.run(`runuser -u postgres -- pgbench -i -q -s ${SCALE} postgres`);
    await g.agent.run(psql('CHECKPOINT;'));

    // pgbench and the copy at once: the copy starts while the database is busy.
    const benchOut: string[] = [];
    const bench = g.agent.run(`runuser -u postgres -- pgbench -c 4 -j 2 -T ${BENCH_SECONDS} -P 5 postgres`, { onLine: (l) => benchOut.push(l) });
    const run = startCli(['encrypt', '--qmp', g.vm.toolQmpSocket, '--device', 'disk0', '--target', target, '--key-file', keyFile, '--iter-time', '50', '--json']);
    const benchResult = await bench;
    const tps = /^tps = ([\d.]+)/m.exec(benchResult.lines.join('\n'))?.[1];
    const reported = Number(/number of transactions actually processed: (\d+)/.exec(benchResult.lines.join('\n'))?.[1]);
    t.diagnostic(`pgbench during the copy: ${reported} transactions, tps ${tps}`);
    assert.ok(reported > 0, `pgbench reported its transactions:\n${benchResult.lines.join('\n')}`);
    const failed = /number of failed transactions: (\d+)/.exec(benchResult.lines.join('\n'))?.[1];
    assert.equal(failed ?? '0', '0', 'no pgbench transaction failed');

    const res = await within(run.result, 300_000);
    assert.notEqual(res, 'timeout', `idlecrypt encrypt finished within 5 min of pgbench's end:\n${run.stderr().slice(-3000)}`);
    if (res === 'timeout') return;
    assert.equal(res.code, 0, `idlecrypt encrypt succeeded:\n${res.stderr.slice(-3000)}`);
    const records = jsonLines(res.stdout);
    const paused = records.some((r) => r.event === 'progress' && (r.paused === true || r.mode === 'paused'));
    t.diagnostic(`encrypt: ${((Date.now() - t0) / 1000).toFixed(1)} s from boot; job seen paused while busy: ${paused}`);
    assert.equal((await imageInfo(target)).format, 'luks');

    // On the LUKS image now: the database checks itself, and holds what pgbench reported.
    const check1 = await g.agent.run(AMCHECK, { allowFail: true });
    assert.equal(check1.code, 0, `pg_amcheck after the pivot:\n${check1.lines.join('\n')}`);
    const rows1 = Number((await g.agent.run(psql('SELECT count(*) FROM pgbench_history;'))).lines.join('').trim());
    assert.ok(rows1 >= reported, `pgbench_history has ${rows1} rows, pgbench reported ${reported} transactions`);
    assert.equal(await powerOff(g), 0);

    // Started again on the encrypted image, with the key.
    const g2 = await boot('pg2', target, { format: 'luks', keyFile });
    const check2 = await g2.agent.run(AMCHECK, { allowFail: true });
    assert.equal(check2.code, 0, `pg_amcheck after the restart on the LUKS image:\n${check2.lines.join('\n')}`);
    const rows2 = Number((await g2.agent.run(psql('SELECT count(*) FROM pgbench_history;'))).lines.join('').trim());
    assert.equal(rows2, rows1, 'the restarted database holds the same transactions');
    const marker = (await g2.agent.run(psql('SELECT t FROM idlecrypt_marker;'))).lines.join('').trim();
    assert.equal(marker, MARKER);
    assert.equal(await powerOff(g2), 0);

    // Plaintext on the source, none in the LUKS image.
    const [inSource, inTarget] = await Promise.all([fileContains(disk, MARKER), fileContains(target, MARKER)]);
    assert.ok(inSource, 'the marker is in the source disk (the check can see it)');
    assert.ok(!inTarget, 'the LUKS image holds no plaintext marker');
    t.diagnostic(`whole test: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  });
});
