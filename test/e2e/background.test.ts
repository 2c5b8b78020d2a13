// Background requests (Priority: u=7, as cuttle warm sends): a new fill of theirs waits while clients
// keep the event loop busy, so warming never lands on the clients' latency; hits never wait. The test
// drives the gate (background.ts) itself: its sampling of the loop is stopped, and each tick says how
// busy the loop was, so what is held and when it goes are states, not timings.
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { get, refusedFor, withProxy, type TestProxy } from '../helpers/proxy.ts';

const BG = { priority: 'u=7' };

/** Stop the gate's own sampling and tick it as a loop busy with clients (or idle). */
function driven(p: TestProxy): { busy: () => void; idle: () => void } {
  const gate = p.proxy.background;
  gate.stopSampling();
  return { busy: () => gate.tick(performance.now(), 1, 100), idle: () => gate.tick(performance.now(), 0, 0) };
}

describe('background requests (Priority: u=7)', () => {
  it('a background miss waits while clients keep the loop busy, then is fetched once, at the default urgency; a background hit does not wait', () =>
    withProxy({}, async ({ origin, p, pool }) => {
      origin.route('/hot', { body: 'hot', headers: { 'cache-control': 'max-age=600' } });
      origin.route('/warm-me', { body: 'warmed', headers: { 'cache-control': 'max-age=600' } });
      assert.equal((await get(pool, `${origin.url}/hot`)).status, 200);
      const loop = driven(p);
      loop.busy();
      const bg = get(pool, `${origin.url}/warm-me`, BG);
      await waitFor('the background fill held', () => p.proxy.background.waiting === 1);
      assert.equal(origin.count('/warm-me'), 0, 'held: nothing asked upstream');
      loop.busy();
      const hit = await get(pool, `${origin.url}/hot`, BG);
      assert.equal(hit.status, 200, 'a background hit is answered while the fill waits');
      assert.equal(p.proxy.background.waiting, 1);
      assert.match((await p.proxy.report()).metrics, /^cuttle_background_waiting 1$/m);
      loop.idle();
      const r = await bg;
      assert.equal(r.status, 200);
      assert.equal(r.body.toString(), 'warmed');
      assert.equal(origin.count('/warm-me'), 1);
      assert.equal(origin.count('/hot'), 1);
      // The fill is everyone's: clients may join it, so it goes upstream at the default urgency.
      assert.equal(origin.seen.find((r) => r.path === '/warm-me')!.headers.priority, undefined);
      assert.equal(p.proxy.background.held, 1);
      assert.equal(await refusedFor(p, 'background'), 0);
      assert.match((await p.proxy.report()).metrics, /^cuttle_requests_counted_total\{counter="background"\} 2$/m);
    }));

  it('past --background-wait the fill is refused with a labelled 503, and nothing is asked upstream', () =>
    withProxy({ 'background-wait': '0s' }, async ({ origin, p, pool }) => {
      origin.route('/warm-me', { body: 'warmed', headers: { 'cache-control': 'max-age=600' } });
      const loop = driven(p);
      loop.busy();
      const r = await get(pool, `${origin.url}/warm-me`, BG);
      assert.equal(r.status, 503);
      assert.match(String(r.headers['proxy-status']), /^cuttle; error=connection_limit_reached; details=".*background/);
      assert.ok(r.headers['x-squid-error']);
      assert.equal(origin.count('/warm-me'), 0);
      assert.equal(await refusedFor(p, 'background'), 1);
      loop.idle();
      assert.equal((await get(pool, `${origin.url}/warm-me`, BG)).status, 200, 'idle again: the same request is fetched');
      assert.equal(origin.count('/warm-me'), 1);
    }));

  it('a client that leaves while its fill waits gives its place up at once; nothing is fetched for it', () =>
    withProxy({}, async ({ origin, p }) => {
      origin.route('/left', { body: 'never fetched', headers: { 'cache-control': 'max-age=600' } });
      const loop = driven(p);
      loop.busy();
      const sock = connect(p.port, '127.0.0.1');
      sock.write(`GET ${origin.url}/left HTTP/1.1\r\nHost: ${new URL(origin.url).host}\r\nPriority: u=7\r\n\r\n`);
      await waitFor('the background fill held', () => p.proxy.background.waiting === 1);
      sock.destroy();
      await waitFor('its place given up', () => p.proxy.background.waiting === 0);
      loop.idle();
      assert.equal(origin.count('/left'), 0);
      assert.equal(await refusedFor(p, 'background'), 0);
    }));
});
