/** `npm run demo` runs to completion: the guest ends on its encrypted disk, verified. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

test('the demo encrypts the running test guest, verifies it, and every dashboard panel has data', () => {
  // The same script as `npm run demo` (setup already ran for the test suite), smaller disk.
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/demo.ts', '--size-mib', '128'], { cwd: ROOT, encoding: 'utf8', timeout: 300_000 });
  const out = `${r.stdout}\n${r.stderr}`;
  assert.equal(r.status, 0, out);
  assert.match(r.stdout, /^disk0\s+idlecrypt-[0-9a-f]{8}\s+luks\s+128\.0 MiB\s+yes\s+\S+guest\.luks$/m);
  assert.match(r.stdout, /==> verified: Images are identical\./);
  assert.match(r.stdout, /==> plaintext markers in the raw encrypted file: 0 \(in the source: 4194304\)/);
  assert.match(r.stdout, /==> dashboard: (\d+) of \1 panels have data/);
  assert.match(r.stdout, /now runs on the encrypted image/);
  console.log(r.stdout.split('\n').filter((l) => l.startsWith('==>')).join('\n'));
});
