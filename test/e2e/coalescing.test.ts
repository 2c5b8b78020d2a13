import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { Pool } from 'undici';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

const sha1 = (b: Buffer) => createHash('sha1').update(b).digest('hex');

/** Absolute-form GET over a raw socket; resolves with what arrived and whether the socket was cut. */
function rawGet(port: number, url: string, opts: { abortAfterBytes?: number } = {}): Promise<{ head: string; body: Buffer; complete: boolean }> {
  return new Promise((resolve) => {
    const s = connect({ port, host: '127.0.0.1' });
    const chunks: Buffer[] = [];
    let total = 0;
    s.on('data', (c: Buffer) => {
      chunks.push(c);
      total += c.length;
      if (opts.abortAfterBytes !== undefined && total >= opts.abortAfterBytes) s.destroy();
    });
    const done = () => {
      const all = Buffer.concat(chunks);
      const i = all.indexOf('\r\n\r\n');
      const head = i < 0 ? all.toString() : all.subarray(0, i).toString();
      const body = i < 0 ? Buffer.alloc(0) : all.subarray(i + 4);
      const m = /content-length: (\d+)/i.exec(head);
      resolve({ head, body, complete: m ? body.length === Number(m[1]) : false });
    };
    s.on('close', done);
    s.on('error', () => {});
    s.write(`GET ${url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
  });
}

describe('coalescing', () => {
  let origin: Origin;
  let p: TestProxy;
  before(async () => {
    origin = await startOrigin();
    p = await startProxy({ 'fill-window': '256KB', 'max-memory-object-size': '128KB' });
  });
  after(async () => {
    await p.close();
    await origin.close();
  });

  it('first client hangs up: the fill completes, is stored, and the next request is a HIT', async () => {
    const body = randomBytes(4 * 1024 * 1024);
    // The origin holds all but the first MiB until the proxy has seen the client go.
    const g = gate();
    origin.route('/big', { headers: { 'cache-control': 'max-age=600' }, body, bodyGate: { after: 1024 * 1024, gate: g } });
    const r = await rawGet(p.port, `${origin.url}/big`, { abortAfterBytes: 100_000 });
    assert.equal(r.complete, false);
    await waitFor('the proxy saw the hang-up mid-fill', () => p.proxy.clientConnections() === 0 && g.waiting === 1);
    g.open();
    // Wait for the fill to land in the store (no new client meanwhile).
    await waitFor('the fill stored', () => p.proxy.coalescer.running === 0);
    const c = proxyClient(p.url);
    const again = await get(c, `${origin.url}/big`);
    assert.equal(sha1(again.body), sha1(body));
    assert.match(String(again.headers['x-cache']), /^HIT/);
    assert.equal(origin.count('/big'), 1);
    assert.equal(p.proxy.coalescer.stats.fillsCommitted >= 1, true);
    await c.close();
  });

  it('upstream reset mid-body: every waiter sees a truncated transfer and nothing is stored', async () => {
    const body = randomBytes(2 * 1024 * 1024);
    // The origin sends 256 KiB and holds the rest until all 20 clients are on the fill, then resets at 1 MiB.
    const g = gate();
    origin.route('/reset', { headers: { 'cache-control': 'max-age=600' }, body, chunkBytes: 64 * 1024, bodyGate: { after: 256 * 1024, gate: g }, resetAfter: 1024 * 1024 });
    const all = Promise.all(Array.from({ length: 20 }, () => rawGet(p.port, `${origin.url}/reset`)));
    await waitFor('twenty readers on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 20);
    g.open();
    const results = await all;
    for (const r of results) {
      assert.match(r.head, /^HTTP\/1\.1 200/);
      assert.equal(r.complete, false, 'truncated: Content-Length unfulfilled');
      assert.ok(r.body.length <= 1024 * 1024);
      assert.ok(body.subarray(0, r.body.length).equals(r.body), 'what arrived is a prefix of the real body');
    }
    assert.equal(origin.count('/reset'), 1);
    assert.equal(await p.proxy.store.get(`${origin.url}/reset`), undefined);
    // The next request is a fresh MISS, not a stored partial.
    origin.route('/reset', { headers: { 'cache-control': 'max-age=600' }, body });
    const c = proxyClient(p.url);
    const ok = await get(c, `${origin.url}/reset`);
    assert.equal(sha1(ok.body), sha1(body));
    assert.equal(origin.count('/reset'), 2);
    await c.close();
  });

  it('chunked upstream failing mid-body: readers get no terminating chunk', async () => {
    const body = randomBytes(512 * 1024);
    // The origin sends 64 KiB and holds the rest until all 4 clients are on the fill, then resets at 256 KiB.
    const g = gate();
    origin.route('/reset-chunked', { headers: { 'cache-control': 'max-age=600' }, body, chunked: true, chunkBytes: 32 * 1024, bodyGate: { after: 64 * 1024, gate: g }, resetAfter: 256 * 1024 });
    const pool = new Pool(p.url, { connections: 4 });
    const all = Promise.all(
      Array.from({ length: 4 }, () =>
        pool.request({ path: `${origin.url}/reset-chunked`, method: 'GET' }).then(
          (res) => res.body.arrayBuffer().then(() => 'complete', () => 'truncated'),
          () => 'error',
        ),
      ),
    );
    await waitFor('four readers on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 4);
    g.open();
    const outcomes = await all;
    assert.deepEqual(outcomes, ['truncated', 'truncated', 'truncated', 'truncated']);
    assert.equal(origin.count('/reset-chunked'), 1);
    await pool.close();
  });

  it('failure before headers: every waiter gets the same labelled error', async () => {
    const g = gate();
    origin.route('/hangup', { gate: g, resetAfter: 0, body: 'x'.repeat(100) });
    const c = new Pool(p.url, { connections: 10 });
    const all = Promise.all(Array.from({ length: 10 }, () => get(c, `${origin.url}/hangup`)));
    await waitFor('ten waiters on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 10);
    g.open();
    const rs = await all;
    // The origin sends headers then resets before any body: readers are cut short, or (before headers) labelled.
    assert.equal(origin.count('/hangup'), 1);
    for (const r of rs) assert.ok(r.status === 200 || r.status === 502);
    await c.close();
    const dead = await startOrigin();
    const deadUrl = dead.url;
    await dead.close();
    const pool = new Pool(p.url, { connections: 10 });
    const errs = await Promise.all(Array.from({ length: 10 }, () => get(pool, `${deadUrl}/x`)));
    for (const e of errs) {
      assert.equal(e.status, 502);
      assert.match(String(e.headers['proxy-status']), /error=connection_refused/);
    }
    await pool.close();
  });
});
