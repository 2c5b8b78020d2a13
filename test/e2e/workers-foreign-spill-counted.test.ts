// Review of da674df..49dd617 (a worker's fill of another worker's key spills to a private file): that
// file is removed at the end, nothing is stored, yet the spill's commit() answers true and the fill
// counts as committed. A relayed object is then counted as stored twice (the owner's record and the
// relaying worker's private spill) in cuttle_fills_committed_total, "Fills whose body was stored".
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

describe("workers: a relayed object's private spill", () => {
  const closers: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('is removed and not counted as a stored fill: one object, one committed fill', async () => {
    const origin = await startOrigin();
    const { proxy, ports, admin, cache } = await startWorkers2([], 'w-review2');
    let path = '';
    for (let i = 0; ; i++) {
      path = `/relayed${i}`;
      if (workerOf(urlKey(new URL(`${origin.url}${path}`)), 2) === 1) break;
    }
    origin.route(path, { body: 'y'.repeat(2 << 20), headers: { 'cache-control': 'max-age=600' } });
    const pool = new Pool(`http://127.0.0.1:${ports[0]}`, { connections: 1 });
    closers.push(() => origin.close(), () => proxy.stop(), () => pool.close());
    const r = await get(pool, `${origin.url}${path}`);
    assert.equal(r.status, 200);
    assert.equal(r.body.length, 2 << 20);
    assert.equal(origin.count(path), 1);
    await waitFor('no temp file left', () => readdirSync(join(cache, 'v1', 'tmp')).length === 0);
    const s = (await (await fetch(`${admin}/status`)).json()) as { fills: { fillsCommitted: number } };
    assert.equal(s.fills.fillsCommitted, 1, 'one body was stored (by the owner); the private spill was not');
  });
});
