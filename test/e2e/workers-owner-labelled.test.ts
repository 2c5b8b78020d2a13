// Review of da674df..49dd617 ("an owner's answer (worker or bank member) is final"): the owner worker's
// own labelled failure (its upstream timed out: 504 ERR_READ_TIMEOUT) is not final for the worker that
// relayed the request. ask() takes it as "the peer's own failure" and goes on to the direct route, so
// the relaying worker asks the same origin again (a second upstream fetch of the object) and its client
// waits a second --read-timeout. README, Every core: "the owner's answer is final", "each object is
// fetched upstream once".
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { Pool } from 'undici';
import { gate, startOrigin } from '../helpers/origin.ts';
import { get } from '../helpers/proxy.ts';
import { ownedBy, startWorkers2 } from '../helpers/workers.ts';

describe('workers: the owner worker labels its own failure', () => {
  const closers: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it("the relaying worker takes it as final: the origin is asked once", async () => {
    const held = gate();
    const origin = await startOrigin();
    const { proxy, ports } = await startWorkers2(['--read-timeout', '1s'], 'w-review2');
    const path = ownedBy(1, origin.url, '/hung');
    origin.route(path, { gate: held, body: 'late', headers: { 'cache-control': 'max-age=600' } });
    const pool = new Pool(`http://127.0.0.1:${ports[0]}`, { connections: 1 });
    closers.push(() => origin.close(), () => proxy.stop(), () => pool.close(), async () => held.open());
    const r = await get(pool, `${origin.url}${path}`);
    assert.equal(r.status, 504);
    assert.match(String(r.headers['proxy-status']), /error=/);
    assert.equal(origin.count(path), 1, "the owner's labelled failure is final: the relaying worker does not ask the origin again");
  });
});
