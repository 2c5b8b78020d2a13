// A stored disk record read once for all the clients that want it at the same time: a herd that
// arrives after a large object's fill is gone would otherwise read (and checksum) the record once per
// client. The record is pumped into a Fill, which readers join as they would an upstream fill; the
// record itself is the fill's spill file, so a reader that falls behind the window reads it back, and
// the last byte waits for the record's checksum (a corrupt record cuts every reader short).
import type { Fill, SpillFile } from './fill.ts';
import type { BodySource } from './store.ts';

type FileBody = Extract<BodySource, { kind: 'file' }>;

/** Bytes read from the record per step (each a chunk of the fill's window). */
const PIECE_BYTES = 256 * 1024;

/** The stored record as a fill's spill file: all of it is on disk; the file closes with its last holder. */
export class RecordSpill implements SpillFile {
  readonly flushed: number;
  readonly failed = undefined;
  onFlush: (() => void) | undefined;
  readonly #body: FileBody;
  #refs = 1; // the pump's

  constructor(body: FileBody, size: number) {
    this.#body = body;
    this.flushed = size;
  }

  append(): void {} // the bytes came from this file

  retain(): void {
    this.#refs++;
  }

  release(): void {
    if (--this.#refs === 0) this.#body.close();
  }

  readAt(pos: number, len: number, into?: Buffer): Promise<Buffer> {
    const n = Math.min(len, this.flushed - pos, into ? into.length : Infinity);
    if (n <= 0) return Promise.resolve(Buffer.alloc(0));
    this.retain();
    return this.#body.read(pos, n, into).finally(() => this.release());
  }
}

/**
 * Read the record into the fill, checking it as it goes: the fill is finished when the whole record
 * checks out, and failed when it does not or cannot be read, after `corrupt` has dropped it (so no
 * reader cut short can ask again and find it). It stops once the fill has ended otherwise (every reader
 * left). Never rejects.
 */
export async function pumpRecord(fill: Fill, body: FileBody, spill: RecordSpill, size: number, corrupt: () => Promise<void>): Promise<void> {
  try {
    const read = await readAll(fill, body, size);
    if (read === 'ok') return fill.finish();
    if (fill.state !== 'streaming') return; // every reader left: nothing to tell anyone
    // A read that failed (EMFILE, EIO) says nothing about the record: it stays, the readers are cut short.
    if (read === 'corrupt') await corrupt().catch(() => {});
    fill.fail(undefined);
  } finally {
    spill.release();
  }
}

/** 'ok' when the whole record was read into the fill and checks out; 'failed' when a read failed. */
async function readAll(fill: Fill, body: FileBody, size: number): Promise<'ok' | 'corrupt' | 'failed'> {
  try {
    let pos = 0;
    while (pos < size) {
      if (fill.state !== 'streaming') return 'failed';
      const b = await body.read(pos, Math.min(PIECE_BYTES, size - pos));
      if (b.length === 0) break;
      body.feed(b);
      pos += b.length;
      fill.push(b);
    }
    if (fill.state !== 'streaming') return 'failed';
    return pos === size && body.verify() === 'ok' ? 'ok' : 'corrupt';
  } catch {
    return 'failed';
  }
}
