// The coalescer: at most one upstream fetch per cache key at a time, however many clients ask.
// A fill belongs to no client: it runs on when its first client hangs up, and it is committed to the
// tiers when complete. The response decides what happens to the waiters:
//   storable        -> everyone streams from the fill; the disk record is its spill file; commit at end
//   not storable    -> the first client keeps the response, the others are released to fetch on their
//                      own, and the key is remembered as uncacheable for a while (Varnish hit-for-miss)
//   304 (revalidation) -> stored headers are refreshed; waiters are served the stored body
//   error before headers -> every waiter gets the same labelled error
//   error mid-body  -> every reader is cut short; nothing is stored
import type { IncomingHttpHeaders } from 'node:http';
import { Readable } from 'node:stream';
import { LRUCache } from 'lru-cache';
import { varyNames } from './cache-key.ts';
import { HashCheck, type CasObject } from './content-hash.ts';
import { FetchPlan, type Attempt } from './fetch-plan.ts';
import type { Mirror, Mirrors } from './mirrors.ts';
import type { Clock } from './clock.ts';
import type { Config } from './config.ts';
import { ProxyError, upstreamError } from './errors.ts';
import { Fill, type FillBudget } from './fill.ts';
import { policyRequest, type Freshness, type Policy } from './freshness.ts';
import { endToEnd, type Headers } from './forward.ts';
import type { Logger } from './log.ts';
import type { StoredMeta, StoredObject, TieredStore } from './store.ts';
import type { DiskWriter } from './store-disk.ts';
import { discard, type Upstream, type UpstreamResponse } from './fetch.ts';

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
  /** Accelerator mode: the repository whose sticky mirror `url` names. */
  accelRepo?: string;
}

export interface CoalescerStats {
  fillsStarted: number;
  fillsCommitted: number;
  fillsFailed: number;
  fillsReleased: number;
  waitersPerFill: number[]; // recent samples, bounded
  /** Answers skipped for the next mirror (error, 5xx, or a 404 of a content-addressed object). */
  failovers: number;
  /** Bodies that broke off and were continued with Range from another mirror. */
  resumes: number;
  /** Content-addressed bodies whose bytes did not match their hash (never stored). */
  hashMismatches: number;
}

export class Coalescer {
  readonly #fills = new Map<string, Fill>();
  readonly #uncacheable: LRUCache<string, true>;
  /** Vary header names last seen for a primary key. */
  readonly varySpecs = new LRUCache<string, string[]>({ max: 65536 });
  readonly #cfg: Config;
  readonly #clock: Clock;
  readonly #store: TieredStore;
  readonly #upstream: Upstream;
  readonly #freshness: Freshness;
  readonly #log: Logger;
  /** Memory shared by the windows of all fills in flight (--fill-memory). */
  readonly budget: FillBudget;
  readonly stats: CoalescerStats = { fillsStarted: 0, fillsCommitted: 0, fillsFailed: 0, fillsReleased: 0, waitersPerFill: [], failovers: 0, resumes: 0, hashMismatches: 0 };
  #mirrors: Mirrors;
  /** Mirrors that recently served corrupt bytes for a key: asked last by the next fill. */
  readonly #corruptFrom = new LRUCache<string, Set<string>>({ max: 4096, ttl: 600_000 });

  /** Called once per fill with the number of clients it served. */
  onFillDone: ((readers: number) => void) | undefined;

  constructor(o: { cfg: Config; clock: Clock; store: TieredStore; upstream: Upstream; freshness: Freshness; log: Logger; mirrors: Mirrors }) {
    this.#mirrors = o.mirrors;
    this.#cfg = o.cfg;
    this.#clock = o.clock;
    this.#store = o.store;
    this.#upstream = o.upstream;
    this.#freshness = o.freshness;
    this.#log = o.log;
    this.budget = { limitBytes: o.cfg.fillMemoryBytes, usedBytes: 0 };
    this.#uncacheable = new LRUCache<string, true>({ max: 65536, ttl: Math.max(1, o.cfg.uncacheableTtlMs), ttlAutopurge: false, perf: o.clock });
  }

  get inFlight(): number {
    return this.#fills.size;
  }

  /** New mirror groups (a reload); fills already running keep the plan they started with. */
  useMirrors(m: Mirrors): void {
    this.#mirrors = m;
  }

  /** The fills in flight with the most clients attached (the dashboard's "top waiters"). */
  topFills(n: number, now: number): { url: string; readers: number; bytes: number; of: number | null; ageS: number }[] {
    return [...this.#fills.values()]
      .filter((f) => f.state === 'pending' || f.state === 'streaming')
      .sort((a, b) => b.attached - a.attached)
      .slice(0, n)
      .map((f) => ({ url: f.key.split('\n')[0]!, readers: f.attached, bytes: f.received, of: f.head?.contentLength ?? null, ageS: Math.round((now - f.startedAt) / 100) / 10 }));
  }

  /** A fill this request may join, if any. */
  joinable(key: string): Fill | undefined {
    const f = this.#fills.get(key);
    if (!f?.joinable) return undefined;
    // A completed fill still being committed is as good as a stored copy only while it is fresh.
    if (f.state === 'done' && f.policy && !(f.policy.timeToLive() > 0)) return undefined;
    return f;
  }

  isUncacheable(primary: string): boolean {
    return this.#uncacheable.has(primary);
  }

  /** Forget in-flight and stored state of a key (unsafe method succeeded, PURGE). */
  invalidate(key: string): void {
    const f = this.#fills.get(key);
    if (f) {
      this.#superseded.add(f);
      this.#unmap(f);
    }
  }

  readonly #superseded = new WeakSet<Fill>();
  readonly #commits = new Set<Promise<void>>();

  /** Resolves when no fill is running or being committed (graceful shutdown waits for this). */
  async settle(): Promise<void> {
    while (this.#fills.size > 0 || this.#commits.size > 0) {
      if (this.#commits.size > 0) await Promise.all(this.#commits);
      else await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Start a fill. A newer fill for the same key (a client reload) supersedes the older one. */
  start(r: FillRequest): Fill {
    const fill = new Fill(r.key, this.#clock.now(), this.#cfg.fillWindowBytes, this.budget);
    const prev = this.#fills.get(r.key);
    if (prev) {
      this.#superseded.add(prev);
      prev.retire();
    }
    this.#fills.set(r.key, fill);
    this.stats.fillsStarted++;
    void this.#run(fill, r);
    return fill;
  }

  #unmap(fill: Fill): void {
    if (this.#fills.get(fill.key) === fill) this.#fills.delete(fill.key);
    fill.retire();
  }

  readonly #finished = new WeakSet<Fill>();

  /** A fill's end, counted once however it ends (a released fill ends at its head, then its body). */
  #done(fill: Fill): void {
    this.#unmap(fill);
    if (this.#finished.has(fill)) return;
    this.#finished.add(fill);
    this.onFillDone?.(fill.attached);
    const s = this.stats.waitersPerFill;
    s.push(fill.attached);
    if (s.length > 1024) s.splice(0, s.length - 1024);
  }

  async #run(fill: Fill, r: FillRequest): Promise<void> {
    const policyReq = policyRequest(r.url, 'GET', r.clientHeaders);
    const headers = { ...r.upstreamHeaders };
    // A client reload must not be answered from a cache further up either.
    if (r.stale?.policy) Object.assign(headers, r.stale.policy.revalidationHeaders(policyReq));
    const plan = new FetchPlan({ url: r.url, cas: r.cas, mirrors: this.#mirrors, accelRepo: r.accelRepo, avoid: this.#corruptFrom.get(r.key) });
    const got = await this.#firstAnswer(plan, headers);
    if ('error' in got) {
      this.stats.fillsFailed++;
      fill.fail(got.error);
      this.#done(fill);
      return;
    }
    const { res, attempt, ac, every404 } = got;
    fill.peer = attempt.url.hostname;
    const body = res.body;
    const resForPolicy = { status: res.status, headers: res.headers as Record<string, string> };

    // Revalidation answered 304: refresh the stored headers; waiters are served the stored body.
    if (r.stale && res.status === 304) {
      body.on('error', () => {}); // a 304 has no body to lose
      body.resume();
      const { policy, modified } = r.stale.policy.revalidatedPolicy(policyReq as never, resForPolicy as never);
      if (!modified) {
        const meta: StoredMeta = { ...r.stale.meta, headers: mergeHeaders(r.stale.meta.headers, res.headers), policy: policy.toObject(), storedAt: this.#clock.now() };
        await this.#store.updateMeta(meta, policy).catch((err) => this.#log.warn({ err, key: r.key }, 'updating stored headers failed'));
        fill.notModified = true;
        fill.finish();
        this.#done(fill);
        return;
      }
    }

    const policy = this.#freshness.policyFor(policyReq as never, resForPolicy as never);
    const vary = varyNames(res.headers.vary);
    const cl = parseContentLength(res.headers['content-length']);
    const head = { status: res.status, headers: endToEnd(res.headers), contentLength: cl };
    const varyChanged = vary.join() !== r.vary.join();
    if (vary.length && !vary.includes('*')) this.varySpecs.set(r.primary, vary);
    // A content-addressed object is keyed without its host, so only the object itself is stored under
    // that key, or a 404 that every mirror of the group gave (negatively cached): never one mirror's
    // 404 or error.
    const verified = r.cas !== undefined && res.status === 200;
    const storable =
      !this.#superseded.has(fill) &&
      !varyChanged &&
      res.status !== 206 &&
      (r.cas === undefined || verified || every404) &&
      policy.storable() &&
      policy.timeToLive() > 0 &&
      (cl === undefined || cl <= this.#cfg.maxObjectBytes);
    const job: PipeJob = { plan, headers, mirror: attempt.mirror, contentLength: cl, check: verified ? new HashCheck(r.cas!) : undefined, skip: 0, ac };
    if (job.check) fill.holdBack = true;

    if (!storable && r.cas !== undefined && cl !== undefined && cl <= SHARED_ERROR_MAX_BYTES && !this.#superseded.has(fill)) {
      // A small content-addressed answer that is not stored (a 5xx, a 404 not every mirror gave, an
      // object the Stratum 1 marks uncacheable) still goes to every waiter: releasing a herd to fetch
      // on its own would hammer the Stratum 1 with identical requests.
      fill.setHead(head, undefined);
      this.#attach(fill, body, job);
      return;
    }
    if (!storable) {
      // Not shared: the first client keeps it; the rest go upstream on their own, now and for a while.
      if (!varyChanged && r.cas === undefined) this.#uncacheable.set(r.primary, true);
      this.stats.fillsReleased++;
      this.#done(fill);
      fill.setHead(head, undefined);
      fill.release();
      this.#attach(fill, body, job);
      return;
    }

    const meta: StoredMeta = { key: r.key, url: r.url.href, status: res.status, headers: head.headers, policy: policy.toObject(), vary, storedAt: this.#clock.now() };
    const spill = this.#store.disk.openWriter(meta, policy, cl) as DiskWriter | undefined;
    fill.policy = policy;
    job.store = { spill, meta, policy };
    fill.setHead(head, spill);
    this.#attach(fill, body, job);
  }

  /**
   * Ask the plan's mirrors in turn until one gives an answer worth passing on. Connect errors, timeouts
   * and 5xx move on when the plan allows failover; so does a 404 of a content-addressed object, which is
   * answered only when no mirror has it.
   */
  async #firstAnswer(plan: FetchPlan, headers: Headers): Promise<{ res: UpstreamResponse; attempt: Attempt; ac: AbortController; every404: boolean } | { error: ProxyError }> {
    let lastError: ProxyError | undefined;
    let other = false; // an attempt failed with something other than a 404
    let held404: { status: number; headers: Record<string, string | string[]>; body: Buffer; attempt: Attempt } | undefined;
    for (let attempt = plan.next(); attempt; attempt = plan.next()) {
      const ac = new AbortController();
      const t0 = performance.now();
      const m = attempt.mirror;
      let res: UpstreamResponse;
      const timer = this.#answerTimer(plan, ac);
      try {
        res = await this.#upstream.request({ url: attempt.url, method: 'GET', headers: { ...headers, host: attempt.url.host }, signal: ac.signal });
      } catch (err) {
        lastError = upstreamError(ac.signal.aborted ? ac.signal.reason : err);
        other = true;
        if (m) this.#mirrorFailed(plan, m, lastError.token);
        if (!plan.failover) break;
        if (plan.hasMore) this.stats.failovers++;
        continue;
      } finally {
        clearTimeout(timer);
      }
      const ttfb = performance.now() - t0;
      if (res.status >= 500 && plan.failover && plan.hasMore) {
        other = true;
        discard(res.body);
        if (m) this.#mirrorFailed(plan, m, `HTTP ${res.status}`);
        this.stats.failovers++;
        continue;
      }
      if (m) this.#mirrors.fetched(m, res.status < 500, ttfb, `HTTP ${res.status}`);
      if (res.status === 404 && plan.retry404 && plan.hasMore) {
        // That mirror lacks the object (not yet replicated): ask the next one, keep this answer in case.
        const b = await readCapped(res.body, 64 * 1024).catch(() => Buffer.alloc(0));
        held404 ??= { status: res.status, headers: res.headers, body: b, attempt };
        this.stats.failovers++;
        continue;
      }
      if (lastError || held404) this.#log.info({ url: attempt.url.href, status: res.status, tried: attempt.mirror?.origin }, 'answered by a failover mirror');
      // Every mirror of the group was asked and each said 404: the object is missing group-wide.
      const every404 = res.status === 404 && plan.retry404 && !other;
      return { res, attempt, ac, every404 };
    }
    if (held404) {
      const { status, headers: h, body, attempt } = held404;
      return { res: { status, headers: h, body: Readable.from([body]), peer: attempt.url.hostname }, attempt, ac: new AbortController(), every404: false };
    }
    return { error: lastError ?? new ProxyError('ERR_UPSTREAM_RESET', 'no mirror to ask') };
  }

  /**
   * With another mirror to fall back on, a mirror that has not connected and answered within
   * --mirror-timeout is given up: waiting for --connect-timeout or --read-timeout would cost every
   * waiting client its 5 s watchdog. The last mirror of a plan gets the full timeouts.
   */
  #answerTimer(plan: FetchPlan, ac: AbortController): NodeJS.Timeout | undefined {
    if (!plan.failover || !plan.hasMore) return undefined;
    const ms = this.#mirrors.cfg.answerTimeoutMs;
    return setTimeout(() => ac.abort(new ProxyError('ERR_READ_TIMEOUT', `mirror did not answer within ${ms} ms; asking the next one`)), ms);
  }

  #mirrorFailed(plan: FetchPlan, m: Mirror, why: string): void {
    this.#mirrors.fetched(m, false, undefined, why);
    if (plan.accelRepo !== undefined) plan.group?.unstick(plan.accelRepo, m);
  }

  /** Feed an upstream body into the fill. On a mid-body failure it may be resumed from another mirror. */
  #attach(fill: Fill, body: Readable, job: PipeJob): void {
    const ac = job.ac;
    fill.upstream = { pause: () => body.pause(), resume: () => body.resume(), abort: () => ac.abort() };
    let skip = job.skip;
    body.on('data', (c: Buffer) => {
      this.#upstream.bytes += c.length;
      if (job.mirror) job.mirror.bytes += c.length;
      if (skip > 0) {
        // A mirror that ignored our Range sends the whole object again: drop what we already have.
        if (c.length <= skip) {
          skip -= c.length;
          return;
        }
        c = c.subarray(skip);
        skip = 0;
      }
      job.check?.update(c);
      fill.push(c);
    });
    body.on('error', (err: unknown) => void this.#bodyFailed(fill, job, err));
    body.on('end', () => this.#bodyEnded(fill, job));
    // A content-addressed body that stalls while another mirror could finish it is given up after
    // --mirror-timeout without bytes (not counting time paused for our own backpressure), and resumed.
    if (job.plan.cas && job.plan.failover && job.plan.hasMore) {
      const stallMs = this.#mirrors.cfg.answerTimeoutMs;
      let seen = fill.received;
      let quietSince = performance.now();
      const watch = setInterval(() => {
        const now = performance.now();
        if (fill.received !== seen || fill.paused) {
          seen = fill.received;
          quietSince = now;
        } else if (now - quietSince > stallMs) {
          clearInterval(watch);
          body.destroy(new ProxyError('ERR_READ_TIMEOUT', `mirror sent nothing for ${stallMs} ms mid-body`));
        }
      }, Math.max(50, Math.min(500, stallMs / 4)));
      watch.unref();
      body.once('close', () => clearInterval(watch));
    }
  }

  async #bodyFailed(fill: Fill, job: PipeJob, err: unknown): Promise<void> {
    if (fill.state === 'done' || fill.state === 'failed') return;
    // A released fill is aborted on purpose once its one reader leaves: not an upstream failure.
    if (fill.released && job.ac.signal.aborted) {
      job.store?.spill?.abort();
      fill.fail(upstreamError(err));
      return;
    }
    const e = upstreamError(err);
    if (job.mirror) this.#mirrorFailed(job.plan, job.mirror, `${e.token} after ${fill.received} bytes`);
    if (await this.#resume(fill, job)) return;
    job.store?.spill?.abort();
    fill.fail(e);
    if (fill.released) return;
    this.stats.fillsFailed++;
    this.#done(fill);
    this.#log.warn({ key: fill.key, bytes: fill.received, err: e.message }, 'upstream failed mid-body; readers truncated, nothing stored');
  }

  /** Continue a content-addressed body of known length with `Range: bytes=N-` from the next mirror. */
  async #resume(fill: Fill, job: PipeJob): Promise<boolean> {
    const cl = job.contentLength;
    if (!job.plan.cas || !job.plan.failover || cl === undefined || fill.received >= cl) return false;
    for (let attempt = job.plan.next(); attempt; attempt = job.plan.next()) {
      const from = fill.received;
      const ac = new AbortController();
      const t0 = performance.now();
      const m = attempt.mirror;
      let res: UpstreamResponse;
      const timer = this.#answerTimer(job.plan, ac);
      try {
        res = await this.#upstream.request({ url: attempt.url, method: 'GET', headers: { ...job.headers, host: attempt.url.host, range: `bytes=${from}-` }, signal: ac.signal });
      } catch (err) {
        if (m) this.#mirrorFailed(job.plan, m, upstreamError(ac.signal.aborted ? ac.signal.reason : err).token);
        continue;
      } finally {
        clearTimeout(timer);
      }
      const range = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(res.headers['content-range'] ?? ''));
      let skip: number;
      if (res.status === 206 && range && Number(range[1]) === from && Number(range[3]) === cl) skip = 0;
      else if (res.status === 200 && parseContentLength(res.headers['content-length']) === cl) skip = from;
      else {
        discard(res.body);
        if (m) this.#mirrorFailed(job.plan, m, `resume answered HTTP ${res.status}`);
        continue;
      }
      if (m) this.#mirrors.fetched(m, true, performance.now() - t0);
      if (fill.state !== 'streaming') {
        discard(res.body);
        return true;
      }
      this.stats.resumes++;
      fill.peer = attempt.url.hostname;
      this.#log.info({ key: fill.key, from, of: cl, mirror: attempt.mirror?.origin, status: res.status }, 'resumed a broken fill from another mirror');
      this.#attach(fill, res.body, { ...job, mirror: m, skip, ac });
      return true;
    }
    return false;
  }

  #bodyEnded(fill: Fill, job: PipeJob): void {
    if (fill.state !== 'streaming') return;
    if (job.check && !job.check.matches()) {
      // Corrupt: nobody gets the last bytes, nothing is stored, and the next fill asks another mirror.
      this.stats.hashMismatches++;
      job.store?.spill?.abort();
      fill.fail(new ProxyError('ERR_CONTENT_HASH'));
      if (job.mirror) {
        this.#mirrorFailed(job.plan, job.mirror, 'content hash mismatch');
        const bad = this.#corruptFrom.get(fill.key) ?? new Set<string>();
        bad.add(job.mirror.origin);
        this.#corruptFrom.set(fill.key, bad);
      }
      this.#log.error({ key: fill.key, mirror: job.mirror?.origin, bytes: fill.received }, 'content hash mismatch; readers cut short, nothing stored');
      if (!fill.released) this.stats.fillsFailed++;
      this.#done(fill);
      return;
    }
    fill.finish();
    if (!job.store) {
      this.#done(fill); // shared but not stored (a released fill was counted done already)
      return;
    }
    const { spill, meta, policy } = job.store;
    if (!spill) {
      // No disk writer (the disk tier refused or failed): keep a small object in memory at least.
      const whole = fill.received <= this.#cfg.maxMemoryObjectBytes ? fill.wholeBody() : undefined;
      if (whole && !this.#superseded.has(fill)) this.#store.memory.put(meta, policy, whole);
      this.#done(fill);
      return;
    }
    // A small body goes to memory at once, so the next request is a hit without waiting for the disk.
    let inMemory = false;
    if (!this.#superseded.has(fill) && fill.received <= this.#cfg.maxMemoryObjectBytes) {
      const whole = fill.wholeBody();
      if (whole) inMemory = this.#store.memory.put(meta, policy, whole);
      if (inMemory) this.#unmap(fill);
    }
    const c = this.#commit(fill, spill, meta, policy, inMemory);
    this.#commits.add(c);
    void c.finally(() => this.#commits.delete(c));
  }

  async #commit(fill: Fill, spill: DiskWriter, meta: StoredMeta, policy: Policy, inMemory: boolean): Promise<void> {
    try {
      if (this.#superseded.has(fill)) {
        spill.abort();
        return;
      }
      if (!inMemory && fill.received <= this.#cfg.maxMemoryObjectBytes) {
        const whole = fill.wholeBody() ?? (await spill.readAt(0, fill.received));
        if (whole.length === fill.received) this.#store.memory.put(meta, policy, whole);
      }
      const ok = await spill.commit();
      if (ok) this.stats.fillsCommitted++;
      else if (spill.failed) this.#log.warn({ key: fill.key, err: spill.failed.message }, 'disk write failed; object kept in memory only if small');
    } catch (err) {
      this.#log.error({ err, key: fill.key }, 'commit failed');
    } finally {
      this.#done(fill);
    }
  }
}

/** Largest error body of a content-addressed object shared with every waiter (without a spill file). */
const SHARED_ERROR_MAX_BYTES = 256 * 1024;

interface PipeJob {
  plan: FetchPlan;
  headers: Headers;
  mirror: Mirror | undefined;
  contentLength: number | undefined;
  check: HashCheck | undefined;
  /** Bytes to drop from the start of this body (a resume answered 200 instead of 206). */
  skip: number;
  ac: AbortController;
  store?: { spill: DiskWriter | undefined; meta: StoredMeta; policy: Policy };
}

async function readCapped(body: Readable, cap: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  body.on('error', () => {}); // the loop below sees errors; this only keeps a late one from being unhandled
  for await (const c of body) {
    n += (c as Buffer).length;
    if (n > cap) {
      discard(body);
      break;
    }
    parts.push(c as Buffer);
  }
  return Buffer.concat(parts);
}

function parseContentLength(v: string | string[] | undefined): number | undefined {
  const s = Array.isArray(v) ? v[0] : v;
  return s !== undefined && /^\d+$/.test(s) ? Number(s) : undefined;
}

/** RFC 9111 §4.3.4: a 304 updates the stored header fields it carries. */
function mergeHeaders(stored: Headers, fresh: Record<string, string | string[]>): Headers {
  const out = { ...stored };
  for (const [k, v] of Object.entries(endToEnd(fresh))) if (k !== 'content-length') out[k] = v;
  return out;
}
