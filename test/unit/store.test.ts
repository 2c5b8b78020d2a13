import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { createFreshness } from '../../src/freshness.ts';
import { systemClock } from '../../src/clock.ts';
import { DiskTier } from '../../src/store-disk.ts';
import { MemoryTier } from '../../src/store-memory.ts';
import { metaFor, tierConformance } from '../store-conformance.ts';
import { tmpDir } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

describe('MemoryTier', () => {
  tierConformance('memory', async () => new MemoryTier({ maxBytes: 64 * 1024, maxEntryBytes: 16 * 1024 }));
});

describe('DiskTier', () => {
  tierConformance('disk', async () => {
    const t = new DiskTier({ dir: join(tmpDir(), 'c'), maxBytes: 64 * 1024, maxEntryBytes: 16 * 1024, freshness: createFreshness(systemClock, 60_000) });
    await t.open();
    await t.loaded;
    return t;
  });
});

describe('DiskTier index bound', () => {
  it('is bounded by count too: each record is charged whole 4 KiB blocks, so at most --disk-cache / 4 KiB records', async () => {
    const dir = join(tmpDir(), 'c');
    const t = new DiskTier({ dir, maxBytes: 64 * 1024, maxEntryBytes: 16 * 1024, freshness: createFreshness(systemClock, 60_000) });
    await t.open();
    await t.loaded;
    assert.equal(t.indexStats().maxEntries, 16);
    // 40 records of a few hundred bytes each: 12 KiB of files, but 40 blocks.
    for (let i = 0; i < 40; i++) {
      const { meta, policy } = metaFor(`tiny${i}`);
      const w = t.openWriter(meta, policy, undefined)!;
      w.append(Buffer.from('x'));
      assert.equal(await w.commit(), true);
    }
    const s = t.stats();
    assert.equal(s.objects, 16);
    assert.equal(s.evictions, 24);
    assert.equal(s.bytes, 16 * 4096, 'charged in blocks');
    assert.equal(t.indexStats().entries, 16);
    assert.ok(t.indexStats().heapBytes > 0);
    // The evicted records' files go too (unlinked in the background: wait for the directory, not time).
    const files = () => readdirSync(join(dir, 'v1', 'objects')).reduce((n, sub) => n + readdirSync(join(dir, 'v1', 'objects', sub)).length, 0);
    await waitFor('evicted files unlinked', () => files() === 16);
    assert.ok(await t.get('tiny39'), 'the newest stays');
    assert.equal(await t.get('tiny0'), undefined, 'the oldest went');
    await t.unlock();
  });
});
