// The fetch path: one fill's upstream fetch as named steps over one state record (Varnish's
// cache_fetch.c). Each step is a function that returns the next one:
//
//   mkbereq ─▶ startfetch ──no answer───────────────────────────────────────▶ error ─▶ done
//                 │ 304 to a revalidation ─▶ condfetch ─unmodified─▶ done   (stored headers refreshed)
//                 ▼                               └─modified─┐
//               decide ◀─────────────────────────────────────┘
//                 │  stored | shared, not stored (a small content-addressed error answer)
//                 │  not shared: released, the first client keeps it, the rest fetch on their own
//                 ▼
//               fetchbody ──broke off──▶ resume (Range, next mirror) ──▶ fetchbody
//                 │                         └─nothing left to ask──▶ fail ─▶ done
//                 ▼
//               fetchend ──hash mismatch──▶ fail
//                 ▼
//               commit ─▶ done
//
// An exception in any step fails the fill (every waiter gets a labelled 500 ERR_INTERNAL), is logged,
// and never escapes: one odd response can't take the process down or leave waiters hanging.
import type { IncomingHttpHeaders } from 'node:http';
import { Readable } from 'node:stream';
import { variantKey, varyNames } from './cache-key.ts';
import type { Config } from './config.ts';
import { HashCheck, repoOf, type CasObject } from './content-hash.ts';
import { internalError, ProxyError, upstreamError } from './errors.ts';
import { discard, type Interim, type Upstream, type UpstreamResponse } from './fetch.ts';
import { FetchPlan, type Attempt } from './fetch-plan.ts';
import type { Fill, FillHead } from './fill.ts';
import { endToEnd, type Headers } from './forward.ts';
import { policyHeaders, policyRequest, storableResponse, type Freshness, type Policy } from './freshness.ts';
import type { Logger } from './log.ts';
import type { Mirror, Mirrors } from './mirrors.ts';
import { ownerRoute, peersOwnFailure, RELAY_HEADER, type Hierarchy, type Route, type Sender } from './hierarchy.ts';
import type { SpillWriter, StoredMeta, StoredObject, TieredStore } from './store.ts';
import type { Clock } from './clock.ts';

export interface FillRequest {
  key: string;
  primary: string;
  url: URL;
  /** Vary names the key was computed with. */
  vary: string[];
  /** Client request headers (for policy: Vary, request Cache-Control). */
  clientHeaders: IncomingHttpHeaders;
  /** Headers to send upstream. */
  upstreamHeaders: Headers;
  /** Stale stored copy to revalidate conditionally. */
  stale?: StoredObject;
  /** The content-addressed object the URL names: verified, and fetched from any mirror of its group. */
  cas?: CasObject;
  /** The key is host-independent (a content-addressed object named through a mirror of a group). */
  shared?: boolean;
  /** Accelerator mode: the repository whose sticky mirror `url` names. */
  accelRepo?: string;
  /** No copy of the key was stored when the fill began, and it is no reload (see Fill.nothingStored). */
  nothingStored?: boolean;
  /** Who sent the request: what a bank member or another worker sent is fetched here, never sent on to another. */
  from?: Sender;
  /** Interim (1xx) responses go to the client whose request started the fill. */
  onInfo?: Interim;
}

export interface FetchStats {
  fillsStarted: number;
  fillsCommitted: number;
  fillsFailed: number;
  fillsReleased: number;
  /** Answers skipped for the next mirror (error, 5xx, or a 404 of a content-addressed object). */
  failovers: number;
  /** Bodies that broke off and were continued with Range from another mirror. */
  resumes: number;
  /** Content-addressed bodies whose bytes did not match their hash (never stored). */
  hashMismatches: number;
  /** Fills given up because nobody was left to serve and the body could not be stored, or no progress. */
  fillsAbandoned: number;
  /** Exceptions inside a fetch (bugs): the fill failed with ERR_INTERNAL. */
  internalErrors: number;
}

/** What the fetch needs of the fill registry (the Coalescer). */
export interface FetchHost {
  readonly cfg: Config;
  readonly clock: Clock;
  readonly store: TieredStore;
  readonly upstream: Upstream;
  readonly freshness: Freshness;
  readonly log: Logger;
  readonly mirrors: Mirrors;
  /** Where a miss goes: the bank owner, the parents, direct. */
  readonly hierarchy: Hierarchy;
  readonly stats: FetchStats;
  /** A newer fill or an invalidation replaced this one: it must not be stored. */
  superseded(fill: Fill): boolean;
  /** A disk commit of `key` in flight (with its removal, if it was superseded meanwhile). */
  noteCommit(key: string, landing: Promise<unknown>): void;
  /** Vary names last seen for a primary key. */
  setVary(primary: string, names: string[] | undefined): void;
  /** Remember a key whose responses are not storable (hit-for-miss). */
  markUncacheable(primary: string): void;
  /** Mirrors that recently served corrupt bytes for a key. */
  corruptFrom(key: string): ReadonlySet<string> | undefined;
  noteCorrupt(key: string, origin: string): void;
  /** New requests no longer find this fill (it is stored, or not shareable). */
  unmap(fill: Fill): void;
  /** New requests under `key` (the response's own Vary variant) join this fill too. */
  alias(fill: Fill, key: string): void;
  /** The fill's end, counted once. */
  done(fill: Fill): void;
  /** The fill's body is stored on disk only: new requests may read it from memory while it lasts. */
  hold(fill: Fill): void;
}

type Step = 'mkbereq' | 'startfetch' | 'condfetch' | 'decide' | 'fetchbody' | 'resume' | 'fetchend' | 'commit' | 'error' | 'fail' | 'done';

/** The one state record of a fetch. */
interface FetchState {
  readonly host: FetchHost;
  readonly fill: Fill;
  readonly r: FillRequest;
  plan?: FetchPlan;
  /** The routes each upstream request of this fetch may take (the bank owner's only on the first). */
  routes: Route[];
  headers: Headers;
  /** The upstream response whose body is being read (the first answer, or a resume's). */
  res?: UpstreamResponse;
  ac: AbortController;
  mirror?: Mirror;
  /** The route and the attempt the body being read came by. */
  route?: Route;
  attempt?: Attempt;
  /** Every mirror of the group was asked and each said 404. */
  every404: boolean;
  /** The answer is a held 404 whose body could not be kept: sent without it, never stored. */
  bodyDropped?: boolean;
  contentLength?: number;
  check?: HashCheck;
  /** Bytes to drop from the start of this body (a resume answered 200 instead of 206). */
  skip: number;
  store?: { spill: SpillWriter | undefined; meta: StoredMeta; policy: Policy };
  /** The key's owner (bank member, worker) has been asked once: later requests of this fetch (failover, resume) don't ask it again. */
  ownerAsked?: boolean;
  /** How the last body read ended: undefined for a clean end. */
  bodyError?: unknown;
  error?: ProxyError;
}

const STEPS: Record<Step, (st: FetchState) => Promise<Step | undefined> | Step | undefined> = {
  mkbereq,
  startfetch,
  condfetch,
  decide,
  fetchbody,
  resume,
  fetchend,
  commit,
  error,
  fail,
  done,
};

/** Run one fill's fetch to its end. Never rejects. */
export async function runFetch(host: FetchHost, fill: Fill, r: FillRequest): Promise<void> {
  const st: FetchState = { host, fill, r, routes: [], headers: {}, ac: new AbortController(), every404: false, skip: 0 };
  let step: Step | undefined = 'mkbereq';
  while (step) {
    try {
      step = await STEPS[step](st);
    } catch (err) {
      host.stats.internalErrors++;
      host.log.error({ err, key: fill.key, step, internal: true }, 'internal error in a fetch; the fill failed');
      if (st.res) discard(st.res.body);
      st.error = internalError(err);
      // Every waiter gets the labelled error; the last resort if even that throws is to end the fill.
      step = step === 'fail' || step === 'done' ? undefined : 'fail';
      if (!step) {
        fill.fail(st.error);
        host.done(fill);
      }
    }
  }
}

function mkbereq(st: FetchState): Step {
  const { r, host } = st;
  st.headers = { ...r.upstreamHeaders };
  // A client reload must not be answered from a cache further up either.
  if (r.stale?.policy) Object.assign(st.headers, r.stale.policy.revalidationHeaders(policyRequest(r.url, 'GET', r.clientHeaders)));
  st.plan = new FetchPlan({ url: r.url, cas: r.cas, mirrors: host.mirrors, accelRepo: r.accelRepo, avoid: host.corruptFrom(r.key) });
  st.routes = host.hierarchy.routes(r.url, r.cas, r.from ?? 'client', r.primary);
  return 'startfetch';
}

/**
 * Ask the plan's mirrors in turn until one gives an answer worth passing on. Connect errors, timeouts
 * and 5xx move on when the plan allows failover; so does a 404 of a content-addressed object, which is
 * answered only when no mirror has it.
 */
async function startfetch(st: FetchState): Promise<Step> {
  const { host, fill } = st;
  const plan = st.plan!;
  let lastError: ProxyError | undefined;
  let other = false; // an attempt failed with something other than a 404
  let held404: { res: UpstreamResponse; body: Buffer | undefined; attempt: Attempt; route: Route } | undefined;
  for (let attempt = plan.next(); attempt; attempt = plan.next()) {
    if (fill.abandoned) break;
    const m = attempt.mirror;
    const got = await ask(st, attempt, {});
    if ('error' in got) {
      if (got.error.code === 'ERR_INTERNAL') throw got.error; // cuttle's own: never a mirror's failure
      lastError = got.error;
      other = true;
      if (m && got.mirrorAsked) mirrorFailed(st, m, lastError.token);
      if (!plan.failover) break;
      if (plan.hasMore) host.stats.failovers++;
      continue;
    }
    const { res, ac, ttfb, route } = got;
    // The key's owner failed over across the mirrors itself: its answer is final here, or every mirror
    // would be asked again.
    const owner = ownerRoute(route);
    if (!owner && res.status >= 500 && plan.failover && plan.hasMore) {
      other = true;
      discard(res.body);
      if (m) mirrorFailed(st, m, `HTTP ${res.status}`);
      host.stats.failovers++;
      continue;
    }
    // Through a peer the time to first byte is not the mirror's own.
    if (m && !owner) host.mirrors.fetched(m, res.status < 500, route.peer ? undefined : ttfb, `HTTP ${res.status}`);
    if (!owner && res.status === 404 && plan.retry404 && plan.hasMore) {
      // That mirror lacks the object (not yet replicated): ask the next one, keep this answer in case.
      const b = await readCapped(res.body, HELD_404_MAX_BYTES).catch(() => undefined);
      held404 ??= { res, body: b, attempt, route };
      host.stats.failovers++;
      continue;
    }
    if (lastError || held404) host.log.info({ url: attempt.url.href, status: res.status, tried: attempt.mirror?.origin }, 'answered by a failover mirror');
    // Every mirror of the group was asked and each said 404: the object is missing group-wide.
    st.every404 = res.status === 404 && plan.retry404 && (!other || owner);
    return answered(st, res, attempt, ac, route);
  }
  if (held404) {
    const { res, body, attempt, route } = held404;
    if (body) return answered(st, { ...res, body: Readable.from([body]) }, attempt, new AbortController(), route);
    // Its body was too long to hold, or broke off: the 404 goes out without it (and is not stored),
    // never cut short under the Content-Length it came with.
    const headers: UpstreamResponse['headers'] = { ...res.headers, 'content-length': '0' };
    delete headers['content-encoding'];
    delete headers['transfer-encoding'];
    st.bodyDropped = true;
    return answered(st, { ...res, headers, body: Readable.from([]) }, attempt, new AbortController(), route);
  }
  st.error = fill.abandoned ?? lastError ?? new ProxyError('ERR_UPSTREAM_RESET', 'no mirror to ask');
  return 'error';
}

function answered(st: FetchState, res: UpstreamResponse, attempt: Attempt, ac: AbortController, route: Route): Step {
  const { fill, r } = st;
  st.res = res;
  st.ac = ac;
  st.mirror = attempt.mirror;
  fill.peer = res.peer;
  fill.hierarchy = route.tag;
  st.route = route;
  st.attempt = attempt;
  // What this mirror's probes fetch: only a repository it has served (defect: a client could steer
  // probes to a repository that doesn't exist and mark every mirror down).
  if (attempt.mirror && res.status === 200) {
    const repo = r.cas?.repo ?? repoOf(r.url.pathname);
    if (repo) attempt.mirror.servedRepo = repo;
  }
  if (fill.abandoned) {
    discard(res.body);
    st.error = fill.abandoned;
    return 'error';
  }
  if (r.stale && res.status === 304) return 'condfetch';
  if (res.status === 206 || res.status === 304) {
    // We sent neither Range nor (without a stored copy) a validator: such an answer is for somebody
    // else's request and must not reach the clients waiting on this one.
    discard(res.body);
    st.error = new ProxyError('ERR_INVALID_RESPONSE', `HTTP ${res.status} to a request without ${res.status === 206 ? 'Range' : 'validators'}`);
    return 'error';
  }
  return 'decide';
}

/** Revalidation answered 304: refresh the stored headers; waiters are served the stored body. */
async function condfetch(st: FetchState): Promise<Step> {
  const { host, fill, r } = st;
  const res = st.res!;
  res.body.on('error', () => {}); // a 304 has no body to lose
  res.body.resume();
  const { policy, modified } = r.stale!.policy.revalidatedPolicy(policyRequest(r.url, 'GET', r.clientHeaders), { status: res.status, headers: policyHeaders(res.headers) });
  if (modified) return 'decide';
  const meta: StoredMeta = { ...r.stale!.meta, headers: mergeHeaders(r.stale!.meta.headers, res.headers, r.cas !== undefined), policy: policy.toObject(), storedAt: host.clock.now() };
  await host.store.updateMeta(meta, policy).catch((err: unknown) => host.log.warn({ err, key: r.key }, 'updating stored headers failed'));
  // Given up meanwhile (shutdown past its timeout): the fill has already failed and said so.
  if (fill.state !== 'pending') return 'done';
  fill.revalidated();
  return 'done';
}

/** Store, share, or release the response. */
function decide(st: FetchState): Step {
  const { host, fill, r } = st;
  const res = st.res!;
  const resForPolicy = { status: res.status, headers: policyHeaders(res.headers) };
  const policy = host.freshness.policyFor(policyRequest(r.url, 'GET', r.clientHeaders), resForPolicy);
  // Content-addressed bytes do not vary: a Vary from a mirror is ignored, and never keys them.
  const vary = r.cas ? [] : varyNames(res.headers.vary);
  const varyAll = vary.includes('*');
  // The response says which request headers select it: it is stored under that variant of the key,
  // from the first response on, whatever spec the request was keyed with.
  const storeKey = vary.length && !varyAll ? variantKey(r.primary, vary, r.clientHeaders) : r.primary;
  const variant = storeKey !== r.key ? { names: vary, key: storeKey } : undefined;
  if (variant) host.alias(fill, storeKey); // later requests, keyed with the new spec, join this fill too
  // A response without Vary clears an old spec (else one odd answer would key the URL forever).
  if (!r.cas) host.setVary(r.primary, vary.length && !vary.includes('*') ? vary : undefined);
  const cl = parseContentLength(res.headers['content-length']);
  const { shared: headers, private: privateHeaders } = responseHeaders(res.headers, r.cas !== undefined);
  const head: FillHead = { status: res.status, headers, contentLength: cl };
  // A content-addressed object under its host-independent key is stored only as the object itself, or
  // as a 404 that every mirror of the group gave (negatively cached): never one mirror's 404 or error.
  const verified = r.cas !== undefined && res.status === 200;
  const superseded = host.superseded(fill);
  const storable =
    !superseded &&
    !st.bodyDropped &&
    !varyAll &&
    (r.cas === undefined || verified || st.every404) &&
    storableResponse(policy, headers, cl, host.cfg.maxObjectBytes);
  st.contentLength = cl;
  st.check = verified ? new HashCheck(r.cas!) : undefined;
  const response = { head, privateHeaders, variant, holdBack: st.check !== undefined };

  if (!storable && r.cas !== undefined && cl !== undefined && cl <= SHARED_ERROR_MAX_BYTES && !superseded && r.clientHeaders.authorization === undefined) {
    // A small content-addressed answer that is not stored (a 5xx, a 404 not every mirror gave, an
    // object the Stratum 1 marks uncacheable) still goes to every waiter: releasing a herd to fetch
    // on its own would hammer the Stratum 1 with identical requests. (Not the answer to credentials.)
    fill.respond({ ...response, shared: true }, undefined, false);
    return 'fetchbody';
  }
  if (!storable) {
    // Not shared: the first client keeps it; the rest go upstream on their own. The key is remembered
    // as uncacheable only when the response is not storable on its own account: a request's own
    // headers never decide for everyone else.
    if (!varyAll && !superseded && r.cas === undefined && !storableOnItsOwn(host, r, resForPolicy, cl)) host.markUncacheable(r.primary);
    host.stats.fillsReleased++;
    fill.respond({ ...response, shared: false }, undefined, false);
    host.done(fill);
    return 'fetchbody';
  }
  const meta: StoredMeta = { key: storeKey, url: r.url.href, status: res.status, headers, policy: policy.toObject(), vary, storedAt: host.clock.now() };
  const spill = host.store.openWriter(meta, policy, cl);
  st.store = { spill, meta, policy };
  fill.respond({ ...response, shared: true, policy }, spill, true);
  return 'fetchbody';
}

/** Would this response be stored for a plain GET of the URL (no client headers)? */
function storableOnItsOwn(host: FetchHost, r: FillRequest, res: { status: number; headers: Record<string, string> }, cl: number | undefined): boolean {
  const p = host.freshness.policyFor(policyRequest(r.url, 'GET', {}), res);
  return storableResponse(p, res.headers, cl, host.cfg.maxObjectBytes);
}

/** Read the body into the fill; on a break, resume from another mirror if the plan allows. */
async function fetchbody(st: FetchState): Promise<Step> {
  const { fill, host } = st;
  const body = st.res!.body;
  if (fill.state !== 'streaming') {
    discard(body);
    st.bodyError = fill.abandoned ?? new ProxyError('ERR_UPSTREAM_RESET', 'fill ended before its body');
    return 'fail';
  }
  // A 204 or 304 has no body, whatever Content-Length the origin sent with it (undici would report the
  // missing bytes as a broken body).
  const status = st.res!.status;
  st.bodyError = status === 204 || status === 304 ? (discard(body), undefined) : await pump(st, body);
  if (st.bodyError === undefined) return 'fetchend';
  if (fill.abandoned) return 'fail';
  // A released fill is aborted on purpose once its one reader leaves: not an upstream failure.
  if (fill.released && st.ac.signal.aborted) return 'fail';
  const e = upstreamError(st.bodyError);
  if (e.code === 'ERR_INTERNAL') throw st.bodyError;
  const why = `${e.token} after ${fill.received} bytes`;
  // Through a parent, the parent broke it off: the mirror behind it is not to blame. A key's owner that
  // broke off failed its own fill (Peer.brokeOff); one that died is refused at the next connect (a
  // worker's exit is announced).
  if (st.route?.peer && ownerRoute(st.route)) st.route.peer.brokeOff(why);
  else if (st.route?.peer) host.hierarchy.peerFailed(st.route.peer, new ProxyError(e.code, why));
  else if (st.mirror) mirrorFailed(st, st.mirror, why);
  return 'resume';
}

/** Stream one upstream body into the fill. Resolves with undefined at a clean end, else the error. */
function pump(st: FetchState, body: Readable): Promise<unknown> {
  const { host, fill } = st;
  const ac = st.ac;
  return new Promise((resolve) => {
    let settled = false;
    const settle = (v: unknown) => {
      if (settled) return;
      settled = true;
      clearInterval(watch);
      resolve(v);
    };
    fill.upstream = { pause: () => body.pause(), resume: () => body.resume(), abort: () => ac.abort(fill.abandoned) };
    let skip = st.skip;
    const relayed = st.route?.peer?.role === 'worker';
    body.on('data', (c: Buffer) => {
      try {
        // A relay's bytes are counted by the worker that fetched them upstream.
        if (!relayed) host.upstream.bytes += c.length;
        if (st.mirror && !relayed) st.mirror.bytes += c.length;
        if (st.route?.peer) st.route.peer.bytes += c.length;
        if (skip > 0) {
          // A mirror that ignored our Range sends the whole object again: drop what we already have.
          if (c.length <= skip) {
            skip -= c.length;
            return;
          }
          c = c.subarray(skip);
          skip = 0;
        }
        st.check?.update(c);
        fill.push(c);
      } catch (err) {
        body.destroy(internalError(err));
      }
    });
    body.once('error', (err: unknown) => settle(err ?? new Error('upstream body failed')));
    body.once('end', () => settle(undefined));
    body.once('close', () => settle(new ProxyError('ERR_UPSTREAM_RESET', 'upstream body closed before its end')));
    // A content-addressed body that stalls while another mirror could finish it is given up after
    // --mirror-timeout without bytes (not counting time paused for our own backpressure), and resumed.
    let watch: NodeJS.Timeout | undefined;
    const plan = st.plan!;
    if (plan.cas && plan.failover && plan.hasMore) {
      const stallMs = host.mirrors.cfg.answerTimeoutMs;
      let seen = fill.received;
      let quietSince = performance.now();
      watch = setInterval(() => {
        const now = performance.now();
        if (fill.received !== seen || fill.paused) {
          seen = fill.received;
          quietSince = now;
        } else if (now - quietSince > stallMs) {
          body.destroy(new ProxyError('ERR_READ_TIMEOUT', `mirror sent nothing for ${stallMs} ms mid-body`));
        }
      }, Math.max(50, Math.min(500, stallMs / 4)));
      watch.unref();
    }
  });
}

/**
 * Continue a content-addressed body of known length with `Range: bytes=N-`: through the routes left for
 * the same mirror when a peer (a parent, the bank owner, another worker) broke it off, then from the
 * plan's next mirrors. The bytes are hash-checked whichever way they come.
 */
async function resume(st: FetchState): Promise<Step> {
  const plan = st.plan!;
  const cl = st.contentLength;
  // Only the object itself is continued: a shared error answer that breaks off is not (its bytes would
  // be spliced with the object's, and nothing checks an error's hash). The object's own status, not the
  // body's being read: a resume's 206 that breaks off too is continued from the next mirror.
  if (!plan.cas || st.fill.response?.head.status !== 200 || cl === undefined || st.fill.received >= cl) return 'fail';
  if (st.route?.peer && st.attempt && (await resumeFrom(st, st.attempt, cl, st.route))) return 'fetchbody';
  if (!plan.failover) return 'fail';
  for (let attempt = plan.next(); attempt; attempt = plan.next()) {
    if (await resumeFrom(st, attempt, cl)) return 'fetchbody';
  }
  return 'fail';
}

/** Ask for the rest of the body from `attempt` (after the route `after`); true when it is coming. */
async function resumeFrom(st: FetchState, attempt: Attempt, cl: number, after?: Route): Promise<boolean> {
  const { host, fill } = st;
  if (fill.state !== 'streaming') return false;
  const from = fill.received;
  const m = attempt.mirror;
  const got = await ask(st, attempt, { range: `bytes=${from}-` }, after);
  if ('error' in got) {
    if (got.error.code === 'ERR_INTERNAL') throw got.error;
    if (m && got.mirrorAsked) mirrorFailed(st, m, got.error.token);
    return false;
  }
  const { res, ac, ttfb, route } = got;
  const range = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(res.headers['content-range'] ?? ''));
  let skip: number;
  // A 206 is taken only as exactly the rest, its length stated: bytes past the object's end would reach
  // readers as the end of a complete response (only its last byte waits for the hash), and a shorter
  // part would fail the hash of a body another mirror could finish.
  const rest = range && Number(range[1]) === from && Number(range[2]) === cl - 1 && Number(range[3]) === cl && parseContentLength(res.headers['content-length']) === cl - from;
  if (res.status === 206 && rest) skip = 0;
  else if (res.status === 200 && parseContentLength(res.headers['content-length']) === cl) skip = from;
  else {
    discard(res.body);
    if (m && !route.peer) mirrorFailed(st, m, `resume answered HTTP ${res.status}`);
    return false;
  }
  if (m && !ownerRoute(route)) host.mirrors.fetched(m, true, route.peer ? undefined : ttfb);
  if (fill.state !== 'streaming') {
    discard(res.body);
    return false;
  }
  host.stats.resumes++;
  fill.peer = res.peer;
  fill.hierarchy = route.tag;
  host.log.info({ key: fill.key, from, of: cl, mirror: attempt.mirror?.origin, via: route.peer?.spec.url, status: res.status }, route.peer || after ? 'resumed a broken fill through the next route' : 'resumed a broken fill from another mirror');
  st.route = route;
  st.attempt = attempt;
  st.res = res;
  st.ac = ac;
  st.mirror = m;
  st.skip = skip;
  return true;
}

function fetchend(st: FetchState): Step {
  const { host, fill } = st;
  if (fill.state !== 'streaming') return 'fail';
  if (st.check && !st.check.matches()) {
    // Corrupt: nobody gets the last bytes, nothing is stored, and the next fill asks another mirror.
    host.stats.hashMismatches++;
    st.bodyError = new ProxyError('ERR_CONTENT_HASH');
    if (st.mirror) {
      mirrorFailed(st, st.mirror, 'content hash mismatch');
      host.noteCorrupt(fill.key, st.mirror.origin);
    }
    host.log.error({ key: fill.key, mirror: st.mirror?.origin, bytes: fill.received }, 'content hash mismatch; readers cut short, nothing stored');
    return 'fail';
  }
  fill.finish();
  return st.store ? 'commit' : 'done';
}

/** Hand a complete body to the tiers: small ones to memory at once, every one to its disk record. */
async function commit(st: FetchState): Promise<Step> {
  const { host, fill } = st;
  const { spill, meta, policy } = st.store!;
  const maxMem = host.cfg.maxMemoryObjectBytes;
  if (host.superseded(fill)) {
    spill?.abort();
    return 'done';
  }
  if (!spill) {
    // No disk writer (the disk tier refused or failed): keep a small object in memory at least.
    const whole = fill.received <= maxMem ? fill.wholeBody() : undefined;
    if (whole) host.store.putMemory(meta, policy, whole);
    return 'done';
  }
  // The memory copy and the record land as one step that a forget waits for (noteCommit): invalidated
  // (an unsafe method, a PURGE) meanwhile, the fill removes what it stored before the forget answers,
  // so no request after it reads the copy in between.
  const landing = (async () => {
    // A small body goes to memory at once, so the next request is a hit without waiting for the disk.
    let inMemory = false;
    if (fill.received <= maxMem) {
      const whole = fill.wholeBody() ?? (spill.failed ? undefined : await spill.readAt(0, fill.received));
      if (whole && whole.length === fill.received) inMemory = host.store.putMemory(meta, policy, whole);
      if (inMemory) host.unmap(fill);
    }
    const ok = await spill.commit();
    if (host.superseded(fill) && (ok || inMemory)) await host.store.delete(meta.key);
    return { ok, inMemory };
  })();
  host.noteCommit(meta.key, landing);
  const { ok, inMemory } = await landing;
  if (ok && host.superseded(fill)) return 'done';
  if (ok) {
    if (!spill.transient) host.stats.fillsCommitted++;
    if (!inMemory && meta.key === fill.key) host.hold(fill);
  }
  else if (spill.failed) host.log.warn({ key: fill.key, err: spill.failed.message }, 'disk write failed; object kept in memory only if small');
  return 'done';
}

/** No answer at all: every waiter gets the same labelled error. */
function error(st: FetchState): Step {
  const { host, fill } = st;
  if (fill.abandoned) host.stats.fillsAbandoned++;
  else host.stats.fillsFailed++;
  fill.fail(st.error ?? new ProxyError('ERR_UPSTREAM_RESET'));
  return 'done';
}

/** The body broke off for good (or was corrupt, or was given up): readers are cut short, nothing stored. */
function fail(st: FetchState): Step {
  const { host, fill } = st;
  st.store?.spill?.abort();
  const e = st.error ?? (st.bodyError instanceof ProxyError ? st.bodyError : upstreamError(st.bodyError));
  fill.fail(e);
  if (st.res) discard(st.res.body);
  if (fill.abandoned) {
    host.stats.fillsAbandoned++;
    host.log.info({ key: fill.key, bytes: fill.received, why: fill.abandoned.message }, 'fill given up');
  } else if (!fill.released) {
    // (A released fill's body is read for its one client only: its end is that client's business.)
    host.stats.fillsFailed++;
    if (e.code !== 'ERR_CONTENT_HASH') host.log.warn({ key: fill.key, bytes: fill.received, err: e.message }, 'upstream failed mid-body; readers truncated, nothing stored');
  }
  return 'done';
}

function done(st: FetchState): undefined {
  st.host.done(st.fill);
  return undefined;
}

type Asked = { res: UpstreamResponse; ac: AbortController; ttfb: number; route: Route } | { error: ProxyError; mirrorAsked: boolean };

/**
 * One upstream request of the plan, over the fetch's routes in turn (hierarchy.ts): a peer that can't be
 * reached, does not answer in time, or labels its answer as its own failure is followed by the next
 * route; with none left that failure is the result (ERR_PEER_FAILED for a labelled answer).
 * `mirrorAsked` says whether a failure was the mirror's own (a direct request), so a dead parent never
 * marks a mirror down.
 */
async function ask(st: FetchState, attempt: Attempt, extra: Headers, after?: Route): Promise<Asked> {
  const { host } = st;
  const left = after ? st.routes.slice(st.routes.indexOf(after) + 1) : st.routes;
  const routes = left.filter((rt) => !rt.peer || (rt.peer.up && !(ownerRoute(rt) && st.ownerAsked)));
  if (routes.some(ownerRoute)) st.ownerAsked = true;
  let last: Asked = { error: new ProxyError('ERR_PARENTS_DOWN', attempt.url.host), mirrorAsked: false };
  for (let i = 0; i < routes.length; i++) {
    const route = routes[i]!;
    const peer = route.peer;
    const more = i < routes.length - 1;
    const ac = new AbortController();
    const t0 = performance.now();
    const timer = routeTimer(st, ac, route, more);
    try {
      const headers: Headers = { ...st.headers, host: attempt.url.host, ...extra };
      if (peer?.role === 'worker') {
        headers[RELAY_HEADER] = host.hierarchy.relayToken!;
        // The owner revalidates its own record (the one this worker's stale copy was read from) and
        // answers with the whole, refreshed object: this worker's validators would only be merged
        // into the owner's own.
        delete headers['if-none-match'];
        delete headers['if-modified-since'];
      }
      const res = await host.upstream.request({ url: attempt.url, method: 'GET', headers, signal: ac.signal, via: peer, onInfo: st.r.onInfo });
      // Another worker's labelled failure is this process's own, and final: it was the owner's fetch.
      const own = peer && peer.role !== 'worker' ? peersOwnFailure(res) : undefined;
      if (peer && own) {
        // The peer answered, but with its own failure (it could not reach the origin, it is overloaded,
        // it denies us): the next route may do better. A denial counts against the peer; the rest do not.
        // With no route left it is this proxy's failure to forward, labelled as such: the mirror behind
        // the peer was never asked, and the client must switch proxy, not Stratum 1.
        discard(res.body);
        if (res.status === 403 || res.status === 407) host.hierarchy.peerFailed(peer, own);
        else peer.answered();
        host.log.info({ peer: peer.spec.url, url: attempt.url.href, status: res.status, why: own }, more ? 'peer answered with its own failure; taking the next route' : 'peer answered with its own failure; no route left');
        last = { error: new ProxyError('ERR_PEER_FAILED', `${peer.spec.url} answered ${own}`), mirrorAsked: false };
        continue;
      }
      if (peer) peer.answered();
      if (peer?.role === 'worker') unrelay(res.headers);
      return { res, ac, ttfb: performance.now() - t0, route };
    } catch (err) {
      const e = upstreamError(ac.signal.aborted ? ac.signal.reason : err);
      if (e.code === 'ERR_INTERNAL') return { error: e, mirrorAsked: false };
      last = { error: e, mirrorAsked: !peer };
      // Our own --peer-timeout on a bank owner: slow, not dead.
      if (peer && ac.signal.aborted && peer.role === 'bank' && e.code === 'ERR_READ_TIMEOUT') peer.slow(`${e.token}: ${e.detail ?? e.message}`);
      else if (peer) host.hierarchy.peerFailed(peer, e);
    } finally {
      clearTimeout(timer);
    }
  }
  return last;
}

/**
 * Another worker's answer carries this process's Via entry and X-Cache, as a client's would: the
 * response is this process's own from here on, and gets them once when it goes out.
 */
function unrelay(h: Record<string, string | string[]>): void {
  delete h['x-cache'];
  const via = String(h.via ?? '');
  const cut = via.lastIndexOf(',');
  if (cut < 0) delete h.via;
  else h.via = via.slice(0, cut);
}

/**
 * How long a route has to connect and answer with headers. A bank owner: --peer-timeout, then the
 * member fetches itself (it must never cost a client its 5 s watchdog). Otherwise, with another mirror
 * to fall back on, --mirror-timeout (waiting for --connect-timeout or --read-timeout would cost every
 * waiting client its 5 s watchdog); the last mirror of a plan through its last route gets the full
 * timeouts.
 */
function routeTimer(st: FetchState, ac: AbortController, route: Route, moreRoutes: boolean): NodeJS.Timeout | undefined {
  const role = route.peer?.role;
  // Another worker of this process is healthy while it runs (a dead one's connections fail at once):
  // its owner may wait on a slow upstream as long as any fill does, and giving up would fetch twice.
  if (role === 'worker') return undefined;
  const abortAfter = (ms: number, who: string, then: string) => setTimeout(() => ac.abort(new ProxyError('ERR_READ_TIMEOUT', `${who} did not answer within ${ms} ms; ${then}`)), ms);
  if (role === 'bank' && moreRoutes) return abortAfter(st.host.cfg.peerTimeoutMs, `bank member ${route.peer!.spec.url}`, 'fetching here');
  // A parent with a route after it has --mirror-timeout to answer, as a mirror with one after it has:
  // a hung parent must not hold every waiter past the client's watchdog.
  const answerMs = st.host.mirrors.cfg.answerTimeoutMs;
  if (role === 'parent' && moreRoutes) return abortAfter(answerMs, `parent ${route.peer!.spec.url}`, 'taking the next route');
  const plan = st.plan!;
  if (!plan.failover || !plan.hasMore) return undefined;
  return abortAfter(answerMs, 'mirror', 'asking the next one');
}

function mirrorFailed(st: FetchState, m: Mirror, why: string): void {
  st.host.mirrors.fetched(m, false, undefined, why);
  const plan = st.plan!;
  if (plan.accelRepo !== undefined) plan.group?.unstick(plan.accelRepo, m);
}

/** Largest error body of a content-addressed object shared with every waiter (without a spill file). */
const SHARED_ERROR_MAX_BYTES = 256 * 1024;
/** A mirror's 404 held while the next mirror is asked keeps at most this much of its body. */
const HELD_404_MAX_BYTES = 64 * 1024;

/** Never stored, never sent to another client: one client's cookies (Squid strips them on hits too). */
const PRIVATE = new Set(['set-cookie', 'set-cookie2']);

/**
 * A content-addressed object's bytes are verified, but its headers are whatever the mirror said: only
 * these describe the object itself, so only these are kept and shared with every client.
 */
const CAS_HEADERS = new Set(['cache-control', 'content-type', 'content-length', 'date', 'etag', 'expires', 'last-modified', 'age', 'via']);

function responseHeaders(h: Record<string, string | string[]>, cas: boolean): { shared: Headers; private: Headers | undefined } {
  const all = endToEnd(h);
  const shared: Headers = {};
  let priv: Headers | undefined;
  for (const [k, v] of Object.entries(all)) {
    if (PRIVATE.has(k)) (priv ??= {})[k] = v;
    else if (!cas || CAS_HEADERS.has(k)) shared[k] = v;
  }
  return { shared, private: priv };
}

/** A whole body of at most `cap` bytes; undefined when it is longer (the rest is discarded). */
async function readCapped(body: Readable, cap: number): Promise<Buffer | undefined> {
  const parts: Buffer[] = [];
  let n = 0;
  body.on('error', () => {}); // the loop below sees errors; this only keeps a late one from being unhandled
  for await (const c of body) {
    n += (c as Buffer).length;
    if (n > cap) {
      discard(body);
      return undefined;
    }
    parts.push(c as Buffer);
  }
  return Buffer.concat(parts);
}

function parseContentLength(v: string | string[] | undefined): number | undefined {
  const s = Array.isArray(v) ? v[0] : v;
  return s !== undefined && /^\d+$/.test(s) ? Number(s) : undefined;
}

/** RFC 9111 §4.3.4: a 304 updates the stored header fields it carries (never a cookie). */
function mergeHeaders(stored: Headers, fresh: Record<string, string | string[]>, cas: boolean): Headers {
  const out = { ...stored };
  for (const [k, v] of Object.entries(responseHeaders(fresh, cas).shared)) if (k !== 'content-length') out[k] = v;
  return out;
}
