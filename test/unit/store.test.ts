import { join } from 'node:path';
import { describe } from 'node:test';
import { createFreshness } from '../../src/freshness.ts';
import { systemClock } from '../../src/clock.ts';
import { DiskTier } from '../../src/store-disk.ts';
import { MemoryTier } from '../../src/store-memory.ts';
import { tierConformance } from '../store-conformance.ts';
import { tmpDir } from '../helpers/proxy.ts';

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
