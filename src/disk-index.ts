// The disk tier's index: which records exist, their sizes and their LRU order, all in the heap. It is
// bounded by bytes (--disk-cache) with each record charged in whole 4 KiB blocks, what a file system
// spends on it, so it is bounded by count too: at most --disk-cache / 4 KiB entries. Keys are the raw
// 32 bytes of the record's SHA-256 as a one-byte string: ~130 B of heap an entry, against ~163 B with
// the 64-character hex name (100,000 to 1,000,000 entries, after a GC; test/unit/memory-cost.test.ts).
import { LRUCache } from 'lru-cache';

export const BLOCK_BYTES = 4096;

/** Heap per entry counted for /status and Prometheus (the measured ~130 B, with room for V8's rounding). */
export const INDEX_ENTRY_BYTES = 152;

/** What a record of `fileBytes` costs on disk: whole blocks, at least one. */
export function chargedBytes(fileBytes: number): number {
  return Math.max(1, Math.ceil(fileBytes / BLOCK_BYTES)) * BLOCK_BYTES;
}

const compact = (hash: string): string => Buffer.from(hash, 'hex').toString('latin1');
const hex = (k: string): string => Buffer.from(k, 'latin1').toString('hex');

export class DiskIndex {
  readonly #lru: LRUCache<string, number>; // compact hash -> file bytes
  readonly maxEntries: number;

  /** `onEvict` gets the hex hash of each record the bound pushes out (to unlink it). */
  constructor(maxBytes: number, maxEntryBytes: number, onEvict: (hash: string) => void) {
    this.maxEntries = Math.floor(maxBytes / BLOCK_BYTES);
    this.#lru = new LRUCache<string, number>({
      maxSize: maxBytes,
      maxEntrySize: chargedBytes(maxEntryBytes),
      sizeCalculation: chargedBytes,
      dispose: (_n, k, reason) => {
        if (reason === 'evict') onEvict(hex(k));
      },
    });
  }

  has(hash: string): boolean {
    return this.#lru.has(compact(hash));
  }

  /** Mark a record used (LRU), or learn it (a lookup while the start-up scan is still running). */
  use(hash: string, fileBytes: number): void {
    const k = compact(hash);
    if (this.#lru.get(k) === undefined) this.#lru.set(k, fileBytes);
  }

  /** Record a file; false when it is past the bound for one entry (it is not indexed). */
  set(hash: string, fileBytes: number): boolean {
    const k = compact(hash);
    this.#lru.set(k, fileBytes);
    return this.#lru.has(k);
  }

  delete(hash: string): void {
    this.#lru.delete(compact(hash));
  }

  get entries(): number {
    return this.#lru.size;
  }

  /** Disk bytes charged: whole blocks per record. */
  get bytes(): number {
    return this.#lru.calculatedSize;
  }

  /** The heap the index holds, estimated from its count. */
  get heapBytes(): number {
    return this.#lru.size * INDEX_ENTRY_BYTES;
  }
}
