// Review of da674df..49dd617 (PURGE waits for every worker): a PURGE made while the key's owner worker
// is dead (between its crash and its restart) must still drop the owner's record. Today the asking
// worker skips its delete of another worker's key ("its owner deletes it"), and the main thread asks
// only the workers that are ready, so nobody deletes the record: the PURGE answers 404 and the
// restarted owner serves the purged object again.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, memoryLogger, tmpDir } from '../helpers/proxy.ts';
import { buildConfig } from '../../src/config.ts';
import { startWorkers } from '../../src/workers.ts';
import { urlKey } from '../../src/cache-key.ts';
import { workerOf } from '../../src/worker-ring.ts';

describe('workers: PURGE while the owner worker is down', () => {
  it("drops the owner's record: after its restart the object is fetched again", async () => {
    const origin = await startOrigin();
    let path = '';
    for (let i = 0; ; i++) {
      path = `/purged${i}`;
      if (workerOf(urlKey(new URL(`${origin.url}${path}`)), 2) === 1) break;
    }
    origin.route(path, { body: 'old'.repeat(2000), headers: { 'cache-control': 'max-age=600' } });
    const dir = tmpDir();
    const { logger } = memoryLogger();
    const raw = { workers: 2, listen: ['127.0.0.1:0'], 'cache-dir': join(dir, 'cache'), 'access-log': 'none', 'admin-listen': '127.0.0.1:0', 'visible-hostname': 'w-purge', 'log-level': 'warn', 'allow-local-dest': ['127.0.0.1'] };
    const set = await startWorkers(buildConfig(raw), raw, logger);
    const url = `http://127.0.0.1:${set.addresses[0]!.port}`;
    const admin = `http://127.0.0.1:${set.adminAddress()!.port}`;
    let pool = new Pool(url, { connections: 1 });
    try {
      assert.equal((await get(pool, `${origin.url}${path}`)).status, 200);
      // Stored by its owner (worker 1): a later request is a hit.
      await waitFor('the object to be a hit', async () => (await get(pool, `${origin.url}${path}`)).headers['x-cache']?.toString().startsWith('HIT') ?? false);
      assert.equal(origin.count(path), 1);
      await pool.close();
      await set.thread(1)!.terminate(); // as a crash would end it
      // Only worker 0 listens now: the PURGE reaches it.
      pool = new Pool(url, { connections: 1 });
      const pr = await get(pool, `${origin.url}${path}`, {}, 'PURGE');
      assert.equal(set.thread(1), undefined, 'the PURGE was answered while worker 1 was down (else this test proves nothing)');
      await pool.close();
      assert.equal(pr.status, 200, 'the object was cached: a PURGE finds it');
      await waitFor('worker 1 restarted and serving', async () => set.restarts(1) === 1 && set.thread(1) !== undefined);
      const s = (await (await fetch(`${admin}/status`)).json()) as { workers: { running: boolean }[] };
      assert.ok(s.workers.every((w) => w.running));
      pool = new Pool(url, { connections: 4 });
      const rs = await Promise.all(Array.from({ length: 8 }, () => get(pool, `${origin.url}${path}`)));
      assert.ok(rs.every((r) => r.status === 200));
      assert.equal(origin.count(path), 2, 'after a PURGE the next request is fetched, not served from the purged record');
    } finally {
      await pool.close();
      await set.close(1000);
      await origin.close();
    }
  });
});
