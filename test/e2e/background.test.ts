// Background requests (Priority: u=7, as cuttle warm sends): a new fill of theirs waits while clients
// keep the event loop busy, so warming never lands on the clients' latency; hits never wait. The
// clients here are a loop of hits that runs until the test has seen the state it waits for.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Pool } from 'undici';
import { waitFor } from '../helpers/mirrors.ts';
import { get, withProxy, type TestProxy } from '../helpers/proxy.ts';

const BG = { priority: 'u=7' };

/** Hits on `url` until stopped: clients that keep the proxy's loop busy. */
function clients(pool: Pool, url: string): { stop: () => Promise<void> } {
  let stopped = false;
  const running = (async () => {
    while (!stopped) assert.equal((await get(pool, url)).status, 200);
  })();
  return {
    stop: async () => {
      stopped = true;
      await running;
    },
  };
}

async function refusedBackground(p: TestProxy): Promise<number> {
  const m = /^cuttle_refused_total\{reason="background"\} (\d+)$/m.exec((await p.proxy.report()).metrics);
  return Number(m?.[1]);
}

describe('background requests (Priority: u=7)', () => {
  it('a background miss waits while clients keep the loop busy, then is fetched once; a background hit does not wait', () =>
    withProxy({ 'background-load': 0 }, async ({ origin, p, pool }) => {
      origin.route('/hot', { body: 'hot', headers: { 'cache-control': 'max-age=600' } });
      origin.route('/warm-me', { body: 'warmed', headers: { 'cache-control': 'max-age=600' } });
      assert.equal((await get(pool, `${origin.url}/hot`)).status, 200);
      const load = clients(pool, `${origin.url}/hot`);
      await waitFor('the loop busy with clients', () => p.proxy.background.busy);
      const bg = get(pool, `${origin.url}/warm-me`, BG);
      await waitFor('the background fill held', () => p.proxy.background.waiting === 1);
      assert.equal(origin.count('/warm-me'), 0, 'held: nothing asked upstream');
      const hit = await get(pool, `${origin.url}/hot`, BG);
      assert.equal(hit.status, 200, 'a background hit is answered while the fill waits');
      assert.equal(p.proxy.background.waiting, 1);
      await load.stop();
      const r = await bg;
      assert.equal(r.status, 200);
      assert.equal(r.body.toString(), 'warmed');
      assert.equal(origin.count('/warm-me'), 1);
      assert.equal(origin.count('/hot'), 1);
      // The fill is everyone's: clients may join it, so it goes upstream at the default urgency.
      assert.equal(origin.seen.find((r) => r.path === '/warm-me')!.headers.priority, undefined);
      assert.equal(p.proxy.background.held, 1);
      assert.equal(await refusedBackground(p), 0);
      assert.match((await p.proxy.report()).metrics, /^cuttle_requests_counted_total\{counter="background"\} 2$/m);
    }));

  it('past --background-wait the fill is refused with a labelled 503, and nothing is asked upstream', () =>
    withProxy({ 'background-load': 0, 'background-wait': '0s' }, async ({ origin, p, pool }) => {
      origin.route('/hot', { body: 'hot', headers: { 'cache-control': 'max-age=600' } });
      origin.route('/warm-me', { body: 'warmed', headers: { 'cache-control': 'max-age=600' } });
      assert.equal((await get(pool, `${origin.url}/hot`)).status, 200);
      const load = clients(pool, `${origin.url}/hot`);
      await waitFor('the loop busy with clients', () => p.proxy.background.busy);
      const r = await get(pool, `${origin.url}/warm-me`, BG);
      await load.stop();
      assert.equal(r.status, 503);
      assert.match(String(r.headers['proxy-status']), /^cuttle; error=connection_limit_reached; details=".*background/);
      assert.ok(r.headers['x-squid-error']);
      assert.equal(origin.count('/warm-me'), 0);
      assert.equal(await refusedBackground(p), 1);
      // Idle again: the same request is fetched.
      await waitFor('the loop idle', () => !p.proxy.background.busy);
      assert.equal((await get(pool, `${origin.url}/warm-me`, BG)).status, 200);
      assert.equal(origin.count('/warm-me'), 1);
    }));
});
