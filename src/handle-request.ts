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
// Each step is a named function returning the next step. The steps decide; deliver.ts writes the
// answer (stored object, disk record or fill, with its head, 304/416 and range), pass.ts forwards what is
// not cached, freshness.ts holds the storable and stale rules. (A plain fresh memory hit on a connection
// still in the hit lane is answered before any of this: hit-lane.ts, with plainLaneRequest below.)
import { SLICE_BYTES } from './pacer.ts';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import { localHint, plainAddress } from './acl.ts';
import { newTransaction, recordTransaction } from './access-log.ts';
import { isBackground, type BackgroundAnswer } from './background.ts';
import { parseTarget, urlKey, variantKey } from './cache-key.ts';
import type { Coalescer } from './coalescer.ts';
import type { Ctx } from './context.ts';
import { deliverStored, dropCorrupt, noteStored, rangeSpec, streamFill, type Delivery } from './deliver.ts';
import { internalError, ProxyError } from './errors.ts';
import { clientWantsReload, hasValidators, isFresh, mayServeStale, onlyIfCached, satisfies, withinRevalidateWindow } from './freshness.ts';
import { forwardInterim, isLoop, relayedHeaders, sendError, upstreamRequestHeaders } from './forward.ts';
import { ownerRoute, RELAY_HEADER, type Route, type Sender } from './hierarchy.ts';
import type { Interim } from './fetch.ts';
import type { FillReader } from './fill.ts';
import { repoOf, type CasObject } from './content-hash.ts';
import type { LaneHit, LaneJoin } from './hit-lane.ts';
import { fillRefusal, refuse, type RefusalReason } from './overload.ts';
import { passUpstream } from './pass.ts';
import { headBytesOf } from './response-sink.ts';
import { StoreUnavailable, type StoredObject } from './store.ts';

type StepName = 'recv' | 'lookup' | 'hit' | 'stale' | 'busy' | 'miss' | 'pass' | 'cachedOnly' | 'purge' | 'deliverFill' | 'serveStale' | 'revalidateInBackground' | 'synth';

interface State extends Delivery {
  ctx: Ctx;
  /** node:http's request and response; a hit-lane join has none (it never reaches recv, pass or purge). */
  node?: { req: IncomingMessage; res: ServerResponse };
  url?: URL;
  primary?: string;
  key?: string;
  vary?: string[];
  stored?: StoredObject;
  fill?: FillReader;
  /** Set when this request started the fill: its reader id (it keeps a response that is not shared). */
  readerId?: number;
  error?: ProxyError;
  /** Never answered by a stored copy or a fill begun before it: a client reload, or credentials. */
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
  /** This request looked again after a fill of its key ended during its disk read (once). */
  lookedAgain?: boolean;
  /** Relayed by another worker of this process (--workers): fetched here, never relayed again. */
  relay?: boolean;
  /** A background request that the gate let go (background.ts): it is not held twice. */
  roomMade?: boolean;
}

const CACHEABLE = new Set(['GET', 'HEAD']);
const CLIENT_CONDITIONS = ['if-none-match', 'if-modified-since', 'if-match', 'if-unmodified-since', 'if-range', 'range'];

export function handleRequest(ctx: Ctx, req: IncomingMessage, res: ServerResponse, accel = false): void | Promise<void> {
  const tx = newTransaction({ startedAt: ctx.clock.now(), client: plainAddress(req.socket.remoteAddress ?? '-'), method: req.method ?? '-', url: req.url ?? '-', headers: req.headers, httpVersion: req.httpVersion });
  ctx.open.set(tx, res);
  if (isBackground(req.headers)) ctx.background.inFlight.add(tx);
  return run({ ctx, res, tx, reqHeaders: req.headers, node: { req, res }, accel }, 'recv');
}

/** A transaction leaves the requests in flight (open, and the background ones the gate leaves out). */
function closeOpen(ctx: Ctx, tx: State['tx']): void {
  ctx.open.delete(tx);
  ctx.background.inFlight.delete(tx);
}

/**
 * Run the steps from `step`. Steps that finish at once return the next step itself, so a memory hit
 * runs from request to response without a promise; the first step that must wait continues from here
 * when it settles.
 */
function run(s: State, step: Next): void | Promise<void> {
  try {
    while (step) {
      if (s.lane && step !== 'busy' && step !== 'deliverFill' && step !== 'synth' && step !== 'hit') {
        s.handedOff = true;
        closeOpen(s.ctx, s.tx); // node:http answers it afresh, under its own transaction
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
  cachedOnly,
  purge,
  deliverFill,
  serveStale,
  revalidateInBackground,
  synth,
};

function fail(s: State, err: ProxyError | ProxyError['code'], detail?: string): StepName {
  s.error = err instanceof ProxyError ? err : new ProxyError(err, detail);
  return 'synth';
}

/** node:http's request and response: only a request that came through node:http reaches recv, pass and purge. */
function nodeOf(s: State): NonNullable<State['node']> {
  if (!s.node) throw new Error(`a hit-lane request reached a node:http step (${s.tx.url})`);
  return s.node;
}

function recv(s: State): Next {
  const { ctx, reqHeaders, tx } = s;
  const req = nodeOf(s).req;
  // Another worker's relay carries the process's secret: its client was checked there.
  s.relay = tx.relay = ctx.hierarchy.isRelay(reqHeaders[RELAY_HEADER]);
  if (!s.relay && !ctx.acl().allowsClient(tx.client)) return fail(s, 'ERR_CLIENT_DENIED', tx.client);
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
  // A relay carries its worker's Via entry, which is this process's own name.
  if (!s.relay && isLoop(reqHeaders, ctx.cfg.visibleHostname)) return fail(s, 'ERR_LOOP');
  const port = Number(url.port || 80);
  const verdict = ctx.acl().checkDestination(url.hostname, port);
  if (verdict === 'deny-port') return fail(s, 'ERR_PORT_DENIED', String(port));
  if (verdict === 'deny-dest') return fail(s, 'ERR_DEST_DENIED', url.hostname);
  if (verdict === 'deny-local') return fail(s, 'ERR_DEST_DENIED', localHint(url.hostname.replace(/^\[|\]$/g, ''), port));
  const method = tx.method;
  if (method === 'PURGE') return 'purge';
  // RFC 9110 §7.6.2: Max-Forwards 0 on TRACE/OPTIONS is answered here.
  if ((method === 'OPTIONS' || method === 'TRACE') && reqHeaders['max-forwards'] !== undefined) {
    const mf = Number(reqHeaders['max-forwards']);
    if (mf === 0) {
      const body = method === 'TRACE' ? `${method} ${tx.url} HTTP/1.1\r\n${Object.entries(reqHeaders).map(([k, v]) => `${k}: ${v}`).join('\r\n')}\r\n\r\n` : '';
      reply(s, 200, { allow: 'GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE', 'content-type': method === 'TRACE' ? 'message/http' : 'text/plain', 'content-length': String(Buffer.byteLength(body)) }, body);
      return undefined;
    }
    if (Number.isInteger(mf) && mf > 0) reqHeaders['max-forwards'] = String(mf - 1);
  }
  if (!CACHEABLE.has(method)) return 'pass';
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
  s.key = variantKey(primary, s.vary, s.reqHeaders);
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
    tx.lane = 'hit';
    // A body past one slice is paced (pacer.ts) when this turn's budget can't take it whole: answered
    // like a join, by the hit step, and the lane reads the connection again once it has left. Else the
    // lane writes it whole, as any hit, and the turn's budget is charged.
    const bytes = method === 'GET' && st.body.kind === 'buffer' ? st.body.data.length : 0;
    if (bytes > SLICE_BYTES && ctx.pacer.wouldWait(bytes)) return (res) => runInLane({ ...laneState(ctx, res, headers, tx, p), stored: st }, 'hit', true);
    ctx.pacer.charge(bytes);
    tx.result = 'TCP_MEM_HIT';
    noteStored(tx, st);
    return { tx, st };
  }
  if (method !== 'GET') return undefined;
  const fill = ctx.coalescer.joinable(p.primary);
  if (!fill?.nothingStored) return undefined;
  const o = fill.outcome;
  if (o && !(o.kind === 'response' && o.shared && fill.state === 'streaming')) return undefined;
  const tx = newTransaction({ startedAt: ctx.clock.now(), client, method, url: p.url.href, headers, httpVersion: '1.1' });
  tx.lane = 'join';
  return (res) => runInLane(laneState(ctx, res, headers, tx, p), 'busy', false);
}

/** A lane request's state: of the request, its steps read its headers alone (no node:http request or response). */
function laneState(ctx: Ctx, res: State['res'], headers: IncomingHttpHeaders, tx: State['tx'], p: NonNullable<ReturnType<typeof plainTarget>>): State {
  ctx.open.set(tx, res);
  return { ctx, res, reqHeaders: headers, tx, accel: false, lane: true, url: p.url, primary: p.primary, key: p.primary, vary: [], cas: p.cas, staleAvailable: false };
}

/**
 * Answer a lane request from `step`: 'handoff' if it reached a step only node:http runs. With
 * `untilSent`, the lane reads on only once the answer has left, so the next one (and its log line)
 * follows it. (A herd parks thousands of these at once: what they hold is kept small, no frame of their
 * own: promise chains, not an async function.)
 */
function runInLane(s: State, step: StepName, untilSent: boolean): Promise<'done' | 'handoff'> {
  const ran = Promise.resolve(run(s, step));
  const sent = untilSent ? ran.then(() => new Promise<void>((over) => s.res.once('close', over))) : ran;
  return sent.then(() => (s.handedOff ? 'handoff' : 'done'));
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
  const { ctx, reqHeaders, tx } = s;
  const key = s.key!;
  s.staleAvailable = false;
  // A request with credentials gets its own answer, as a reload does. Its response is kept for the
  // others only where RFC 9111 §3.5 lets a shared cache (public, s-maxage, must-revalidate: the policy
  // decides); else it is released to this client alone, and the key stays cacheable.
  const credentials = reqHeaders.authorization !== undefined;
  s.reload = credentials || clientWantsReload(reqHeaders);
  // only-if-cached beside what forbids a stored copy (credentials, no-cache): nothing may answer it.
  if (s.reload && onlyIfCached(reqHeaders)) return fail(s, 'ERR_ONLY_IF_CACHED_MISS', credentials ? 'a request with credentials never gets a stored copy' : 'it also said no-cache');
  if (s.reload) {
    // Never satisfied by, nor joined to, a copy or fill that began before this request arrived.
    tx.result = credentials ? 'TCP_MISS' : 'TCP_CLIENT_REFRESH_MISS';
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
  const plain = plainRequest(reqHeaders);
  if (plain) {
    const held = ctx.coalescer.heldBody(key);
    const policy = held?.outcome?.kind === 'response' ? held.outcome.policy : undefined;
    if (held && policy && isFresh(policy)) {
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
  // A fill of the key that ends while the disk is read moves its object to memory, or to a record
  // this read may have missed, and leaves the fill table: then neither would be found, and the request
  // would fetch again what was just fetched. It looks once more instead.
  const fillBefore = ctx.coalescer.joinable(key);
  const looked = ctx.store.getFromDisk(key).then(
    (stored): StepName => {
      if (!stored && fillBefore && !s.lookedAgain && ctx.coalescer.joinable(key) !== fillBefore) {
        s.lookedAgain = true;
        return 'lookup';
      }
      return lookedUp(s, stored);
    },
    (err: unknown) => {
      if (err instanceof StoreUnavailable) return unavailable(s, err);
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
  const { ctx, reqHeaders, tx } = s;
  const key = s.key!;
  if (stored) {
    // Without request directives, freshness is the stored timeline alone (the key already pins URL,
    // host and Vary); with them, the full RFC 9111 check.
    if (noDirectives(reqHeaders) ? isFresh(stored.policy) : satisfies(stored.policy, stored.meta.headers, reqHeaders)) {
      s.stored = stored;
      return stored.tier === 'disk' && noConditions(reqHeaders) ? sharedDiskHit(s, stored) : 'hit';
    }
    s.staleAvailable = true;
  }
  if (onlyIfCached(reqHeaders)) {
    closeStored(stored);
    // A fill that has its whole response is a stored response in all but name; one under way is not.
    return ctx.coalescer.joinable(key)?.state === 'done' ? 'busy' : 'cachedOnly';
  }
  if (stored) {
    // The upstream failed a refresh of this key moments ago: serve the stale copy without asking
    // again, so a herd polling an expired manifest costs one attempt per --stale-retry, not one each.
    if (ctx.coalescer.refreshFailedRecently(key) && mayServeStale(stored.policy, stored.meta.headers, reqHeaders, ctx.cfg.maxStaleMs)) {
      s.stored = stored;
      return 'serveStale';
    }
    if (tx.method === 'GET' && withinRevalidateWindow(stored.policy, stored.meta.headers, reqHeaders)) {
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
  const spec = rangeSpec(reqHeaders);
  const rangeFirst = spec && 'first' in spec ? spec.first : undefined;
  const fillForRange = rangeFirst !== undefined && rangeFirst <= ctx.cfg.rangeOffsetLimitBytes && !stored;
  if ((reqHeaders.range !== undefined && !fillForRange) || /(^|,)\s*no-store\b/i.test(String(reqHeaders['cache-control'] ?? ''))) {
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

function hit(s: State): Next | Promise<Next> {
  const st = s.stored!;
  s.tx.result = st.tier === 'memory' ? 'TCP_MEM_HIT' : 'TCP_HIT';
  return serve(s, st);
}

/**
 * Deliver a stored response (deliver.ts): a memory hit without a promise; a record that can't be read
 * now is answered 503 by synth, and stays stored.
 */
function serve(s: State, st: StoredObject): Next | Promise<Next> {
  return deliverStored(s, st)?.then((err) => (err ? unavailable(s, err) : undefined));
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

function miss(s: State): StepName | Promise<StepName | undefined> {
  const { ctx, reqHeaders, tx } = s;
  // Another request may have started this key's fill while this one looked in the store: join it.
  // (From here to start() nothing awaits, so a herd can't start two fills for one key.)
  if (!s.reload && ctx.coalescer.joinable(s.key!)) {
    closeStored(s.stored);
    s.stored = undefined;
    return 'busy';
  }
  // A background request's fill yields to clients (background.ts): it waits while the loop is busy.
  if (!s.roomMade && isBackground(reqHeaders)) {
    const room = admitBackground(s);
    if (room !== 'go') return waitForRoom(s, room);
  }
  // A new fill is admitted only while it can be served at speed (overload.ts); a join or a hit never gets here.
  const refused = newFillRefusal(ctx);
  if (refused) {
    closeStored(s.stored);
    return fail(s, refuse(ctx.counters, refused));
  }
  s.tx.served = 'miss';
  if (tx.result === 'NONE') tx.result = 'TCP_MISS';
  const stale = s.stored;
  s.stored = undefined;
  const started = startFill(s, stale, true);
  s.fill = started.fill;
  s.readerId = started.readerId;
  closeStored(stale);
  return 'deliverFill';
}

/**
 * A background request waits for the loop to have room, then looks again (in the meantime a client may
 * have fetched its key); or, after --background-wait (or at once, the queue full), is refused so that
 * cuttle warm asks again later.
 */
async function waitForRoom(s: State, room: BackgroundAnswer | Promise<BackgroundAnswer>): Promise<StepName | undefined> {
  const { ctx } = s;
  closeStored(s.stored);
  s.stored = undefined;
  if ((await room) === 'refused') return fail(s, refuse(ctx.counters, 'background'));
  // Its client left while it waited (the gate let its place go then): no fill for nobody.
  if (s.node?.req.socket.destroyed) {
    s.tx.aborted = true;
    return undefined;
  }
  s.roomMade = true;
  return 'lookup';
}

/** The gate's answer for a background request: a client that leaves while it waits gives up its place. */
function admitBackground(s: State): BackgroundAnswer | Promise<BackgroundAnswer> {
  const sock = s.node?.req.socket;
  const gone = new AbortController();
  const onClose = () => gone.abort();
  sock?.once('close', onClose);
  const room = s.ctx.background.admit(performance.now(), gone.signal);
  if (!(room instanceof Promise)) {
    sock?.off('close', onClose);
    return room;
  }
  return room.finally(() => sock?.off('close', onClose));
}

/** Why a new fill may not start now (overload.ts), if it may not. */
function newFillRefusal(ctx: Ctx): RefusalReason | undefined {
  const { budget, inFlight, running } = ctx.coalescer;
  return fillRefusal({ inFlight, maxFills: ctx.cfg.maxFills, usedBytes: budget.usedBytes, limitBytes: budget.limitBytes, windowsBytes: running * ctx.cfg.fillWindowBytes, lagging: ctx.loopLag.lagging });
}

/**
 * Start this request's key's fill (revalidating `stale` if it has validators). `waits`: this client
 * waits for the fill's answer, so upstream interim responses (1xx) go to it.
 */
function startFill(s: State, stale: StoredObject | undefined, waits: boolean): ReturnType<Coalescer['start']> {
  const { ctx, reqHeaders, tx } = s;
  // A relay's headers already carry this process's Via entry and the client's address.
  const upstreamHeaders = s.relay ? relayedHeaders(reqHeaders, s.url!) : upstreamRequestHeaders(reqHeaders, s.url!, tx.client, ctx.cfg.visibleHostname);
  // The fill is for everyone: it asks for the whole object, never this client's conditions, and at the
  // default urgency: a client that joins a fill a background request began must not wait behind a
  // worker, bank member or parent that holds background fills (background.ts).
  for (const h of CLIENT_CONDITIONS) delete upstreamHeaders[h];
  delete upstreamHeaders.priority;
  return ctx.coalescer.start({
    key: s.key!,
    primary: s.primary!,
    url: s.url!,
    vary: s.vary!,
    clientHeaders: reqHeaders,
    upstreamHeaders,
    stale: stale && hasValidators(stale.meta.headers) ? stale : undefined,
    nothingStored: !s.reload && stale === undefined,
    cas: s.cas,
    accelRepo: s.accelRepo,
    from: senderOf(s),
    onInfo: waits && s.node ? interimTo(s.node) : undefined,
  });
}

/** Who sent this request: another worker (a relay), a member of this bank, or a client. */
function senderOf(s: State): Sender {
  return s.relay ? 'worker' : s.ctx.hierarchy.fromBank(s.tx.client, s.reqHeaders.via) ? 'bank' : 'client';
}

function interimTo({ req, res }: NonNullable<State['node']>): Interim {
  return (status, headers) => forwardInterim(res, req.httpVersion, status, headers);
}

function revalidateInBackground(s: State): Next | Promise<Next> {
  const { ctx, tx } = s;
  // A background request's refresh yields as its fills do: while the loop is busy, the copy alone.
  const yields = isBackground(s.reqHeaders) && ctx.background.busy;
  if (!yields && !ctx.coalescer.joinable(s.key!) && !newFillRefusal(ctx)) {
    const bg = startFill(s, s.stored, false);
    bg.fill.removeReader(bg.readerId); // nobody waits on it
  }
  tx.result = 'TCP_STALE_HIT';
  return serve(s, s.stored!);
}

async function deliverFill(s: State): Promise<StepName | undefined> {
  const { ctx, res, tx } = s;
  const fill = s.fill!;
  const starter = s.readerId !== undefined;
  const id = s.readerId ?? fill.addReader();
  s.readerId = undefined;
  try {
    const outcome = fill.outcome ?? (await fill.published());
    // A stored object served through a fill (a finished one, or a shared read of its disk record).
    const isHit = tx.result === 'TCP_MEM_HIT' || tx.result === 'TCP_HIT';
    if (!isHit) {
      tx.hierarchy = fill.hierarchy;
      tx.peer = fill.peer || s.url!.hostname;
    }
    switch (outcome.kind) {
      case 'failed':
        // Accelerator mode: a sticky mirror that failed is replaced before anything else is decided.
        if (retryOnNextMirror(s)) return 'lookup';
        // The upstream is down and a stale copy is here: RFC 9111 §4.2.4.
        if (s.staleAvailable && (await findStale(s))) return 'serveStale';
        s.error = outcome.error;
        return 'synth';
      case 'notModified': {
        let st;
        try {
          st = await ctx.store.get(s.key!);
        } catch (err) {
          if (err instanceof StoreUnavailable) return unavailable(s, err);
          throw err;
        }
        if (!st) return 'miss';
        tx.result = 'TCP_REFRESH_UNMODIFIED';
        return await serve(s, st);
      }
      case 'response': {
        // The upstream answered 5xx and a stale copy is here: RFC 9111 §4.2.4.
        if (s.staleAvailable && outcome.head.status >= 500 && (await findStale(s))) return 'serveStale';
        if (!outcome.shared && !starter) {
          tx.coalesced = false;
          return 'pass'; // the response was not shareable: fetch on our own
        }
        // A response that varies goes only to requests of its own variant; another looks up again (now
        // keyed with the response's Vary) and gets its own.
        const v = outcome.variant;
        if (v && variantKey(s.primary!, v.names, s.reqHeaders) !== v.key) {
          s.fill = undefined;
          setKey(s, s.primary!);
          tx.coalesced = false;
          return 'lookup';
        }
        await streamFill(s, fill, outcome, id, { starter, isHit, ranged: !s.cas });
        return undefined;
      }
    }
  } finally {
    fill.removeReader(id);
  }
}

/**
 * A stored record that can't be read now (EMFILE, EIO), found before anything was written: this request
 * is answered 503; the record stays for the next one.
 */
function unavailable(s: State, err: StoreUnavailable): 'synth' {
  s.ctx.log.warn({ err, key: s.key }, 'stored record unreadable now; kept, the request answered 503');
  s.error = new ProxyError('ERR_STORE_UNAVAILABLE', err.message, { cause: err });
  return 'synth';
}

/** Look the stale copy up again after a failed refresh; keep it in s.stored if it may be served. */
async function findStale(s: State): Promise<boolean> {
  const st = await s.ctx.store.get(s.key!).catch(() => undefined);
  if (!st) return false;
  if (!mayServeStale(st.policy, st.meta.headers, s.reqHeaders, s.ctx.cfg.maxStaleMs)) {
    closeStored(st);
    return false;
  }
  s.ctx.coalescer.noteRefreshFailed(s.key!);
  s.stored = st;
  return true;
}

function serveStale(s: State): Next | Promise<Next> {
  const { ctx, tx } = s;
  tx.result = 'TCP_REFRESH_FAIL_OLD';
  tx.coalesced = false;
  ctx.counters.staleServed++;
  return serve(s, s.stored!);
}

function pass(s: State): Promise<StepName | undefined> | StepName {
  return onlyIfCached(s.reqHeaders) ? 'cachedOnly' : forwardUncached(s, s.ctx.hierarchy.passRoutes(s.url!));
}

/**
 * only-if-cached, and nothing stored here satisfies it: with --workers or a bank, the key's owner may
 * hold it, and is asked with the same directive; nobody else is (RFC 9111 §5.2.1.7: a stored
 * response or a 504, never a request to the origin).
 */
function cachedOnly(s: State): Promise<StepName | undefined> | StepName {
  const owners = s.key === undefined ? [] : s.ctx.hierarchy.routes(s.url!, s.cas, senderOf(s), s.primary!).filter(ownerRoute);
  if (owners.length === 0) return fail(s, 'ERR_ONLY_IF_CACHED_MISS');
  return forwardUncached(s, owners);
}

/** Forward the request for this client alone, over the routes given (pass.ts). */
async function forwardUncached(s: State, routes: Route[]): Promise<StepName | undefined> {
  const { ctx, tx } = s;
  const { req, res } = nodeOf(s);
  if (ctx.counters.passesInFlight >= ctx.cfg.maxPasses) return fail(s, refuse(ctx.counters, 'passes'));
  tx.served = 'pass';
  ctx.counters.passesInFlight++;
  if (tx.result === 'NONE') tx.result = 'TCP_MISS';
  const url = s.url!;
  try {
    // The URL's own key, never the host-independent key of immutable content-addressed bytes (that
    // would be an open PURGE).
    const failed = await passUpstream(ctx, req, res, tx, url, routes, async () => {
      for (const k of urlKeys(s, urlKey(url))) await forget(ctx, k);
    });
    if (!failed) return undefined;
    if (failed.code === 'ERR_INTERNAL') throw failed; // cuttle's own: logged as one, answered 500
    s.error = failed;
    return 'synth';
  } finally {
    ctx.counters.passesInFlight--;
  }
}

/** The keys a URL may be stored under: its primary key and the requester's Vary variant. */
function urlKeys(s: State, primary: string): Set<string> {
  const vary = s.ctx.coalescer.varySpecs.get(primary) ?? [];
  return new Set([primary, variantKey(primary, vary, s.reqHeaders)]);
}

/**
 * Drop a key from the tiers and from the fills that new requests could join, here and (--workers) in
 * every other worker before this returns. True when another worker held a copy.
 */
async function forget(ctx: Ctx, key: string): Promise<boolean> {
  ctx.coalescer.invalidate(key);
  await ctx.coalescer.commitsLanded(key); // a record still landing is gone before the answer
  await ctx.store.delete(key);
  return (await ctx.forgotten?.(key)) ?? false;
}

async function purge(s: State): Promise<StepName | undefined> {
  const { ctx, tx } = s;
  if (!ctx.acl().allowsPurge(tx.client)) return fail(s, 'ERR_PURGE_DENIED', tx.client);
  let found = false;
  // PURGE is the admin's (--allow-purge): through a mirror it reaches the host-independent key too.
  const primary = s.cas && s.ctx.mirrors.byHost(s.url!.host) ? s.cas.key : urlKey(s.url!);
  for (const k of urlKeys(s, primary)) {
    // A record that can't be opened now (EMFILE) is still there: it is purged all the same.
    const st = await ctx.store.get(k).catch((err: unknown) => (err instanceof StoreUnavailable ? ('unreadable' as const) : undefined));
    if (st) {
      found = true;
      if (st !== 'unreadable') closeStored(st);
    }
    // With --workers, the owner's record may land a moment after this worker has served its answer.
    if (await forget(ctx, k)) found = true;
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
  s.node?.req.resume();
  if (!s.res.destroyed) tx.bytesOut += sendError(s.res, err, ctx.cfg.visibleHostname);
  return undefined;
}

function reply(s: State, status: number, headers: Record<string, string>, body: string): void {
  s.tx.status = status;
  s.tx.result = 'TCP_MISS';
  s.tx.bytesOut += Buffer.byteLength(body);
  s.node?.req.resume();
  s.res.writeHead(status, { ...headers, via: `1.1 ${s.ctx.cfg.visibleHostname}` });
  s.res.end(body);
}

/**
 * Log the requests a shutdown cut, as it closes the access log: their connections' 'close' events, and
 * so their own lines, would come after it. Each one's line now, cut short unless its answer had all
 * left; the request path or the lane, when it gets there, writes no second line.
 */
export function logCutRequests(ctx: Ctx): void {
  for (const [tx, res] of ctx.open) {
    closeOpen(ctx, tx);
    if (!res?.writableFinished) tx.aborted = true;
    if (res) tx.headBytes = headBytesOf(res);
    recordTransaction(ctx, tx, undefined);
  }
}

function finish(s: State): void {
  const { ctx, tx } = s;
  const record = () => {
    closeOpen(ctx, tx);
    tx.headBytes = headBytesOf(s.res);
    recordTransaction(ctx, tx, s.error?.token);
  };
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
