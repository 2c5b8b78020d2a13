// Review of da674df..49dd617 (a check that passes at 49dd617, kept as a regression test): a body the
// origin breaks off behind the owner worker reaches the relaying worker as a break of its relay and
// counts against the owner worker, but peer.answered() at each head resets the run, so a flaky origin
// never takes a healthy owner worker down. The private spill files of the broken fills are removed.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get } from '../helpers/proxy.ts';
import { startWorkers2 } from '../helpers/workers.ts';
import { urlKey } from '../../src/cache-key.ts';
import { workerOf } from '../../src/worker-ring.ts';

describe('workers: an origin that breaks bodies off behind the owner worker', () => {
  const closers: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('does not take the owner worker down: its other keys are still fetched once', async () => {
    const origin = await startOrigin();
    const { proxy, ports, cache } = await startWorkers2(['--probe-interval', '1h'], 'w-review2');
    const owned: string[] = [];
    for (let i = 0; owned.length < 4; i++) if (workerOf(urlKey(new URL(`${origin.url}/k${i}`)), 2) === 1) owned.push(`/k${i}`);
    const [b1, b2, b3, good] = owned as [string, string, string, string];
    for (const p of [b1, b2, b3]) origin.route(p, { body: 'z'.repeat(100_000), resetAfter: 30_000, headers: { 'cache-control': 'max-age=600' } });
    origin.route(good, { body: 'fine', headers: { 'cache-control': 'max-age=600' } });
    const p0 = new Pool(`http://127.0.0.1:${ports[0]}`, { connections: 1 });
    const p1 = new Pool(`http://127.0.0.1:${ports[1]}`, { connections: 1 });
    closers.push(() => origin.close(), () => proxy.stop(), () => p0.destroy(), () => p1.destroy());
    for (const p of [b1, b2, b3]) await get(p0, `${origin.url}${p}`).catch(() => undefined); // truncated: the client sees the break
    await waitFor('no temp file left after the broken fills', () => readdirSync(join(cache, 'v1', 'tmp')).length === 0);
    assert.equal((await get(p0, `${origin.url}${good}`)).status, 200);
    assert.equal((await get(p1, `${origin.url}${good}`)).status, 200);
    assert.equal(origin.count(good), 1, 'the owner worker is healthy: it alone fetches its keys');
    assert.doesNotMatch(proxy.stderr(), /worker down/);
  });
});
