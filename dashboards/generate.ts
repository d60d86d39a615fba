/**
 * Writes the dashboards as JSON for Grafana's file provisioning:
 *
 *   node --import tsx dashboards/generate.ts            writes dashboards/json/*.json
 *   node --import tsx dashboards/generate.ts --out DIR  writes them to DIR instead
 *   node --import tsx dashboards/generate.ts --check    exits 1 if the committed JSON is stale
 *
 * The output is deterministic (no timestamps, ids assigned in order, 2-space JSON with a
 * final newline), so regenerating without a code change changes no byte; a test checks it.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildDashboard } from './idlecrypt.ts';

export const JSON_DIR = fileURLToPath(new URL('./json/', import.meta.url));

/** File name -> content of every generated dashboard. */
export function renderDashboards(): Map<string, string> {
  return new Map([['idlecrypt.json', `${JSON.stringify(buildDashboard(), null, 2)}\n`]]);
}

export async function writeDashboards(dir: string = JSON_DIR): Promise<string[]> {
  await fs.mkdir(dir, { recursive: true });
  const written: string[] = [];
  for (const [name, content] of renderDashboards()) {
    const file = path.join(dir, name);
    await fs.writeFile(file, content);
    written.push(file);
  }
  return written;
}

/** The generated files whose committed copy in `dir` differs (or is missing). */
export async function staleDashboards(dir: string = JSON_DIR): Promise<string[]> {
  const stale: string[] = [];
  for (const [name, content] of renderDashboards()) {
    const committed = await fs.readFile(path.join(dir, name), 'utf8').catch(() => null);
    if (committed !== content) stale.push(name);
  }
  return stale;
}

async function main(argv: string[]): Promise<number> {
  const outAt = argv.indexOf('--out');
  const out = outAt >= 0 ? argv[outAt + 1] : undefined;
  if (outAt >= 0 && !out) {
    process.stderr.write('generate: --out needs a directory\n');
    return 2;
  }
  if (argv.includes('--check')) {
    const stale = await staleDashboards(out ?? JSON_DIR);
    if (stale.length > 0) {
      process.stderr.write(`generate: out of date: ${stale.join(', ')} (run: node --import tsx dashboards/generate.ts)\n`);
      return 1;
    }
    process.stdout.write('dashboards are up to date\n');
    return 0;
  }
  for (const file of await writeDashboards(out ?? JSON_DIR)) process.stdout.write(`wrote ${path.relative(process.cwd(), file)}\n`);
  return 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
