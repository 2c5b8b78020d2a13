// Stale when every mirror is down (RFC 9111 §4.2.4): a CVMFS manifest past its max-age is served from
// the cache when no Stratum 1 of the group answers, within --max-stale, unless the response forbids it.
// Time is a ManualClock: nothing sleeps.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import { gate, startOrigin, type Origin, type Route } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, proxyClient, startProxy } from '../helpers/proxy.ts';

const MANIFEST = '/cvmfs/stale.cern.ch/.cvmfspublished';

async function group(headers: Record<string, string>): Promise<Origin[]> {
  const mirrors = await Promise.all([startOrigin(), startOrigin()]);
  for (const m of mirrors) m.route(MANIFEST, { headers, body: 'Cabc\nNstale.cern.ch\nS42\n' });
  return mirrors;
}

describe('stale when every mirror is down', () => {
  it('an expired manifest is served stale to a herd, at one upstream attempt per --stale-retry', async () => {
    const clock = new ManualClock();
    const mirrors = await group({ 'cache-control': 'max-age=61' });
    const p = await startProxy({ stratum1: mirrors.map((m) => m.url), 'probe-interval': '60s', 'stale-retry': '10s' }, { clock });
    const pool = proxyClient(p.url, 20);
    try {
      const url = `${mirrors[0]!.url}${MANIFEST}`;
      assert.equal((await get(pool, url)).status, 200);
      assert.equal(mirrors[0]!.count(MANIFEST), 1);
      clock.advance(120_000); // expired
      for (const m of mirrors) await m.close(); // every Stratum 1 of the group is down
      const before = p.proxy.upstream.fetches;
      const herd = await Promise.all(Array.from({ length: 20 }, () => get(pool, url)));
      for (const r of herd) {
        assert.equal(r.status, 200);
        assert.equal(r.body.toString(), 'Cabc\nNstale.cern.ch\nS42\n');
        assert.ok(Number(r.headers.age) >= 120, `Age ${r.headers.age}`);
      }
      assert.equal(p.proxy.upstream.fetches - before, 1, 'the herd cost one upstream attempt');
      for (let i = 0; i < 5; i++) assert.equal((await get(pool, url)).status, 200);
      assert.equal(p.proxy.upstream.fetches - before, 1, 'no new attempt within --stale-retry');
      clock.advance(11_000);
      assert.equal((await get(pool, url)).status, 200);
      assert.equal(p.proxy.upstream.fetches - before, 2, 'one more attempt after --stale-retry');
      assert.equal(p.proxy.counters.staleServed, 26);
      assert.equal(p.logLines.filter((l) => l.includes('TCP_REFRESH_FAIL_OLD/200')).length, 26);
    } finally {
      await pool.close();
      await p.close();
    }
  });

  it('a 5xx from the origin serves the stale copy too; a fresh answer afterwards replaces it', async () => {
    const clock = new ManualClock();
    const origin = await startOrigin();
    let status = 200;
    let n = 0;
    // The 503 carries no freshness of its own (one that did would be stored, as RFC 9111 allows).
    origin.route('/m', (): Route => ({ status, headers: status === 200 ? { 'cache-control': 'max-age=60' } : {}, body: `v${++n}` }));
    const p = await startProxy({ 'stale-retry': '0s' }, { clock });
    const pool = proxyClient(p.url, 4);
    try {
      assert.equal((await get(pool, `${origin.url}/m`)).body.toString(), 'v1');
      clock.advance(120_000);
      status = 503;
      const r = await get(pool, `${origin.url}/m`);
      assert.equal(r.status, 200);
      assert.equal(r.body.toString(), 'v1');
      status = 200;
      assert.equal((await get(pool, `${origin.url}/m`)).body.toString(), 'v3');
      assert.equal(origin.count('/m'), 3);
      assert.equal(p.proxy.counters.staleServed, 1);
    } finally {
      await pool.close();
      await p.close();
      await origin.close();
    }
  });

  for (const [name, cc, reqHeaders, advanceS] of [
    ['must-revalidate', 'max-age=60, must-revalidate', {}, 120],
    ['proxy-revalidate', 'max-age=60, proxy-revalidate', {}, 120],
    ['s-maxage', 's-maxage=60', {}, 120],
    ['a response stale-if-error shorter than the staleness', 'max-age=60, stale-if-error=30', {}, 120],
    ['--max-stale (1h here) exceeded', 'max-age=60', {}, 2 * 3600],
    ["the client's max-stale", 'max-age=60', { 'cache-control': 'max-stale=10' }, 120],
  ] as const) {
    it(`no stale copy when ${name} forbids it: the labelled error instead`, async () => {
      const clock = new ManualClock();
      const origin = await startOrigin();
      origin.route('/m', { headers: { 'cache-control': cc }, body: 'old' });
      const p = await startProxy({ 'max-stale': '1h' }, { clock });
      const pool = proxyClient(p.url, 2);
      try {
        assert.equal((await get(pool, `${origin.url}/m`)).status, 200);
        clock.advance(advanceS * 1000);
        const url = `${origin.url}/m`;
        await origin.close();
        const r = await get(pool, url, reqHeaders);
        assert.equal(r.status, 502);
        assert.match(String(r.headers['proxy-status']), /connection_refused/);
        assert.equal(p.proxy.counters.staleServed, 0);
        assert.equal(origin.count('/m'), 1);
      } finally {
        await pool.close();
        await p.close();
      }
    });
  }

  it("a response's stale-if-error longer than the staleness allows it", async () => {
    const clock = new ManualClock();
    const origin = await startOrigin();
    origin.route('/m', { headers: { 'cache-control': 'max-age=60, stale-if-error=600' }, body: 'old' });
    const p = await startProxy({}, { clock });
    const pool = proxyClient(p.url, 2);
    try {
      assert.equal((await get(pool, `${origin.url}/m`)).status, 200);
      clock.advance(120_000);
      const url = `${origin.url}/m`;
      await origin.close();
      const r = await get(pool, url);
      assert.equal(r.status, 200);
      assert.equal(r.body.toString(), 'old');
      assert.equal(p.proxy.counters.staleServed, 1);
      assert.equal(origin.count('/m'), 1);
    } finally {
      await pool.close();
      await p.close();
    }
  });
});

describe('stale-while-revalidate', () => {
  it('within the window the stale copy is served at once, and one background fill refreshes it', async () => {
    const clock = new ManualClock();
    const origin = await startOrigin();
    const g = gate();
    let n = 0;
    origin.route('/swr', (): Route => ({ gate: ++n > 1 ? g : undefined, headers: { 'cache-control': 'max-age=60, stale-while-revalidate=600' }, body: `v${n}` }));
    const p = await startProxy({}, { clock });
    const pool = proxyClient(p.url, 4);
    try {
      assert.equal((await get(pool, `${origin.url}/swr`)).body.toString(), 'v1');
      clock.advance(120_000);
      // The refresh is held at the origin: the clients do not wait for it.
      for (let i = 0; i < 3; i++) assert.equal((await get(pool, `${origin.url}/swr`)).body.toString(), 'v1');
      await waitFor('one background refresh at the origin', () => g.waiting === 1);
      assert.equal(p.logLines.filter((l) => l.includes('TCP_STALE_HIT/200')).length, 3);
      g.open();
      await waitFor('the refresh stored', () => p.proxy.coalescer.running === 0);
      assert.equal((await get(pool, `${origin.url}/swr`)).body.toString(), 'v2');
      assert.equal(origin.count('/swr'), 2);
    } finally {
      await pool.close();
      await p.close();
      await origin.close();
    }
  });
});
