// Memory held outside the tiers is bounded and reported: the disk index (its entries, its bound of
// --disk-cache / 4 KiB, its heap) and the pool of read-back buffers show in /status and Prometheus.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { BufferPool, POOL_MAX_BYTES, POOLED_BYTES, READ_BYTES } from '../../src/buffer-pool.ts';
import { INDEX_ENTRY_BYTES } from '../../src/disk-index.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, withProxy } from '../helpers/proxy.ts';

async function admin(port: number, path: string): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  assert.equal(res.status, 200);
  return res.text();
}

function metric(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} is exported`);
  return Number(line.split(' ').pop());
}

describe('memory outside the tiers', () => {
  it('/status and /metrics report the disk index (entries, bound, heap) and the buffer pool', async () => {
    await withProxy({ 'disk-cache': '64MB', 'max-object-size': '16MB', 'max-memory-object-size': '64KB' }, async ({ origin, p, pool }) => {
      const body = randomBytes(512 * 1024);
      origin.route('/big', { body, headers: { 'cache-control': 'max-age=600' } });
      const url = `${origin.url}/big`;
      assert.ok((await get(pool, url)).body.equals(body));
      await waitFor('stored on disk, its fill gone', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0);
      // A disk hit streamed on its own (a condition that does not match keeps it out of a shared read)
      // reads through pooled buffers, which come back once the socket has them.
      const hit = await get(pool, url, { 'if-none-match': '"other"' });
      assert.equal(hit.status, 200);
      assert.ok(hit.body.equals(body));
      assert.equal(origin.count('/big'), 1, 'one upstream fetch');
      const port = p.proxy.adminAddress()!.port;
      const status = JSON.parse(await admin(port, '/status')) as { tiers: { disk: { objects: number; index: { entries: number; maxEntries: number; heapBytes: number } } }; bufferPoolBytes: number };
      assert.deepEqual(status.tiers.disk.index, { entries: 1, maxEntries: (64 * 2 ** 20) / 4096, heapBytes: INDEX_ENTRY_BYTES });
      assert.ok(status.bufferPoolBytes >= POOLED_BYTES && status.bufferPoolBytes <= POOL_MAX_BYTES, `pool ${status.bufferPoolBytes}`);
      const m = await admin(port, '/metrics');
      assert.equal(metric(m, 'cuttle_disk_index_entries'), 1);
      assert.equal(metric(m, 'cuttle_disk_index_max_entries'), 16384);
      assert.equal(metric(m, 'cuttle_disk_index_heap_bytes'), INDEX_ENTRY_BYTES);
      assert.equal(metric(m, 'cuttle_buffer_pool_bytes'), status.bufferPoolBytes);
    });
  });

  it('the buffer pool keeps no more than its bound, each buffer counted at what it costs', () => {
    const pool = new BufferPool(4 * POOLED_BYTES);
    const out = Array.from({ length: 10 }, () => pool.acquire());
    assert.ok(out.every((b) => b.length === READ_BYTES));
    for (const b of out) pool.release(b);
    assert.equal(pool.bytes, 4 * POOLED_BYTES);
    assert.ok(POOL_MAX_BYTES <= 32 * 2 ** 20, 'the default bound: 32 MiB, not 128');
  });
});
