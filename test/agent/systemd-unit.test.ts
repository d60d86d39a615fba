/**
 * The shipped systemd unit (contrib/systemd/idlecrypt-agent.service) passes
 * `systemd-analyze verify` with nothing to say, and says what the README promises: the
 * agent in the foreground, restarted on failure, SIGTERM to the agent alone to stop (copies
 * left paused, their storage daemons running), SIGHUP to reload, /run/idlecrypt and
 * /var/lib/idlecrypt made by systemd, root only.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

const UNIT = fileURLToPath(new URL('../../contrib/systemd/idlecrypt-agent.service', import.meta.url));
const BIN = fileURLToPath(new URL('../../bin/idlecrypt', import.meta.url));
const run = promisify(execFile);
let dir: string | undefined;
after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** systemd-analyze verify's findings for a unit text ('' = none). */
async function verify(text: string): Promise<string> {
  dir ??= await mkdtemp(path.join(tmpdir(), 'idlecrypt-unit-'));
  const file = path.join(dir, 'idlecrypt-agent.service');
  await writeFile(file, text);
  try {
    const r = await run('systemd-analyze', ['verify', file]);
    return (r.stdout + r.stderr).trim();
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string; code?: number };
    return `exit ${x.code}: ${(x.stdout ?? '') + (x.stderr ?? '')}`.trim();
  }
}

describe('the systemd unit', () => {
  it('verifies cleanly with the command installed where it names it, and catches a broken unit', async () => {
    const text = await readFile(UNIT, 'utf8');
    // The unit names /usr/local/bin/idlecrypt (the README's symlink); verify checks that the
    // command exists, so point it at this checkout's.
    assert.match(text, /^ExecStart=\/usr\/local\/bin\/idlecrypt agent --config \/etc\/idlecrypt\/agent\.yaml$/m);
    const here = text.replaceAll('/usr/local/bin/idlecrypt', BIN);
    assert.equal(await verify(here), '');
    // The check can fail: a typo systemd only warns about, and a command that is not there.
    assert.match(await verify(here.replace('Restart=on-failure', 'Restart=sometimes')), /Failed to parse service restart specifier/);
    assert.match(await verify(text.replaceAll('/usr/local/bin/idlecrypt', '/nonexistent/idlecrypt')), /not executable/);
  });

  it('restarts on failure, stops with SIGTERM, reloads with SIGHUP, and keeps its directories root-only', async () => {
    const text = await readFile(UNIT, 'utf8');
    const keys = new Map(text.split('\n').filter((l) => /^\w+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    assert.equal(keys.get('Restart'), 'on-failure');
    assert.equal(keys.get('KillSignal') ?? 'SIGTERM', 'SIGTERM');
    // The storage daemons of paused copies outlive a stop, so that the next start adopts them.
    assert.equal(keys.get('KillMode'), 'process');
    assert.equal(keys.get('ExecReload'), '/bin/kill -HUP $MAINPID');
    assert.equal(keys.get('RuntimeDirectory'), 'idlecrypt');
    assert.equal(keys.get('RuntimeDirectoryMode'), '0700');
    assert.equal(keys.get('StateDirectory'), 'idlecrypt');
    assert.equal(keys.get('StateDirectoryMode'), '0700');
    assert.equal(keys.get('UMask'), '0077');
    assert.equal(keys.get('LimitMEMLOCK'), 'infinity', 'bpftrace locks its maps');
    for (const cap of ['CAP_BPF', 'CAP_PERFMON', 'CAP_SYS_ADMIN', 'CAP_SYS_PTRACE']) assert.ok(keys.get('CapabilityBoundingSet')?.split(' ').includes(cap), cap);
  });
});
