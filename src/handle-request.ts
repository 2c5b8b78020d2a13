// The request path as one explicit state machine (Varnish cache_req_fsm.c):
//
//   recv ──deny/bad──▶ synth
//    │
//   lookup ──▶ hit ───────────────────────────────▶ deliverStored  (TCP_HIT / TCP_MEM_HIT)
//    │    ├──▶ busy ─▶ join fill ─────────────────▶ deliverFill    (TCP_CF_MISS)
//    │    ├──▶ stale ─▶ fill (conditional if validators) ─304─▶ deliverStored (TCP_REFRESH_UNMODIFIED)
//    │    │                                        └─200─▶ deliverFill    (TCP_REFRESH_MODIFIED)
//    │    ├──▶ miss ─▶ new fill ──────────────────▶ deliverFill    (TCP_MISS)
//    │    └──▶ pass ─▶ upstream, not stored ──────▶ (TCP_MISS)
//   finish ─▶ one Transaction: access log line and counters
//
// Each step is a named function returning the next step. (A plain fresh memory hit on a connection
// still in the hit lane is answered before any of this: hit-lane.ts, with plainLaneRequest below.)
import type { IncomingHttpHeaders, IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import type { Acl } from './acl.ts';
import { localHint, plainAddress } from './acl.ts';
import { newTransaction, type AccessLog, type Transaction } from './access-log.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { Metrics } from './metrics.ts';
import { parseTarget, urlKey, variantKey } from './cache-key.ts';
import type { Clock } from './clock.ts';
import type { Coalescer } from './coalescer.ts';
import type { Config } from './config.ts';
import { internalError, ProxyError, upstreamError } from './errors.ts';
import { discard, type Upstream } from './fetch.ts';
import type { FillHead, FillReader } from './fill.ts';
import { clientWantsReload, directives, forbidsStale, hasValidators, isFresh, staleness } from './freshness.ts';
import { clientResponseHeaders, conditionMatches, isLoop, notModifiedHeaders, sendError, upstreamRequestHeaders } from './forward.ts';
import type { Logger } from './log.ts';
import type { Mirrors } from './mirrors.ts';
import { repoOf, type CasObject } from './content-hash.ts';
import type { LaneHit, LaneJoin } from './hit-lane.ts';
import { StoreUnavailable, type StoredMeta, type StoredObject, type TieredStore } from './store.ts';
import type { Counters } from './counters.ts';

export interface Ctx {
  cfg: Config;
  acl: () => Acl;
  clock: Clock;
  store: TieredStore;
  coalescer: Coalescer;
  upstream: Upstream;
  accessLog: AccessLog;
  log: Logger;
  counters: Counters;
  buffers: BufferPool;
  metrics: Metrics;
  mirrors: Mirrors;
  /** Open CONNECT tunnels, each by the function that ends it (shutdown cuts them). */
  tunnels: Set<() => void>;
}

type StepName = 'recv' | 'lookup' | 'hit' | 'stale' | 'busy' | 'miss' | 'pass' | 'purge' | 'deliverFill' | 'serveStale' | 'revalidateInBackground' | 'synth';

interface State {
  ctx: Ctx;
  req: IncomingMessage;
  res: ServerResponse;
  tx: Transaction;
  url?: URL;
  primary?: string;
  key?: string;
  vary?: string[];
  stored?: StoredObject;
  fill?: FillReader;
  /** Set when this request started the fill: its reader id (it keeps a response that is not shared). */
  readerId?: number;
  error?: ProxyError;
  reload?: boolean;
  /** The request came in on an accelerator-mode listener. */
  accel: boolean;
  cas?: CasObject;
  /** Accelerator mode: the repository whose sticky mirror serves this request. */
  accelRepo?: string;
  /** Accelerator mode: mirrors moved on to after the sticky one failed. */
  accelRetries?: number;
  /** A stored copy exists but is not fresh: served if the upstream turns out to be down. */
  staleAvailable?: boolean;
  /** Answered by the hit lane, which runs only busy, deliverFill and synth (plainLaneRequest). */
  lane?: boolean;
  /** A lane request reached another step: it stopped there, and node:http answers it afresh. */
  handedOff?: boolean;
  /** This request waited for another's disk lookup of its key (lookup waits once). */
  waitedForDisk?: boolean;
}

const CACHEABLE = new Set(['GET', 'HEAD']);
const noop = () => {};
const CLIENT_CONDITIONS = ['if-none-match', 'if-modified-since', 'if-match', 'if-unmodified-since', 'if-range', 'range'];
const SAFE = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE']);

export function handleRequest(ctx: Ctx, req: IncomingMessage, res: ServerResponse, accel = false): void | Promise<void> {
  const tx = newTransaction({ startedAt: ctx.clock.now(), client: plainAddress(req.socket.remoteAddress ?? '-'), method: req.method ?? '-', url: req.url ?? '-', headers: req.headers, httpVersion: req.httpVersion });
  return run({ ctx, req, res, tx, accel }, 'recv');
}

/**
 * Run the steps from `step`. Steps that finish at once return the next step itself, so a memory hit
 * runs from request to response without a promise; the first step that must wait continues from here
 * when it settles.
 */
function run(s: State, step: Next): void | Promise<void> {
  try {
    while (step) {
      if (s.lane && step !== 'busy' && step !== 'deliverFill' && step !== 'synth') {
        s.handedOff = true;
        return;
      }
      const next = STEPS[step](s);
      if (next instanceof Promise) return next.then((n) => run(s, n), (err: unknown) => failedInside(s, err));
      step = next;
    }
  } catch (err) {
    return failedInside(s, err);
  }
  finish(s);
}

/** A step threw: cuttle's own failure, answered with a labelled error (or the socket cut). */
async function failedInside(s: State, err: unknown): Promise<void> {
  s.ctx.log.error({ err, url: s.tx.url, internal: true }, 'request failed inside the proxy');
  s.error = err instanceof ProxyError ? err : internalError(err);
  await synth(s).catch(() => s.res.destroy());
  finish(s);
}

type Next = StepName | undefined;

const STEPS: Record<StepName, (s: State) => Next | Promise<Next>> = {
  recv,
  lookup,
  hit,
  stale,
  busy,
  miss,
  pass,
  purge,
  deliverFill,
  serveStale,
  revalidateInBackground,
  synth,
};

function fail(s: State, code: ProxyError['code'], detail?: string): StepName {
  s.error = new ProxyError(code, detail);
  return 'synth';
}

function recv(s: State): Next {
  const { ctx, req, tx } = s;
  if (!ctx.acl().allowsClient(tx.client)) return fail(s, 'ERR_CLIENT_DENIED', tx.client);
  let target = req.url ?? '';
  if (target.startsWith('/')) {
    if (!s.accel) return fail(s, 'ERR_ORIGIN_FORM');
    // Accelerator mode: the repository's sticky mirror of the first group serves the path; from here on
    // the request is the same as a forward request naming that mirror.
    const path = target.split('#')[0]!;
    if (!/^\/[\x21-\x7e]*$/.test(path)) return fail(s, 'ERR_BAD_REQUEST', target.slice(0, 200));
    s.accelRepo = repoOf(path);
    target = ctx.mirrors.groups[0]!.stickyFor(s.accelRepo).origin + path;
  }
  const parsed = parseTarget(target);
  if (!parsed) return fail(s, /^[a-z][a-z0-9+.-]*:\/\//i.test(target) && !/^http:/i.test(target) ? 'ERR_UNSUPPORTED_SCHEME' : 'ERR_BAD_REQUEST', target.slice(0, 200));
  const url = parsed.url;
  s.url = url;
  s.cas = parsed.cas;
  tx.url = url.href;
  const primary = primaryOf(ctx, parsed);
  if (isLoop(req.headers, ctx.cfg.visibleHostname)) return fail(s, 'ERR_LOOP');
  const port = Number(url.port || 80);
  const verdict = ctx.acl().checkDestination(url.hostname, port);
  if (verdict === 'deny-port') return fail(s, 'ERR_PORT_DENIED', String(port));
  if (verdict === 'deny-dest') return fail(s, 'ERR_DEST_DENIED', url.hostname);
  if (verdict === 'deny-local') return fail(s, 'ERR_DEST_DENIED', localHint(url.hostname.replace(/^\[|\]$/g, ''), port));
  const method = tx.method;
  if (method === 'PURGE') return 'purge';
  // RFC 9110 §7.6.2: Max-Forwards 0 on TRACE/OPTIONS is answered here.
  if ((method === 'OPTIONS' || method === 'TRACE') && req.headers['max-forwards'] !== undefined) {
    const mf = Number(req.headers['max-forwards']);
    if (mf === 0) {
      const body = method === 'TRACE' ? `${method} ${tx.url} HTTP/1.1\r\n${Object.entries(req.headers).map(([k, v]) => `${k}: ${v}`).join('\r\n')}\r\n\r\n` : '';
      reply(s, 200, { allow: 'GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE', 'content-type': method === 'TRACE' ? 'message/http' : 'text/plain', 'content-length': String(Buffer.byteLength(body)) }, body);
      return undefined;
    }
    if (Number.isInteger(mf) && mf > 0) req.headers['max-forwards'] = String(mf - 1);
  }
  if (!CACHEABLE.has(method)) return 'pass';
  // A request with credentials gets its own answer: never from, nor into, the shared cache. (Passed,
  // not marked: one client's headers never change what the others get.)
  if (req.headers.authorization !== undefined) return 'pass';
  setKey(s, primary);
  return 'lookup';
}

/**
 * A target's primary key. Only the mirrors of a group feed, or are joined under, the host-independent
 * key of a content-addressed object: through any other host it is that URL's own object (still
 * hash-verified).
 */
function primaryOf(ctx: Ctx, parsed: NonNullable<ReturnType<typeof parseTarget>>): string {
  return parsed.cas && !ctx.mirrors.byHost(parsed.url.host) ? urlKey(parsed.url) : parsed.primary;
}

/** The request headers a primary key's responses vary on (content-addressed bytes do not vary). */
function varyOf(ctx: Ctx, primary: string): string[] {
  return primary.startsWith('cvmfs-cas:') ? [] : (ctx.coalescer.varySpecs.get(primary) ?? []);
}

function setKey(s: State, primary: string): void {
  s.primary = primary;
  s.vary = varyOf(s.ctx, primary);
  s.key = variantKey(primary, s.vary, s.req.headers);
}

/**
 * What the hit lane (hit-lane.ts) may answer without recv and lookup: a forward GET or HEAD with no
 * request directive, condition, range, credentials or Vary, that the ACLs let through. Denials and
 * errors go to the full path.
 */
function plainTarget(ctx: Ctx, method: string, target: string, headers: IncomingHttpHeaders, client: string): { url: URL; primary: string; cas: CasObject | undefined } | undefined {
  if ((method !== 'GET' && method !== 'HEAD') || headers.authorization !== undefined || !plainRequest(headers)) return undefined;
  if (!ctx.acl().allowsClient(client)) return undefined;
  const parsed = parseTarget(target);
  if (!parsed) return undefined;
  const url = parsed.url;
  const primary = primaryOf(ctx, parsed);
  if (isLoop(headers, ctx.cfg.visibleHostname) || ctx.acl().checkDestination(url.hostname, Number(url.port || 80)) !== 'allow') return undefined;
  if (varyOf(ctx, primary).length) return undefined;
  if (clientWantsReload(headers) || ctx.coalescer.isUncacheable(primary)) return undefined;
  return { url, primary, cas: parsed.cas };
}

/**
 * The hit lane's question (hit-lane.ts), asked once per plain request: a fresh memory hit (its
 * transaction and stored object; storedHitHead gives the head), or a GET that may join a fill in flight
 * without a lookup (the function that answers it), or undefined: the full path answers it.
 *
 * A join is allowed only for a fill that began with nothing stored for its key and is no reload
 * (Fill.nothingStored): lookup's disk read could only find nothing and then join it, so the join starts
 * at busy. The answer runs busy, deliverFill and synth, and ends 'handoff' (nothing written, nothing
 * logged: node:http answers the request from the start) at any other step, such as the pass of a
 * response that is not shared, or the new lookup of a variant.
 */
export function plainLaneRequest(ctx: Ctx, method: string, target: string, headers: IncomingHttpHeaders, client: string): LaneHit | LaneJoin | undefined {
  const p = plainTarget(ctx, method, target, headers, client);
  if (!p) return undefined;
  const st = ctx.store.getFromMemory(p.primary);
  if (st) {
    if (!isFresh(st.policy)) return undefined;
    const tx = newTransaction({ startedAt: ctx.clock.now(), client, method, url: p.url.href, headers, httpVersion: '1.1' });
    tx.result = 'TCP_MEM_HIT';
    tx.lane = 'hit';
    noteStored(tx, st);
    return { tx, st };
  }
  if (method !== 'GET') return undefined;
  const fill = ctx.coalescer.joinable(p.primary);
  if (!fill?.nothingStored || fill.released || (fill.state !== 'pending' && fill.state !== 'streaming')) return undefined;
  const tx = newTransaction({ startedAt: ctx.clock.now(), client, method, url: p.url.href, headers, httpVersion: '1.1' });
  tx.lane = 'join';
  // Of the request, those steps read its headers alone.
  // (A herd parks thousands of these at once: what they hold is kept small, no frame of their own.)
  const req = { headers, resume: noop } as unknown as IncomingMessage;
  return (res) => {
    const s: State = { ctx, req, res: res as unknown as ServerResponse, tx, accel: false, lane: true, url: p.url, primary: p.primary, key: p.primary, vary: [], cas: p.cas, staleAvailable: false };
    return Promise.resolve(run(s, 'busy')).then(() => (s.handedOff ? 'handoff' : 'done'));
  };
}

/**
 * Accelerator mode, a manifest or other per-mirror file whose sticky mirror just failed: the repository
 * has moved on, so ask the new sticky mirror, under its own key (never store one mirror's answer under
 * another's URL).
 */
function retryOnNextMirror(s: State): boolean {
  const group = s.ctx.mirrors.groups[0];
  if (s.accelRepo === undefined || s.cas || !group || (s.accelRetries ?? 0) >= group.mirrors.length - 1) return false;
  const next = group.stickyFor(s.accelRepo).origin;
  if (next === s.url!.origin) return false;
  const parsed = parseTarget(`${next}${s.url!.pathname}${s.url!.search}`);
  if (!parsed) return false;
  s.accelRetries = (s.accelRetries ?? 0) + 1;
  s.url = parsed.url;
  s.tx.url = parsed.url.href;
  s.fill = undefined;
  setKey(s, parsed.primary);
  return true;
}

function lookup(s: State): StepName | Promise<StepName> {
  const { ctx, req, tx } = s;
  const key = s.key!;
  s.staleAvailable = false;
  s.reload = clientWantsReload(req.headers);
  if (s.reload) {
    // Never satisfied by, nor joined to, a copy or fill that began before this request arrived.
    tx.result = 'TCP_CLIENT_REFRESH_MISS';
    return tx.method === 'GET' ? 'miss' : 'pass';
  }
  if (ctx.coalescer.isUncacheable(s.primary!)) return 'pass';
  // A fresh stored copy first: nobody's fill (a reload, say) may hide it. The memory tier answers at
  // once; only a miss there waits for the disk (asked once, not memory again).
  const inMemory = ctx.store.getFromMemory(key);
  if (inMemory) return lookedUp(s, inMemory);
  // The stored copy other clients are reading now (a finished fill's body, or a shared read of the
  // record) answers a plain request as the record would: joining it at once saves the record's open,
  // head reads and close, four thread-pool trips. A herd that asks together finds none yet: it waits
  // for the one lookup in flight (which starts the shared read of a large record), then looks again.
  const plain = plainRequest(req.headers);
  if (plain) {
    const held = ctx.coalescer.heldBody(key);
    if (held?.policy && isFresh(held.policy)) {
      s.fill = held;
      tx.result = 'TCP_MEM_HIT';
      return 'deliverFill';
    }
    const inFlight = s.waitedForDisk ? undefined : ctx.coalescer.diskLookupOf(key);
    if (inFlight) {
      s.waitedForDisk = true; // once: a second look reads the disk itself
      const again = (): StepName => 'lookup';
      return inFlight.then(again, again);
    }
  }
  const looked = ctx.store.getFromDisk(key).then(
    (stored) => lookedUp(s, stored),
    (err: unknown) => {
      if (err instanceof StoreUnavailable) return storeUnavailable(s, err) ?? 'synth';
      ctx.counters.corruptRecords++;
      ctx.log.warn({ err, key }, 'stored object corrupt; refetching');
      return lookedUp(s, undefined);
    },
  );
  if (plain) ctx.coalescer.noteDiskLookup(key, looked);
  return looked;
}

/** No condition and no range: the whole stored response is the answer. */
function noConditions(headers: IncomingHttpHeaders): boolean {
  return CLIENT_CONDITIONS.every((h) => headers[h] === undefined);
}

/** No request directive: freshness is the stored timeline alone (CVMFS sends an empty Pragma). */
function noDirectives(headers: IncomingHttpHeaders): boolean {
  return !headers['cache-control'] && !headers.pragma;
}

/** No request directive and no condition: any fresh stored copy answers. */
function plainRequest(headers: IncomingHttpHeaders): boolean {
  return noDirectives(headers) && noConditions(headers);
}

/** What the lookup found decides the next step. */
function lookedUp(s: State, stored: StoredObject | undefined): StepName {
  const { ctx, req, tx } = s;
  const key = s.key!;
  if (stored) {
    // Without request directives, freshness is the stored timeline alone (the key already pins URL,
    // host and Vary); with them, the full RFC 9111 check.
    if (noDirectives(req.headers) ? isFresh(stored.policy) : satisfies(stored, req.headers)) {
      s.stored = stored;
      return stored.tier === 'disk' && noConditions(req.headers) ? sharedDiskHit(s, stored) : 'hit';
    }
    s.staleAvailable = true;
    // The upstream failed a refresh of this key moments ago: serve the stale copy without asking
    // again, so a herd polling an expired manifest costs one attempt per --stale-retry, not one each.
    if (ctx.coalescer.refreshFailedRecently(key) && mayServeStale(stored, req.headers, ctx.cfg.maxStaleMs)) {
      s.stored = stored;
      return 'serveStale';
    }
    if (tx.method === 'GET' && withinRevalidateWindow(stored, req.headers)) {
      s.stored = stored;
      return 'revalidateInBackground';
    }
  }
  if (ctx.coalescer.joinable(key)) {
    closeStored(stored);
    return 'busy';
  }
  // What this request alone wants (no storing, a range far into the object) is fetched for it alone.
  // A range that starts within --range-offset-limit fills the whole object (Squid's
  // range_offset_limit), so the next request is a hit; the range is answered from the fill.
  const spec = rangeSpec(req.headers);
  const rangeFirst = spec && 'first' in spec ? spec.first : undefined;
  const fillForRange = rangeFirst !== undefined && rangeFirst <= ctx.cfg.rangeOffsetLimitBytes && !stored;
  if ((req.headers.range !== undefined && !fillForRange) || /(^|,)\s*no-store\b/i.test(String(req.headers['cache-control'] ?? ''))) {
    closeStored(stored);
    return 'pass';
  }
  if (stored) {
    s.stored = stored;
    return 'stale';
  }
  if (tx.method === 'HEAD') return 'pass';
  return 'miss';
}

/**
 * A plain request for a disk record (no range, no condition) that other clients are reading now reads
 * the same bytes they do: the fill that stored it, if it still holds them, or a shared read of the
 * record. A large record starts such a shared read; a small one is read on its own.
 */
function sharedDiskHit(s: State, st: StoredObject): StepName {
  const { ctx, tx } = s;
  const held = ctx.coalescer.heldBody(s.key!);
  if (held) {
    closeStored(st);
    s.stored = undefined;
    s.fill = held;
    tx.result = 'TCP_MEM_HIT';
    return 'deliverFill';
  }
  if (tx.method !== 'GET' || st.size <= ctx.cfg.maxMemoryObjectBytes) return 'hit';
  const shared = ctx.coalescer.shareRecord(s.key!, st, () => dropCorrupt(ctx, st.meta.key));
  s.stored = undefined;
  s.fill = shared.fill;
  s.readerId = shared.readerId;
  tx.result = 'TCP_HIT';
  return 'deliverFill';
}

function closeStored(st: StoredObject | undefined): void {
  if (st?.body.kind === 'file') st.body.close();
}

function hit(s: State): undefined | Promise<undefined> {
  const st = s.stored!;
  s.tx.result = st.tier === 'memory' ? 'TCP_MEM_HIT' : 'TCP_HIT';
  return deliverStored(s, st)?.then(() => undefined);
}

function stale(s: State): StepName {
  s.tx.result = 'TCP_REFRESH_MODIFIED';
  if (s.tx.method === 'HEAD') {
    closeStored(s.stored);
    s.stored = undefined;
    return 'pass';
  }
  return 'miss'; // a conditional refetch when the copy has validators (startFill), else a plain one
}

function busy(s: State): StepName {
  // Looked up again, never assumed: the fill found a step ago may have failed or been released since
  // (a microtask runs between a lookup's answer and this step). Gone, the request looks again.
  const fill = s.ctx.coalescer.joinable(s.key!);
  if (!fill) return 'lookup';
  s.fill = fill;
  if (fill.state === 'done') {
    // The whole response is already here, only not yet handed to the tiers: a hit in all but name.
    s.tx.result = 'TCP_MEM_HIT';
    return 'deliverFill';
  }
  s.tx.coalesced = true;
  s.tx.served = 'coalesced';
  if (s.tx.result === 'NONE') s.tx.result = 'TCP_MISS';
  return 'deliverFill';
}

function miss(s: State): StepName {
  const { ctx, req, tx } = s;
  // Another request may have started this key's fill while this one looked in the store: join it.
  // (From here to start() nothing awaits, so a herd can't start two fills for one key.)
  if (!s.reload && ctx.coalescer.joinable(s.key!)) {
    closeStored(s.stored);
    s.stored = undefined;
    return 'busy';
  }
  if (ctx.coalescer.inFlight >= ctx.cfg.maxFills) {
    closeStored(s.stored);
    return fail(s, 'ERR_OVERLOADED', 'too many fills in flight');
  }
  s.tx.served = 'miss';
  if (tx.result === 'NONE') tx.result = 'TCP_MISS';
  const stale = s.stored;
  s.stored = undefined;
  const started = startFill(s, stale);
  s.fill = started.fill;
  s.readerId = started.readerId;
  closeStored(stale);
  return 'deliverFill';
}

/** Start this request's key's fill (revalidating `stale` if it has validators). */
function startFill(s: State, stale: StoredObject | undefined): ReturnType<Coalescer['start']> {
  const { ctx, req, tx } = s;
  const upstreamHeaders = upstreamRequestHeaders(req.headers, s.url!, tx.client, ctx.cfg.visibleHostname);
  // The fill is for everyone: it asks for the whole object, never this client's conditions.
  for (const h of CLIENT_CONDITIONS) delete upstreamHeaders[h];
  return ctx.coalescer.start({
    key: s.key!,
    primary: s.primary!,
    url: s.url!,
    vary: s.vary!,
    clientHeaders: req.headers,
    upstreamHeaders,
    stale: stale && hasValidators(stale.meta.headers) ? stale : undefined,
    nothingStored: !s.reload && stale === undefined,
    cas: s.cas,
    accelRepo: s.accelRepo,
  });
}

/**
 * stale-while-revalidate (RFC 5861): within the response's window, the stale copy is served at once
 * and one background fill refreshes it (joined by nobody; it stores what it gets).
 */
function withinRevalidateWindow(st: StoredObject, reqHeaders: IncomingMessage['headers']): boolean {
  const res = directives(st.meta.headers['cache-control']);
  const swr = res.get('stale-while-revalidate');
  // The window is the origin's own permission to serve stale, so s-maxage alone does not forbid it.
  if (swr === undefined || res.has('must-revalidate') || res.has('proxy-revalidate') || res.has('no-cache')) return false;
  const req = directives(reqHeaders['cache-control']);
  if (req.has('max-age') || req.has('min-fresh')) return false; // the client asked for fresher than that
  const staleS = staleness(st.policy);
  return staleS > 0 && staleS <= Number(swr);
}

async function revalidateInBackground(s: State): Promise<undefined> {
  const { ctx, tx } = s;
  if (!ctx.coalescer.joinable(s.key!) && ctx.coalescer.inFlight < ctx.cfg.maxFills) {
    const bg = startFill(s, s.stored);
    bg.fill.removeReader(bg.readerId); // nobody waits on it
  }
  tx.result = 'TCP_STALE_HIT';
  await deliverStored(s, s.stored!);
  return undefined;
}

async function deliverFill(s: State): Promise<StepName | undefined> {
  const { ctx, res, tx } = s;
  const fill = s.fill!;
  const starter = s.readerId !== undefined;
  const id = s.readerId ?? fill.addReader();
  s.readerId = undefined;
  try {
    while (fill.state === 'pending' && !fill.released) await fill.changed();
    // A stored object served through a fill (a finished one, or a shared read of its disk record).
    const isHit = tx.result === 'TCP_MEM_HIT' || tx.result === 'TCP_HIT';
    if (!isHit) {
      tx.hierarchy = 'HIER_DIRECT';
      tx.peer = fill.peer || s.url!.hostname;
    }
    // Accelerator mode: a sticky mirror that failed is replaced before anything else is decided.
    if (!fill.head && fill.state === 'failed' && retryOnNextMirror(s)) return 'lookup';
    // The upstream is down (no answer, or a 5xx) and a stale copy is here: RFC 9111 §4.2.4.
    const down = fill.head ? fill.head.status >= 500 : fill.state === 'failed';
    if (s.staleAvailable && down && (await findStale(s))) return 'serveStale';
    if (fill.released && !starter) {
      tx.coalesced = false;
      return 'pass'; // the response was not shareable: fetch on our own
    }
    // A response that varies goes only to requests of its own variant; another looks up again (now
    // keyed with the response's Vary) and gets its own.
    if (fill.variant && variantKey(s.primary!, fill.variant.names, s.req.headers) !== fill.variant.key) {
      s.fill = undefined;
      setKey(s, s.primary!);
      tx.coalesced = false;
      return 'lookup';
    }
    if (fill.notModified) {
      const st = await ctx.store.get(s.key!);
      if (!st) return 'miss';
      tx.result = 'TCP_REFRESH_UNMODIFIED';
      await deliverStored(s, st);
      return undefined;
    }
    if (!fill.head) {
      if (retryOnNextMirror(s)) return 'lookup';
      s.error = fill.error ?? new ProxyError('ERR_UPSTREAM_RESET');
      return 'synth';
    }
    const head = fill.head;
    // Age: the stored response's current age (the upstream's Age included); else the upstream's own.
    const headers: OutgoingHttpHeaders = { ...sharedHead(head, ctx.cfg.visibleHostname, isHit ? 'HIT' : 'MISS') };
    if (fill.policy) headers.age = String(Math.floor(fill.policy.age()));
    // The client whose request started the fill gets its own Set-Cookie; nobody else ever does.
    if (starter && fill.privateHeaders) Object.assign(headers, fill.privateHeaders);
    tx.status = head.status;
    tx.mime = String(head.headers['content-type'] ?? '');
    if (res.destroyed) return undefined;
    if (conditionMatches(s.req.headers, head.status, head.headers)) {
      tx.status = 304;
      res.writeHead(304, notModifiedHeaders(headers));
      res.end();
      return undefined;
    }
    // A single range of a complete 200 is answered 206 from the fill (never for a content-addressed
    // object: its bytes are verified only as a whole).
    const range = head.status === 200 && tx.method === 'GET' && head.contentLength !== undefined && !s.cas ? fillRange(s.req.headers, head.contentLength) : undefined;
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
      return undefined;
    }
    // The client's watchdog counts the first byte: the head goes out before any wait, else with the
    // first piece of body (one write, not two). `headOut` tracks it: res.headersSent is true from
    // writeHead on, before anything is written. An empty body whose hash is checked has no last byte
    // to hold back, so its head alone would be a complete answer: that head waits for the check too.
    const headWaits = fill.holdBack && head.contentLength === 0;
    let headOut = false;
    const flushHead = () => {
      if (!headOut) res.flushHeaders();
      headOut = true;
    };
    let graced = false;
    let burst = 0;
    for (;;) {
      if (off >= stop) break;
      // Fairness: bytes already in memory can be written without ever awaiting, so one reader could
      // hold the event loop for megabytes while new requests and the upstream wait. Yield regularly.
      if (burst >= BURST_BYTES) {
        burst = 0;
        await nextTurn();
      }
      if (res.destroyed) {
        tx.aborted = true;
        return undefined;
      }
      const p = fill.peek(id, off);
      if (p === 'end') break;
      if (p === 'failed') {
        ctx.counters.truncated++;
        tx.aborted = true;
        res.destroy(); // no terminating chunk, Content-Length unfulfilled: the client sees a truncation
        return undefined;
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
      const pooled = p === 'spill' ? ctx.buffers.acquire() : undefined;
      let buf = pooled ? await fill.readSpill(off, pooled) : (p as Buffer);
      if (off + buf.length > stop) buf = buf.subarray(0, stop - off);
      if (buf.length === 0) {
        if (pooled) ctx.buffers.release(pooled);
        flushHead();
        await fill.changed();
        continue;
      }
      off += buf.length;
      burst += buf.length;
      tx.bytesOut += buf.length;
      headOut = true;
      // Bytes from the fill's memory may queue up to QUEUE_BYTES for the socket before waiting for
      // `drain`: one write then carries several chunks (pooled disk reads still wait, the pool is bounded).
      if (!res.write(buf, pooled && (() => ctx.buffers.release(pooled))) && (pooled || res.writableLength >= QUEUE_BYTES)) await drained(res);
    }
    res.end();
    return undefined;
  } finally {
    fill.removeReader(id);
  }
}

/**
 * The one byte range a Range header asks for (`bytes=a-b`, `bytes=a-` or `bytes=-n`), before the size is
 * known; undefined for anything else (several ranges, another unit, garbage): the full 200 answers those.
 */
function rangeSpec(h: IncomingMessage['headers']): { first: number; last: number | undefined } | { suffix: number } | undefined {
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(String(h.range ?? ''));
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') return { suffix: Number(m[2]) };
  return { first: Number(m[1]), last: m[2] === '' ? undefined : Number(m[2]) };
}

/** That range within a body of `size` bytes: 'unsatisfiable' when it lies past the end. */
function resolveRange(spec: NonNullable<ReturnType<typeof rangeSpec>>, size: number): { start: number; end: number } | 'unsatisfiable' | undefined {
  if ('suffix' in spec) return spec.suffix === 0 ? 'unsatisfiable' : { start: Math.max(0, size - spec.suffix), end: size - 1 };
  const end = spec.last === undefined ? size - 1 : Math.min(spec.last, size - 1);
  if (spec.first >= size) return 'unsatisfiable';
  return end < spec.first ? undefined : { start: spec.first, end };
}

/** The `bytes=a-b` / `bytes=a-` range to answer from a fill of `size` bytes, if the request asks for one. */
function fillRange(h: IncomingMessage['headers'], size: number): { start: number; end: number } | undefined {
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
function byteRange(h: IncomingMessage['headers'], st: StoredObject): { start: number; end: number } | 'unsatisfiable' | undefined {
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
 * A stored record that can't be read now (EMFILE, EIO): this request fails with 503, or is cut short
 * once its head is out; the record stays for the next one.
 */
function storeUnavailable(s: State, err: StoreUnavailable): 'synth' | undefined {
  s.ctx.log.warn({ err, key: s.key }, 'stored record unreadable now; kept, the request answered 503');
  if (s.res.headersSent) {
    s.tx.aborted = true;
    s.res.destroy();
    return undefined;
  }
  s.error = new ProxyError('ERR_STORE_UNAVAILABLE', err.message, { cause: err });
  return 'synth';
}

/** A disk record that failed its checksum while being served: dropped, the client cut short. */
async function corruptRecord(s: State, st: StoredObject): Promise<void> {
  await dropCorrupt(s.ctx, st.meta.key);
  s.tx.aborted = true;
  s.res.destroy();
}

function dropCorrupt(ctx: Ctx, key: string): Promise<void> {
  ctx.counters.corruptRecords++;
  ctx.log.error({ key }, 'disk record failed its checksum; dropped, clients cut short');
  return ctx.store.delete(key);
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
 * streamed, and verified against its checksum before its last byte goes out.
 */
function deliverStored(s: State, st: StoredObject): void | Promise<void> {
  const body = st.body;
  if (body.kind === 'file') return deliverRecord(s, st, body);
  const a = storedAnswer(s, st);
  if (!a) return;
  if (a.range) return sendPart(s, st, a.headers, a.range, body.data);
  s.res.writeHead(st.meta.status, a.headers);
  if (!hasBody(s.tx.method, st)) {
    s.res.end();
    return;
  }
  s.tx.bytesOut += body.data.length;
  s.res.end(body.data);
}

async function deliverRecord(s: State, st: StoredObject, body: Extract<StoredObject['body'], { kind: 'file' }>): Promise<void> {
  const { ctx, res, tx } = s;
  try {
    const a = storedAnswer(s, st);
    if (!a) return;
    // A range is answered from a record read whole first, so its checksum is verified before any byte
    // goes out; past RANGE_FROM_DISK_MAX the whole 200 answers it.
    if (a.range && st.size <= RANGE_FROM_DISK_MAX) {
      const whole = await readVerified(body, st.size);
      if (!whole) return corruptRecord(s, st);
      sendPart(s, st, a.headers, a.range, whole);
      return;
    }
    res.writeHead(st.meta.status, a.headers);
    if (!hasBody(s.tx.method, st)) {
      res.end();
      return;
    }
    for (let pos = 0; pos < st.size; ) {
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
      await corruptRecord(s, st); // the client is cut short
      return;
    }
    res.end();
  } catch (err) {
    if (!(err instanceof StoreUnavailable)) throw err;
    if (storeUnavailable(s, err)) await synth(s);
  } finally {
    body.close();
  }
}

/**
 * The head of a stored response for this request, or undefined when answered here already: 304 (the
 * client's own validators match) or 416. A single byte range of a complete 200 comes back as `range`
 * (RFC 9110 §14).
 */
function storedAnswer(s: State, st: StoredObject): { headers: OutgoingHttpHeaders; range: { start: number; end: number } | undefined } | undefined {
  const { res, tx } = s;
  const headers = hitHeaders(s.ctx, tx, st);
  if (res.destroyed) return undefined;
  if (conditionMatches(s.req.headers, st.meta.status, st.meta.headers)) {
    tx.status = 304;
    res.writeHead(304, notModifiedHeaders(headers));
    res.end();
    return undefined;
  }
  const range = st.meta.status === 200 && tx.method === 'GET' ? byteRange(s.req.headers, st) : undefined;
  if (range === 'unsatisfiable') {
    tx.status = 416;
    res.writeHead(416, { ...notModifiedHeaders(headers), 'content-range': `bytes */${st.size}`, 'content-length': '0' });
    res.end();
    return undefined;
  }
  return { headers, range };
}

/** A stored response's head as a hit sends it, its status and type noted in the transaction. */
function hitHeaders(ctx: Ctx, tx: Transaction, st: StoredObject): OutgoingHttpHeaders {
  noteStored(tx, st);
  return storedHitHead(ctx, st, hitAge(st));
}

function noteStored(tx: Transaction, st: StoredObject): void {
  tx.status = st.meta.status;
  tx.mime = String(st.meta.headers['content-type'] ?? '');
}

/** A stored response's current Age, as a hit's head says it. */
export function hitAge(st: StoredObject): string {
  return String(Math.floor(st.policy.age()));
}

/** The head fields a hit on `st` sends (node:http adds Date, when the response has none, and Connection). */
export function storedHitHead(ctx: Pick<Ctx, 'cfg'>, st: StoredObject, age: string): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = { ...sharedHead(st.meta, ctx.cfg.visibleHostname, 'HIT'), age };
  if (st.meta.status !== 204 && st.meta.status !== 304) headers['content-length'] = String(st.size);
  return headers;
}

/** Whether a hit on `st` answering `method` sends its body. */
export function hasBody(method: string, st: StoredObject): boolean {
  return method !== 'HEAD' && st.meta.status !== 204 && st.meta.status !== 304;
}

function sendPart(s: State, st: StoredObject, headers: OutgoingHttpHeaders, range: { start: number; end: number }, whole: Buffer): void {
  const part = whole.subarray(range.start, range.end + 1);
  s.tx.status = 206;
  s.tx.bytesOut += part.length;
  s.res.writeHead(206, { ...headers, 'content-range': `bytes ${range.start}-${range.end}/${st.size}`, 'content-length': String(part.length) });
  s.res.end(part);
}

/**
 * May a stale stored copy be served because the upstream can't be reached (RFC 9111 §4.2.4)? Not when
 * the response forbids it (must-revalidate, proxy-revalidate, s-maxage, no-cache), and no staler than
 * the least of --max-stale, the response's stale-if-error, and the client's max-stale or stale-if-error.
 */
export function mayServeStale(st: StoredObject, reqHeaders: IncomingMessage['headers'], maxStaleMs: number): boolean {
  const res = directives(st.meta.headers['cache-control']);
  if (forbidsStale(res) || res.has('no-store')) return false;
  const req = directives(reqHeaders['cache-control']);
  let limitS = maxStaleMs / 1000;
  for (const v of [res.get('stale-if-error'), req.get('max-stale'), req.get('stale-if-error')]) {
    if (v === undefined || v === '') continue; // `max-stale` without a value: any staleness
    const n = Number(v);
    limitS = Math.min(limitS, Number.isFinite(n) && n >= 0 ? n : 0);
  }
  return staleness(st.policy) <= limitS;
}

/**
 * May a stored response answer this request without revalidation, given the request's own
 * directives (RFC 9111 §4.2, §5.2.1)? The key already pins URL, host and Vary. (The library's own check
 * refuses every must-revalidate response, fresh or not.)
 */
function satisfies(st: StoredObject, reqHeaders: IncomingMessage['headers']): boolean {
  const req = directives(reqHeaders['cache-control']);
  const age = st.policy.age();
  const freshFor = -staleness(st.policy);
  const num = (k: string) => Number(req.get(k));
  if (req.has('max-age') && !(age <= num('max-age'))) return false;
  if (req.has('min-fresh') && !(freshFor >= num('min-fresh'))) return false;
  if (freshFor > 0) return true;
  if (!req.has('max-stale')) return false;
  if (forbidsStale(directives(st.meta.headers['cache-control']))) return false;
  return req.get('max-stale') === '' || -freshFor <= num('max-stale');
}

/** Look the stale copy up again after a failed refresh; keep it in s.stored if it may be served. */
async function findStale(s: State): Promise<boolean> {
  const st = await s.ctx.store.get(s.key!).catch(() => undefined);
  if (!st) return false;
  if (!mayServeStale(st, s.req.headers, s.ctx.cfg.maxStaleMs)) {
    closeStored(st);
    return false;
  }
  s.ctx.coalescer.noteRefreshFailed(s.key!);
  s.stored = st;
  return true;
}

async function serveStale(s: State): Promise<undefined> {
  const { ctx, tx } = s;
  tx.result = 'TCP_REFRESH_FAIL_OLD';
  tx.coalesced = false;
  ctx.counters.staleServed++;
  await deliverStored(s, s.stored!);
  return undefined;
}

async function pass(s: State): Promise<StepName | undefined> {
  const { ctx, req, res, tx } = s;
  if (ctx.counters.passesInFlight >= ctx.cfg.maxPasses) return fail(s, 'ERR_OVERLOADED', 'too many uncached requests in flight');
  tx.served = 'pass';
  ctx.counters.passesInFlight++;
  if (tx.result === 'NONE') tx.result = 'TCP_MISS';
  const url = s.url!;
  const hasBody = req.headers['content-length'] !== undefined ? req.headers['content-length'] !== '0' : req.headers['transfer-encoding'] !== undefined;
  const ac = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) ac.abort();
  };
  res.once('close', onClose);
  try {
    let up;
    try {
      up = await ctx.upstream.request({
        url,
        method: tx.method,
        headers: upstreamRequestHeaders(req.headers, url, tx.client, ctx.cfg.visibleHostname),
        body: hasBody ? req : null,
        signal: ac.signal,
      });
    } catch (err) {
      s.error = upstreamError(err);
      return 'synth';
    }
    tx.hierarchy = 'HIER_DIRECT';
    tx.peer = up.peer;
    tx.status = up.status;
    tx.mime = String(up.headers['content-type'] ?? '');
    // RFC 9111 §4.4: a successful unsafe request invalidates the stored URL: that URL's own key, never
    // the host-independent key of immutable content-addressed bytes (that would be an open PURGE).
    if (!SAFE.has(tx.method) && up.status < 400) for (const k of urlKeys(s, urlKey(url))) await forget(ctx, k);
    if (res.destroyed) {
      discard(up.body);
      return undefined;
    }
    res.writeHead(up.status, clientResponseHeaders(up.status, up.headers, ctx.cfg.visibleHostname, 'MISS'));
    if (tx.method === 'HEAD' || up.status === 204 || up.status === 304) {
      // No body, whatever Content-Length came with it.
      discard(up.body);
      res.end();
      return undefined;
    }
    const ok = await new Promise<boolean>((resolve) => {
      up.body.on('data', (c: Buffer) => {
        tx.bytesOut += c.length;
        ctx.upstream.bytes += c.length;
        if (!res.write(c)) {
          up.body.pause();
          res.once('drain', () => up.body.resume());
        }
      });
      up.body.once('end', () => resolve(true));
      up.body.once('error', () => resolve(false));
      res.once('close', () => resolve(res.writableFinished));
    });
    if (ok) res.end();
    else {
      if (!res.destroyed) ctx.counters.truncated++;
      tx.aborted = true;
      discard(up.body);
      res.destroy();
    }
    return undefined;
  } finally {
    res.off('close', onClose);
    ctx.counters.passesInFlight--;
  }
}

/** The keys a URL may be stored under: its primary key and the requester's Vary variant. */
function urlKeys(s: State, primary: string): Set<string> {
  const vary = s.ctx.coalescer.varySpecs.get(primary) ?? [];
  return new Set([primary, variantKey(primary, vary, s.req.headers)]);
}

/** Drop a key from the tiers and from the fills that new requests could join. */
async function forget(ctx: Ctx, key: string): Promise<void> {
  ctx.coalescer.invalidate(key);
  await ctx.store.delete(key);
}

async function purge(s: State): Promise<StepName | undefined> {
  const { ctx, tx } = s;
  if (!ctx.acl().allowsPurge(tx.client)) return fail(s, 'ERR_PURGE_DENIED', tx.client);
  let found = false;
  // PURGE is the admin's (--allow-purge): through a mirror it reaches the host-independent key too.
  const primary = s.cas && s.ctx.mirrors.byHost(s.url!.host) ? s.cas.key : urlKey(s.url!);
  for (const k of urlKeys(s, primary)) {
    const st = await ctx.store.get(k).catch(() => undefined);
    if (st) {
      found = true;
      closeStored(st);
    }
    await forget(ctx, k);
  }
  reply(s, found ? 200 : 404, { 'content-length': '0' }, '');
  return undefined;
}

async function synth(s: State): Promise<undefined> {
  const err = s.error ?? new ProxyError('ERR_INTERNAL');
  const { ctx, tx } = s;
  tx.status = err.status;
  if (err.status === 403) {
    tx.result = 'TCP_DENIED';
  } else {
    if (tx.result === 'NONE') tx.result = 'TCP_MISS';
  }
  tx.mime = 'text/plain';
  // The request body, if any, is not wanted; let the connection be reused where possible.
  s.req.resume();
  if (!s.res.destroyed) tx.bytesOut += sendError(s.res, err, ctx.cfg.visibleHostname);
  return undefined;
}

function reply(s: State, status: number, headers: Record<string, string>, body: string): void {
  s.tx.status = status;
  s.tx.result = 'TCP_MISS';
  s.tx.bytesOut += Buffer.byteLength(body);
  s.req.resume();
  s.res.writeHead(status, { ...headers, via: `1.1 ${s.ctx.cfg.visibleHostname}` });
  s.res.end(body);
}

const BURST_BYTES = 1024 * 1024;
/** What a fill's reader may queue for its socket beyond the kernel's buffer before it waits for `drain`. */
const QUEUE_BYTES = 128 * 1024;

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

function drained(res: ServerResponse): Promise<void> {
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

/** A finished transaction goes to the access log and to the counters and metrics, at one instant. */
export function recordTransaction(ctx: Pick<Ctx, 'accessLog' | 'metrics' | 'clock'>, tx: Transaction, errorToken: string | undefined): void {
  const now = ctx.clock.now();
  ctx.accessLog.write(tx, now);
  ctx.metrics.observe(tx, errorToken, now);
}

function finish(s: State): void {
  const { ctx, tx } = s;
  const record = () => recordTransaction(ctx, tx, s.error?.token);
  // Ended and all handed to the kernel is finished: 'finish' itself comes a tick later, and waiting for
  // it cost a listener per hit.
  const handedOver = s.res.writableFinished || (s.res.writableEnded && s.res.writableLength === 0);
  if (!handedOver && !s.res.destroyed) {
    // Response still streaming out of the socket buffers: log when it ends.
    s.res.once('close', () => {
      if (!s.res.writableFinished) tx.aborted = true;
      record();
    });
    return;
  }
  record();
}
