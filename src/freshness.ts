// RFC 9111 policy for a shared cache, via http-cache-semantics, with time taken from our Clock.
// Adds what the library leaves to the cache: negative caching of 404/410 without explicit freshness,
// and no minimum expiry (max-age=61 is cached for 61 s, unlike Squid's default minimum_expiry_time).
import CachePolicy from 'http-cache-semantics';
import type { Clock } from './clock.ts';

export type Policy = CachePolicy;
type PolicyRequest = CachePolicy.Request;
type PolicyResponse = CachePolicy.Response;

export interface Freshness {
  /** Build a policy for a fresh upstream response. */
  policyFor(req: PolicyRequest, res: PolicyResponse): Policy;
  fromObject(o: object): Policy;
}

// https://www.rfc-editor.org/rfc/rfc9111#section-4.2.1 explicit freshness comes from these.
function hasExplicitFreshness(h: CachePolicy.Headers): boolean {
  const cc = String(h['cache-control'] ?? '');
  return /(^|,)\s*(s-maxage|max-age)\s*=/i.test(cc) || h.expires !== undefined;
}

/** The status codes whose caching rules the policy library implements (http-cache-semantics' understoodStatuses). */
const UNDERSTOOD = new Set([200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501]);

/** Policies the library would not store but RFC 9111 §3 lets a shared cache store (see storable()). */
const explicitlyStorable = new WeakMap<object, boolean>();

export function createFreshness(clock: Clock, negativeTtlMs: number): Freshness {
  class ClockedPolicy extends CachePolicy {
    #maxAge: number | undefined;
    now(): number {
      return clock.now();
    }
    // A pure function of the stored response (its directives, Date, Expires, Last-Modified), asked on
    // every hit: the library re-derives it each time, parsing dates. A revalidation makes a new policy.
    maxAge(): number {
      return (this.#maxAge ??= super.maxAge());
    }
    // The library stores only the status codes it "understands"; RFC 9111 §3 lets a shared cache store
    // any final status (299, 400, 499, 5xx...) that carries explicit freshness, and only then (so a
    // 5xx without it is never sticky: the frontier-squid bug 5051 lesson).
    storable(): boolean {
      if (super.storable()) return true;
      let v = explicitlyStorable.get(this);
      if (v === undefined) {
        // Read through the library's public serialisation, not its fields; computed once per policy.
        const o = this.toObject() as unknown as { st: number; m: string; a: boolean; rescc: Record<string, string>; reqcc: Record<string, string>; resh: Record<string, string> };
        v =
          o.st >= 200 && o.st <= 599 && o.st !== 206 && o.st !== 304 &&
          (o.m === 'GET' || o.m === 'HEAD') &&
          !o.reqcc['no-store'] && !o.rescc['no-store'] && !o.rescc.private &&
          // RFC 9111 §3.5: the answer to a request with credentials only when it says a shared cache may.
          (o.a || Boolean(o.rescc.public || o.rescc['s-maxage'] || o.rescc['must-revalidate'])) &&
          Boolean(o.rescc['max-age'] || o.rescc['s-maxage'] || o.resh.expires);
        explicitlyStorable.set(this, v);
      }
      return v;
    }
  }
  const opts = { shared: true, cacheHeuristic: 0.1, immutableMinTimeToLive: 24 * 3600 * 1000 };
  return {
    policyFor(req, res) {
      const own = policyHeaders(res.headers as Record<string, string | string[]>);
      // cuttle stores a response without its cookies and never gives them to another client (fill-fetch
      // PRIVATE), as Squid does; so the library's own refusal of a shared response with Set-Cookie (not
      // RFC 9111's: it lets a shared cache store one) has nothing left to protect.
      delete own['set-cookie'];
      delete own['set-cookie2'];
      // must-understand (RFC 9111 §5.2.2.3): a cache that implements the status code's caching rules
      // ignores no-store; one that does not, stores nothing. Ours are the policy library's codes.
      const cc = own['cache-control'];
      if (cc !== undefined && directives(cc).has('must-understand')) {
        own['cache-control'] = UNDERSTOOD.has(res.status ?? 0) ? cc.split(',').filter((d) => d.split('=')[0]!.trim() !== 'no-store').join(',') : `${cc}, no-store`;
      }
      let headers: CachePolicy.Headers = own;
      // Negative caching: a 404/410 without explicit freshness lives for negative-ttl (Squid negative_ttl).
      if ((res.status === 404 || res.status === 410) && !hasExplicitFreshness(headers) && negativeTtlMs > 0) {
        const cc = headers['cache-control'];
        headers = { ...headers, 'cache-control': `${cc ? `${cc}, ` : ''}max-age=${Math.floor(negativeTtlMs / 1000)}` };
      }
      return new ClockedPolicy(req, { ...res, headers }, opts);
    },
    fromObject(o) {
      return ClockedPolicy.fromObject(o as never);
    },
  };
}

type HeaderMap = Record<string, string | string[] | undefined>;

/**
 * The one storable rule (RFC 9111 §3), asked of every response a fill decides on: the policy lets a
 * shared cache store it, it is fresh for a while or stale at once but revalidatable (no-cache,
 * max-age=0 with a validator), and it is no larger than --max-object-size when its length is known.
 */
export function storableResponse(policy: Policy, headers: Record<string, unknown>, contentLength: number | undefined, maxObjectBytes: number): boolean {
  return policy.storable() && (policy.timeToLive() > 0 || hasValidators(headers)) && (contentLength === undefined || contentLength <= maxObjectBytes);
}

/**
 * May a stale stored copy be served because the upstream can't be reached (RFC 9111 §4.2.4)? Not when
 * the response forbids it (must-revalidate, proxy-revalidate, s-maxage, no-cache), and no staler than
 * the least of --max-stale, the response's stale-if-error, and the client's max-stale or stale-if-error.
 */
export function mayServeStale(policy: Policy, resHeaders: HeaderMap, reqHeaders: HeaderMap, maxStaleMs: number): boolean {
  const res = directives(resHeaders['cache-control']);
  if (forbidsStale(res) || res.has('no-store')) return false;
  const req = directives(reqHeaders['cache-control']);
  let limitS = maxStaleMs / 1000;
  for (const v of [res.get('stale-if-error'), req.get('max-stale'), req.get('stale-if-error')]) {
    if (v === undefined || v === '') continue; // `max-stale` without a value: any staleness
    const n = Number(v);
    limitS = Math.min(limitS, Number.isFinite(n) && n >= 0 ? n : 0);
  }
  return staleness(policy) <= limitS;
}

/**
 * May a stored response answer this request without revalidation, given the request's own
 * directives (RFC 9111 §4.2, §5.2.1)? The key already pins URL, host and Vary. (The library's own check
 * refuses every must-revalidate response, fresh or not.)
 */
export function satisfies(policy: Policy, resHeaders: HeaderMap, reqHeaders: HeaderMap): boolean {
  const req = directives(reqHeaders['cache-control']);
  const age = policy.age();
  const freshFor = -staleness(policy);
  const num = (k: string) => Number(req.get(k));
  if (req.has('max-age') && !(age <= num('max-age'))) return false;
  if (req.has('min-fresh') && !(freshFor >= num('min-fresh'))) return false;
  if (freshFor > 0) return true;
  if (!req.has('max-stale')) return false;
  if (forbidsStale(directives(resHeaders['cache-control']))) return false;
  return req.get('max-stale') === '' || -freshFor <= num('max-stale');
}

/**
 * stale-while-revalidate (RFC 5861): within the response's window, the stale copy is served at once
 * and one background fill refreshes it (joined by nobody; it stores what it gets).
 */
export function withinRevalidateWindow(policy: Policy, resHeaders: HeaderMap, reqHeaders: HeaderMap): boolean {
  const res = directives(resHeaders['cache-control']);
  const swr = res.get('stale-while-revalidate');
  // The window is the origin's own permission to serve stale, so s-maxage alone does not forbid it.
  if (swr === undefined || res.has('must-revalidate') || res.has('proxy-revalidate') || res.has('no-cache')) return false;
  const req = directives(reqHeaders['cache-control']);
  if (req.has('max-age') || req.has('min-fresh')) return false; // the client asked for fresher than that
  const staleS = staleness(policy);
  return staleS > 0 && staleS <= Number(swr);
}

/** Does the client demand an end-to-end reload (RFC 9111 §5.2.1.4, §5.4)? */
export function clientWantsReload(h: { 'cache-control'?: string | string[] | undefined; pragma?: string | string[] | undefined }): boolean {
  if (!h['cache-control'] && !h.pragma) return false; // most requests: no directives at all
  const cc = String(h['cache-control'] ?? '').toLowerCase();
  if (/(^|,)\s*no-cache\b/.test(cc) || /(^|,)\s*max-age\s*=\s*0\b/.test(cc)) return true;
  // Pragma: no-cache only counts without Cache-Control (RFC 9111 §5.4), but CVMFS sends both; Squid honours either.
  return /(^|,)\s*no-cache\b/i.test(String(h.pragma ?? ''));
}

/** only-if-cached (RFC 9111 §5.2.1.7): a stored response or a 504, never a request upstream. */
export function onlyIfCached(h: { 'cache-control'?: string | string[] | undefined }): boolean {
  return h['cache-control'] !== undefined && /(^|,)\s*only-if-cached\s*(,|$)/i.test(String(h['cache-control']));
}

/** Validators that make a conditional refetch possible. */
export function hasValidators(h: Record<string, unknown>): boolean {
  return h.etag !== undefined || h['last-modified'] !== undefined;
}

/** The request as http-cache-semantics sees it. Host comes from the absolute URL, which is what the key holds. */
export function policyRequest(url: URL, method: string, headers: Record<string, string | string[] | undefined>): CachePolicy.Request {
  return { url: `${url.pathname}${url.search}`, method, headers: { ...policyHeaders(headers), host: url.host } as CachePolicy.Headers };
}

/**
 * Header fields as the policy library reads them: one string per field. undici gives a repeated field
 * as an array (two Cache-Control lines), which the library would call .trim() on; RFC 9110 §5.3 lets
 * list fields be joined with commas, and a repeated singleton (Expires, Date) becomes invalid, which is
 * what it is.
 */
export function policyHeaders(h: Record<string, string | string[] | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) {
    if (v === undefined) continue;
    out[k] = Array.isArray(v) ? v.join(', ') : String(v);
  }
  // Directive names are case-insensitive (RFC 9111 §5.2); the library compares them as written.
  if (out['cache-control'] !== undefined) out['cache-control'] = out['cache-control'].replace(/(^|,)\s*([^=,]+)/g, (_m, sep: string, name: string) => `${sep}${name.trim().toLowerCase()}`);
  if (out.expires !== undefined) out.expires = httpDate(out.expires) ?? EXPIRED;
  // Age is a non-negative integer (RFC 9111 §5.1): of a list (repeated lines) the first member counts;
  // anything that is not an integer is ignored.
  if (out.age !== undefined) {
    const first = out.age.split(',')[0]!.split(';')[0]!.trim();
    if (/^\d+$/.test(first)) out.age = first;
    else delete out.age;
  }
  // RFC 9213: a valid CDN-Cache-Control replaces Cache-Control and Expires for a cache that honours it.
  const cdn = out['cdn-cache-control'] !== undefined ? cdnDirectives(out['cdn-cache-control']) : undefined;
  if (cdn !== undefined) {
    out['cache-control'] = cdn;
    delete out.expires;
  }
  return out;
}

const SF_KEY = /^[a-z*][a-z0-9_.*-]*$/;
const SF_BARE = /^(?:-?\d{1,15}(?:\.\d{1,3})?|"(?:[^"\\]|\\.)*"|[A-Za-z*][\w:/!#$%&'*+.^`|~-]*|:[A-Za-z0-9+/=]*:|\?[01])$/;
const INTEGER_DIRECTIVES = new Set(['max-age', 's-maxage', 'stale-while-revalidate', 'stale-if-error']);

/**
 * CDN-Cache-Control (RFC 9213) is a Structured Field dictionary: the Cache-Control directives it
 * holds, or undefined when it does not parse (then it is ignored as a whole, as is one whose
 * freshness directives are not integers).
 */
function cdnDirectives(v: string): string | undefined {
  const out: string[] = [];
  for (const raw of v.split(',')) {
    const member = raw.trim().split(';')[0]!.trim();
    if (!member) return undefined;
    const eq = member.indexOf('=');
    const key = eq < 0 ? member : member.slice(0, eq);
    const val = eq < 0 ? undefined : member.slice(eq + 1);
    if (!SF_KEY.test(key) || (val !== undefined && !SF_BARE.test(val))) return undefined;
    if (INTEGER_DIRECTIVES.has(key) && (val === undefined || !/^\d{1,15}$/.test(val))) return undefined;
    if (val === undefined || val === '?1') out.push(key);
    else if (val !== '?0') out.push(`${key}=${val}`);
  }
  return out.join(', ');
}

const EXPIRED = 'Thu, 01 Jan 1970 00:00:00 GMT';
const MONTHS = ['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'];
// The grammar is case-sensitive, but RFC 9111 §4.2 has a cache match dates case-insensitively
// ("THU", "AUG", "gMT"); any zone but GMT stays invalid.
const IMF = /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT$/i;
const RFC850 = /^(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d{2})-(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT$/i;
const ASCTIME = /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ( \d|\d{2}) (\d{2}):(\d{2}):(\d{2}) (\d{4})$/i;
const month = (name: string) => MONTHS.indexOf(name.toLowerCase());

/**
 * An HTTP-date in one of the three formats RFC 9110 §5.6.7 makes recipients accept, as IMF-fixdate; else
 * undefined. (Date.parse is far more lenient: an invalid Expires must count as already expired.)
 */
export function httpDate(v: string): string | undefined {
  let d: number;
  let m = IMF.exec(v);
  if (m) d = Date.UTC(Number(m[3]), month(m[2]!), Number(m[1]), Number(m[4]), Number(m[5]), Number(m[6]));
  else if ((m = RFC850.exec(v))) {
    // A two-digit year more than 50 years in the future is in the past (RFC 9110 §5.6.7).
    const now = new Date().getUTCFullYear();
    let y = Math.floor(now / 100) * 100 + Number(m[3]);
    if (y > now + 50) y -= 100;
    d = Date.UTC(y, month(m[2]!), Number(m[1]), Number(m[4]), Number(m[5]), Number(m[6]));
  } else if ((m = ASCTIME.exec(v))) d = Date.UTC(Number(m[6]), month(m[1]!), Number(m[2]!.trim()), Number(m[3]), Number(m[4]), Number(m[5]));
  else return undefined;
  return Number.isNaN(d) ? undefined : new Date(d).toUTCString();
}

/**
 * Is the stored response still fresh (RFC 9111 §4.2)? Not the library's timeToLive(), which also counts
 * the stale-if-error and stale-while-revalidate windows: those allow a stale response in their own
 * cases (an unreachable origin; a background refresh), not a hit as if fresh.
 */
export function isFresh(p: Policy): boolean {
  return p.maxAge() > p.age();
}

/** Seconds past the freshness lifetime (negative while fresh). */
export function staleness(p: Policy): number {
  return p.age() - p.maxAge();
}

/**
 * Response directives under which a shared cache never answers with a stale copy on its own account
 * (RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10: s-maxage implies proxy-revalidate; §5.2.2.4 no-cache).
 */
export function forbidsStale(res: Map<string, string>): boolean {
  return res.has('must-revalidate') || res.has('proxy-revalidate') || res.has('s-maxage') || res.has('no-cache');
}

/** Cache-Control directives by lower-cased name (values unquoted; '' for a directive without one). */
export function directives(v: string | string[] | undefined): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of (Array.isArray(v) ? v.join(',') : (v ?? '')).split(',')) {
    const [k, val] = part.split('=', 2);
    const name = k!.trim().toLowerCase();
    if (name) out.set(name, (val ?? '').trim().replace(/^"|"$/g, ''));
  }
  return out;
}
