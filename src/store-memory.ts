// Memory tier: whole small bodies in an lru-cache bounded by bytes (--memory-cache) and entry size
// (--max-memory-object-size). lru-cache refuses to be unbounded, and so does this.
//
// The bound covers what an entry really costs, not just its body: its headers and freshness policy as
// JavaScript objects, and lru-cache's own bookkeeping. Bodies are copied into buffers of their own: a
// small Buffer is usually a slice of an 8 KiB pool slab (or of a socket read), and keeping the slice
// would keep the whole slab alive, uncounted.
import { LRUCache } from 'lru-cache';
import type { Policy } from './freshness.ts';
import type { StoredMeta, StoredObject, Tier, TierStats, TierWriter } from './store.ts';

interface Entry {
  meta: StoredMeta;
  policy: Policy;
  body: Buffer;
  cost: number;
}

/**
 * Fixed cost of an entry beyond its body and headers: the policy object (http-cache-semantics keeps
 * parsed copies of the request and response headers), the meta record, and lru-cache's slots.
 * Calibrated by test/unit/memory-cost.test.ts (heap and buffers after a GC, against the count): about
 * 0.8 of what is counted is really held, so the bound is kept with room for V8's own rounding.
 */
const ENTRY_OVERHEAD = 1024;

/**
 * What the heap part of an entry costs in RSS, per byte it holds. An LRU evicts entries all over the
 * old generation, and V8 keeps the pages they leave half empty: after a storm of small misses through
 * the default 256 MB tier, old space was 307 MiB committed for 216 MiB live (1.42x). Counting the heap
 * part at this keeps RSS, not just the live heap, within --memory-cache.
 */
const HEAP_RESIDENT = 1.45;

/** A body buffer's own cost beyond its bytes: JS view, ArrayBuffer, backing-store record, malloc header. */
const BUFFER_OVERHEAD = 160;

/** What one entry costs in memory, in bytes. */
export function entryCost(meta: StoredMeta, body: Buffer): number {
  let headerBytes = meta.key.length + meta.url.length;
  for (const [k, v] of Object.entries(meta.headers)) headerBytes += k.length + (Array.isArray(v) ? v.join('').length : String(v).length);
  // Headers live twice: in the stored meta, and in the policy's parsed copy.
  return body.length + BUFFER_OVERHEAD + Math.ceil(HEAP_RESIDENT * (2 * headerBytes + ENTRY_OVERHEAD));
}

const EMPTY = Object.freeze({});

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
      maxEntrySize: opts.maxBytes,
      sizeCalculation: (e) => e.cost,
      dispose: (_v, _k, reason) => {
        if (reason === 'evict') this.#evictions++;
      },
    });
  }

  async get(key: string): Promise<StoredObject | undefined> {
    return this.getNow(key);
  }

  /** The same as get(), without a promise: memory answers at once (the hit path). */
  getNow(key: string): StoredObject | undefined {
    const e = this.#lru.get(key);
    if (!e) return undefined;
    return { meta: e.meta, policy: e.policy, size: e.body.length, tier: 'memory', body: { kind: 'buffer', data: e.body } };
  }

  put(meta: StoredMeta, policy: Policy, body: Buffer): boolean {
    if (body.length > this.#maxEntryBytes) return false;
    // The policy object is kept; its serialised twice (meta.policy) is only for the disk record.
    const m: StoredMeta = { ...meta, policy: EMPTY };
    const own = Buffer.allocUnsafeSlow(body.length);
    body.copy(own);
    this.#lru.set(meta.key, { meta: m, policy, body: own, cost: entryCost(m, own) });
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
    if (e) {
      const m: StoredMeta = { ...meta, policy: EMPTY };
      this.#lru.set(meta.key, { meta: m, policy, body: e.body, cost: entryCost(m, e.body) });
    }
  }

  stats(): TierStats {
    return { objects: this.#lru.size, bytes: this.#lru.calculatedSize, maxBytes: this.#maxBytes, evictions: this.#evictions };
  }
}
