// Parents that fail on their own account (a review's findings, each failing before its fix): a parent's
// labelled failure is this proxy's failure to forward, never the Stratum 1's, and a hung parent costs
// a client --mirror-timeout at most when another route is left.
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { after, describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin } from '../helpers/origin.ts';
import { casBodies, healthy, startMirrors } from '../helpers/mirrors.ts';
import { get, proxyClient, startProxy } from '../helpers/proxy.ts';

/** A proxy that accepts connections and never answers (a hung regional squid). */
async function silentServer(): Promise<{ url: string; close(): Promise<void> }> {
  const held = new Set<Socket>();
  const s: Server = createServer((c) => {
    held.add(c);
    c.on('error', () => {});
  });
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${(s.address() as { port: number }).port}`,
    close: async () => {
      for (const c of held) c.destroy();
      await new Promise<void>((r) => s.close(() => r()));
    },
  };
}

describe('parents that fail on their own account', () => {
  const closers: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it("with --never-direct, a parent's own labelled 503 is a labelled 502 ERR_PEER_FAILED here, and marks no Stratum 1 down", async () => {
    const bodies = casBodies([2048, 2049, 2050, 2051]);
    const paths = [...bodies.keys()];
    const [m1, m2] = await startMirrors(bodies, [1, 1]);
    // The parent is overloaded: every answer is its own labelled failure, as a Squid's error page is.
    const parent = await startOrigin();
    for (const p of paths) for (const m of [m1!, m2!]) parent.route(`${m.url}${p}`, { status: 503, headers: { 'x-squid-error': 'ERR_CANNOT_FORWARD 0' }, body: 'overloaded' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [parent.url], 'never-direct': true, stratum1: [m1!.url, m2!.url], 'probe-interval': '1h' });
    const pool = proxyClient(child.url);
    closers.push(() => m1!.stop(), () => m2!.stop(), () => parent.close(), () => child.close(), () => pool.close());
    for (const p of paths) {
      const r = await get(pool, `${m1!.url}${p}`);
      assert.equal(r.status, 502);
      assert.match(String(r.headers['proxy-status']), /^cuttle; error=destination_unavailable; details=".*answered HTTP 503 ERR_CANNOT_FORWARD 0/);
    }
    assert.equal(m1!.count(paths[0]!) + m2!.count(paths[0]!), 0, 'no mirror was ever asked');
    assert.equal(parent.seen.length, 2 * paths.length, 'the parent was asked for each mirror');
    // The mirrors did nothing wrong: nobody asked them.
    assert.ok(healthy(child.proxy, m1!.url), 'mirror 1 still healthy');
    assert.ok(healthy(child.proxy, m2!.url), 'mirror 2 still healthy');
  });

  it("a parent's labelled failure reaches the client labelled, for a content-addressed object too (the client must switch proxy, not Stratum 1)", async () => {
    const bodies = casBodies([3072]);
    const [path] = [...bodies.keys()];
    const [m1] = await startMirrors(bodies, [1]);
    const parent = await startOrigin();
    parent.route(`${m1!.url}${path!}`, { status: 502, headers: { 'x-squid-error': 'ERR_CONNECT_FAIL 111', 'proxy-status': 'squid; error=connection_refused' }, body: 'parent cannot connect' });
    parent.route(`${m1!.url}/plain`, { status: 502, headers: { 'x-squid-error': 'ERR_CONNECT_FAIL 111', 'proxy-status': 'squid; error=connection_refused' }, body: 'parent cannot connect' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [parent.url], 'never-direct': true, stratum1: [m1!.url], 'probe-interval': '1h' });
    const pool = proxyClient(child.url);
    closers.push(() => m1!.stop(), () => parent.close(), () => child.close(), () => pool.close());
    const plain = await get(pool, `${m1!.url}/plain`);
    assert.equal(plain.status, 502);
    assert.equal(plain.headers['x-squid-error'], 'ERR_CANNOT_FORWARD 0', 'a plain URL: labelled');
    const cas = await get(pool, `${m1!.url}${path!}`);
    assert.equal(cas.status, 502);
    assert.equal(parent.seen.length, 2);
    assert.equal(cas.headers['x-squid-error'], 'ERR_CANNOT_FORWARD 0', 'a content-addressed object: labelled too');
  });

  it('a parent that accepts but never answers is given --mirror-timeout when direct is allowed, then the miss goes direct', async (t) => {
    const origin = await startOrigin({ '/plain': { body: 'direct', headers: { 'cache-control': 'max-age=60' } } });
    const hung = await silentServer();
    const child = await startProxy({ 'visible-hostname': 'site', parent: [hung.url], 'peer-timeout': '200ms', 'probe-interval': '1h' });
    // The CVMFS client's watchdog: no response head within 5 s and the proxy is burned.
    const pool = new Pool(child.url, { connections: 1, headersTimeout: 5000, bodyTimeout: 5000 });
    closers.push(() => origin.close(), () => hung.close(), () => child.close(), () => pool.close());
    t.diagnostic('the read timeout is 60 s by default; a parent with a route after it has --mirror-timeout (3 s)');
    const r = await get(pool, `${origin.url}/plain`).catch((err: Error) => ({ status: -1, err }));
    assert.equal(r.status, 200, `answered by the next route (direct) in time: ${'err' in r ? r.err.message : ''}`);
    assert.equal(origin.count('/plain'), 1);
  });
});
