import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import { startOrigin, type Origin, type Route } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

describe('caching policy (RFC 9111, injected clock)', () => {
  let origin: Origin;
  let p: TestProxy;
  const clock = new ManualClock(Date.parse('2026-11-25T00:00:00Z'));
  let version = 0;
  before(async () => {
    origin = await startOrigin({
      '/manifest': () => ({ headers: { 'cache-control': 'max-age=61' }, body: `rev ${++version}` }),
      '/gone': { status: 404, body: 'nope' },
      '/gone-short': { status: 404, headers: { 'cache-control': 'max-age=5' }, body: 'nope' },
      '/err': { status: 503, body: 'down' },
      '/err-fresh': { status: 503, headers: { 'cache-control': 'max-age=30' }, body: 'down but fresh' },
      '/etag': (req): Route =>
        req.headers['if-none-match'] === '"v1"'
          ? { status: 304, headers: { etag: '"v1"', 'cache-control': 'max-age=10', 'x-refreshed': 'yes' } }
          : { headers: { etag: '"v1"', 'cache-control': 'max-age=10' }, body: 'validated body' },
      '/vary': (req) => ({ headers: { vary: 'Accept-Language', 'cache-control': 'max-age=60' }, body: `lang=${req.headers['accept-language']}` }),
      '/vary-star': { headers: { vary: '*', 'cache-control': 'max-age=60' }, body: 'star' },
      '/cvmfs/atlas.cern.ch/api/v1.0/geo/cuttle-test/s1a.example,s1b.example': { headers: { 'cache-control': 'max-age=3600' }, body: '2,1\n' },
    });
    p = await startProxy({ 'negative-ttl': '60s' }, { clock });
  });
  after(async () => {
    await p.close();
    await origin.close();
  });

  it('caches geo API answers for their max-age (3600 s) and sends X-Forwarded-For for geolocation', async () => {
    const c = proxyClient(p.url);
    const path = '/cvmfs/atlas.cern.ch/api/v1.0/geo/cuttle-test/s1a.example,s1b.example';
    assert.equal((await get(c, origin.url + path)).body.toString(), '2,1\n');
    assert.equal(origin.seen.find((r) => r.path === path)?.headers['x-forwarded-for'], '127.0.0.1');
    clock.advance(3599_000);
    assert.match(String((await get(c, origin.url + path)).headers['x-cache']), /^HIT/);
    assert.equal(origin.count(path), 1);
    clock.advance(2_000);
    await get(c, origin.url + path);
    assert.equal(origin.count(path), 2, 'refetched once expired');
    await c.close();
  });

  it('caches max-age=61 for exactly 61 s (no minimum expiry), then refetches', async () => {
    const c = proxyClient(p.url);
    const u = `${origin.url}/manifest`;
    assert.equal((await get(c, u)).body.toString(), 'rev 1');
    clock.advance(60_000);
    const hit = await get(c, u);
    assert.equal(hit.body.toString(), 'rev 1');
    assert.equal(hit.headers.age, '60');
    assert.equal(origin.count('/manifest'), 1);
    clock.advance(2_000);
    const fresh = await get(c, u);
    assert.equal(fresh.body.toString(), 'rev 2');
    assert.equal(origin.count('/manifest'), 2);
    assert.match(p.logLines.at(-1)!, /TCP_REFRESH_MODIFIED\/200/);
    await c.close();
  });

  it('Cache-Control: no-cache fetches anew and replaces the stored copy', async () => {
    const c = proxyClient(p.url);
    const u = `${origin.url}/manifest`;
    const n = origin.count('/manifest');
    const r = await get(c, u, { 'cache-control': 'no-cache', pragma: 'no-cache' });
    assert.equal(origin.count('/manifest'), n + 1);
    assert.match(p.logLines.at(-1)!, /TCP_CLIENT_REFRESH_MISS\/200/);
    const after = await get(c, u);
    assert.equal(after.body.toString(), r.body.toString(), 'the replacement is what is served next');
    assert.match(String(after.headers['x-cache']), /^HIT/);
    assert.equal(origin.count('/manifest'), n + 1);
    // Pragma alone (what old clients send) also reloads.
    await get(c, u, { pragma: 'no-cache' });
    assert.equal(origin.count('/manifest'), n + 2);
    await c.close();
  });

  it('negatively caches a 404 without explicit freshness for negative-ttl', async () => {
    const c = proxyClient(p.url);
    const u = `${origin.url}/gone`;
    assert.equal((await get(c, u)).status, 404);
    clock.advance(59_000);
    const again = await get(c, u);
    assert.equal(again.status, 404);
    assert.match(String(again.headers['x-cache']), /^HIT/);
    assert.equal(origin.count('/gone'), 1);
    clock.advance(2_000);
    await get(c, u);
    assert.equal(origin.count('/gone'), 2);
    // Explicit freshness on a 404 wins over negative-ttl.
    await get(c, `${origin.url}/gone-short`);
    clock.advance(6_000);
    await get(c, `${origin.url}/gone-short`);
    assert.equal(origin.count('/gone-short'), 2);
    await c.close();
  });

  it('never caches a 5xx unless it is explicitly fresh', async () => {
    const c = proxyClient(p.url);
    await get(c, `${origin.url}/err`);
    const r = await get(c, `${origin.url}/err`);
    assert.equal(r.status, 503);
    assert.equal(r.headers['x-squid-error'], undefined, 'a genuine upstream 503 is not labelled');
    assert.equal(origin.count('/err'), 2);
    await get(c, `${origin.url}/err-fresh`);
    await get(c, `${origin.url}/err-fresh`);
    assert.equal(origin.count('/err-fresh'), 1);
    await c.close();
  });

  it('revalidates a stale object with validators: 304 refreshes the stored headers', async () => {
    const c = proxyClient(p.url);
    const u = `${origin.url}/etag`;
    await get(c, u);
    clock.advance(11_000);
    const before = { ...p.proxy.counters };
    const r = await get(c, u);
    // Counted as Squid counts it (isTcpHit): a hit, not a miss, in /status, SNMP and the dashboard alike.
    assert.equal(p.proxy.counters.hits, before.hits + 1);
    assert.equal(p.proxy.counters.misses, before.misses);
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), 'validated body');
    assert.equal(r.headers['x-refreshed'], 'yes');
    assert.equal(origin.count('/etag'), 2);
    assert.equal(origin.seen.at(-1)!.headers['if-none-match'], '"v1"');
    assert.match(p.logLines.at(-1)!, /TCP_REFRESH_UNMODIFIED\/200/);
    const hit = await get(c, u);
    assert.match(String(hit.headers['x-cache']), /^HIT/);
    assert.equal(origin.count('/etag'), 2);
    await c.close();
  });

  it('keys by Vary-selected request headers, and never caches Vary: *', async () => {
    const c = proxyClient(p.url);
    const u = `${origin.url}/vary`;
    await get(c, u, { 'accept-language': 'en' }); // learns the Vary spec
    await get(c, u, { 'accept-language': 'en' });
    await get(c, u, { 'accept-language': 'de' });
    const en = await get(c, u, { 'accept-language': 'en' });
    const de = await get(c, u, { 'accept-language': 'de' });
    assert.equal(en.body.toString(), 'lang=en');
    assert.equal(de.body.toString(), 'lang=de');
    assert.match(String(de.headers['x-cache']), /^HIT/);
    assert.equal(origin.count('/vary'), 2, 'each variant fetched once: the first response is stored under its own variant');
    await get(c, `${origin.url}/vary-star`);
    await get(c, `${origin.url}/vary-star`);
    assert.equal(origin.count('/vary-star'), 2);
    await c.close();
  });
});
