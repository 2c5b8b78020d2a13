// Reusable read buffers for bytes read back from disk (disk hits, and readers behind a fill's memory
// window). A herd of 1,000 readers would otherwise allocate a fresh 64 KiB buffer per read and leave
// the garbage collector to catch up, which shows as RSS. Buffers return to the pool once the socket has
// flushed them. The pool is bounded; when it is empty, a fresh buffer is allocated.
export const READ_BYTES = 64 * 1024;

export class BufferPool {
  readonly #free: Buffer[] = [];
  readonly #max: number;

  constructor(maxBuffers: number) {
    this.#max = maxBuffers;
  }

  acquire(): Buffer {
    return this.#free.pop() ?? Buffer.allocUnsafeSlow(READ_BYTES);
  }

  /** Give back a buffer from acquire() (or a view of one) once nothing references it any more. */
  release(b: Buffer): void {
    if (this.#free.length < this.#max && b.buffer.byteLength === READ_BYTES) this.#free.push(Buffer.from(b.buffer, 0, READ_BYTES));
  }
}
