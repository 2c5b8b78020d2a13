// Races between tasks: a value another task can change is looked at again, never assumed.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { gate } from '../helpers/origin.ts';
import { get, withProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

describe('races', () => {
  for (const lane of [true, false]) {
    it(`a fill that leaves between a request's lookup and its join costs that request nothing (hit lane ${lane ? 'on' : 'off'})`, async () => {
      await withProxy({ 'hit-lane': lane }, async ({ origin, p, pool }) => {
        const g = gate();
        origin.route('/obj', { gate: g, body: 'whole body', headers: { 'cache-control': 'max-age=60' } });
        const first = get(pool, `${origin.url}/obj`);
        await waitFor('the fill at the origin', () => g.waiting === 1);
        // The race, made certain: the fill is found joinable, and gone by the next look (it failed, or
        // was released, in the microtask between a lookup and its join).
        const c = p.proxy.coalescer;
        const joinable = c.joinable.bind(c);
        let looks = 0;
        c.joinable = (key: string) => (++looks === 2 ? undefined : joinable(key));
        let answered = false;
        const second = get(pool, `${origin.url}/obj`).finally(() => (answered = true));
        await waitFor('the second request joined (or answered)', () => answered || c.topFills(1, 0)[0]?.readers === 2);
        c.joinable = joinable;
        g.open();
        for (const r of await Promise.all([first, second])) {
          assert.equal(r.status, 200);
          assert.equal(r.body.toString(), 'whole body');
        }
        assert.ok(looks >= 3, 'the request looked again');
        assert.equal(origin.count('/obj'), 1);
        assert.equal(p.proxy.counters.errors, 0);
      });
    });
  }
});
