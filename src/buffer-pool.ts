// Reusable read buffers for bytes read back from disk (disk hits, and readers behind a fill's memory
// window). A herd of 1,000 readers would otherwise allocate a fresh 64 KiB buffer per read and leave
// the garbage collector to catch up, which shows as RSS. Buffers return to the pool once the socket has
// flushed them; when it is empty, a fresh buffer is allocated.
// The pool is bounded by the bytes it keeps, each buffer counted at what it costs (not just its 64 KiB),
// and reports them (/status, cuttle_buffer_pool_bytes). 32 MiB is 510 buffers: it was 2,048 (128 MiB).
export const READ_BYTES = 64 * 1024;

/** What a kept buffer costs: its bytes, and its JS view, ArrayBuffer and backing-store record. */
export const POOLED_BYTES = READ_BYTES + 160;

/** The most the pool keeps. */
export const POOL_MAX_BYTES = 32 * 1024 * 1024;

export class BufferPool {
  readonly #free: Buffer[] = [];
  readonly #maxBytes: number;

  constructor(maxBytes = POOL_MAX_BYTES) {
    this.#maxBytes = maxBytes;
  }

  /** Bytes the pool keeps now (counted at POOLED_BYTES a buffer). */
  get bytes(): number {
    return this.#free.length * POOLED_BYTES;
  }

  acquire(): Buffer {
    return this.#free.pop() ?? Buffer.allocUnsafeSlow(READ_BYTES);
  }

  /** Give back a buffer from acquire() (or a view of one) once nothing references it any more. */
  release(b: Buffer): void {
    if (b.buffer.byteLength === READ_BYTES && this.bytes + POOLED_BYTES <= this.#maxBytes) this.#free.push(Buffer.from(b.buffer, 0, READ_BYTES));
  }
}
