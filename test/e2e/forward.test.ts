import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connect } from 'node:net';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

/** Send a request that says `Connection: close` on a raw socket; resolve with all that came back. */
function raw(port: number, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host: '127.0.0.1' });
    let out = '';
    s.on('data', (c) => (out += c));
    s.on('end', () => resolve(out));
    s.on('error', reject);
    s.write(text);
  });
}

describe('forwarding: hang-ups', () => {
  it('a client that hangs up before the upstream answers does not take the proxy down', async () => {
    const g = gate();
    const origin = await startOrigin({ '/slow-post': { gate: g, body: 'late answer' } });
    const p = await startProxy();
    try {
      const s = connect({ port: p.port, host: '127.0.0.1' });
      s.on('error', () => {});
      s.write(`POST ${origin.url}/slow-post HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi`);
      await waitFor('the origin holding the POST', () => g.waiting === 1);
      s.destroy();
      // The pass notices the hang-up and lets go of its upstream request.
      await waitFor('the pass ended', () => p.proxy.counters.passesInFlight === 0);
      g.open(); // the origin answers the abandoned request
      const c = proxyClient(p.url, 1);
      assert.equal((await get(c, `${origin.url}/slow-post`)).status, 200, 'still serving');
      await c.close();
      assert.equal(p.proxy.counters.passes, 1, 'the abandoned POST was a pass');
      assert.equal(p.proxy.counters.passesInFlight, 0);
    } finally {
      await p.close();
      await origin.close();
    }
  });
});

describe('forwarding', () => {
  let origin: Origin;
  let p: TestProxy;
  before(async () => {
    origin = await startOrigin({
      '/hello': { headers: { 'content-type': 'text/plain', 'cache-control': 'max-age=300', 'keep-alive': 'timeout=5', connection: 'x-secret' , 'x-secret': 'leak' }, body: 'hello world' },
      '/echo': (req) => ({ body: JSON.stringify({ method: req.method, body: req.body, headers: req.headers }), headers: { 'content-type': 'application/json' } }),
      '/nostore': { headers: { 'cache-control': 'no-store' }, body: 'private' },
    });
    p = await startProxy();
  });
  after(async () => {
    await p.close();
    await origin.close();
  });

  it('forwards GET and caches it: second request is a HIT, origin fetched once', async () => {
    const c = proxyClient(p.url);
    const a = await get(c, `${origin.url}/hello`);
    assert.equal(a.status, 200);
    assert.equal(a.body.toString(), 'hello world');
    assert.match(String(a.headers['x-cache']), /^MISS from cuttle-test/);
    assert.match(String(a.headers.via), /1\.1 cuttle-test \(cuttle\//);
    assert.equal(a.headers['x-secret'], undefined, 'a header named by Connection is hop-by-hop');
    const b = await get(c, `${origin.url}/hello`);
    assert.equal(b.body.toString(), 'hello world');
    assert.match(String(b.headers['x-cache']), /^HIT from/);
    assert.ok(b.headers.age !== undefined);
    assert.equal(origin.count('/hello'), 1);
    assert.equal(p.proxy.upstream.fetches, 1);
    // The bytes field counts the head too, as Squid's does (access-log.test.ts).
    assert.match(p.logLines.at(-1)!, / TCP_MEM_HIT\/200 \d{3} GET http:\/\/127\.0\.0\.1:\d+\/hello - HIER_NONE\/- text\/plain\n$/);
    await c.close();
  });

  it('HEAD is answered from the cache once stored', async () => {
    const c = proxyClient(p.url);
    const h = await get(c, `${origin.url}/hello`, {}, 'HEAD');
    assert.equal(h.status, 200);
    assert.equal(h.headers['content-length'], '11');
    assert.equal(h.body.length, 0);
    assert.equal(origin.count('/hello'), 1);
    await c.close();
  });

  it('strips hop-by-hop request headers, adds Via and appends X-Forwarded-For', async () => {
    const before = origin.seen.length;
    // A raw socket, so the Connection header reaches the proxy exactly as written.
    const out = await raw(
      p.port,
      `POST ${origin.url}/echo HTTP/1.1\r\nHost: 127.0.0.1:${origin.port}\r\nX-Forwarded-For: 192.0.2.7\r\n` +
        'Proxy-Authorization: Basic xyz\r\nX-Drop: 1\r\nConnection: close, x-drop\r\nTE: trailers\r\nContent-Length: 7\r\n\r\npayload',
    );
    assert.match(out, /^HTTP\/1\.1 200 /);
    const seen = origin.seen[before]!;
    assert.equal(seen.method, 'POST');
    assert.equal(seen.body, 'payload');
    assert.equal(seen.headers['proxy-authorization'], undefined);
    assert.equal(seen.headers['x-drop'], undefined);
    assert.equal(seen.headers.te, undefined);
    assert.equal(seen.headers['x-forwarded-for'], '192.0.2.7, 127.0.0.1');
    assert.match(String(seen.headers.via), /^1\.1 cuttle-test \(cuttle\/[\d.]+\)$/);
    assert.equal(origin.count('/echo'), 1);
  });

  it('POST is never cached and invalidates the stored URL when it succeeds', async () => {
    const c = proxyClient(p.url);
    origin.route('/inv', { headers: { 'cache-control': 'max-age=300' }, body: 'v1' });
    await get(c, `${origin.url}/inv`);
    await get(c, `${origin.url}/inv`);
    assert.equal(origin.count('/inv'), 1);
    await get(c, `${origin.url}/inv`, {}, 'POST', 'x');
    assert.equal(origin.count('/inv'), 2);
    const again = await get(c, `${origin.url}/inv`);
    assert.match(String(again.headers['x-cache']), /^MISS/);
    assert.equal(origin.count('/inv'), 3);
    await c.close();
  });

  it('answers 508 when its own Via entry shows a loop, without going upstream', async () => {
    const c = proxyClient(p.url);
    const n = origin.seen.length;
    const r = await get(c, `${origin.url}/hello?loop`, { via: '1.1 other, 1.1 cuttle-test (cuttle/0.1.0)' });
    assert.equal(r.status, 508);
    assert.match(String(r.headers['proxy-status']), /error=proxy_loop_detected/);
    assert.equal(origin.seen.length, n);
    await c.close();
  });

  it('honours Max-Forwards: 0 on OPTIONS locally', async () => {
    const c = proxyClient(p.url);
    const n = origin.seen.length;
    const r = await get(c, `${origin.url}/echo`, { 'max-forwards': '0' }, 'OPTIONS');
    assert.equal(r.status, 200);
    assert.ok(r.headers.allow);
    assert.equal(origin.seen.length, n);
    await c.close();
  });

  it('rejects origin-form requests with 400 and a labelled error', async () => {
    const out = await raw(p.port, 'GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
    assert.match(out, /^HTTP\/1\.1 400 /);
    assert.match(out, /proxy-status: cuttle; error=http_request_error/i);
    assert.match(out, /x-squid-error: ERR_INVALID_URL 0/i);
    assert.equal(p.proxy.counters.errors >= 1, true);
  });

  it('labels its own upstream failures (connection refused) but passes genuine 404/500 through unlabelled', async () => {
    const c = proxyClient(p.url);
    const dead = await startOrigin();
    const deadUrl = dead.url;
    await dead.close();
    const r = await get(c, `${deadUrl}/x`);
    assert.equal(r.status, 502);
    assert.match(String(r.headers['proxy-status']), /error=connection_refused/);
    assert.equal(r.headers['x-squid-error'], 'ERR_CONNECT_FAIL 111');
    origin.route('/boom', { status: 500, body: 'origin broke' });
    const e = await get(c, `${origin.url}/boom`);
    assert.equal(e.status, 500);
    assert.equal(e.headers['proxy-status'], undefined);
    assert.equal(e.headers['x-squid-error'], undefined);
    const nf = await get(c, `${origin.url}/missing`);
    assert.equal(nf.status, 404);
    assert.equal(nf.headers['x-squid-error'], undefined);
    await c.close();
  });

  it('times out a silent upstream with a labelled 504', async () => {
    const slow = await startProxy({ 'read-timeout': '300ms' });
    const never = gate(); // opened only after the proxy has given up
    origin.route('/silent', { gate: never, body: 'late' });
    const c = proxyClient(slow.url);
    const r = await get(c, `${origin.url}/silent`);
    never.open();
    assert.equal(r.status, 504);
    assert.match(String(r.headers['proxy-status']), /error=http_response_timeout/);
    assert.equal(origin.count('/silent'), 1);
    await c.close();
    await slow.close();
  });

  it('does not store no-store responses, and remembers them as uncacheable', async () => {
    const c = proxyClient(p.url);
    await get(c, `${origin.url}/nostore`);
    const b = await get(c, `${origin.url}/nostore`);
    assert.equal(b.body.toString(), 'private');
    assert.equal(origin.count('/nostore'), 2);
    assert.equal(p.proxy.coalescer.isUncacheable(`${origin.url}/nostore`), true);
    await c.close();
  });
});
