// A Fill is one upstream response growing in place, read by any number of clients at once
// (Varnish's busy object, ATS read-while-writer). It knows nothing of HTTP or storage policy.
//
// Lifecycle: pending (no headers yet) -> streaming -> done | failed.
// Body bytes live in a memory window [windowStart, received). With a spill file (the disk record being
// written), bytes older than the window are read back from it, so every reader has its own cursor and a
// slow reader never holds back a fast one or the upstream. Without a spill (a response that is not
// being stored, or a failed disk) the window can only drop what every reader has consumed, and the
// upstream is paused while the window is full: that mode is only used for a single reader.
import type { HierarchyTag } from './access-log.ts';
import { ProxyError } from './errors.ts';
import type { Policy } from './freshness.ts';

export type FillState = 'pending' | 'streaming' | 'done' | 'failed';

export interface FillHead {
  status: number;
  headers: Record<string, string | string[]>;
  contentLength: number | undefined;
}

/**
 * A response a fill publishes: its head and what goes with it, fixed before any body byte.
 * `shared` false: the response is released, kept by the client that started the fill; every other
 * reader fetches on its own. `policy`: the freshness of a response being stored (or of the stored
 * record a shared read serves). `privateHeaders`: only the starting client's (its own Set-Cookie).
 * `variant`: the response varies; only a request of this variant may take it. `holdBack`: the last
 * byte is withheld until the body's content hash (or the record's checksum) is checked.
 */
export interface FillResponse {
  readonly kind: 'response';
  readonly head: FillHead;
  readonly shared: boolean;
  readonly policy?: Policy;
  readonly privateHeaders?: Record<string, string | string[]>;
  readonly variant?: { names: string[]; key: string };
  readonly holdBack?: boolean;
}

/**
 * What a fill's fetch publishes, once: a response, a revalidation answered 304 (the refreshed stored
 * copy is the answer), or a failure before any response (every reader gets this labelled error).
 * Delivery switches over it; nothing about it changes afterwards.
 */
export type FillOutcome = FillResponse | { readonly kind: 'notModified' } | { readonly kind: 'failed'; readonly error: ProxyError };

/** What a reader finds at its cursor. */
export type Peek = Buffer | 'wait' | 'end' | 'failed' | 'spill';

/** Memory shared by all fills' windows. While it has room, windows keep whole bodies, so a herd reads
 * from memory; past it, each window shrinks to its own bound and lagging readers read from disk. */
export interface FillBudget {
  limitBytes: number;
  usedBytes: number;
}

/**
 * The file behind a fill's window: the disk record being written (a DiskWriter), or the stored record a
 * shared disk read comes from. Readers that fall behind the window read it back with readAt().
 */
export interface SpillFile {
  /** Body bytes on disk, readable with readAt. */
  readonly flushed: number;
  readonly failed: Error | undefined;
  onFlush: (() => void) | undefined;
  append(chunk: Buffer): void;
  /** Each reader holds the file open until it leaves. */
  retain(): void;
  release(): void;
  readAt(pos: number, len: number, into?: Buffer): Promise<Buffer>;
}

/** Unflushed bytes a fill may hold before its upstream is paused for the disk to catch up. */
const MAX_UNFLUSHED_BYTES = 32 * 1024 * 1024;

export interface UpstreamControl {
  pause(): void;
  resume(): void;
  abort(): void;
}

/** What the request path sees of a fill: it waits for the head, then reads at its own cursor. */
export interface FillReader {
  readonly key: string;
  readonly state: FillState;
  /** Undefined until the fetch publishes it (published() waits for it). */
  readonly outcome: FillOutcome | undefined;
  published(): Promise<FillOutcome>;
  readonly peer: string;
  readonly hierarchy: HierarchyTag;
  readonly attached: number;
  /**
   * No copy of the key was stored when this fill began, and it is no reload: until it ends, a lookup
   * of its key can find nothing but this fill (no copy to prefer, none stale to fall back on).
   */
  readonly nothingStored: boolean;
  addReader(): number;
  removeReader(id: number): void;
  changed(): Promise<void>;
  peek(id: number, off: number): Peek;
  readSpill(off: number, into: Buffer): Promise<Buffer>;
}


export class Fill implements FillReader {
  readonly key: string;
  readonly startedAt: number;
  state: FillState = 'pending';
  #outcome: FillOutcome | undefined;
  received = 0;
  attached = 0;
  upstream: UpstreamControl | undefined;
  /** Host the body came from (the access log's hierarchy peer); changes on failover or resume. */
  peer = '';
  /** How that host was chosen (the access log's hierarchy code). */
  hierarchy: HierarchyTag = 'HIER_DIRECT';
  /** The fetch means to store this body (set with the head; cleared when that becomes impossible). */
  storing = false;
  /** Why the fill was given up by cuttle itself (nobody left to serve, no progress): not the mirror's fault. */
  abandoned: ProxyError | undefined;
  /** performance.now() of the last byte received (or of the head): the no-progress watchdog reads it. */
  lastProgressAt = performance.now();

  readonly #windowBytesMax: number;
  #chunks: Buffer[] = [];
  #starts: number[] = [];
  #windowStart = 0;
  #spill: SpillFile | undefined;
  #readers = new Map<number, number>(); // reader id -> cursor (used only without a spill)
  #nextReader = 0;
  #paused = false;
  #changed: Promise<void> | undefined;
  #notify: (() => void) | undefined;

  readonly #budget: FillBudget;
  /** Called once when the window is dropped (the last reader of a finished fill left). */
  onDropped: (() => void) | undefined;

  readonly nothingStored: boolean;

  constructor(key: string, startedAt: number, windowBytesMax: number, budget: FillBudget, nothingStored = false) {
    this.key = key;
    this.nothingStored = nothingStored;
    this.startedAt = startedAt;
    this.#windowBytesMax = windowBytesMax;
    this.#budget = budget;
  }

  get outcome(): FillOutcome | undefined {
    return this.#outcome;
  }

  async published(): Promise<FillOutcome> {
    while (!this.#outcome) await this.changed();
    return this.#outcome;
  }

  /** The published response, if the fill has one. */
  get response(): FillResponse | undefined {
    return this.#outcome?.kind === 'response' ? this.#outcome : undefined;
  }

  /** The response is not shared: waiters fetch on their own. */
  get released(): boolean {
    return this.#outcome?.kind === 'response' && !this.#outcome.shared;
  }

  /** The upstream is paused for backpressure (so a quiet body is not a stalled mirror). */
  get paused(): boolean {
    return this.#paused;
  }

  get windowBytes(): number {
    return this.received - this.#windowStart;
  }

  get spilling(): boolean {
    return this.#spill !== undefined && !this.#spill.failed;
  }

  /** Readers attached now (`attached` counts every reader it ever had). */
  get readers(): number {
    return this.#readers.size;
  }

  /** Complete, and every byte still in memory: a new reader needs no disk read. */
  get wholeInMemory(): boolean {
    return this.state === 'done' && this.#windowStart === 0 && this.#chunks.length > 0;
  }

  /** A late reader can join only if it can replay from byte 0. */
  get joinable(): boolean {
    return !this.released && this.state !== 'failed' && (this.#windowStart === 0 || this.spilling);
  }

  /** Resolves at the next change of state or data. Shared by all readers. */
  changed(): Promise<void> {
    this.#changed ??= new Promise((r) => (this.#notify = r));
    return this.#changed;
  }

  #wake(): void {
    const n = this.#notify;
    this.#changed = undefined;
    this.#notify = undefined;
    n?.();
  }

  #publish(o: FillOutcome): void {
    if (this.#outcome) throw new Error(`fill ${this.key}: outcome published twice (${this.#outcome.kind}, then ${o.kind})`);
    this.#outcome = o;
  }

  /**
   * Publish the response and start its body. A shared one streams to every reader (into its disk record
   * when `spill` is given and `storing`); one that is not shared wakes every waiter to fetch on its own.
   */
  respond(response: Omit<FillResponse, 'kind'>, spill: SpillFile | undefined, storing = false): void {
    this.#publish({ kind: 'response', ...response });
    this.state = 'streaming';
    this.storing = storing;
    this.lastProgressAt = performance.now();
    this.#spill = spill;
    if (spill) {
      // Readers that attached before the headers now hold the spill file open too.
      for (let i = 0; i < this.#readers.size; i++) spill.retain();
      spill.onFlush = () => {
        // A spill that failed (disk full, object past --max-object-size) means the body can't be stored.
        if (spill.failed) this.storing = false;
        this.#trim();
        this.#wake();
        this.#checkWanted();
      };
    }
    this.#wake();
    if (!response.shared) this.#checkWanted();
  }

  /**
   * Give the fill up (cuttle's decision, not an upstream failure): readers are cut short, the upstream
   * is aborted, and the fetch ends it without charging the mirror.
   */
  abandon(why: ProxyError): void {
    if (this.state === 'done' || this.state === 'failed') return;
    this.abandoned ??= why;
    this.storing = false;
    this.fail(why);
    this.upstream?.abort();
  }

  /** A streaming fill that will not be stored and has no reader left is not worth finishing. */
  #checkWanted(): void {
    if (this.state !== 'streaming' || this.#readers.size > 0) return;
    // Without a spill file, a window that has filled up with nobody reading can never drain. A released
    // (not shared) response is read only by the client that started it.
    const canStore = !this.released && this.storing && !this.#retired && (this.spilling || (!this.#spill && !this.#paused));
    if (!canStore) this.abandon(new ProxyError('ERR_FILL_ABANDONED'));
  }

  /** A revalidation was answered 304: the refreshed stored copy is every reader's answer. */
  revalidated(): void {
    this.#publish({ kind: 'notModified' });
    this.finish();
  }

  push(chunk: Buffer): void {
    if (this.state !== 'streaming') return;
    this.lastProgressAt = performance.now();
    this.#starts.push(this.received);
    this.#chunks.push(chunk);
    this.received += chunk.length;
    this.#budget.usedBytes += chunk.length;
    this.#spill?.append(chunk);
    this.#trim();
    this.#wake();
  }

  finish(): void {
    this.state = 'done';
    this.#wake();
  }

  fail(err: ProxyError | undefined): void {
    if (this.state === 'done' || this.state === 'failed') return;
    if (!this.#outcome) this.#publish({ kind: 'failed', error: err ?? new ProxyError('ERR_UPSTREAM_RESET') });
    this.state = 'failed';
    this.#wake();
    if (this.#readers.size === 0) this.#dropWindowIfIdle();
  }

  /** The coalescer no longer hands this fill to new readers: its memory can go once readers are done. */
  retire(): void {
    this.#retired = true;
    if (this.#readers.size === 0) this.#dropWindowIfIdle();
    this.#checkWanted();
  }

  #retired = false;

  #dropWindowIfIdle(): void {
    const finished = this.state === 'failed' || (this.state === 'done' && (this.#retired || this.released));
    if (!finished) return;
    if (this.#chunks.length > 0) {
      this.#budget.usedBytes -= this.windowBytes;
      this.#chunks = [];
      this.#starts = [];
      this.#windowStart = this.received;
    }
    const d = this.onDropped;
    this.onDropped = undefined;
    d?.();
  }

  /** Register a reader; returns its id. A reader holds the spill file open until it leaves. */
  addReader(): number {
    const id = this.#nextReader++;
    this.#readers.set(id, 0);
    this.attached++;
    this.#spill?.retain();
    return id;
  }

  removeReader(id: number): void {
    if (!this.#readers.delete(id)) return;
    this.#spill?.release();
    this.#trim();
    if (this.#readers.size === 0) this.#dropWindowIfIdle();
    this.#checkWanted();
  }

  /** What reader `id` finds at byte `off`. Without a spill, also records the reader's progress. */
  peek(id: number, off: number): Peek {
    if (!this.#spill || this.#spill.failed) {
      if (this.#readers.get(id) !== off) {
        this.#readers.set(id, off);
        this.#trim();
      }
    }
    const visible = this.visible;
    if (off < visible) {
      if (off >= this.#windowStart) {
        const b = this.#slice(off);
        return off + b.length > visible ? b.subarray(0, visible - off) : b;
      }
      return this.spilling && off < this.#spill!.flushed ? 'spill' : 'failed';
    }
    if (this.state === 'done') return 'end';
    if (this.state === 'failed') return 'failed';
    return 'wait';
  }

  /**
   * Bytes readers may have: all of them, or all but the body's last while the content is being
   * verified. With a known length only that byte waits; without one, the newest byte received might
   * be the last. (Holding back the newest byte of every chunk cost each reader a 1-byte write per chunk.)
   */
  get visible(): number {
    const r = this.response;
    if (!r?.holdBack || this.state === 'done') return this.received;
    const length = r.head.contentLength;
    return length !== undefined && this.received < length ? this.received : Math.max(0, this.received - 1);
  }

  /** Read bytes behind the window back from the spill file into `into`. */
  readSpill(off: number, into: Buffer): Promise<Buffer> {
    return this.#spill!.readAt(off, Math.min(into.length, this.visible - off), into);
  }

  #slice(off: number): Buffer {
    // Binary search for the chunk holding `off`.
    let lo = 0;
    let hi = this.#starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#starts[mid]! <= off) lo = mid;
      else hi = mid - 1;
    }
    const c = this.#chunks[lo]!;
    const s = this.#starts[lo]!;
    return off === s ? c : c.subarray(off - s);
  }

  /** All bytes, if the window still holds them (small objects). */
  wholeBody(): Buffer | undefined {
    return this.#windowStart === 0 ? Buffer.concat(this.#chunks, this.received) : undefined;
  }

  #trim(): void {
    // How far the window may be dropped: what is safely on disk, or what every reader has consumed.
    let keepFrom: number;
    if (this.#spill && !this.#spill.failed) keepFrom = this.#spill.flushed;
    else {
      keepFrom = this.received;
      for (const off of this.#readers.values()) keepFrom = Math.min(keepFrom, off);
      if (this.#readers.size === 0 && !this.released) keepFrom = this.#windowStart; // nobody yet: keep all
    }
    // Drop whole chunks, oldest first, while the window is over its own bound and the shared budget is
    // spent (or, without a spill, as soon as every reader has them).
    const spilling = this.spilling;
    while (this.#chunks.length > 0 && this.windowBytes > this.#windowBytesMax && (!spilling || this.#budget.usedBytes > this.#budget.limitBytes)) {
      const end = this.#starts[1] ?? this.received;
      if (end > keepFrom) break;
      this.#budget.usedBytes -= end - this.#windowStart;
      this.#chunks.shift();
      this.#starts.shift();
      this.#windowStart = end;
    }
    // Backpressure goes to the upstream from the disk, or from the single non-shared reader; and once
    // --fill-memory is spent, from a window still over twice its own bound (its bytes not yet on
    // disk): the budget is a hard bound, not one that each fill may pass by a disk's lag.
    const overBudget = this.#budget.usedBytes > this.#budget.limitBytes && this.windowBytes > this.#windowBytesMax * 2;
    const full = spilling ? this.received - this.#spill!.flushed > MAX_UNFLUSHED_BYTES || overBudget : this.windowBytes > this.#windowBytesMax * 2;
    if (full && !this.#paused && this.state === 'streaming') {
      this.#paused = true;
      this.upstream?.pause();
      this.#checkWanted();
    } else if (!full && this.#paused) {
      this.#paused = false;
      this.upstream?.resume();
    }
  }
}
