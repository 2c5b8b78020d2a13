// Delivery: writing a response to a client, from a stored object (memory body or disk record) or from a
// fill in flight, with its head, a 304 or 416 when the client's conditions say so, and one byte range
// when it asks. Which source answers is the request path's decision (handle-request.ts); how the bytes
// go out, fairly and verified, is decided here.
import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http';
import type { Transaction } from './access-log.ts';
import type { Ctx } from './context.ts';
import type { FillHead, FillReader, FillResponse } from './fill.ts';
import { clientResponseHeaders, conditionMatches, notModifiedHeaders } from './forward.ts';
import { framingOf, type ResponseSink } from './response-sink.ts';
import { StoreUnavailable, type StoredMeta, type StoredObject } from './store.ts';
import { READ_BYTES } from './buffer-pool.ts';
import { SLICE_BYTES } from './pacer.ts';

/** What delivery needs of the proxy. */
export type DeliveryCtx = Pick<Ctx, 'cfg' | 'buffers' | 'counters' | 'log' | 'store' | 'pacer'>;

/** One response being delivered: where it goes, the request's headers, and its transaction. */
export interface Delivery {
  ctx: DeliveryCtx;
  res: ResponseSink;
  tx: Transaction;
  reqHeaders: IncomingHttpHeaders;
}

/**
 * The head fields of a response for the client, less Age: built once per stored meta or fill head (the
 * hits on one memory object share its meta; a fill's readers share its head), per HIT or MISS and per
 * visible hostname, not once per request. Callers copy it before adding their own fields.
 */
const sharedHeads = new WeakMap<StoredMeta | FillHead, { name: string; HIT?: OutgoingHttpHeaders; MISS?: OutgoingHttpHeaders }>();
function sharedHead(of: StoredMeta | FillHead, name: string, cache: 'HIT' | 'MISS'): OutgoingHttpHeaders {
  let h = sharedHeads.get(of);
  if (h?.name !== name) {
    h = { name };
    sharedHeads.set(of, h);
  }
  return (h[cache] ??= clientResponseHeaders(of.status, of.headers, name, cache));
}

/**
 * Serve a stored response. A memory body is answered without a promise (most hits); a disk record is
 * streamed, and verified against its checksum before its last byte goes out. A record that can't be
 * read now comes back as its StoreUnavailable while nothing has been written: the caller answers it.
 */
export function deliverStored(d: Delivery, st: StoredObject): void | Promise<StoreUnavailable | undefined> {
  const body = st.body;
  if (body.kind === 'file') return deliverRecord(d, st, body);
  const a = storedAnswer(d, st);
  if (!a) return;
  if (a.range) return sendPart(d, st, a.headers, a.range, body.data);
  d.res.writeHead(st.meta.status, a.headers);
  if (!hasBody(d.tx.method, st)) {
    d.res.end();
    return;
  }
  return sendBody(d, body.data);
}

/**
 * A memory body: whole when this turn's budget takes it, else its first slice at once and the rest
 * paced (pacer.ts), so no turn writes thousands of them whole.
 */
function sendBody(d: Delivery, body: Buffer): void | Promise<undefined> {
  const whole = body.length <= SLICE_BYTES || !d.ctx.pacer.wouldWait(body.length);
  d.ctx.pacer.charge(whole ? body.length : SLICE_BYTES);
  if (whole) {
    d.tx.bytesOut += body.length;
    d.res.end(body);
    return;
  }
  d.tx.bytesOut += SLICE_BYTES;
  d.res.write(body.subarray(0, SLICE_BYTES));
  return sendRest(d, body);
}

async function sendRest(d: Delivery, body: Buffer): Promise<undefined> {
  const { ctx, res, tx } = d;
  // The last slice ends the response (below): the loop always returns from inside.
  for (let off = SLICE_BYTES; ; ) {
    const n = Math.min(SLICE_BYTES, body.length - off);
    await ctx.pacer.take(n);
    if (res.destroyed) {
      tx.aborted = true;
      return undefined;
    }
    tx.bytesOut += n;
    const piece = body.subarray(off, off + n);
    off += n;
    // The last slice ends the response in the same write, as a whole body's end() would.
    if (off >= body.length) {
      res.end(piece);
      return undefined;
    }
    if (!res.write(piece) && res.writableLength >= QUEUE_BYTES) await drained(res);
  }
}

async function deliverRecord(d: Delivery, st: StoredObject, body: Extract<StoredObject['body'], { kind: 'file' }>): Promise<StoreUnavailable | undefined> {
  const { ctx, res, tx } = d;
  try {
    const a = storedAnswer(d, st);
    if (!a) return;
    // A range is answered from a record read whole first, so its checksum is verified before any byte
    // goes out; past RANGE_FROM_DISK_MAX the whole 200 answers it.
    if (a.range && st.size <= RANGE_FROM_DISK_MAX) {
      const whole = await readVerified(body, st.size);
      if (!whole) {
        await corruptRecord(d, st);
        return;
      }
      sendPart(d, st, a.headers, a.range, whole);
      return;
    }
    res.writeHead(st.meta.status, a.headers);
    if (!hasBody(d.tx.method, st)) {
      res.end();
      return;
    }
    for (let pos = 0; pos < st.size; ) {
      // The first piece at once, the rest paced (pacer.ts): a pooled buffer is taken once granted.
      await ctx.pacer.next(READ_BYTES, pos === 0);
      if (res.destroyed) {
        tx.aborted = true;
        return;
      }
      const pooled = ctx.buffers.acquire();
      const b = await body.read(pos, pooled.length, pooled);
      if (b.length === 0) {
        ctx.buffers.release(pooled);
        break;
      }
      body.feed(b);
      pos += b.length;
      if (res.destroyed) {
        tx.aborted = true;
        return;
      }
      // Hold back the last piece until the record's checksum is verified.
      if (pos >= st.size && body.verify() !== 'ok') break;
      tx.bytesOut += b.length;
      if (!res.write(b, () => ctx.buffers.release(pooled))) await drained(res);
    }
    if (body.verify() !== 'ok') {
      await corruptRecord(d, st); // the client is cut short
      return;
    }
    res.end();
  } catch (err) {
    if (!(err instanceof StoreUnavailable)) throw err;
    // Not the record's fault (EMFILE, EIO): it stays. Before the head, the request path answers 503.
    if (!d.res.headersSent) return err;
    d.ctx.log.warn({ err, key: st.meta.key }, 'stored record unreadable now; kept, the client cut short');
    d.tx.aborted = true;
    d.res.destroy();
  } finally {
    body.close();
  }
}

/**
 * The head of a stored response for this request, or undefined when answered here already: 304 (the
 * client's own validators match) or 416. A single byte range of a complete 200 comes back as `range`
 * (RFC 9110 §14).
 */
function storedAnswer(d: Delivery, st: StoredObject): { headers: OutgoingHttpHeaders; range: { start: number; end: number } | undefined } | undefined {
  const { res, tx } = d;
  const headers = hitHeaders(d.ctx, tx, st);
  if (res.destroyed) return undefined;
  if (conditionMatches(d.reqHeaders, st.meta.status, st.meta.headers)) {
    tx.status = 304;
    res.writeHead(304, notModifiedHeaders(headers));
    res.end();
    return undefined;
  }
  const range = st.meta.status === 200 && tx.method === 'GET' ? byteRange(d.reqHeaders, st) : undefined;
  if (range === 'unsatisfiable') {
    tx.status = 416;
    res.writeHead(416, { ...notModifiedHeaders(headers), 'content-range': `bytes */${st.size}`, 'content-length': '0' });
    res.end();
    return undefined;
  }
  return { headers, range };
}

/** A stored response's head as a hit sends it, its status and type noted in the transaction. */
function hitHeaders(ctx: DeliveryCtx, tx: Transaction, st: StoredObject): OutgoingHttpHeaders {
  noteStored(tx, st);
  return storedHitHead(ctx, st, hitAge(st));
}

export function noteStored(tx: Transaction, st: StoredObject): void {
  tx.status = st.meta.status;
  tx.mime = String(st.meta.headers['content-type'] ?? '');
}

/** A stored response's current Age, as a hit's head says it. */
export function hitAge(st: StoredObject): string {
  return String(Math.floor(st.policy.age()));
}

/** The head fields a hit on `st` sends (node:http adds Date, when the response has none, and Connection). */
export function storedHitHead(ctx: Pick<DeliveryCtx, 'cfg'>, st: StoredObject, age: string): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = { ...sharedHead(st.meta, ctx.cfg.visibleHostname, 'HIT'), age };
  if (st.meta.status !== 204 && st.meta.status !== 304) headers['content-length'] = String(st.size);
  return headers;
}

/** Whether a hit on `st` answering `method` sends its body. */
export function hasBody(method: string, st: StoredObject): boolean {
  return method !== 'HEAD' && st.meta.status !== 204 && st.meta.status !== 304;
}

function sendPart(d: Delivery, st: StoredObject, headers: OutgoingHttpHeaders, range: { start: number; end: number }, whole: Buffer): void {
  const part = whole.subarray(range.start, range.end + 1);
  d.tx.status = 206;
  d.tx.bytesOut += part.length;
  d.res.writeHead(206, { ...headers, 'content-range': `bytes ${range.start}-${range.end}/${st.size}`, 'content-length': String(part.length) });
  d.res.end(part);
}

/** A disk record that failed its checksum while being served: dropped, the client cut short. */
async function corruptRecord(d: Delivery, st: StoredObject): Promise<void> {
  await dropCorrupt(d.ctx, st.meta.key);
  d.tx.aborted = true;
  d.res.destroy();
}

export function dropCorrupt(ctx: DeliveryCtx, key: string): Promise<void> {
  ctx.counters.corruptRecords++;
  ctx.log.error({ key }, 'disk record failed its checksum; dropped, clients cut short');
  return ctx.store.delete(key);
}

/**
 * Stream a fill's response to one of its readers (`id`): its head (304 when the client's validators
 * match, 206 for one range of a complete 200 when `ranged`), then its body as it arrives, fairly, and
 * cut short if the fill fails. `starter`: this request started the fill (it alone gets the private
 * headers); `isHit`: the fill serves a stored object.
 */
export async function streamFill(d: Delivery, fill: FillReader, response: FillResponse, id: number, opts: { starter: boolean; isHit: boolean; ranged: boolean }): Promise<void> {
  const { ctx, res, tx } = d;
  const head = response.head;
  // Age: the stored response's current age (the upstream's Age included); else the upstream's own.
  const headers: OutgoingHttpHeaders = { ...sharedHead(head, ctx.cfg.visibleHostname, opts.isHit ? 'HIT' : 'MISS') };
  if (response.policy) headers.age = String(Math.floor(response.policy.age()));
  // The client whose request started the fill gets its own Set-Cookie; nobody else ever does.
  if (opts.starter && response.privateHeaders) Object.assign(headers, response.privateHeaders);
  tx.status = head.status;
  tx.mime = String(head.headers['content-type'] ?? '');
  if (res.destroyed) return;
  if (conditionMatches(d.reqHeaders, head.status, head.headers)) {
    tx.status = 304;
    res.writeHead(304, notModifiedHeaders(headers));
    res.end();
    return;
  }
  // A single range of a complete 200 is answered 206 from the fill (never for a content-addressed
  // object: its bytes are verified only as a whole).
  const range = head.status === 200 && tx.method === 'GET' && head.contentLength !== undefined && opts.ranged ? fillRange(d.reqHeaders, head.contentLength) : undefined;
  let off = 0;
  let stop = Infinity;
  if (range) {
    tx.status = 206;
    headers['content-range'] = `bytes ${range.start}-${range.end}/${head.contentLength}`;
    headers['content-length'] = String(range.end - range.start + 1);
    off = range.start;
    stop = range.end + 1;
    res.writeHead(206, headers);
  } else res.writeHead(head.status, headers);
  if (tx.method === 'HEAD' || head.status === 204 || head.status === 304) {
    res.end();
    return;
  }
  // The client's watchdog counts the first byte: the head goes out before any wait, else with the
  // first piece of body (one write, not two). `headOut` tracks it: res.headersSent is true from
  // writeHead on, before anything is written. An empty body whose hash is checked has no last byte
  // to hold back, so its head alone would be a complete answer: that head waits for the check too.
  const headWaits = response.holdBack === true && head.contentLength === 0;
  let headOut = false;
  const flushHead = () => {
    if (!headOut) res.flushHeaders();
    headOut = true;
  };
  let graced = false;
  let firstSlice = true;
  let grantedAhead = false;
  for (;;) {
    if (off >= stop) break;
    if (res.destroyed) {
      tx.aborted = true;
      return;
    }
    const p = fill.peek(id, off);
    if (p === 'end') break;
    if (p === 'failed') {
      ctx.counters.truncated++;
      tx.aborted = true;
      res.destroy(); // no terminating chunk, Content-Length unfulfilled: the client sees a truncation
      return;
    }
    if (p === 'wait') {
      // A fill's first bytes mostly follow its head within one turn of the event loop: wait that turn
      // before sending the head alone, so that head and body leave in one write, not two (a herd's
      // readers all paid a lone head's write per object).
      if (!headOut && !graced) {
        graced = true;
        await Promise.race([fill.changed(), nextTurn()]);
        continue;
      }
      if (!headWaits) flushHead();
      await fill.changed();
      continue;
    }
    if (p === 'spill') flushHead();
    // Fair delivery (pacer.ts): the first slice at once, each later one when this turn's budget allows,
    // so bytes already in memory never hold the loop for megabytes while others wait. Granted before a
    // pooled buffer is taken: a reader that waits holds none.
    const want = p === 'spill' ? READ_BYTES : Math.min(p.length, SLICE_BYTES, stop - off);
    const granted = grantedAhead ? undefined : ctx.pacer.next(want, firstSlice);
    if (granted) {
      await granted;
      // Granted: look at the fill afresh (what was peeked may have left the window meanwhile).
      grantedAhead = true;
      continue;
    }
    firstSlice = false;
    grantedAhead = false;
    const pooled = p === 'spill' ? ctx.buffers.acquire() : undefined;
    let buf = pooled ? await fill.readSpill(off, pooled) : (p as Buffer);
    if (pooled && res.destroyed) {
      // The client left during the read: its 'close' has been, so a drain wait would never end.
      ctx.buffers.release(pooled);
      tx.aborted = true;
      return;
    }
    if (off + buf.length > stop) buf = buf.subarray(0, stop - off);
    if (buf.length > SLICE_BYTES) buf = buf.subarray(0, SLICE_BYTES);
    if (buf.length === 0) {
      if (pooled) ctx.buffers.release(pooled);
      flushHead();
      await fill.changed();
      continue;
    }
    off += buf.length;
    tx.bytesOut += buf.length;
    tx.frameBytes += framingOf(res, buf.length);
    headOut = true;
    // Bytes from the fill's memory may queue up to QUEUE_BYTES for the socket before waiting for
    // `drain`: one write then carries several chunks (pooled disk reads still wait, the pool is bounded).
    if (!res.write(buf, pooled && (() => ctx.buffers.release(pooled))) && (pooled || res.writableLength >= QUEUE_BYTES)) await drained(res);
  }
  tx.frameBytes += framingOf(res, 'end');
  res.end();
}

/**
 * The one byte range a Range header asks for (`bytes=a-b`, `bytes=a-` or `bytes=-n`), before the size is
 * known; undefined for anything else (several ranges, another unit, garbage): the full 200 answers those.
 */
export function rangeSpec(h: IncomingHttpHeaders): { first: number; last: number | undefined } | { suffix: number } | undefined {
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(String(h.range ?? ''));
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') return { suffix: Number(m[2]) };
  return { first: Number(m[1]), last: m[2] === '' ? undefined : Number(m[2]) };
}

/** That range within a body of `size` bytes: 'unsatisfiable' when it lies past the end. */
function resolveRange(spec: NonNullable<ReturnType<typeof rangeSpec>>, size: number): { start: number; end: number } | 'unsatisfiable' | undefined {
  // A suffix of an empty body selects all of it, no byte: the whole 200 answers (no range of it exists).
  if ('suffix' in spec) return spec.suffix === 0 ? 'unsatisfiable' : size === 0 ? undefined : { start: Math.max(0, size - spec.suffix), end: size - 1 };
  const end = spec.last === undefined ? size - 1 : Math.min(spec.last, size - 1);
  if (spec.first >= size) return 'unsatisfiable';
  return end < spec.first ? undefined : { start: spec.first, end };
}

/** The `bytes=a-b` / `bytes=a-` range to answer from a fill of `size` bytes, if the request asks for one. */
function fillRange(h: IncomingHttpHeaders, size: number): { start: number; end: number } | undefined {
  if (h['if-range'] !== undefined) return undefined; // a fill's validators are the upstream's: keep it simple, send all
  const spec = rangeSpec(h);
  if (!spec || 'suffix' in spec) return undefined;
  const r = resolveRange(spec, size);
  return r === 'unsatisfiable' ? undefined : r;
}

/** Largest disk record read whole to answer a Range request with 206 (larger ones get the full 200). */
const RANGE_FROM_DISK_MAX = 16 * 1024 * 1024;

/**
 * The one byte range a request asks of a stored 200, if it asks for exactly one and If-Range (if any)
 * matches the stored validator; 'unsatisfiable' when it starts past the end. Anything else (several
 * ranges, another unit, garbage) is ignored: the full 200 is a valid answer.
 */
function byteRange(h: IncomingHttpHeaders, st: StoredObject): { start: number; end: number } | 'unsatisfiable' | undefined {
  const spec = rangeSpec(h);
  if (!spec) return undefined;
  const ifRange = h['if-range'] === undefined ? undefined : String(h['if-range']);
  if (ifRange !== undefined) {
    const etag = String(st.meta.headers.etag ?? '');
    const lm = String(st.meta.headers['last-modified'] ?? '');
    // A strong ETag or an exact Last-Modified date must match (RFC 9110 §13.1.5).
    if (ifRange.startsWith('W/') || (ifRange !== etag && ifRange !== lm) || (ifRange === etag && etag.startsWith('W/'))) return undefined;
  }
  return resolveRange(spec, st.size);
}

/** A disk body read whole and checked against its CRC; undefined when it fails. */
async function readVerified(body: Extract<StoredObject['body'], { kind: 'file' }>, size: number): Promise<Buffer | undefined> {
  const whole = await body.read(0, size);
  body.feed(whole);
  return whole.length === size && body.verify() === 'ok' ? whole : undefined;
}

/**
 * What a reader may queue for its socket beyond the kernel's buffer before it waits for `drain`. Bytes
 * a fill's window has let go stay held while queued, outside --fill-memory, so this is a bound of its
 * own (README "Storage bounds"), not a multiple of the slice.
 */
const QUEUE_BYTES = 512 * 1024;

/** The next turn of the event loop, one promise shared by everyone waiting for it. */
let turn: Promise<void> | undefined;
function nextTurn(): Promise<void> {
  return (turn ??= new Promise((resolve) =>
    setImmediate(() => {
      turn = undefined;
      resolve();
    }),
  ));
}

function drained(res: ResponseSink): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}
