/**
 * `npm run demo`: the main job, end to end, on the bundled test guest.
 *
 * Boots the test VM (TCG) with a bursty workload (idle and busy disk phases), encrypts its
 * disk in the background with a moderated `idlecrypt encrypt` and its live progress view,
 * writes the metrics to a local influxd on loopback (when the influxdb package is
 * installed) or else to a line-protocol file, checks that the guest now runs on the
 * encrypted image, that the image decrypts to the guest's data and that every dashboard
 * panel has data, and says where everything is.
 *
 *   npm run demo [-- --size-mib 1024] [--keep] [--libvirt]
 *
 * --libvirt: the guest is a libvirt domain (`idlecrypt-demo`, TCG, defined and started
 * through virsh; libvirtd is started if it is not running), encrypted with
 * `idlecrypt encrypt --domain idlecrypt-demo --disk vda` through libvirt's block copy; the
 * demo shows `idlecrypt status --domain` (the running image and the next boot's), and
 * removes the domain and its secret at the end.
 *
 * Output: ./demo-output/ (metrics, influxd data, logs); the disk images live in a temp
 * folder that is removed at the end unless --keep is given.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { InfluxDB } from 'influx';
import { ensureImage, makeDiskImage, startTestVm } from '../vm-images/launch.ts';
import { ensureLibvirtd, TestDomain, virsh } from '../vm-images/libvirt.ts';
import { startInfluxd, INFLUXD, type Influxd } from '../test/helpers/influxd.ts';
import { checkPanels } from '../dashboards/queries.ts';
import { hostTag } from '../src/metrics/index.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BIN = path.join(ROOT, 'bin/idlecrypt');
const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '1024' }, keep: { type: 'boolean', default: false }, libvirt: { type: 'boolean', default: false } } });
const sizeMiB = Number(values['size-mib']);
const OUT = path.join(ROOT, 'demo-output');

const bold = (s: string) => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const say = (s: string) => process.stdout.write(`${bold('==>')} ${s}\n`);

ensureImage();
await rm(OUT, { recursive: true, force: true });
await mkdir(OUT, { recursive: true });
const work = await mkdtemp(path.join(tmpdir(), 'idlecrypt-demo-'));
const source = path.join(work, 'guest.raw');
const target = path.join(work, 'guest.luks');
const keyFile = path.join(work, 'guest.key');
const policyFile = path.join(OUT, 'demo-policy.yaml');

say(`making a ${sizeMiB} MiB guest disk with recognisable data (in ${work})`);
await makeDiskImage(source, { sizeMiB, format: 'raw', fill: 'pattern' });
await writeFile(keyFile, randomBytes(32).toString('base64url'), { mode: 0o600 });
// The shipped policy, with the idle speed capped so that a demo-sized disk takes long
// enough to show the job pausing for busy phases and resuming in idle ones.
await writeFile(policyFile, `# demo: the default policy with a capped idle speed\nspeed:\n  idle: ${Math.max(16, Math.round(sizeMiB / 24))}MiB\n`);

let influxd: Influxd | undefined;
if (existsSync(INFLUXD)) {
  influxd = await startInfluxd({ dir: path.join(OUT, 'influxdb') });
  say(`InfluxDB running on ${influxd.url} (data in demo-output/influxdb)`);
} else {
  say('no influxd here (apt-get install influxdb): metrics go to a line-protocol file');
}

const params = { idle: 6, busy: 6 };
let guest: { name: string; pid: number; args: string[]; status: string[]; stop: () => Promise<void> } | undefined;
let exitCode = 0;
try {
  if (values.libvirt) {
    const name = 'idlecrypt-demo';
    say(`starting libvirtd if needed, and the test guest as libvirt domain '${name}' (TCG): 6 s idle, 6 s of disk I/O, repeating`);
    await ensureLibvirtd();
    await chmod(work, 0o755); // libvirt's QEMU runs as libvirt-qemu and must reach the images
    await virsh('destroy', name).catch(() => undefined); // a demo interrupted before its clean-up
    await virsh('undefine', name).catch(() => undefined);
    const d = await TestDomain.start({ name, dir: work, disk: source, workload: 'bursty', params });
    guest = {
      name,
      pid: await d.pid(),
      args: ['--domain', name, '--disk', 'vda'],
      status: ['status', '--domain', name],
      stop: async () => {
        await d.remove();
        // The secret our run defined for the image (usage volume = the target): the domain is gone.
        for (const m of (await virsh('secret-list').catch(() => '')).matchAll(/^\s*([0-9a-f-]{36})\s+volume (\S+)/gm)) {
          if (m[2] === target) await virsh('secret-undefine', m[1]!).catch(() => undefined);
        }
      },
    };
  } else {
    say('booting the test VM (TCG): 6 s idle, 6 s of disk I/O, repeating');
    const vm = await startTestVm({ name: 'demo', disk: source, dir: path.join(work, 'vm'), workload: 'bursty', params });
    guest = { name: 'demo', pid: vm.pid, args: ['--qmp', vm.toolQmpSocket, '--device', 'disk0'], status: ['status', '--qmp', vm.toolQmpSocket], stop: () => vm.stop() };
    await vm.ready;
  }
  say(`guest up (QEMU pid ${guest.pid}); encrypting its disk while it runs, moderated by guest activity:`);
  const metricsArgs = influxd ? ['--influx', influxd.influxUrl('idlecrypt')] : ['--metrics-file', path.join(OUT, 'metrics.lp')];
  const args = ['encrypt', ...guest.args, '--target', target, '--key-file', keyFile, '--policy', policyFile, ...metricsArgs];
  process.stdout.write(`    idlecrypt ${args.join(' ')}\n`);
  const code = await new Promise<number>((resolve) => {
    const child = spawn(BIN, args, { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, IDLECRYPT_LOG: process.env.IDLECRYPT_LOG ?? 'error' } });
    // Ctrl-C reaches the child through the terminal; the demo waits for it to clean up.
    process.on('SIGINT', () => {});
    child.on('close', (c) => resolve(c ?? 1));
  });
  if (code !== 0) {
    exitCode = code;
    say(`encrypt exited with ${code}; the guest still runs on ${source}`);
  } else {
    say(values.libvirt ? 'the guest now runs on its encrypted disk, and its next boot will too:' : 'the guest now runs on its encrypted disk:');
    execFileSync(BIN, guest.status, { stdio: 'inherit' });
    say('verifying: the encrypted image, decrypted with the key, equals the guest\'s data');
    // The guest's disk loop writes back the bytes it read, so the data stays comparable
    // while the guest runs; -U lets qemu-img read images QEMU holds open.
    const cmp = compare(source, target, keyFile);
    say(cmp.ok ? `verified: ${cmp.text}` : `MISMATCH: ${cmp.text}`);
    if (!cmp.ok) exitCode = 1;
    say(`plaintext markers in the raw encrypted file: ${await countMarkers(target)} (in the source: ${await countMarkers(source)})`);
    if (influxd) {
      // The host row shows the agent (idlecrypt agent); this run fills every other panel.
      const check = await checkPanels(new InfluxDB(influxd.influxUrl('idlecrypt')), JSON.parse(readFileSync(path.join(ROOT, 'dashboards/json/idlecrypt.json'), 'utf8')), { host: hostTag(), vm: guest.name }, { runOnly: true });
      const other = check.policyOnly > 0 ? `; ${check.policyOnly} more plot what only other policies write, such as latency.margin` : '';
      say(`dashboard: ${check.panelsWithData} of ${check.panels} panels have data (the host row shows idlecrypt agent, not run here${other})`);
      if (check.panelsWithData !== check.panels) exitCode = 1;
      const counts = await influxd.query('SELECT count("interval_s") FROM "idlecrypt_activity"; SELECT count("state_code") FROM "idlecrypt_moderation"; SELECT count("bytes_done") FROM "idlecrypt_job"', 'idlecrypt');
      const n = (i: number) => String(counts.results[i]?.series?.[0]?.values[0]?.[1] ?? 0);
      say(`metrics in InfluxDB: ${n(0)} activity samples, ${n(1)} moderation states, ${n(2)} job readings`);
    }
  }
} catch (e) {
  exitCode = 1;
  process.stderr.write(`demo: ${(e as Error).message}\n`);
} finally {
  await guest?.stop();
  await influxd?.stop();
  if (values.keep) say(`kept ${work} (source, encrypted image, key)`);
  else await rm(work, { recursive: true, force: true });
}
say('where things are:');
process.stdout.write(
  influxd
    ? `    metrics:    demo-output/influxdb (start it again: influxd -config demo-output/influxdb/influxd.conf; database idlecrypt)\n`
    : `    metrics:    demo-output/metrics.lp (load: curl -XPOST 'http://127.0.0.1:8086/write?db=idlecrypt' --data-binary @demo-output/metrics.lp)\n`,
);
process.stdout.write(
  `    dashboards: dashboards/json/idlecrypt.json, with Grafana provisioning in dashboards/provisioning/ (see dashboards/README.md)\n` +
    `    policy:     ${path.relative(ROOT, policyFile)} (the shipped default: policy/default.yaml)\n`,
);
process.exit(exitCode);

/** How many 'IDLECRYPT-DATA' markers (one per 32 bytes of the test data) a file holds. */
async function countMarkers(file: string): Promise<number> {
  const needle = Buffer.from('IDLECRYPT-DATA');
  let n = 0;
  let tail = Buffer.alloc(0);
  for await (const chunk of createReadStream(file, { highWaterMark: 4 << 20 })) {
    const buf = Buffer.concat([tail, chunk as Buffer]);
    for (let i = buf.indexOf(needle); i !== -1; i = buf.indexOf(needle, i + 1)) n++;
    // keep a tail shorter than the needle, so no match is counted twice
    tail = buf.subarray(Math.max(0, buf.length - needle.length + 1));
  }
  return n;
}

function compare(plain: string, enc: string, key: string): { ok: boolean; text: string } {
  try {
    const out = execFileSync('qemu-img', ['compare', '-U', '--object', `secret,id=sec0,file=${key}`, '--image-opts', `driver=file,filename=${plain}`, `driver=luks,key-secret=sec0,file.filename=${enc}`], { encoding: 'utf8' });
    return { ok: true, text: out.trim() };
  } catch (e) {
    return { ok: false, text: String((e as { stdout?: string }).stdout ?? (e as Error).message).trim() };
  }
}
