// --memory-cache bounds what the memory tier really costs: bodies, headers, policies and bookkeeping.
// Fills a tier with many small entries shaped like real ones (a policy built from real request and
// response headers) and compares the tier's own count with what the process really holds after a GC.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { systemClock } from '../../src/clock.ts';
import { createFreshness, policyRequest } from '../../src/freshness.ts';
import { MemoryTier } from '../../src/store-memory.ts';
import { DiskIndex, INDEX_ENTRY_BYTES } from '../../src/disk-index.ts';
import { hashKey } from '../../src/cache-key.ts';
import type { StoredMeta } from '../../src/store.ts';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function used(): number {
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.external;
}

describe('memory tier accounting', () => {
  it('counts at least what its entries really hold (heap and buffers), and stays within its bound', () => {
    const freshness = createFreshness(systemClock, 60_000);
    const maxBytes = 16 * 2 ** 20;
    const tier = new MemoryTier({ maxBytes, maxEntryBytes: 2 ** 20 });
    // A small body from a socket read: a slice of a larger buffer, as undici and the pool hand them out.
    const slab = Buffer.alloc(64 * 1024, 1);
    const before = used();
    const n = 40_000;
    for (let i = 0; i < n; i++) {
      const url = new URL(`http://stratum1.example.org:8000/cvmfs/atlas.cern.ch/api/v1/object/${i}`);
      const reqHeaders = { 'user-agent': 'cvmfs Fuse 2.11.2', 'x-forwarded-for': '10.1.2.3', via: '1.1 node17', host: url.host, pragma: '' };
      const resHeaders = { 'content-type': 'application/x-cvmfs', 'cache-control': 'max-age=3600', 'last-modified': 'Thu, 01 Jan 2026 00:00:00 GMT', etag: `"${i}-abcdef"`, date: new Date().toUTCString(), 'content-length': '300', server: 'Apache' };
      const policy = freshness.policyFor(policyRequest(url, 'GET', reqHeaders), { status: 200, headers: resHeaders });
      const meta: StoredMeta = { key: url.href, url: url.href, status: 200, headers: resHeaders, policy: policy.toObject(), vary: [], storedAt: Date.now() };
      tier.put(meta, policy, slab.subarray(i % 1000, (i % 1000) + 300));
    }
    const real = used() - before;
    const counted = tier.stats().bytes;
    assert.ok(counted <= maxBytes, `counted ${counted} within ${maxBytes}`);
    assert.ok(tier.stats().evictions > 0, 'the bound was reached');
    // Every entry is counted at no less than it costs (10% slack for V8's own rounding).
    assert.ok(real <= counted * 1.1, `the tier counts ${(counted / 2 ** 20).toFixed(1)} MiB but holds ${(real / 2 ** 20).toFixed(1)} MiB`);
  });
});

describe('disk index accounting', () => {
  it('holds no more heap per record than it reports, and no more records than --disk-cache / 4 KiB', () => {
    const n = 200_000;
    // Hashes made first, so only the index's own copies are measured.
    const hashes = Array.from({ length: n }, (_, i) => hashKey(`http://stratum1.example.org:8000/cvmfs/atlas.cern.ch/data/${i}`));
    const before = used();
    const index = new DiskIndex(n * 4096, 2 ** 30, () => {});
    for (const h of hashes) index.set(h, 300 + h.charCodeAt(0)); // small records, one block each: the count bound
    const real = used() - before;
    assert.equal(index.entries, n);
    assert.equal(index.maxEntries, n);
    assert.ok(real <= index.heapBytes, `the index reports ${index.heapBytes / n} B an entry but holds ${(real / n).toFixed(1)} B`);
    // One more record past the count bound evicts the oldest, however small the records are.
    let evicted = 0;
    const more = new DiskIndex(8 * 4096, 2 ** 30, () => evicted++);
    for (let i = 0; i < 9; i++) more.set(hashes[i]!, 100);
    assert.equal(more.entries, 8);
    assert.equal(evicted, 1);
    assert.equal(more.has(hashes[0]!), false);
    assert.ok(INDEX_ENTRY_BYTES < 163, 'more compact than hex keys (~163 B an entry)');
  });
});
