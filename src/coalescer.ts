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
import { LRUCache } from 'lru-cache';
import { varyNames } from './cache-key.ts';
import type { Clock } from './clock.ts';
import type { Config } from './config.ts';
import { upstreamError } from './errors.ts';
import { Fill, type FillBudget } from './fill.ts';
import { policyRequest, type Freshness, type Policy } from './freshness.ts';
import { endToEnd, type Headers } from './forward.ts';
import type { Logger } from './log.ts';
import type { StoredMeta, StoredObject, TieredStore } from './store.ts';
import type { DiskWriter } from './store-disk.ts';
import type { Upstream } from './fetch.ts';

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
}

export interface CoalescerStats {
  fillsStarted: number;
  fillsCommitted: number;
  fillsFailed: number;
  fillsReleased: number;
  waitersPerFill: number[]; // recent samples, bounded
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
  readonly stats: CoalescerStats = { fillsStarted: 0, fillsCommitted: 0, fillsFailed: 0, fillsReleased: 0, waitersPerFill: [] };

  /** Called once per fill with the number of clients it served. */
  onFillDone: ((readers: number) => void) | undefined;

  constructor(o: { cfg: Config; clock: Clock; store: TieredStore; upstream: Upstream; freshness: Freshness; log: Logger }) {
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
    const ac = new AbortController();
    let res;
    try {
      res = await this.#upstream.request({ url: r.url, method: 'GET', headers, signal: ac.signal });
    } catch (err) {
      this.stats.fillsFailed++;
      fill.fail(upstreamError(err));
      this.#done(fill);
      return;
    }
    const body = res.body;
    fill.upstream = { pause: () => body.pause(), resume: () => body.resume(), abort: () => ac.abort() };
    const resForPolicy = { status: res.status, headers: res.headers as Record<string, string> };

    // Revalidation answered 304: refresh the stored headers; waiters are served the stored body.
    if (r.stale && res.status === 304) {
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
    const storable =
      !this.#superseded.has(fill) &&
      !varyChanged &&
      res.status !== 206 &&
      policy.storable() &&
      policy.timeToLive() > 0 &&
      (cl === undefined || cl <= this.#cfg.maxObjectBytes);

    if (!storable) {
      // Not shared: the first client keeps it; the rest go upstream on their own, now and for a while.
      if (!varyChanged) this.#uncacheable.set(r.primary, true);
      this.stats.fillsReleased++;
      this.#done(fill);
      fill.setHead(head, undefined);
      fill.release();
      this.#pipe(fill, body, undefined, undefined, undefined);
      return;
    }

    const meta: StoredMeta = { key: r.key, url: r.url.href, status: res.status, headers: head.headers, policy: policy.toObject(), vary, storedAt: this.#clock.now() };
    const spill = this.#store.disk.openWriter(meta, policy, cl) as DiskWriter | undefined;
    fill.policy = policy;
    fill.setHead(head, spill);
    this.#pipe(fill, body, spill, meta, policy);
  }

  #pipe(fill: Fill, body: NodeJS.ReadableStream & { destroy(): void }, spill: DiskWriter | undefined, meta: StoredMeta | undefined, policy: Policy | undefined): void {
    body.on('data', (c: Buffer) => {
      this.#upstream.bytes += c.length;
      fill.push(c);
    });
    body.on('error', (err: unknown) => {
      if (fill.state === 'done') return;
      spill?.abort();
      fill.fail(upstreamError(err));
      // A released fill is aborted on purpose once its one reader leaves: not an upstream failure.
      if (fill.released) return;
      this.stats.fillsFailed++;
      this.#done(fill);
      this.#log.warn({ key: fill.key, bytes: fill.received, err: (err as Error).message }, 'upstream failed mid-body; readers truncated, nothing stored');
    });
    body.on('end', () => {
      fill.finish();
      if (!spill || !meta || !policy) return;
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
    });
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
