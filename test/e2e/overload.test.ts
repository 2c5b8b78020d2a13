// Overload: refuse fast, never trickle. Past a limit cuttle answers a labelled 503 at once (a CVMFS
// client then fails over to its next proxy) instead of serving slowly: when --fill-memory is spent, a
// new fill is refused while joiners of a running one are served; while the event loop lags past
// --max-loop-lag, a new connection is refused. The listen backlog is --listen-backlog, as the kernel
// reports it, and the kernel's accept-queue drops are counted in /metrics.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { Worker } from 'node:worker_threads';
import { randomBytes } from 'node:crypto';
import { openFilesLimit, readListenQueue, readSomaxconn } from '../../src/overload.ts';
import { REFUSER_MIN_OPEN_FILES, REFUSER_SOCKETS } from '../../src/refuser.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { gate, startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, startProxy, tmpDir } from '../helpers/proxy.ts';
import { requireTool } from '../helpers/tools.ts';

/**
 * The backlog the kernel gives the listening sockets on `port` (ss: a LISTEN socket's Send-Q is its
 * backlog); cuttle listens with several sockets on one port (SO_REUSEPORT), all alike.
 */
function kernelBacklog(ss: string, port: number): number {
  const out = spawnSync(ss, ['-ltnH', `sport = :${port}`], { encoding: 'utf8' });
  assert.equal(out.status, 0, out.stderr);
  const rows = out.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/));
  assert.ok(rows.length >= 1, out.stdout);
  for (const [state] of rows) assert.equal(state, 'LISTEN');
  const backlogs = new Set(rows.map(([, , sendQ]) => Number(sendQ)));
  assert.equal(backlogs.size, 1, `every listening socket has the same backlog: ${out.stdout}`);
  return [...backlogs][0]!;
}

/** How many sockets listen on `port` (ss: one LISTEN row each; cuttle's share it by SO_REUSEPORT). */
function listeningSockets(ss: string, port: number): number {
  return spawnSync(ss, ['-ltnH', `sport = :${port}`], { encoding: 'utf8' }).stdout.trim().split('\n').filter(Boolean).length;
}

/** Everything the proxy sends on `sock` until it closes. */
async function readToClose(sock: Socket): Promise<string> {
  let text = '';
  sock.on('data', (c: Buffer) => (text += c.toString('latin1')));
  await once(sock, 'close');
  return text;
}

/** The next whole response on a keep-alive connection (the proxy's answers here have a Content-Length). */
function nextResponse(sock: Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (c: Buffer) => {
      text += c.toString('latin1');
      const end = text.indexOf('\r\n\r\n');
      if (end < 0) return;
      const length = Number(/\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end))?.[1] ?? 0);
      if (text.length < end + 4 + length) return;
      sock.off('data', onData);
      resolve(text);
    };
    sock.on('data', onData);
    sock.once('error', reject);
  });
}

/** A client in a worker thread: connects, writes the request, says so in `flag`, posts what it read. */
const CONNECT_IN_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const sock = require('node:net').connect(workerData.port, '127.0.0.1', () =>
  sock.write(workerData.request, () => {
    Atomics.store(workerData.flag, 0, 1);
    Atomics.notify(workerData.flag, 0);
  }));
let text = '';
sock.on('data', (c) => (text += c.toString('latin1')));
sock.on('close', () => parentPort.postMessage(text));
`;

/** A connection from another thread: the whole answer, posted, then the flag set (the test's thread may be blocked). */
const REFUSED_IN_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const sock = require('node:net').connect(workerData.port, '127.0.0.1', () => sock.write(workerData.request));
let text = '';
sock.on('data', (c) => (text += c.toString('latin1')));
sock.on('close', () => {
  parentPort.postMessage(text);
  Atomics.store(workerData.flag, 0, 1);
  Atomics.notify(workerData.flag, 0);
});
`;

/** Whether cuttle hands its ports to the refuser here (Linux, and enough descriptors: refuser.ts). */
function refuserHere(t: TestContext): boolean {
  const soft = openFilesLimit()?.soft ?? Infinity;
  if (process.platform === 'linux' && soft >= REFUSER_MIN_OPEN_FILES) return true;
  t.skip(`no refuser thread here (${process.platform}, open-files limit ${soft})`);
  return false;
}

const keepAlive = (url: string) => `GET ${url} HTTP/1.1\r\nHost: ${new URL(url).host}\r\n\r\n`;
const request = (url: string) => `GET ${url} HTTP/1.1\r\nHost: ${new URL(url).host}\r\nConnection: close\r\n\r\n`;

describe('overload: refuse fast, never trickle', () => {
  it('--listen-backlog is the backlog the kernel gives each client listener; a net.core.somaxconn below it is one warning', async (t) => {
    const ss = requireTool(t, ['ss'], 'iproute2');
    if (!ss) return;
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    const p = await startProxy({ 'listen-backlog': 123 });
    const pool = proxyClient(p.url, 1);
    try {
      assert.equal(kernelBacklog(ss, p.port), 123);
      assert.deepEqual(p.logs.filter((l) => String(l.msg).includes('somaxconn')), [], '123 is within net.core.somaxconn: no warning');
      assert.equal((await get(pool, `${origin.url}/x`)).status, 200);
      assert.equal(origin.count('/x'), 1);
    } finally {
      await pool.close();
      await p.close();
    }
    // The default (65535) past this host's somaxconn: the kernel's cap, said once.
    const somaxconn = readSomaxconn();
    const q = await startProxy({ listen: ['127.0.0.1:0', '127.0.0.1:0'] });
    try {
      const warned = q.logs.filter((l) => String(l.msg).includes('net.core.somaxconn'));
      if (somaxconn !== undefined && somaxconn < 65535) {
        assert.equal(warned.length, 1, 'one warning for both listeners');
        assert.equal(warned[0]!.somaxconn, somaxconn);
        assert.equal(kernelBacklog(ss, q.proxy.addresses()[1]!.port), somaxconn);
      } else {
        assert.equal(warned.length, 0);
        assert.equal(kernelBacklog(ss, q.proxy.addresses()[1]!.port), 65535);
      }
    } finally {
      q.logs.length = 0;
      await q.close();
      await origin.close();
    }
  });

  it("the kernel's accept-queue drops (ListenOverflows, ListenDrops) are in /metrics", async (t) => {
    const before = readListenQueue();
    if (!before) return t.skip('no /proc/net/netstat on this host');
    // A stopped proxy with a backlog of 1 on each of its listening sockets: the kernel queues two
    // connections on each and drops the others' SYNs. It listens with up to 256 sockets a port, and the
    // kernel spreads connections over them by a hash: 2 × 256 + 1 connections fill one of them for sure
    // (64 left every socket with two or fewer about once in fifty runs at 78 sockets).
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--listen-backlog', '1']);
    const admin = Number(/"admin":\{[^}]*"port":(\d+)/.exec(proxy.stderr())![1]);
    const clients: Socket[] = [];
    try {
      proxy.child.kill('SIGSTOP');
      for (let i = 0; i < 2 * 256 + 1; i++) clients.push(connect(proxy.port, '127.0.0.1').on('error', () => {}));
      await waitFor('the kernel dropped a connection at the full accept queue', () => readListenQueue()!.overflows > before.overflows);
      const seen = readListenQueue()!;
      proxy.child.kill('SIGCONT');
      const text = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
      const value = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1]);
      assert.match(text, /^# TYPE cuttle_listen_overflows_total counter$/m);
      assert.ok(value('cuttle_listen_overflows_total') >= seen.overflows, text);
      assert.ok(value('cuttle_listen_drops_total') >= seen.drops);
      assert.ok(value('cuttle_listen_drops_total') >= value('cuttle_listen_overflows_total'), 'an overflow is also a drop');
      assert.ok(value('cuttle_listen_overflows_total') > before.overflows, 'the drops counted');
    } finally {
      for (const c of clients) c.destroy();
      proxy.child.kill('SIGCONT');
      await proxy.stop();
    }
  });

  it('a budget spent by a fill whose window is within its own bound refuses nothing: that fill spills to disk at speed', async () => {
    const origin = await startOrigin();
    // A 64 KiB budget, used up by 128 KiB of a fill held behind a gate: within its 2 MB window, bytes
    // that go to disk as they come. A new miss is not refused for that (fill memory is "spent" only by
    // bytes past the windows' bound, which no window can drop yet: unit/overload.test.ts).
    const p = await startProxy({ 'fill-memory': '64KB' });
    const pool = proxyClient(p.url, 4);
    const g = gate();
    const body = randomBytes(256 * 1024);
    try {
      origin.route('/big', { body, bodyGate: { after: 128 * 1024, gate: g }, headers: { 'cache-control': 'max-age=60' } });
      origin.route('/other', { body: 'other', headers: { 'cache-control': 'max-age=60' } });
      const first = await pool.request({ path: `${origin.url}/big`, method: 'GET' });
      assert.equal(first.statusCode, 200);
      const budget = p.proxy.coalescer.budget;
      await waitFor('the fill holds what the origin sent, the budget used up', () => p.proxy.coalescer.topFills(1, 0)[0]?.bytes === 128 * 1024 && budget.usedBytes >= budget.limitBytes);
      assert.equal((await get(pool, `${origin.url}/other`)).body.toString(), 'other');
      assert.equal(origin.count('/other'), 1);
      g.open();
      assert.ok(Buffer.from(await first.body.arrayBuffer()).equals(body));
      assert.equal(origin.count('/big'), 1);
      assert.equal(p.proxy.counters.refused.fill_memory, 0);
    } finally {
      await pool.close();
      await p.close();
      await origin.close();
    }
  });

  it('while the event loop lags past --max-loop-lag, a new connection gets 503 at once and a hit on an open one is served; new ones are served again once it keeps up', async () => {
    const origin = await startOrigin({ '/a': { body: 'a', headers: { 'cache-control': 'max-age=60' } }, '/h': { body: 'h', headers: { 'cache-control': 'max-age=60' } } });
    const p = await startProxy({ 'max-loop-lag': '200ms' });
    const lag = p.proxy.loopLag;
    const open = connect(p.port, '127.0.0.1');
    let worker: Worker | undefined;
    try {
      // A connection open before the lag, with /h stored.
      open.write(keepAlive(`${origin.url}/h`));
      assert.match(await nextResponse(open), /^HTTP\/1.1 200 /);
      await waitFor('the monitor on time', () => !lag.lagging && lag.lastLateMs < 200);
      // Two turns in a row run long (one alone is not overload: a burst of connects is accepted in one).
      // First, this process (the proxy's too) blocks for 400 ms with a hit waiting on the open connection:
      // the monitor's next tick fires at least 300 ms late. Right after that tick, in the same loop
      // iteration's check phase, a second block: a new connection with its request (from a worker thread,
      // so it waits in the accept queue) reaches the kernel meanwhile, and the tick after it is late
      // again, in the timers phase, before the poll phase accepts the connection.
      open.write(keepAlive(`${origin.url}/h`));
      const hit = nextResponse(open);
      const flag = new Int32Array(new SharedArrayBuffer(4));
      const block = (ms: number, from = performance.now()) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Math.max(0, ms - (performance.now() - from)));
      let laggingAfterOne: boolean | undefined;
      let lateWhenLagging = 0;
      worker = undefined;
      let answered: Promise<[string]> | undefined;
      let exited: Promise<unknown> | undefined;
      const tick = lag.tick.bind(lag);
      lag.tick = (now: number) => {
        tick(now);
        if (lag.lagging && lateWhenLagging === 0) lateWhenLagging = lag.lastLateMs;
        if (laggingAfterOne !== undefined || lag.lastLateMs < 300) return;
        laggingAfterOne = lag.lagging;
        setImmediate(() => {
          const blockedAt = performance.now();
          worker = new Worker(CONNECT_IN_WORKER, { eval: true, workerData: { port: p.port, request: request(`${origin.url}/a`), flag } });
          answered = once(worker, 'message') as Promise<[string]>;
          exited = once(worker, 'exit'); // emitted right after its last message
          assert.equal(Atomics.wait(flag, 0, 0, 10_000), 'ok', 'the worker connected and wrote its request');
          block(400, blockedAt);
        });
      };
      block(400);
      await waitFor('the worker has connected, and the monitor lags', () => worker !== undefined && lateWhenLagging > 0);
      lag.tick = tick;
      assert.equal(laggingAfterOne, false, 'one long turn is not lagging');
      const [text] = await answered!;
      await exited;
      assert.match(text, /^HTTP\/1.1 503 /);
      assert.match(text, /\r\nProxy-Status: cuttle; error=connection_limit_reached; details="the event loop lags"\r\n/);
      assert.match(text, /\r\nX-Squid-Error: ERR_ONLY_IF_CACHED_MISS 0\r\n/);
      assert.ok(lateWhenLagging >= 300, `the tick was ${lateWhenLagging} ms late`);
      assert.match(await hit, /^HTTP\/1.1 200 [^]*\r\n\r\nh$/, 'the hit on the open connection is served');
      assert.equal(origin.count('/a'), 0);
      assert.equal(p.proxy.counters.refused.loop_lag, 1);

      await waitFor('the monitor on time again, and the ports back with the proxy', () => !lag.lagging && p.proxy.acceptHand() === 'proxy');
      const again = connect(p.port, '127.0.0.1');
      again.write(request(`${origin.url}/a`));
      assert.match(await readToClose(again), /^HTTP\/1.1 200 /);
      assert.equal(origin.count('/a'), 1);
      assert.equal(origin.count('/h'), 1);
      assert.equal(p.proxy.counters.hits, 1);
      assert.equal(p.proxy.counters.refused.loop_lag, 1);
      const status = (await (await fetch(`http://127.0.0.1:${p.proxy.adminAddress()!.port}/status`)).json()) as { refused: Record<string, number> };
      assert.equal(status.refused.loop_lag, 1);
    } finally {
      await worker?.terminate();
      open.destroy();
      await p.close();
      await origin.close();
    }
  });
  it('a burst is taken by many listening sockets on one port: 256 per address, at most one per 256 descriptors of the open-files limit', async (t) => {
    const ss = requireTool(t, ['ss'], 'iproute2');
    if (!ss) return;
    const listening = (port: number) => listeningSockets(ss, port);
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    const low = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1'], undefined, { openFiles: 1024 });
    const soft = openFilesLimit()?.soft;
    const here = await startProxy();
    const pool = proxyClient(here.url, 1);
    try {
      assert.equal(listening(low.port), process.platform === 'linux' ? 4 : 1, 'ulimit -n 1024: 4 sockets');
      const expected = process.platform !== 'linux' ? 1 : Math.max(1, Math.min(256, Math.floor((soft === undefined || soft === Infinity ? Infinity : soft) / 256)));
      assert.equal(listening(here.port), expected, `open-files limit ${soft}`);
      assert.equal((await get(pool, `${origin.url}/x`)).status, 200);
      assert.equal((await get(pool, `${origin.url}/x`)).status, 200);
      assert.equal(origin.count('/x'), 1);
    } finally {
      await pool.close();
      await here.close();
      await low.stop();
      await origin.close();
    }
  });
  it('the open-files limit caps client connections below --max-client-connections: the one too many gets 503, not a reset', async () => {
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    // 400 descriptors, less what is kept for what is not a client: 256 + 4 × 4 upstream connections +
    // 2 × 16 fills, but never more than half.
    const cap = 400 - Math.min(256 + 4 * 4 + 2 * 16, 200);
    const p = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1', '--upstream-connections', '4', '--max-fills', '16'], undefined, { openFiles: 400 });
    const socks: Socket[] = [];
    try {
      assert.match(p.stderr(), new RegExp(`the open-files limit is 400: at most ${cap} client connections`));
      for (let i = 0; i < cap; i++) {
        const s = connect(p.port, '127.0.0.1');
        socks.push(s);
        s.write(keepAlive(`${origin.url}/x`));
        assert.match(await nextResponse(s), /^HTTP\/1.1 200 /, `connection ${i + 1} of ${cap} is served`);
      }
      const extra = connect(p.port, '127.0.0.1');
      socks.push(extra);
      extra.write(request(`${origin.url}/x`));
      const text = await readToClose(extra);
      assert.match(text, /^HTTP\/1.1 503 /);
      assert.match(text, /\r\nProxy-Status: cuttle; error=connection_limit_reached; details="too many client connections"\r\n/);
      assert.equal(origin.count('/x'), 1, 'one upstream fetch, then hits');
    } finally {
      for (const s of socks) s.destroy();
      await p.stop();
      await origin.close();
    }
  });
  it('at --max-client-connections the refuser thread holds the port: each new connection gets the labelled 503 from it at once, counted and logged; open connections are served; with room again cuttle listens again', async (t) => {
    const ss = requireTool(t, ['ss'], 'iproute2');
    if (!ss || !refuserHere(t)) return;
    const listening = (port: number) => listeningSockets(ss, port);
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    const p = await startProxy({ 'max-client-connections': 2 });
    const ours = listening(p.port);
    const held = [connect(p.port, '127.0.0.1'), connect(p.port, '127.0.0.1')];
    try {
      assert.ok(ours > REFUSER_SOCKETS, `the proxy listens with ${ours} sockets`);
      held[0]!.write(keepAlive(`${origin.url}/x`));
      assert.match(await nextResponse(held[0]!), /^HTTP\/1.1 200 /);
      // Two connections open: the cap. The proxy's sockets stop listening; the refuser's hold the port.
      await waitFor('the port handed to the refuser', () => p.proxy.acceptHand() === 'refuser');
      assert.equal(listening(p.port), REFUSER_SOCKETS, "only the refuser's sockets listen");
      for (let i = 1; i <= 3; i++) {
        const extra = connect(p.port, '127.0.0.1');
        extra.write(request(`${origin.url}/x`));
        const text = await readToClose(extra);
        assert.match(text, /^HTTP\/1.1 503 /);
        assert.match(text, /\r\nProxy-Status: cuttle; error=connection_limit_reached; details="too many client connections"\r\n/);
        assert.match(text, /\r\nX-Squid-Error: ERR_ONLY_IF_CACHED_MISS 0\r\n/);
        // The last is not waited for: the thread's final report, as it lets go, carries it.
        if (i < 3) await waitFor(`refusal ${i} counted`, () => p.proxy.counters.refused.connections === i);
      }
      // A connection taken before the cap is served as ever, a hit.
      held[1]!.write(keepAlive(`${origin.url}/x`));
      assert.match(await nextResponse(held[1]!), /^HTTP\/1.1 200 [^]*\r\n\r\nx$/);
      assert.match((await p.proxy.report()).metrics, /^cuttle_accept_handed_over 1$/m);
      // One closes: a sixteenth of the cap is free, and the proxy listens again before the refuser lets go.
      held.shift()!.destroy();
      await waitFor('the port back with the proxy', () => p.proxy.acceptHand() === 'proxy');
      assert.equal(listening(p.port), ours);
      const again = connect(p.port, '127.0.0.1');
      again.write(request(`${origin.url}/x`));
      assert.match(await readToClose(again), /^HTTP\/1.1 200 [^]*\r\n\r\nx$/);
      assert.equal(p.proxy.counters.refused.connections, 3);
      const status = (await (await fetch(`http://127.0.0.1:${p.proxy.adminAddress()!.port}/status`)).json()) as { refused: Record<string, number> };
      assert.equal(status.refused.connections, 3);
      assert.equal(p.proxy.counters.hits, 2);
      assert.equal(origin.count('/x'), 1);
      for (const s of held) s.destroy();
      await p.close();
      // Squid's fields: result/status and method of each line, the refusals as request-less NONE/503.
      const lines = p.logLines.map((l) => l.split(/\s+/));
      assert.deepEqual(lines.map((f) => `${f[3]} ${f[5]}`).sort(), ['NONE/503 NONE', 'NONE/503 NONE', 'NONE/503 NONE', 'TCP_MEM_HIT/200 GET', 'TCP_MEM_HIT/200 GET', 'TCP_MISS/200 GET']);
      // Logged as ended when the thread refused them, not when its report came: elapsed 0.
      assert.deepEqual(lines.filter((f) => f[3] === 'NONE/503').map((f) => f[1]), ['0', '0', '0']);
    } finally {
      for (const s of held) s.destroy();
      await p.close();
      await origin.close();
    }
  });
  it('a failed attempt to listen again (EMFILE) is tried again a second later, not in a loop: the proxy takes its port back once descriptors are free', async (t) => {
    const prlimit = requireTool(t, ['prlimit'], 'util-linux');
    if (!prlimit || !refuserHere(t)) return;
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    const p = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1', '--max-client-connections', '2']);
    const pid = p.child.pid!;
    const admin = Number(/"admin":\{[^}]*"port":(\d+)/.exec(p.stderr())?.[1]);
    // A proxy that never yields (a listen retried in a loop) fails here, not by hanging the test.
    const handedOver = async () => Number(/^cuttle_accept_handed_over (\d+)$/m.exec(await (await fetch(`http://127.0.0.1:${admin}/metrics`, { signal: AbortSignal.timeout(15_000) })).text())?.[1]);
    const limit = (soft: number | string) => assert.equal(spawnSync(prlimit, ['--pid', String(pid), `--nofile=${soft}:`]).status, 0);
    const soft = openFilesLimit(`/proc/${pid}/limits`)!.soft;
    const held = [connect(p.port, '127.0.0.1'), connect(p.port, '127.0.0.1')];
    try {
      await waitFor('the port handed to the refuser', async () => (await handedOver()) === 1);
      // No descriptor to spare: the first socket that listens again takes the last one, the next fails.
      limit(readdirSync(`/proc/${pid}/fd`).length + 1);
      held.shift()!.destroy();
      await waitFor('the failed listen logged', () => /could not listen again on the client ports: trying again in 1000 ms/.test(p.stderr()));
      limit(soft);
      await waitFor('the port back with the proxy', async () => (await handedOver()) === 0);
      const again = connect(p.port, '127.0.0.1');
      again.write(request(`${origin.url}/x`));
      assert.match(await readToClose(again), /^HTTP\/1.1 200 [^]*\r\n\r\nx$/);
      assert.equal(origin.count('/x'), 1);
      // Each retry a second after the last: a few at most (a loop that never yields made thousands).
      const tries = (p.stderr().match(/could not listen again/g) ?? []).length;
      assert.ok(tries < 10, `${tries} attempts`);
    } finally {
      for (const s of held) s.destroy();
      await p.stop();
      await origin.close();
    }
  });
  it("the refuser thread answers while cuttle's own event loop is blocked: a refusal never waits for the proxy's turns", async (t) => {
    if (!refuserHere(t)) return;
    const origin = await startOrigin({ '/x': { body: 'x', headers: { 'cache-control': 'max-age=60' } } });
    // In-process: this test's thread is the proxy's, and blocking it blocks the proxy's loop.
    const p = await startProxy({ 'max-client-connections': 1 });
    const held = connect(p.port, '127.0.0.1');
    let worker: Worker | undefined;
    try {
      await waitFor('the port handed to the refuser', () => p.proxy.acceptHand() === 'refuser');
      const flag = new Int32Array(new SharedArrayBuffer(4));
      worker = new Worker(REFUSED_IN_WORKER, { eval: true, workerData: { port: p.port, request: request(`${origin.url}/x`), flag } });
      const answered = once(worker, 'message') as Promise<[string]>;
      // The loop is blocked until the other thread has its whole answer (or a minute, which fails).
      assert.equal(Atomics.wait(flag, 0, 0, 60_000), 'ok', 'the refusal came while the loop was blocked');
      const [text] = await answered;
      assert.match(text, /^HTTP\/1.1 503 [^]*\r\nProxy-Status: cuttle; error=connection_limit_reached; details="too many client connections"\r\n/);
      await waitFor('the refusal counted', () => p.proxy.counters.refused.connections === 1);
      assert.equal(origin.count('/x'), 0);
    } finally {
      await worker?.terminate();
      held.destroy();
      await p.close();
      await origin.close();
    }
  });
});
