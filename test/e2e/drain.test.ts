// Drain as a state (src/drain.ts): POST /drain and SIGTERM take cuttle out of service without taking
// it offline. /readyz answers 503 at once, every keep-alive connection gets Connection: close on its
// next response (the hit lane's and node:http's), a new connection is still served, fills in flight
// finish; POST /drain?cancel puts it back (not after SIGTERM); with --workers it reaches every worker.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, startProxy, tmpDir } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { adminUrl, workerPorts } from '../helpers/workers.ts';

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** A raw keep-alive client connection: one request at a time, each answer read whole (Content-Length). */
class Conn {
  readonly s: Socket;
  readonly closed: Promise<unknown>;
  #got = '';
  #wake: (() => void) | undefined;
  #ended = false;

  constructor(port: number) {
    this.s = connect(port, '127.0.0.1');
    this.s.setEncoding('latin1');
    this.s.on('data', (d: string) => {
      this.#got += d;
      this.#wake?.();
    });
    this.s.on('error', () => {});
    this.closed = once(this.s, 'close').then(() => {
      this.#ended = true;
      this.#wake?.();
    });
  }

  /** Whether the proxy has closed the connection. */
  get ended(): boolean {
    return this.#ended;
  }

  async get(url: string): Promise<Answer> {
    this.s.write(`GET ${url} HTTP/1.1\r\nHost: origin\r\nUser-Agent: cvmfs Fuse 2.11.5\r\nConnection: Keep-Alive\r\n\r\n`);
    for (;;) {
      const head = this.#got.indexOf('\r\n\r\n');
      if (head >= 0) {
        const lines = this.#got.slice(0, head).split('\r\n');
        const headers: Record<string, string> = {};
        for (const l of lines.slice(1)) headers[l.slice(0, l.indexOf(':')).toLowerCase()] = l.slice(l.indexOf(':') + 1).trim();
        const len = Number(headers['content-length']);
        if (this.#got.length - head - 4 >= len) {
          const body = this.#got.slice(head + 4, head + 4 + len);
          this.#got = this.#got.slice(head + 4 + len);
          return { status: Number(lines[0]!.split(' ')[1]), headers, body };
        }
      }
      if (this.#ended) throw new Error(`the connection closed before a whole answer: ${JSON.stringify(this.#got)}`);
      await new Promise<void>((r) => (this.#wake = r));
    }
  }

  close(): void {
    this.s.destroy();
  }
}

async function admin(base: string, path: string, method = 'GET'): Promise<{ status: number; text: string }> {
  const res = await fetch(`${base}${path}`, { method });
  return { status: res.status, text: await res.text() };
}

const HEADERS = { 'cache-control': 'max-age=600', 'content-type': 'text/plain' };

describe('drain: POST /drain', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin({ '/hot': { headers: HEADERS, body: 'hot object' }, '/cold': { headers: HEADERS, body: 'cold object' } });
  });
  after(() => origin.close());

  it('readyz 503 at once, Connection: close on the next response (hit lane and node:http), new connections served; cancel restores', async () => {
    const p = await startProxy({});
    const base = `http://127.0.0.1:${p.proxy.adminAddress()!.port}`;
    try {
      const warm = proxyClient(p.url, 1);
      assert.equal((await get(warm, `${origin.url}/hot`)).status, 200);
      await warm.close();
      // Two keep-alive connections: one the hit lane answers (a memory hit), one node:http (a miss).
      const lane = new Conn(p.port);
      const node = new Conn(p.port);
      const first = await lane.get(`${origin.url}/hot`);
      assert.equal(first.headers.connection, 'keep-alive');
      assert.equal(p.proxy.counters.laneHits, 1, 'the hit lane answered it');
      assert.equal((await node.get(`${origin.url}/cold`)).headers.connection, 'keep-alive');
      assert.equal((await admin(base, '/readyz')).status, 200);

      const drained = await admin(base, '/drain', 'POST');
      assert.equal(drained.status, 200);
      assert.equal((JSON.parse(drained.text) as { state: string }).state, 'draining');
      const ready = await admin(base, '/readyz');
      assert.equal(ready.status, 503);
      assert.match(ready.text, /draining/);
      const status = JSON.parse((await admin(base, '/status')).text) as { drain: { state: string; cancellable: boolean; leftS: number | null } };
      assert.deepEqual([status.drain.state, status.drain.cancellable, status.drain.leftS], ['draining', true, null]);

      // Each keep-alive connection gets its next answer, with Connection: close, and is closed after it.
      for (const [c, path] of [
        [lane, '/hot'],
        [node, '/cold'],
      ] as const) {
        const r = await c.get(`${origin.url}${path}`);
        assert.equal(r.status, 200);
        assert.equal(r.headers.connection, 'close');
        await c.closed;
      }
      // A new connection (a client that has not re-resolved) is served, and closed after its answer.
      const fresh = new Conn(p.port);
      const r = await fresh.get(`${origin.url}/hot`);
      assert.deepEqual([r.status, r.body, r.headers.connection], [200, 'hot object', 'close']);
      await fresh.closed;
      assert.equal(origin.count('/hot'), 1, 'the hits were hits: one upstream fetch');
      assert.equal(origin.count('/cold'), 1);
      assert.equal(p.proxy.counters.laneHits, 1, 'while draining node:http answers, and closes');

      // Cancelled: ready again, and connections are kept alive again.
      const back = await admin(base, '/drain?cancel', 'POST');
      assert.equal(back.status, 200);
      assert.equal((JSON.parse(back.text) as { state: string }).state, 'serving');
      assert.equal((await admin(base, '/readyz')).status, 200);
      const again = new Conn(p.port);
      assert.equal((await again.get(`${origin.url}/hot`)).headers.connection, 'keep-alive');
      assert.equal((await again.get(`${origin.url}/hot`)).headers.connection, 'keep-alive');
      assert.equal(again.ended, false);
      again.close();
      assert.equal(origin.count('/hot'), 1);
    } finally {
      await p.close();
    }
  });

  it('/drain takes POST only, from --allow-admin clients only, and never from a web page', async () => {
    const open = await startProxy({});
    const closed = await startProxy({ 'allow-admin': ['10.0.0.0/8'] });
    try {
      const base = `http://127.0.0.1:${open.proxy.adminAddress()!.port}`;
      assert.equal((await admin(base, '/drain')).status, 405);
      const page = await fetch(`${base}/drain`, { method: 'POST', headers: { origin: 'http://evil.example' } });
      await page.text();
      assert.equal(page.status, 403);
      assert.equal(open.proxy.drain.state, 'serving');
      const refused = await admin(`http://127.0.0.1:${closed.proxy.adminAddress()!.port}`, '/drain', 'POST');
      assert.equal(refused.status, 403);
      assert.equal(closed.proxy.drain.state, 'serving', 'a client outside --allow-admin cannot drain');
      assert.equal(origin.count('/hot'), 1);
    } finally {
      await open.close();
      await closed.close();
    }
  });
});

describe('drain: SIGTERM', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin({ '/hot': { headers: HEADERS, body: 'hot object' } });
  });
  after(() => origin.close());

  it('a fill in flight completes and closes its keep-alive connection, a new connection is served, idle ones are closed, cancel is refused, exit 0', async () => {
    const g = gate();
    origin.route('/slow', { headers: HEADERS, body: 'slow object', gate: g });
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--allow-local-dest', '127.0.0.1', '--shutdown-timeout', '120s']);
    const base = adminUrl(proxy);
    // An idle keep-alive connection, and one whose request waits on a fill held at the origin.
    const idle = new Conn(proxy.port);
    assert.equal((await idle.get(`${origin.url}/hot`)).headers.connection, 'keep-alive');
    const busy = new Conn(proxy.port);
    assert.equal((await busy.get(`${origin.url}/hot`)).headers.connection, 'keep-alive');
    const fill = busy.get(`${origin.url}/slow`);
    await waitFor('the fill held at the origin', () => g.waiting === 1);

    proxy.child.kill('SIGTERM');
    await waitFor('draining', () => /draining, then shutting down/.test(proxy.stderr()));
    assert.equal((await admin(base, '/readyz')).status, 503);
    const status = JSON.parse((await admin(base, '/status')).text) as { drain: { state: string; cancellable: boolean; leftS: number } };
    assert.deepEqual([status.drain.state, status.drain.cancellable], ['stopping', false]);
    assert.ok(status.drain.leftS > 0 && status.drain.leftS <= 120, `leftS ${status.drain.leftS}`);
    const cancel = await admin(base, '/drain?cancel', 'POST');
    assert.equal(cancel.status, 409, 'a stop cannot be cancelled');
    assert.match(cancel.text, /SIGTERM/);
    // The idle connection is closed by the proxy (its client asks again on a new one).
    await idle.closed;

    // A client that has not re-resolved: its new connection is served (a hit), and closed after it.
    const late = new Conn(proxy.port);
    const r = await late.get(`${origin.url}/hot`);
    assert.deepEqual([r.status, r.body, r.headers.connection], [200, 'hot object', 'close']);
    await late.closed;

    // The fill finishes: its answer, the connection's next, closes it; then nothing is left and cuttle exits 0.
    const exited = once(proxy.child, 'exit') as Promise<[number | null]>;
    g.open();
    const done = await fill;
    assert.deepEqual([done.status, done.body, done.headers.connection], [200, 'slow object', 'close']);
    await busy.closed;
    const [code] = await exited;
    assert.equal(code, 0);
    assert.equal(origin.count('/slow'), 1);
    assert.equal(origin.count('/hot'), 1, 'the drain served hits, not fetches');
    await proxy.stop();
  });
});

describe('drain: a slow reader at shutdown', () => {
  it('a response handed whole to node:http but not yet read by its client is not cut when the stop closes idle connections', async () => {
    const body = Buffer.alloc(12 * 2 ** 20, 9); // more than the kernel's socket buffers hold
    const origin = await startOrigin({ '/big': { headers: HEADERS, body } });
    const p = await startProxy({ 'memory-cache': '64MB', 'max-memory-object-size': '16MB' });
    try {
      const warm = proxyClient(p.url, 1);
      assert.equal((await get(warm, `${origin.url}/big`)).body.length, body.length);
      await warm.close();
      // A memory hit through node:http (a field the hit lane leaves to it): the whole body is written
      // with end() in the turn its head is, and most of it waits in the socket while the client sleeps.
      const s = connect(p.port, '127.0.0.1');
      const chunks: Buffer[] = [];
      let got = 0;
      let headSeen = false;
      const head = new Promise<void>((resolve) =>
        s.on('data', (d: Buffer) => {
          chunks.push(d);
          got += d.length;
          if (!headSeen && Buffer.concat(chunks).includes('\r\n\r\n')) {
            headSeen = true;
            s.pause();
            resolve();
          }
        }),
      );
      const closed = once(s, 'close');
      s.write(`GET ${origin.url}/big HTTP/1.1\r\nHost: origin\r\nX-Slow-Reader: 1\r\n\r\n`);
      await head;
      const stopping = p.proxy.close(60_000);
      // The stop's first sweep of idle connections has run (close() runs it at once); the client reads on.
      s.resume();
      await waitFor('the whole answer, or the connection closed', () => got >= body.length + 100 || s.destroyed || s.readableEnded);
      const raw = Buffer.concat(chunks);
      const bodyAt = raw.indexOf('\r\n\r\n') + 4;
      assert.equal(raw.length - bodyAt, body.length, 'the whole body arrived');
      s.destroy();
      await closed;
      await stopping;
      assert.equal(origin.count('/big'), 1);
    } finally {
      await p.close();
      await origin.close();
    }
  });
});

describe('drain: --workers 2', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin({ '/hot': { headers: HEADERS, body: 'hot object' } });
  });
  after(() => origin.close());

  it('POST /drain reaches every worker; cancel brings them all back; SIGTERM drains them all', async () => {
    const proxy = await startChildProxy(['--workers', '2', '--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--allow-local-dest', '127.0.0.1']);
    const base = adminUrl(proxy);
    const ports = await workerPorts(proxy);
    // One keep-alive connection to each worker.
    const conns = ports.map((p) => new Conn(p));
    for (const c of conns) assert.equal((await c.get(`${origin.url}/hot`)).headers.connection, 'keep-alive');
    assert.equal((await admin(base, '/readyz')).status, 200);

    /** Lines in which every worker says it drains (or is back in service). */
    const said = (what: RegExp) => proxy.stderr().split('\n').filter((l) => l.includes('"worker":') && what.test(l)).length;
    assert.equal((await admin(base, '/drain', 'POST')).status, 200);
    await waitFor('both workers draining', () => said(/"msg":"draining:/) === 2);
    assert.equal((await admin(base, '/readyz')).status, 503);
    const status = JSON.parse((await admin(base, '/status')).text) as { drain: { state: string }; draining: boolean };
    assert.deepEqual([status.drain.state, status.draining], ['draining', true]);
    for (const c of conns) {
      assert.equal((await c.get(`${origin.url}/hot`)).headers.connection, 'close', 'each worker closes its connection after its answer');
      await c.closed;
    }

    assert.equal((await admin(base, '/drain?cancel', 'POST')).status, 200);
    await waitFor('both workers back in service', () => said(/"msg":"drain cancelled/) === 2);
    assert.equal((await admin(base, '/readyz')).status, 200);
    const back = ports.map((p) => new Conn(p));
    for (const c of back) assert.equal((await c.get(`${origin.url}/hot`)).headers.connection, 'keep-alive', 'each worker keeps connections alive again');

    // SIGTERM: both workers drain. Worker 0's connection waits on a fill held at the origin: its answer
    // closes it; worker 1's idle one is closed; then the process exits 0.
    const g = gate();
    origin.route('/slow', { headers: HEADERS, body: 'slow object', gate: g });
    const fill = back[0]!.get(`${origin.url}/slow`);
    await waitFor('the fill held at the origin', () => g.waiting === 1);
    const exited = once(proxy.child, 'exit') as Promise<[number | null]>;
    proxy.child.kill('SIGTERM');
    await waitFor('both workers draining again', () => said(/"msg":"draining:/) === 4);
    assert.equal((await admin(base, '/readyz')).status, 503);
    assert.equal((JSON.parse((await admin(base, '/status')).text) as { drain: { state: string } }).drain.state, 'stopping');
    await back[1]!.closed;
    g.open();
    const done = await fill;
    assert.deepEqual([done.status, done.body, done.headers.connection], [200, 'slow object', 'close']);
    await back[0]!.closed;
    const [code] = await exited;
    assert.equal(code, 0);
    assert.equal(origin.count('/hot'), 1, 'one fetch for the whole process');
    assert.equal(origin.count('/slow'), 1);
    await proxy.stop();
  });
});
