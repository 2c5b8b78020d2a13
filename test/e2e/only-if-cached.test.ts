// Cache-Control: only-if-cached (RFC 9111 §5.2.1.7): a stored response or a labelled 504, and never a
// request to the origin. `cuttle warm` asks with it to skip what the cache holds, and its --check asks
// nothing else, so a miss here must cost the upstream nothing, on one event loop and with --workers.
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin } from '../helpers/origin.ts';
import { get, useProxy } from '../helpers/proxy.ts';
import { ownedBy, startWorkers2 } from '../helpers/workers.ts';

const OIC = { 'cache-control': 'only-if-cached' };

describe('only-if-cached', () => {
  const rig = useProxy();

  it('a miss is a labelled 504 with no upstream request; once stored, GET and HEAD are hits', async () => {
    const { origin } = rig;
    origin.route('/a', { body: 'stored body', headers: { 'cache-control': 'max-age=600' } });
    const url = `${origin.url}/a`;
    const miss = await get(rig.pool, url, OIC);
    assert.equal(miss.status, 504);
    assert.match(String(miss.headers['proxy-status']), /error=proxy_internal_response/);
    assert.equal(miss.headers['x-squid-error'], 'ERR_ONLY_IF_CACHED_MISS 0');
    const headMiss = await get(rig.pool, url, OIC, 'HEAD');
    assert.equal(headMiss.status, 504);
    assert.equal(origin.count('/a'), 0, 'only-if-cached never reaches the origin');
    assert.equal((await get(rig.pool, url)).status, 200);
    const hit = await get(rig.pool, url, OIC);
    assert.equal(hit.status, 200);
    assert.equal(hit.body.toString(), 'stored body');
    assert.equal((await get(rig.pool, url, OIC, 'HEAD')).status, 200);
    assert.equal(origin.count('/a'), 1, 'one upstream fetch in all');
  });

  it('a stale copy answers only when the request allows staleness (max-stale); no-cache with it is a 504', async () => {
    const { origin } = rig;
    origin.route('/stale', { body: 'old', headers: { 'cache-control': 'max-age=0', etag: '"v1"' } });
    const url = `${origin.url}/stale`;
    assert.equal((await get(rig.pool, url)).status, 200);
    assert.equal((await get(rig.pool, url, OIC)).status, 504);
    const allowed = await get(rig.pool, url, { 'cache-control': 'only-if-cached, max-stale' });
    assert.equal(allowed.status, 200);
    assert.equal(allowed.body.toString(), 'old');
    assert.equal((await get(rig.pool, url, { 'cache-control': 'only-if-cached, no-cache' })).status, 504);
    assert.equal(origin.count('/stale'), 1);
  });

  it('an uncacheable request (credentials) with only-if-cached is a 504, not a pass', async () => {
    const { origin } = rig;
    origin.route('/private', { body: 'p' });
    const r = await get(rig.pool, `${origin.url}/private`, { ...OIC, authorization: 'Basic Zm9vOmJhcg==' });
    assert.equal(r.status, 504);
    assert.equal(origin.count('/private'), 0);
  });
});

describe('only-if-cached with --workers 2', () => {
  it("the worker that does not own a key asks its owner with only-if-cached: the owner's copy answers, and a miss costs the origin nothing", async () => {
    const origin = await startOrigin();
    const { proxy, ports } = await startWorkers2();
    const owned = ownedBy(1, origin.url, '/w');
    const other = ownedBy(1, origin.url, '/x');
    origin.route(owned, { body: 'owned by worker 1', headers: { 'cache-control': 'max-age=600' } });
    origin.route(other, { body: 'never fetched', headers: { 'cache-control': 'max-age=600' } });
    const viaOwner = new Pool(`http://127.0.0.1:${ports[1]}`, { connections: 1 });
    const viaOther = new Pool(`http://127.0.0.1:${ports[0]}`, { connections: 1 });
    after(async () => {
      await viaOwner.close();
      await viaOther.close();
      await proxy.stop();
      await origin.close();
    });
    assert.equal((await get(viaOwner, `${origin.url}${owned}`)).status, 200);
    const r = await get(viaOther, `${origin.url}${owned}`, OIC);
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), 'owned by worker 1');
    const miss = await get(viaOther, `${origin.url}${other}`, OIC);
    assert.equal(miss.status, 504);
    assert.equal(miss.headers['x-squid-error'], 'ERR_ONLY_IF_CACHED_MISS 0');
    assert.equal(origin.count(owned), 1, 'the owner fetched it once; the only-if-cached request fetched nothing');
    assert.equal(origin.count(other), 0);
  });
});
