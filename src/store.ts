// What a stored object is, and the small interface every storage tier implements (see
// test/store-conformance.ts). TieredStore looks in memory, then on disk, and promotes small disk hits
// to memory only when they are seen a second time, so a herd of one-time objects can't flush hot catalogs.
import { LRUCache } from 'lru-cache';
import { upTo } from './lru-bounds.ts';
import type { Policy } from './freshness.ts';
import type { SpillFile } from './fill.ts';

/**
 * A stored record that can't be read now: descriptors are exhausted (EMFILE, ENFILE) or the disk failed
 * a read. Nothing says the record is bad, so it stays stored; only the request that met it fails.
 * (A record that is really bad, a wrong checksum or header, is dropped where it is found.)
 */
export class StoreUnavailable extends Error {
  constructor(cause: unknown) {
    super(`stored record can't be read now: ${(cause as Error)?.message ?? String(cause)}`, { cause });
    this.name = 'StoreUnavailable';
  }
}

export type StoredHeaders = Record<string, string | string[]>;

/** Everything about an object except its body; JSON-serialisable (it is the disk record header). */
export interface StoredMeta {
  key: string;
  url: string;
  status: number;
  headers: StoredHeaders;
  /** http-cache-semantics CachePolicy.toObject() */
  policy: object;
  /** Request header names selected by Vary. */
  vary: string[];
  storedAt: number;
}

export interface StoredObject {
  meta: StoredMeta;
  policy: Policy;
  size: number;
  tier: 'memory' | 'disk';
  /** Stream the body to `sink`; resolves false if the stored bytes turn out corrupt. A read that fails rejects with StoreUnavailable. */
  body: BodySource;
}

export type BodySource =
  | { kind: 'buffer'; data: Buffer }
  | { kind: 'file'; read(pos: number, len: number, into?: Buffer): Promise<Buffer>; verify(): 'ok' | 'corrupt' | 'pending'; feed(b: Buffer): void; close(): void };

export interface TierWriter {
  append(chunk: Buffer): void;
  /** Make the object visible. False when it could not be stored. */
  commit(): Promise<boolean>;
  abort(): void;
}

/** The disk tier's writer: its bytes can be read back while it writes (the spill file of a fill). */
export interface SpillWriter extends TierWriter, SpillFile {
  /** Only a spill: its commit stores nothing (another worker owns the key, --workers). */
  readonly transient?: boolean;
}

export interface TierStats {
  objects: number;
  bytes: number;
  maxBytes: number;
  evictions: number;
}

export interface Tier {
  /** Undefined when absent (or dropped as corrupt); rejects with StoreUnavailable when it can't be read now. */
  get(key: string): Promise<StoredObject | undefined>;
  openWriter(meta: StoredMeta, policy: Policy, expectedBytes: number | undefined): TierWriter | undefined;
  delete(key: string): Promise<void>;
  /** Replace the header part of a stored object (after a 304). */
  updateMeta(meta: StoredMeta, policy: Policy): Promise<void>;
  stats(): TierStats;
}

export class TieredStore {
  readonly memory: Tier & { put(meta: StoredMeta, policy: Policy, body: Buffer): boolean; getNow(key: string): StoredObject | undefined };
  readonly disk: Omit<Tier, 'openWriter'> & { openWriter(meta: StoredMeta, policy: Policy, expectedBytes: number | undefined): SpillWriter | undefined };
  readonly #maxMemoryObjectBytes: number;
  // Keys seen once on disk: a second disk hit promotes a small object. Bounded.
  readonly #seenOnDisk = new LRUCache<string, true>(upTo(65536));

  constructor(memory: TieredStore['memory'], disk: TieredStore['disk'], maxMemoryObjectBytes: number) {
    this.memory = memory;
    this.disk = disk;
    this.#maxMemoryObjectBytes = maxMemoryObjectBytes;
  }

  async get(key: string): Promise<StoredObject | undefined> {
    return this.getFromMemory(key) ?? this.getFromDisk(key);
  }

  /** The memory tier's copy, without a promise (the hit path). */
  getFromMemory(key: string): StoredObject | undefined {
    return this.memory.getNow(key);
  }

  /** The disk tier's copy; a small object seen twice on disk is promoted to memory. */
  async getFromDisk(key: string): Promise<StoredObject | undefined> {
    const d = await this.disk.get(key);
    if (!d) return undefined;
    if (d.size <= this.#maxMemoryObjectBytes) {
      if (this.#seenOnDisk.has(key)) {
        this.#seenOnDisk.delete(key);
        return this.#promote(d);
      }
      this.#seenOnDisk.set(key, true);
    }
    return d;
  }

  async #promote(d: StoredObject): Promise<StoredObject> {
    if (d.body.kind !== 'file') return d;
    let body: Buffer;
    try {
      body = await d.body.read(0, d.size);
    } finally {
      d.body.close(); // also when the read fails: no leaked file handle
    }
    d.body.feed(body);
    const ok = body.length === d.size && d.body.verify() === 'ok';
    if (!ok) {
      await this.disk.delete(d.meta.key);
      throw new Error('corrupt disk record');
    }
    this.memory.put(d.meta, d.policy, body);
    return { ...d, tier: 'memory', body: { kind: 'buffer', data: body } };
  }

  /** Every store write goes through here: a spill-file writer for a fill's body (the disk record). */
  openWriter(meta: StoredMeta, policy: Policy, expectedBytes: number | undefined): SpillWriter | undefined {
    return this.disk.openWriter(meta, policy, expectedBytes);
  }

  /** Keep a whole small body in memory (so the next request is a hit before the disk commit lands). */
  putMemory(meta: StoredMeta, policy: Policy, body: Buffer): boolean {
    return this.memory.put(meta, policy, body);
  }

  async delete(key: string): Promise<void> {
    this.#seenOnDisk.delete(key);
    await Promise.all([this.memory.delete(key), this.disk.delete(key)]);
  }

  async updateMeta(meta: StoredMeta, policy: Policy): Promise<void> {
    await Promise.all([this.memory.updateMeta(meta, policy), this.disk.updateMeta(meta, policy)]);
  }
}
