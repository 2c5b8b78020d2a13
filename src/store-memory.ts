// Memory tier: whole small bodies in an lru-cache bounded by bytes (--memory-cache) and entry size
// (--max-memory-object-size). lru-cache refuses to be unbounded, and so does this.
import { LRUCache } from 'lru-cache';
import type { Policy } from './freshness.ts';
import type { StoredMeta, StoredObject, Tier, TierStats, TierWriter } from './store.ts';

interface Entry {
  meta: StoredMeta;
  policy: Policy;
  body: Buffer;
}

const OVERHEAD = 512; // rough per-entry bookkeeping, so many tiny objects still count

export class MemoryTier implements Tier {
  readonly #lru: LRUCache<string, Entry>;
  readonly #maxBytes: number;
  readonly #maxEntryBytes: number;
  #evictions = 0;

  constructor(opts: { maxBytes: number; maxEntryBytes: number }) {
    if (!(opts.maxBytes > 0)) throw new Error('MemoryTier needs maxBytes > 0');
    this.#maxBytes = opts.maxBytes;
    this.#maxEntryBytes = Math.min(opts.maxEntryBytes, opts.maxBytes);
    this.#lru = new LRUCache<string, Entry>({
      maxSize: opts.maxBytes,
      maxEntrySize: this.#maxEntryBytes + OVERHEAD,
      sizeCalculation: (e) => e.body.length + OVERHEAD,
      dispose: (_v, _k, reason) => {
        if (reason === 'evict') this.#evictions++;
      },
    });
  }

  async get(key: string): Promise<StoredObject | undefined> {
    const e = this.#lru.get(key);
    if (!e) return undefined;
    return { meta: e.meta, policy: e.policy, size: e.body.length, tier: 'memory', body: { kind: 'buffer', data: e.body } };
  }

  put(meta: StoredMeta, policy: Policy, body: Buffer): boolean {
    if (body.length > this.#maxEntryBytes) return false;
    this.#lru.set(meta.key, { meta, policy, body });
    return this.#lru.has(meta.key);
  }

  openWriter(meta: StoredMeta, policy: Policy, expectedBytes: number | undefined): TierWriter | undefined {
    if (expectedBytes !== undefined && expectedBytes > this.#maxEntryBytes) return undefined;
    const chunks: Buffer[] = [];
    let size = 0;
    let dead = false;
    return {
      append: (c) => {
        if (dead) return;
        size += c.length;
        if (size > this.#maxEntryBytes) {
          dead = true;
          chunks.length = 0;
        } else chunks.push(c);
      },
      commit: async () => !dead && this.put(meta, policy, Buffer.concat(chunks, size)),
      abort: () => {
        dead = true;
        chunks.length = 0;
      },
    };
  }

  async delete(key: string): Promise<void> {
    this.#lru.delete(key);
  }

  async updateMeta(meta: StoredMeta, policy: Policy): Promise<void> {
    const e = this.#lru.get(meta.key);
    if (e) this.#lru.set(meta.key, { meta, policy, body: e.body });
  }

  stats(): TierStats {
    return { objects: this.#lru.size, bytes: this.#lru.calculatedSize, maxBytes: this.#maxBytes, evictions: this.#evictions };
  }
}
