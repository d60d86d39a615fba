/**
 * QmpClient against a scripted fake server: the wire faults real QEMU cannot be made to show.
 * The real thing is exercised in qmp-client.qemu.test.ts.
 */
import { describe, it, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { firstValueFrom, lastValueFrom, toArray } from 'rxjs';
import { QmpClient, type QmpEvent } from '../../src/qmp/client.ts';
import {
  QmpCommandError,
  QmpDisconnectedError,
  QmpError,
  QmpNotQmpError,
  QmpProtocolError,
  QmpStateError,
  QmpTimeoutError,
} from '../../src/qmp/errors.ts';
import { IdlecryptError } from '../../src/errors.ts';
import {
  FAKE_GREETING,
  FAKE_TIMESTAMP,
  FakeQmpServer,
  captureLogger,
  connectToFake,
  eventMessage,
  line,
} from '../helpers/fake-qmp.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(options: Parameters<typeof connectToFake>[0] = {}) {
  const pair = await connectToFake(options);
  cleanups.push(() => pair.server.stop(), () => pair.client.close());
  return pair;
}

async function startServer(): Promise<FakeQmpServer> {
  const server = await FakeQmpServer.start();
  cleanups.push(() => server.stop());
  return server;
}

/** Resolves to the rejection of `p` (fails the test if `p` resolves). */
async function rejectionOf(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof Error);
    return e;
  }
  assert.fail('expected a rejection');
}

describe('QmpClient handshake', () => {
  it('reads the greeting, negotiates capabilities with an id, and ends in state running', async () => {
    const { client, capabilities } = await setup();
    assert.deepEqual(capabilities, { execute: 'qmp_capabilities', id: 'idlecrypt-1' });
    assert.equal(client.state, 'running');
    assert.deepEqual(client.greeting, FAKE_GREETING);
  });

  it('fails connect with QmpNotQmpError after greetingTimeoutMs when the server stays silent', async () => {
    const server = await startServer();
    const started = Date.now();
    const connecting = QmpClient.connect(server.path, { greetingTimeoutMs: 200 });
    const conn = await server.accept();
    const err = await rejectionOf(connecting);
    const elapsed = Date.now() - started;
    assert.ok(err instanceof QmpNotQmpError);
    assert.equal(err.code, 'QMP_NOT_QMP');
    assert.equal(err.message, `${server.path} is not a QMP socket (no greeting within 0.2 s; is another client connected?)`);
    assert.ok(elapsed >= 190 && elapsed < 2000, `elapsed ${elapsed} ms`);
    await conn.closed; // the client hung up rather than leaking the socket
  });

  for (const [what, first, quoted] of [
    ['a text banner', 'SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n', '"SSH-2.0-OpenSSH_9.2p1 Debian-2"'],
    ['a JSON object without "QMP"', line({ hello: 'world' }), '"{\\"hello\\":\\"world\\"}"'],
    ['a long line with a control character', `\u0007${'x'.repeat(200)}\n`, `"\\u0007${'x'.repeat(79)}" (201 characters)`],
  ] as const) {
    it(`fails connect with QmpNotQmpError when the first message is ${what}`, async () => {
      const server = await startServer();
      const connecting = QmpClient.connect(server.path, { greetingTimeoutMs: 2000 });
      const conn = await server.accept();
      conn.send(first);
      const err = await rejectionOf(connecting);
      assert.ok(err instanceof QmpNotQmpError);
      // The start of what answered, quoted, so that a failure says what it was.
      assert.equal(err.message, `${server.path} is not a QMP socket (its first message is not a QMP greeting: ${quoted})`);
      await conn.closed;
    });
  }

  it('fails connect with QmpDisconnectedError when the server hangs up before greeting', async () => {
    const server = await startServer();
    const connecting = QmpClient.connect(server.path, { greetingTimeoutMs: 2000 });
    (await server.accept()).drop();
    const err = await rejectionOf(connecting);
    assert.ok(err instanceof QmpDisconnectedError);
    assert.equal(err.message, 'QMP connection closed while waiting for the QMP greeting (did QEMU exit?)');
    assert.equal(err.command, undefined);
  });

  it('fails connect with QmpCommandError when qmp_capabilities is refused', async () => {
    const server = await startServer();
    const connecting = QmpClient.connect(server.path);
    const conn = await server.accept();
    conn.send(FAKE_GREETING);
    const cap = await conn.next();
    conn.error(cap.id, 'CommandNotFound', "Capabilities negotiation is already complete, command ignored");
    const err = await rejectionOf(connecting);
    assert.ok(err instanceof QmpCommandError);
    assert.equal(err.message, 'qmp_capabilities: Capabilities negotiation is already complete, command ignored');
    await conn.closed;
  });
});

describe('QmpClient commands', () => {
  it('gives every command a unique idlecrypt-<n> id and sends arguments only when given', async () => {
    const { client, conn } = await setup();
    const a = client.execute('blockdev-del', { 'node-name': 'target0' });
    const b = client.execute('query-status');
    const sentA = await conn.next();
    const sentB = await conn.next();
    assert.deepEqual(sentA, { execute: 'blockdev-del', arguments: { 'node-name': 'target0' }, id: 'idlecrypt-2' });
    assert.deepEqual(sentB, { execute: 'query-status', id: 'idlecrypt-3' });
    conn.reply(sentA.id);
    conn.reply(sentB.id, { running: true, singlestep: false, status: 'running' });
    assert.deepEqual(await a, {});
    assert.deepEqual(await b, { running: true, singlestep: false, status: 'running' });
  });

  it('routes replies by id, not by order, when two replies arrive in one write in reverse order', async () => {
    const { client, conn } = await setup();
    const version = client.execute('query-version');
    const status = client.execute('query-status');
    const [sentV, sentS] = [await conn.next(), await conn.next()];
    const v = { qemu: { major: 7, minor: 2, micro: 0 }, package: 'x' };
    const s = { running: false, singlestep: false, status: 'paused' };
    conn.send(line({ return: s, id: sentS.id }) + line({ return: v, id: sentV.id }));
    assert.deepEqual(await version, v);
    assert.deepEqual(await status, s);
  });

  it('assembles a reply split across writes mid-JSON and mid-UTF-8 character', async () => {
    const { client, conn } = await setup();
    let settled = false;
    const reply = client.executeRaw('query-block').finally(() => (settled = true));
    const sent = await conn.next();
    const ret = [{ device: 'disk-ü-✓', locked: false }];
    const bytes = Buffer.from(line({ id: sent.id, return: ret }), 'utf8');
    const check = bytes.indexOf(Buffer.from('✓', 'utf8')); // a 3-byte character
    const cuts = [5, check + 1, check + 2, bytes.length - 1]; // last cut: between \r and \n
    const chunks = [0, ...cuts].map((from, i) => bytes.subarray(from, cuts[i] ?? bytes.length));
    const lastChunk = chunks.pop()!;
    await conn.sendChunks(chunks);
    await sleep(20);
    assert.equal(settled, false, 'resolved before the line was complete');
    conn.send(lastChunk);
    assert.deepEqual(await reply, ret);
  });

  it('rejects with QmpCommandError naming the command and keeping argument keys but not values', async () => {
    const { client, conn } = await setup();
    const p = client.execute('blockdev-add', { driver: 'file', 'node-name': 'f0', filename: '/srv/SECRET-NAME.img' });
    const sent = await conn.next();
    conn.error(sent.id, 'GenericError', "Could not open '/srv/x.img': No such file or directory");
    const err = await rejectionOf(p);
    assert.ok(err instanceof QmpCommandError);
    assert.ok(err instanceof QmpError && err instanceof IdlecryptError);
    assert.equal(err.code, 'QMP_COMMAND');
    assert.equal(err.name, 'QmpCommandError');
    assert.equal(err.errorClass, 'GenericError');
    assert.equal(err.command, 'blockdev-add');
    assert.equal(err.desc, "Could not open '/srv/x.img': No such file or directory");
    assert.equal(err.message, "blockdev-add: Could not open '/srv/x.img': No such file or directory");
    assert.deepEqual(err.context, { command: 'blockdev-add', errorClass: 'GenericError', argKeys: ['driver', 'node-name', 'filename'] });
    assert.doesNotMatch(JSON.stringify({ m: err.message, c: err.context }), /SECRET/);
  });

  it('rejects a reply with neither return nor error with QmpProtocolError and stays connected', async () => {
    const { client, conn } = await setup();
    const p = client.execute('query-status');
    conn.send({ id: (await conn.next()).id, surprise: true });
    const err = await rejectionOf(p);
    assert.ok(err instanceof QmpProtocolError);
    assert.equal(err.code, 'QMP_PROTOCOL');
    assert.equal(err.message, 'query-status: QEMU sent a reply with neither "return" nor "error"');
    assert.equal(client.state, 'running');
  });

  it('drops a reply with an unknown id with a warning and still resolves the real reply', async () => {
    const { logger, lines } = captureLogger();
    const { client, conn } = await setup({ logger });
    const p = client.execute('query-jobs');
    const sent = await conn.next();
    conn.send(line({ return: [{ id: 'bogus' }], id: 'not-ours-7' }));
    conn.reply(sent.id, []);
    assert.deepEqual(await p, []);
    const warnings = lines.filter((l) => l.level === 40);
    assert.equal(warnings.length, 1);
    assert.equal(warnings[0]?.msg, 'qmp reply with unknown id dropped');
    assert.equal(warnings[0]?.id, 'not-ours-7');
    assert.equal(client.state, 'running');
  });

  it('times out a command with QmpTimeoutError and drops its late reply quietly', async () => {
    const { logger, lines } = captureLogger();
    const { client, conn } = await setup({ logger });
    const started = Date.now();
    const p = client.execute('query-status', undefined, { timeoutMs: 100 });
    const sent = await conn.next();
    const err = await rejectionOf(p);
    assert.ok(Date.now() - started >= 95);
    assert.ok(err instanceof QmpTimeoutError);
    assert.equal(err.code, 'QMP_TIMEOUT');
    assert.equal(err.message, 'query-status: no reply from QEMU within 0.1 s');
    assert.equal(err.command, 'query-status');
    assert.equal(err.timeoutMs, 100);
    conn.reply(sent.id, { running: true, singlestep: false, status: 'running' }); // too late
    const next = client.execute('query-commands');
    conn.reply((await conn.next()).id, [{ name: 'quit' }]);
    assert.deepEqual(await next, [{ name: 'quit' }]);
    assert.deepEqual(lines.filter((l) => (l.level as number) >= 40), []);
    assert.equal(client.state, 'running');
  });

  it('takes the default command timeout from commandTimeoutMs', async () => {
    const { client, conn } = await setup({ commandTimeoutMs: 80 });
    const p = client.execute('query-block');
    await conn.next();
    const err = await rejectionOf(p);
    assert.ok(err instanceof QmpTimeoutError);
    assert.equal(err.message, 'query-block: no reply from QEMU within 0.08 s');
  });
});

describe('QmpClient events', () => {
  it('delivers an event sent before the reply before the command promise resolves', async () => {
    const { client, conn } = await setup();
    const order: string[] = [];
    client.events$.subscribe((e) => order.push(`event ${e.event}`));
    const p = client.execute('stop').then(() => order.push('reply stop'));
    const sent = await conn.next();
    conn.event('STOP');
    await sleep(20); // a separate read
    conn.reply(sent.id);
    await p;
    const q = client.execute('cont').then(() => order.push('reply cont'));
    const sent2 = await conn.next();
    conn.send(line(eventMessage('RESUME')) + line({ return: {}, id: sent2.id })); // same read
    await q;
    assert.deepEqual(order, ['event STOP', 'reply stop', 'event RESUME', 'reply cont']);
  });

  it('filters events by name, in wire order, and supplies {} for events without data', async () => {
    const { client, conn } = await setup();
    const all: QmpEvent[] = [];
    client.events$.subscribe((e) => all.push(e));
    const filtered: QmpEvent<'STOP' | 'JOB_STATUS_CHANGE'>[] = [];
    client.events('STOP', 'JOB_STATUS_CHANGE').subscribe((e) => filtered.push(e));
    conn.send(
      line(eventMessage('JOB_STATUS_CHANGE', { id: 'mirror0', status: 'running' })) +
        line(eventMessage('RESUME')) +
        line(eventMessage('STOP')) +
        line(eventMessage('JOB_STATUS_CHANGE', { id: 'mirror0', status: 'ready' })),
    );
    const p = client.execute('query-status');
    conn.reply((await conn.next()).id, { running: true, singlestep: false, status: 'running' });
    await p; // the events were sent first, so they are in by now
    assert.deepEqual(all.map((e) => e.event), ['JOB_STATUS_CHANGE', 'RESUME', 'STOP', 'JOB_STATUS_CHANGE']);
    assert.deepEqual(filtered, [
      { event: 'JOB_STATUS_CHANGE', data: { id: 'mirror0', status: 'running' }, timestamp: FAKE_TIMESTAMP },
      { event: 'STOP', data: {}, timestamp: FAKE_TIMESTAMP },
      { event: 'JOB_STATUS_CHANGE', data: { id: 'mirror0', status: 'ready' }, timestamp: FAKE_TIMESTAMP },
    ]);
  });

  it('logs command names and event names but never argument values or event data', async () => {
    const { logger, lines } = captureLogger();
    const { client, conn } = await setup({ logger });
    const p = client.execute('object-add', { 'qom-type': 'secret', id: 'sec0', file: '/run/SECRET-KEYFILE' });
    const sent = await conn.next();
    conn.event('INPUT_EVENT', { key: 'SECRET-KEYCODE' });
    conn.error(sent.id, 'GenericError', 'attempt to add duplicate property');
    await rejectionOf(p);
    const text = JSON.stringify(lines);
    assert.doesNotMatch(text, /SECRET/);
    assert.ok(lines.some((l) => l.msg === 'qmp command' && l.cmd === 'object-add' && l.id === sent.id));
    assert.ok(lines.some((l) => l.msg === 'qmp event' && l.event === 'INPUT_EVENT'));
    assert.ok(lines.some((l) => l.msg === 'qmp error reply' && l.cmd === 'object-add' && l.errorClass === 'GenericError'));
  });
});

describe('QmpClient disconnects', () => {
  it('rejects every pending command with QmpDisconnectedError naming it when the server drops', async () => {
    const { client, conn } = await setup();
    const events = lastValueFrom(client.events$.pipe(toArray()));
    const a = client.execute('query-block');
    const b = client.execute('block-job-complete', { device: 'mirror0' });
    await conn.next();
    await conn.next();
    conn.drop();
    const [ea, eb] = [await rejectionOf(a), await rejectionOf(b)];
    assert.ok(ea instanceof QmpDisconnectedError && eb instanceof QmpDisconnectedError);
    assert.equal(ea.code, 'QMP_DISCONNECTED');
    assert.equal(ea.message, 'QMP connection closed while waiting for query-block (did QEMU exit?)');
    assert.equal(ea.command, 'query-block');
    assert.equal(eb.message, 'QMP connection closed while waiting for block-job-complete (did QEMU exit?)');
    const closed = await firstValueFrom(client.closed$); // a late subscriber still gets it
    assert.ok(closed instanceof QmpDisconnectedError);
    assert.equal(closed.message, 'QMP connection closed (did QEMU exit?)');
    assert.equal(closed.command, undefined);
    assert.deepEqual(await events, []); // events$ completed
    assert.equal(client.state, 'closed');
    const late = await rejectionOf(client.execute('query-status'));
    assert.ok(late instanceof QmpStateError);
    assert.equal(late.code, 'QMP_STATE');
    assert.equal(late.message, 'cannot execute query-status: the QMP connection is closed');
  });

  it('close() fails pending commands, emits undefined on closed$, and is idempotent', async () => {
    const { client, conn } = await setup();
    const closedValues: unknown[] = [];
    client.closed$.subscribe((v) => closedValues.push(v));
    const p = rejectionOf(client.execute('query-status'));
    await conn.next();
    await Promise.all([client.close(), client.close()]);
    const err = await p;
    assert.ok(err instanceof QmpDisconnectedError);
    assert.equal(err.message, 'QMP connection closed while waiting for query-status (close() was called)');
    assert.deepEqual(closedValues, [undefined]);
    assert.equal(client.state, 'closed');
    await conn.closed;
    await client.close();
    assert.deepEqual(closedValues, [undefined]);
  });

  it('ends the connection on a line that is not JSON and fails pending commands with the reason', async () => {
    const { client, conn } = await setup();
    const p = client.execute('query-status');
    await conn.next();
    conn.send('this is not json\r\n');
    const err = await rejectionOf(p);
    assert.ok(err instanceof QmpDisconnectedError);
    assert.equal(err.message,
      'QMP connection closed while waiting for query-status (protocol error: QEMU sent a line that is not a JSON object)');
    assert.ok(err.cause instanceof QmpProtocolError);
    assert.equal(err.cause.code, 'QMP_PROTOCOL');
    const closed = await firstValueFrom(client.closed$);
    assert.equal(closed?.message, 'QMP connection closed (protocol error: QEMU sent a line that is not a JSON object)');
    assert.equal(client.state, 'closed');
    await conn.closed;
  });

  it('ends the connection on an error reply without an id, since it belongs to no command', async () => {
    const { client, conn } = await setup();
    const p = client.execute('query-status');
    await conn.next();
    conn.send({ error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } });
    const err = await rejectionOf(p);
    assert.equal(err.message,
      'QMP connection closed while waiting for query-status (protocol error: QEMU reported an error without an id (GenericError))');
    await firstValueFrom(client.closed$);
    assert.equal(client.state, 'closed');
  });
});
