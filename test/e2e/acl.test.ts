import assert from 'node:assert/strict';
import { connect, createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, withProxy, type TestProxy } from '../helpers/proxy.ts';

/** Send `text` on a raw socket; resolve with what came back once the proxy closes or `until` holds. */
function rawExchange(port: number, text: string, until: (out: string) => boolean = () => false): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host: '127.0.0.1' });
    let out = '';
    s.on('data', (c) => {
      out += c;
      if (until(out)) s.end();
    });
    s.on('close', () => resolve(out));
    s.on('error', reject);
    s.write(text);
  });
}

describe('access control', () => {
  let origin: Origin;
  let p: TestProxy;
  before(async () => {
    origin = await startOrigin({ '/ok': { headers: { 'cache-control': 'max-age=60' }, body: 'ok' } });
    p = await startProxy({ 'allow-client': ['127.0.0.1/32'] });
  });
  after(async () => {
    await p.close();
    await origin.close();
  });

  it('denies a client outside --allow-client with 403 and Squid/RFC 9209 labels', async () => {
    const pool = new Pool(p.url, { localAddress: '127.0.0.2' });
    const r = await get(pool, `${origin.url}/ok`);
    assert.equal(r.status, 403);
    assert.equal(r.headers['x-squid-error'], 'ERR_ACCESS_DENIED 0');
    assert.match(String(r.headers['proxy-status']), /^cuttle; error=http_request_denied/);
    assert.equal(origin.count('/ok'), 0);
    assert.equal(p.proxy.counters.denied, 1);
    assert.match(p.logLines.at(-1)!, / 127\.0\.0\.2 TCP_DENIED\/403 /);
    await pool.close();
  });

  it('allows the listed client', async () => {
    const c = proxyClient(p.url);
    const r = await get(c, `${origin.url}/ok`);
    assert.equal(r.status, 200);
    assert.equal(origin.count('/ok'), 1);
    await c.close();
  });

  it('denies loopback destinations unless --allow-local-dest names them, and the 403 says how', async () => {
    const strict = await startProxy({ 'allow-local-dest': [] });
    const c = proxyClient(strict.url);
    const r = await get(c, `${origin.url}/ok`);
    assert.equal(r.status, 403);
    assert.match(String(r.headers['proxy-status']), /error=destination_ip_prohibited/);
    assert.match(r.body.toString(), new RegExp(`start cuttle with --allow-local-dest 127\\.0\\.0\\.1:${origin.port}`));
    const byName = await get(c, `http://localhost:${origin.port}/ok`);
    assert.equal(byName.status, 403);
    assert.equal(origin.count('/ok'), 1, 'no new upstream fetch');
    assert.equal(strict.proxy.counters.denied, 2);
    await c.close();
    await strict.close();
  });

  it('a wide --allow-dest CIDR does not open loopback: only --allow-local-dest does', async () => {
    await withProxy({ 'allow-dest': ['0.0.0.0/0', '::/0'], 'allow-local-dest': [] }, async ({ origin: o, p: wide, pool }) => {
      o.route('/secret', { body: 'admin only' });
      const r = await get(pool, `${o.url}/secret`);
      assert.equal(r.status, 403);
      assert.match(r.body.toString(), /--allow-local-dest 127\.0\.0\.1:/);
      assert.equal(o.count('/secret'), 0, 'nothing reached the loopback origin');
      assert.equal(wide.proxy.upstream.fetches, 0);
    });
  });

  it('denies destinations outside the allow-dest list, and ports outside allow-port', async () => {
    await withProxy({ 'allow-dest': ['.cern.ch'] }, async ({ origin: o, p: listed, pool }) => {
      const r = await get(pool, 'http://192.0.2.1/x');
      assert.equal(r.status, 403);
      assert.equal((await get(pool, `${o.url}/ok`)).status, 404, 'the origin answered: allow-dest does not close what allow-local-dest opens');
      assert.equal(listed.proxy.upstream.fetches, 1);
    });
    const c = proxyClient(p.url);
    const port = await get(c, `http://127.0.0.1:25/x`);
    assert.equal(port.status, 403);
    assert.match(port.body.toString(), /port/);
    await c.close();
  });

  it('denies CONNECT by default', async () => {
    const out = await rawExchange(p.port, `CONNECT 127.0.0.1:${origin.port} HTTP/1.1\r\nHost: 127.0.0.1:${origin.port}\r\n\r\n`);
    assert.match(out, /^HTTP\/1\.1 403 /);
    assert.match(out, /X-Squid-Error: ERR_ACCESS_DENIED 0/);
    assert.match(out, /Proxy-Status: cuttle; error=http_request_denied/);
  });

  it('tunnels CONNECT to a port listed in --allow-connect-port', async () => {
    const echo = createServer((s) => s.pipe(s));
    await new Promise<void>((r) => echo.listen(0, '127.0.0.1', () => r()));
    const ePort = (echo.address() as AddressInfo).port;
    const tp = await startProxy({ 'allow-connect-port': String(ePort) });
    const out = await rawExchange(tp.port, `CONNECT 127.0.0.1:${ePort} HTTP/1.1\r\nHost: 127.0.0.1:${ePort}\r\n\r\nping`, (out) => out.endsWith('ping'));
    assert.match(out, /^HTTP\/1\.1 200 Connection Established\r\n\r\nping/);
    assert.equal(tp.proxy.counters.requests, 1);
    await tp.close();
    echo.close();
  });
});

describe('listening', () => {
  it('a bare --listen port serves IPv6 and IPv4 clients alike (dual-stack, like Squid)', async () => {
    const origin = await startOrigin({ '/dual': { headers: { 'cache-control': 'max-age=60' }, body: 'both' } });
    const p = await startProxy({ listen: ['0'] });
    try {
      const port = p.proxy.addresses()[0]!.port;
      for (const host of ['127.0.0.1', '[::1]']) {
        const c = new Pool(`http://${host}:${port}`);
        const r = await get(c, `${origin.url}/dual`);
        assert.equal(r.status, 200, host);
        assert.equal(r.body.toString(), 'both');
        await c.close();
      }
      assert.equal(origin.count('/dual'), 1);
      assert.equal(p.proxy.counters.hits, 1);
    } finally {
      await p.close();
      await origin.close();
    }
  });
});
