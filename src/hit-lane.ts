// The hit lane: a client connection's plain requests for fresh memory hits are answered here, without
// node:http's per-request IncomingMessage and ServerResponse (most of a small hit's CPU). The lane reads
// only a strict subset of HTTP/1.1: the first request that is anything else, or a read that ends inside
// a request, hands the connection and its unread bytes to node:http for the rest of its life. So node's
// parser judges every request the lane does not fully understand, and the full request path answers it.
import { STATUS_CODES, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http';
import type { Socket } from 'node:net';
import type { Transaction } from './access-log.ts';
import type { ResponseSink } from './response-sink.ts';
import type { StoredMeta, StoredObject } from './store.ts';
import { LRUCache } from 'lru-cache';

export interface LaneHit {
  tx: Transaction;
  st: StoredObject;
}

/**
 * A plain GET that joins a fill in flight: answers it on a LaneResponse ('handoff': it wrote nothing,
 * and node:http must answer the request afresh).
 */
export type LaneJoin = (res: ResponseSink) => Promise<'done' | 'handoff'>;

export interface HitLaneOptions {
  /** What the lane does with a plain request: answer a fresh memory hit, or a join; else undefined (handed off). */
  answer: (method: string, target: string, headers: IncomingHttpHeaders, client: string) => LaneHit | LaneJoin | undefined;
  /** The stored response's current Age, and its head fields with that Age. */
  age: (st: StoredObject) => string;
  head: (st: StoredObject, age: string) => OutgoingHttpHeaders;
  /** Whether the answer to `method` carries the stored body. */
  hasBody: (method: string, st: StoredObject) => boolean;
  /** The transaction is finished (handed to the kernel, or the client went away). */
  record: (tx: Transaction) => void;
  /** Answers still in their sockets' buffers, until recorded: a shutdown that cuts them logs them (Ctx.open). */
  open: { set(tx: Transaction, res: undefined): unknown; delete(tx: Transaction): unknown };
  /** The lane itself threw (a bug): logged as an internal error; the connection is cut. */
  failed: (err: unknown) => void;
  idleTimeoutMs: number;
  /** The proxy is draining (drain.ts): every request goes to node:http, which closes the connection after it. */
  draining: () => boolean;
  /** How long a new connection may take to send its first request (node:http's headersTimeout). */
  firstRequestTimeoutMs: number;
}

/** A small object's whole response, head and body in one buffer, for as long as its Age and Date hold. */
interface Built {
  age: string;
  date: string;
  headBytes: number;
  bytes: Buffer;
}
/** Bodies up to this size are answered from a built response; larger ones write head and body. */
const BUILT_MAX_BODY = 64 * 1024;
/** The built responses' bound: the hot small objects of the moment, rebuilt at most once a second. */
const BUILT_BYTES = 8 * 2 ** 20;

/**
 * Request headers the lane reads itself: what CVMFS clients, curl and load generators send on a plain
 * GET. Any other field (conditions, ranges, directives, bodies, Expect, Upgrade...) goes to node:http.
 */
const PLAIN = new Set(['host', 'user-agent', 'accept', 'accept-language', 'accept-encoding', 'connection', 'proxy-connection', 'pragma', 'referer', 'cvmfs-info', 'x-frontier-id', 'x-cvmfs-pid', 'x-cvmfs-gid', 'x-cvmfs-uid']);
// The target: only the characters RFC 3986 allows in an absolute URI (no fragment); node's parser judges the rest.
const REQUEST_LINE = /^(GET|HEAD) (http:\/\/[A-Za-z0-9\-._~%!$&'()*+,;=:@/?[\]]+) HTTP\/1\.1$/;
// A token name, then a value of visible ASCII, spaces and tabs (no obs-fold, no obs-text, no CR or LF).
const FIELD = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e]*?)[ \t]*$/;
const END = Buffer.from('\r\n\r\n');
const EMPTY = Buffer.alloc(0);
/** Answers one read may queue for its socket; the rest of the read goes to node:http. */
const QUEUE_BYTES = 256 * 1024;
/** A head longer than this is not a plain request. */
const MAX_HEAD = 8192;

/** Parse a request head (without its final CRLFCRLF) of the plain kind, or undefined. */
export function parsePlain(head: string): { method: string; target: string; headers: IncomingHttpHeaders } | undefined {
  const lines = head.split('\r\n');
  const rl = REQUEST_LINE.exec(lines[0]!);
  if (!rl) return undefined;
  const headers: IncomingHttpHeaders = {};
  for (let i = 1; i < lines.length; i++) {
    const f = FIELD.exec(lines[i]!);
    if (!f) return undefined;
    const name = f[1]!.toLowerCase();
    if (!PLAIN.has(name) || headers[name] !== undefined) return undefined;
    headers[name] = f[2]!;
  }
  // node's parser reads Proxy-Connection as Connection: anything but keep-alive in either (close, a
  // token list) is node:http's to answer, and to close the connection after.
  for (const conn of [headers.connection, headers['proxy-connection'] as string | undefined]) if (conn !== undefined && conn.toLowerCase() !== 'keep-alive') return undefined;
  return { method: rl[1]!, target: rl[2]!, headers };
}

/** The response head as node:http writes it for the same headers on a keep-alive connection. */
export function serializeHead(status: number, headers: OutgoingHttpHeaders, keepAliveS: number, date: string, chunked = false): string {
  let out = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'unknown'}\r\n`;
  let hasDate = false;
  for (const name in headers) {
    const v = headers[name];
    if (v === undefined) continue;
    if (name === 'date') hasDate = true;
    if (Array.isArray(v)) for (const x of v) out += `${name}: ${x}\r\n`;
    else out += `${name}: ${v}\r\n`;
  }
  if (!hasDate) out += `Date: ${date}\r\n`;
  return `${out}Connection: keep-alive\r\nKeep-Alive: timeout=${keepAliveS}\r\n${chunked ? 'Transfer-Encoding: chunked\r\n' : ''}\r\n`;
}

/**
 * The response to a lane request that joins a fill, written on the lane's socket with node's framing:
 * the head as serializeHead writes it, chunked without a Content-Length, no body for 204 and 304, and
 * writes corked until the next tick, as node corks them. 'close' means over: all of it handed to the
 * kernel (writableFinished), or the socket gone.
 */
export class LaneResponse implements ResponseSink {
  headersSent = false;
  writableEnded = false;
  writableFinished = false;
  /** Bytes of the head (headBytesOf reads it for the access log). */
  headBytes = 0;
  readonly #sock: Socket;
  readonly keepAliveS: number;
  #head: string | undefined;
  #chunked = false;
  #noBody = false;
  #corked = false;
  #over = false;
  #onOver: (() => void)[] = [];
  /** The socket's 'close' listener, made when someone first waits for this response's end. */
  #onClose: (() => void) | undefined;

  constructor(sock: Socket, keepAliveS: number) {
    this.#sock = sock;
    this.keepAliveS = keepAliveS;
  }

  get destroyed(): boolean {
    return this.#sock.destroyed;
  }

  get writableLength(): number {
    return this.#sock.writableLength;
  }

  get chunkedEncoding(): boolean {
    return this.#chunked;
  }

  writeHead(status: number, headers: OutgoingHttpHeaders): this {
    this.#noBody = status === 204 || status === 304;
    this.#chunked = !this.#noBody && headers['content-length'] === undefined;
    this.#head = serializeHead(status, headers, this.keepAliveS, httpDate(Date.now()), this.#chunked);
    this.headBytes = this.#head.length; // latin1: a character a byte
    this.headersSent = true;
    return this;
  }

  flushHeaders(): void {
    this.#cork();
    if (this.#head !== undefined) this.#sock.write(this.#head, 'latin1');
    this.#head = undefined;
  }

  write(chunk: Buffer, cb?: (err?: Error | null) => void): boolean {
    this.flushHeaders();
    if (this.#noBody || chunk.length === 0) {
      if (cb) process.nextTick(cb);
      return true;
    }
    if (!this.#chunked) return this.#sock.write(chunk, cb);
    this.#sock.write(`${chunk.length.toString(16)}\r\n`, 'latin1');
    this.#sock.write(chunk);
    return this.#sock.write('\r\n', 'latin1', cb);
  }

  end(chunk?: Buffer | string): this {
    if (this.writableEnded) return this;
    if (chunk !== undefined) this.write(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    else this.flushHeaders();
    if (this.#chunked) this.#sock.write('0\r\n\r\n', 'latin1');
    this.writableEnded = true;
    this.#sock.write(EMPTY, (err) => {
      this.writableFinished = !err;
      this.#ended();
    });
    return this;
  }

  destroy(): this {
    this.#sock.destroy();
    return this;
  }

  on(event: 'drain' | 'close', fn: () => void): this {
    if (event === 'drain') this.#sock.on('drain', fn);
    else this.once(event, fn);
    return this;
  }

  once(event: 'close', fn: () => void): this {
    if (this.#over || this.#sock.destroyed) {
      fn();
      return this;
    }
    // The socket's own close is listened to only while someone waits (a handed-over join leaves none).
    if (this.#onOver.push(fn) === 1) this.#sock.once('close', (this.#onClose ??= () => this.#ended()));
    return this;
  }

  off(event: 'drain' | 'close', fn: () => void): this {
    if (event === 'drain') this.#sock.off('drain', fn);
    else {
      this.#onOver = this.#onOver.filter((f) => f !== fn);
      if (this.#onOver.length === 0 && this.#onClose) this.#sock.off('close', this.#onClose);
    }
    return this;
  }

  #cork(): void {
    if (this.#corked) return;
    this.#corked = true;
    this.#sock.cork();
    process.nextTick(uncork, this);
  }

  /** Called by uncork() on the next tick after the first write of a tick. */
  uncorkNow(): void {
    this.#corked = false;
    this.#sock.uncork();
  }

  #ended(): void {
    if (this.#over) return;
    this.#over = true;
    if (this.#onClose) this.#sock.off('close', this.#onClose);
    const all = this.#onOver;
    this.#onOver = [];
    for (const fn of all) fn();
  }
}

/** A LaneResponse's writes of one tick leave together (process.nextTick's argument: no closure each). */
function uncork(res: LaneResponse): void {
  res.uncorkNow();
}

/** The HTTP date, made at most once a second. */
let dateSecond = -1;
let dateText = '';
function httpDate(nowMs: number): string {
  const sec = Math.floor(nowMs / 1000);
  if (sec !== dateSecond) {
    dateSecond = sec;
    dateText = new Date(sec * 1000).toUTCString();
  }
  return dateText;
}

export class HitLane {
  /** Connections in the lane now: idle between requests, unless answering a join (`joining`). */
  readonly sockets = new Set<Socket>();
  readonly options: HitLaneOptions;
  readonly keepAliveS: number;
  readonly #built = new LRUCache<StoredMeta, Built>({ maxSize: BUILT_BYTES, sizeCalculation: (b) => b.bytes.length });
  /** Sockets whose answers wait, corked, for the end of this turn's reads (#flushHeld). */
  #held: (() => void)[] = [];
  /** Connections answering a join now: not idle, though nothing may be queued on them. */
  readonly joining = new Set<Socket>();
  /** Connections that have had an answer: idle between requests (a new one has not asked yet). */
  readonly answered = new WeakSet<Socket>();
  #joinsOver: (() => void)[] = [];

  /** Resolves once no connection is answering a join (shutdown waits for them as for node's). */
  joinsOver(): Promise<void> {
    return this.joining.size === 0 ? Promise.resolve() : new Promise((r) => this.#joinsOver.push(r));
  }

  /** A connection's join is over (answered, handed over, or its socket gone). */
  joinEnded(sock: Socket): void {
    this.joining.delete(sock);
    if (this.joining.size === 0) for (const r of this.#joinsOver.splice(0)) r();
  }

  constructor(o: HitLaneOptions) {
    this.options = o;
    this.keepAliveS = Math.floor(o.idleTimeoutMs / 1000);
  }

  #head(st: StoredObject, age: string, date: string): string {
    return serializeHead(st.meta.status, this.options.head(st, age), this.keepAliveS, date);
  }

  /** The built response of a small stored object, made again when its Age or the Date has moved on. */
  #built1(st: StoredObject & { body: { kind: 'buffer' } }, age: string, date: string): Built {
    const had = this.#built.get(st.meta);
    if (had && had.age === age && had.date === date) return had;
    const head = Buffer.from(this.#head(st, age, date), 'latin1');
    const b = { age, date, headBytes: head.length, bytes: Buffer.concat([head, st.body.data]) };
    this.#built.set(st.meta, b);
    return b;
  }

  /** Queue the answer to one lane request on `sock` (corked by the caller until the turn's flush). */
  answer(sock: Socket, tx: Transaction, st: StoredObject): void {
    const withBody = this.options.hasBody(tx.method, st);
    const age = this.options.age(st);
    const date = httpDate(tx.startedAt);
    if (st.body.kind === 'buffer' && st.body.data.length <= BUILT_MAX_BODY) {
      const b = this.#built1(st as StoredObject & { body: { kind: 'buffer' } }, age, date);
      if (withBody) tx.bytesOut = st.body.data.length;
      tx.headBytes = b.headBytes;
      sock.write(withBody ? b.bytes : b.bytes.subarray(0, b.headBytes));
      return;
    }
    const head = this.#head(st, age, date);
    tx.headBytes = head.length; // latin1: a character a byte
    sock.write(head, 'latin1');
    if (withBody && st.body.kind === 'buffer') {
      tx.bytesOut = st.body.data.length;
      sock.write(st.body.data);
    }
  }

  /**
   * Answers leave together once the event loop has read everything ready (setImmediate runs right
   * after the poll phase), not one write per read. Each write that finds the client asleep wakes it,
   * and on a VM that wake-up (an interrupt to another CPU) cost ~10% of a small hit; a batch wakes a
   * client once and finds it running for the rest.
   */
  hold(flush: () => void): void {
    if (this.#held.push(flush) === 1) setImmediate(this.#flushHeld);
  }

  readonly #flushHeld = () => {
    const all = this.#held;
    this.#held = [];
    for (const flush of all) {
      try {
        flush();
      } catch (err) {
        this.options.failed(err);
      }
    }
  };

  /** Serve `sock`'s requests here until one is not a plain memory hit; then `handOff(sock)`. */
  attach(sock: Socket, client: string, handOff: (sock: Socket) => void): void {
    new LaneConnection(this, sock, client, handOff);
  }
}

/**
 * One client connection in the lane, as a state machine:
 * - reading: requests are read and hits answered (queued, corked, until the turn's flush);
 * - joining: a join is being answered; what arrives meanwhile waits in `early`;
 * - handedOff: node:http has the connection (for the rest of its life);
 * - closed: the socket is gone.
 * Every byte the lane writes for its hits goes through one path: queued under one cork, then `flush`
 * uncorks, logs the answers once they have left, and ends the connection when the client is done (its
 * FIN may come in the same turn as the requests: the answers leave before the end, never after it).
 */
type LaneState = 'reading' | 'joining' | 'handedOff' | 'closed';

class LaneConnection {
  state: LaneState = 'reading';
  readonly #lane: HitLane;
  readonly #sock: Socket;
  readonly #client: string;
  readonly #handOff: (sock: Socket) => void;
  /** No request answered yet: the first-request timeout holds, not the keep-alive one. */
  #first = true;
  /** The client has sent its FIN: the connection ends once the lane's answers have left. */
  #clientDone = false;
  /** Reads that arrived during a join, read after it. */
  #early: Buffer[] = [];
  /** Answers queued (corked) on the socket and not yet flushed, with their transactions. */
  #held: Transaction[] | undefined;

  constructor(lane: HitLane, sock: Socket, client: string, handOff: (sock: Socket) => void) {
    this.#lane = lane;
    this.#sock = sock;
    this.#client = client;
    this.#handOff = handOff;
    lane.sockets.add(sock);
    sock.on('data', this.#onData);
    sock.on('error', noop);
    sock.on('close', this.#onClose);
    sock.on('end', this.#onEnd);
    const o = lane.options;
    sock.setTimeout(Math.min(o.firstRequestTimeoutMs, o.idleTimeoutMs));
    sock.on('timeout', this.#onTimeout);
  }

  readonly #onTimeout = () => this.#sock.destroy();

  readonly #onClose = () => {
    this.state = 'closed';
    this.#lane.sockets.delete(this.#sock);
    this.#lane.joinEnded(this.#sock); // a join still waiting on its fill has no one left to answer
  };

  // The client is done: the connection ends once every answer of the lane has left (a join's included).
  readonly #onEnd = () => {
    this.#clientDone = true;
    if (this.state === 'reading') this.#endIfDone();
  };

  /** End the connection if the client is done and nothing of the lane's waits to be written. */
  #endIfDone(): void {
    if (this.#clientDone && this.#held === undefined && this.state === 'reading') this.#sock.end();
  }

  /** The one write path's end of a turn: the queued answers leave, are logged, and the end follows them. */
  readonly #flush = () => {
    const answered = this.#held;
    if (!answered) return;
    this.#held = undefined;
    const sock = this.#sock;
    const o = this.#lane.options;
    sock.uncork();
    // All in the kernel is finished (as node:http's finish counts it); else when the rest has left.
    if (sock.writableLength === 0 && !sock.destroyed) for (const tx of answered) o.record(tx);
    else {
      for (const tx of answered) o.open.set(tx, undefined);
      sock.write(EMPTY, (err) => {
        for (const tx of answered) {
          o.open.delete(tx);
          if (err) tx.aborted = true;
          o.record(tx);
        }
      });
    }
    this.#endIfDone();
    // A client that sends faster than it reads waits here, as node:http makes it wait.
    if (!sock.writableEnded && sock.writableNeedDrain && !sock.isPaused()) {
      sock.pause();
      sock.once('drain', this.#resumeOnDrain);
    }
  };

  /** Reading again once the client has read its answers (removed when a join or node:http takes over). */
  readonly #resumeOnDrain = () => {
    if (this.state === 'reading') this.#sock.resume();
  };

  /** Queue one hit's answer (corked until the turn's flush). */
  #queue(tx: Transaction, st: StoredObject): void {
    if (!this.#held) {
      this.#held = [];
      this.#sock.cork();
      this.#lane.hold(this.#flush);
    }
    this.#lane.answer(this.#sock, tx, st);
    this.#held.push(tx);
  }

  readonly #onData = (chunk: Buffer) => {
    const sock = this.#sock;
    if (this.state === 'joining') {
      this.#early.push(chunk); // a read that a drain's resume let through: kept for after the join
      sock.pause();
      return;
    }
    if (this.state !== 'reading') return;
    const o = this.#lane.options;
    let pos = 0;
    let rest: Buffer | undefined;
    let join: LaneJoin | undefined;
    let joinAt = 0;
    try {
      while (pos < chunk.length) {
        const end = chunk.indexOf(END, pos);
        const req = end >= 0 && end - pos <= MAX_HEAD ? parsePlain(chunk.toString('latin1', pos, end)) : undefined;
        // A client that pipelines faster than it reads: past QUEUE_BYTES of answers, node:http takes the
        // rest, with its own backpressure (the lane's answers may be copies, the built responses).
        const room = this.#held === undefined || sock.writableLength < QUEUE_BYTES;
        const hit = req && room && !o.draining() ? o.answer(req.method, req.target, req.headers, this.#client) : undefined;
        if (typeof hit !== 'object') {
          join = hit;
          if (join) {
            joinAt = pos;
            pos = end + 4;
          } else rest = chunk.subarray(pos);
          break;
        }
        pos = end + 4;
        this.#queue(hit.tx, hit.st);
      }
      if (this.#held && this.#first) {
        this.#first = false;
        this.#lane.answered.add(sock);
        sock.setTimeout(o.idleTimeoutMs); // from now on, the keep-alive timeout between requests
      }
      // node:http's answers, and a join's, must follow the lane's: they leave now, not with the others.
      if (rest || join) this.#flush();
    } catch (err) {
      o.failed(err);
      sock.destroy();
      return;
    }
    if (join) this.#startJoin(join, chunk, joinAt, pos);
    else if (rest) this.#leave(rest);
  };

  /** Hand the connection and its unread bytes to node:http. */
  #leave(rest: Buffer): void {
    const sock = this.#sock;
    sock.off('drain', this.#resumeOnDrain);
    if (this.#clientDone) {
      // The client's FIN was read already: node:http would never see it, and bytes can't be put back
      // before an end. node:http answers no request after a FIN either: the connection ends here.
      this.state = 'closed';
      sock.end();
      return;
    }
    this.state = 'handedOff';
    sock.pause(); // before unshift: a flowing stream would emit the bytes to nobody
    sock.off('data', this.#onData);
    sock.off('error', noop);
    sock.off('timeout', this.#onTimeout);
    sock.off('close', this.#onClose);
    sock.off('end', this.#onEnd);
    sock.setTimeout(0);
    this.#lane.sockets.delete(sock);
    if (rest.length) sock.unshift(rest);
    this.#handOff(sock);
    sock.resume();
  }

  // Answer a join (a plain GET joining a fill in flight) with the request path's own steps, writing
  // on the socket; the lane reads again once it is over. Its request is chunk[at, end), and what
  // follows it in the chunk is read after it.
  #startJoin(answer: LaneJoin, chunk: Buffer, at: number, end: number): void {
    const sock = this.#sock;
    const lane = this.#lane;
    const o = lane.options;
    this.state = 'joining';
    lane.joining.add(sock);
    sock.off('drain', this.#resumeOnDrain); // a drain must not resume reading in the middle of a join
    sock.pause();
    sock.setTimeout(0); // node:http sets no timeout on a response in progress either
    answer(new LaneResponse(sock, lane.keepAliveS)).then(
      (how) => {
        lane.joinEnded(sock);
        const pending = this.#early;
        this.#early = [];
        if (sock.destroyed) return;
        this.state = 'reading';
        if (how === 'handoff') return this.#leave(pending.length ? Buffer.concat([chunk.subarray(at), ...pending]) : chunk.subarray(at));
        this.#first = false;
        lane.answered.add(sock);
        sock.setTimeout(o.idleTimeoutMs);
        const more = pending.length ? Buffer.concat([chunk.subarray(end), ...pending]) : chunk.subarray(end);
        if (more.length) this.#onData(more);
        if (this.state !== 'reading') return; // another join, or node:http has it now
        if (this.#clientDone) this.#endIfDone();
        else if (sock.writableNeedDrain) sock.once('drain', this.#resumeOnDrain);
        else sock.resume();
      },
      (err: unknown) => {
        lane.joinEnded(sock);
        o.failed(err);
        sock.destroy();
      },
    );
  }
}

function noop(): void {}
