// The coalescer: the registry of fills. At most one upstream fetch per cache key at a time, however
// many clients ask. A fill belongs to no client: it runs on when its first client hangs up, and it is
// committed to the tiers when complete (the fetch itself is src/fill-fetch.ts). The response decides
// what happens to the waiters:
//   storable        -> everyone streams from the fill; the disk record is its spill file; commit at end
//   not storable    -> the first client keeps the response, the others are released to fetch on their
//                      own, and the key is remembered as uncacheable for a while (Varnish hit-for-miss),
//                      but only when the response is not storable on its own account
//   304 (revalidation) -> stored headers are refreshed; waiters are served the stored body
//   error before headers -> every waiter gets the same labelled error
//   error mid-body  -> every reader is cut short; nothing is stored
// A fill that can't be stored and has nobody left to serve ends at once; one with no progress for
// --read-timeout is given up by a watchdog. Neither holds a --max-fills slot or memory beyond that.
import { LRUCache } from 'lru-cache';
import { upTo } from './lru-bounds.ts';
import type { Clock } from './clock.ts';
import type { Config } from './config.ts';
import { ProxyError } from './errors.ts';
import type { Upstream } from './fetch.ts';
import { runFetch, type FetchHost, type FetchStats, type FillRequest } from './fill-fetch.ts';
import { Fill, type FillBudget, type FillReader } from './fill.ts';
import { pumpRecord, RecordSpill } from './record-fill.ts';
import { isFresh, type Freshness } from './freshness.ts';
import type { Logger } from './log.ts';
import type { Mirrors } from './mirrors.ts';
import type { Hierarchy } from './hierarchy.ts';
import type { StoredObject, TieredStore } from './store.ts';

export type { FillRequest } from './fill-fetch.ts';

export class Coalescer implements FetchHost {
  readonly #fills = new Map<string, Fill>();
  readonly #uncacheable: LRUCache<string, true>;
  /** Vary header names last seen for a primary key. */
  readonly varySpecs = new LRUCache<string, string[]>(upTo(65536));
  readonly cfg: Config;
  readonly clock: Clock;
  readonly store: TieredStore;
  readonly upstream: Upstream;
  readonly freshness: Freshness;
  readonly log: Logger;
  readonly hierarchy: Hierarchy;
  /** Memory shared by the windows of all fills in flight (--fill-memory). */
  readonly budget: FillBudget;
  readonly stats: FetchStats = { fillsStarted: 0, fillsCommitted: 0, fillsFailed: 0, fillsReleased: 0, failovers: 0, resumes: 0, hashMismatches: 0, fillsAbandoned: 0, internalErrors: 0 };
  #mirrors: Mirrors;
  /** Mirrors that recently served corrupt bytes for a key: asked last by the next fill. */
  readonly #corruptFrom = new LRUCache<string, Set<string>>({ max: 4096, ttl: 600_000 });
  readonly #superseded = new WeakSet<Fill>();
  /** Disk commits in flight, by key: bounded by the running fills. */
  readonly #commits = new Map<string, Set<Promise<unknown>>>();
  readonly #finished = new WeakSet<Fill>();
  /**
   * Stored fills whose whole body is still in memory because clients are still reading it: a request
   * that finds the disk record reads this copy instead (a herd on a large object reads the disk once).
   * An entry goes when the fill's last reader leaves and its memory is dropped.
   */
  readonly #held = new Map<string, Fill>();
  /** Disk lookups in flight by key, settled once their request has taken its next step. */
  readonly #diskLookups = new Map<string, Promise<unknown>>();
  /** Every fetch still running (including released fills and commits to disk). */
  readonly #running = new Set<Fill>();
  #idle: (() => void)[] = [];
  /** Keys whose refresh just failed (upstream down): stale copies are served without asking again. */
  readonly #refreshFailed: LRUCache<string, true>;
  #watchdog: NodeJS.Timeout | undefined;

  /** Called once per fill with the number of clients it served. */
  onFillDone: ((readers: number) => void) | undefined;

  constructor(o: { cfg: Config; clock: Clock; store: TieredStore; upstream: Upstream; freshness: Freshness; log: Logger; mirrors: Mirrors; hierarchy: Hierarchy }) {
    this.#mirrors = o.mirrors;
    this.cfg = o.cfg;
    this.clock = o.clock;
    this.store = o.store;
    this.upstream = o.upstream;
    this.freshness = o.freshness;
    this.log = o.log;
    this.hierarchy = o.hierarchy;
    this.budget = { limitBytes: o.cfg.fillMemoryBytes, usedBytes: 0 };
    this.#uncacheable = new LRUCache<string, true>({ ...upTo(65536), ttl: Math.max(1, o.cfg.uncacheableTtlMs), ttlAutopurge: false, ttlResolution: 0, perf: o.clock });
    this.#refreshFailed = new LRUCache<string, true>({ ...upTo(65536), ttl: Math.max(1, o.cfg.staleRetryMs), ttlAutopurge: false, ttlResolution: 0, perf: o.clock });
  }

  get mirrors(): Mirrors {
    return this.#mirrors;
  }

  /** Fills new requests can join (the --max-fills count). */
  get inFlight(): number {
    return this.#fills.size;
  }

  /** Fetches still running, joinable or not. */
  get running(): number {
    return this.#running.size;
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
      .map((f) => ({ url: f.key.split('\n')[0]!, readers: f.attached, bytes: f.received, of: f.response?.head.contentLength ?? null, ageS: Math.round((now - f.startedAt) / 100) / 10 }));
  }

  /** A fill this request may join, if any. */
  joinable(key: string): FillReader | undefined {
    const f = this.#fills.get(key);
    if (!f?.joinable) return undefined;
    // A completed fill still being committed is as good as a stored copy only while it is fresh.
    const policy = f.response?.policy;
    if (f.state === 'done' && policy && !isFresh(policy)) return undefined;
    return f;
  }

  /**
   * The stored copy of `key` as a fill clients are reading now, if any: the finished fill that stored it
   * (its body still in memory), or a shared read of its disk record. Same response, same freshness.
   */
  heldBody(key: string): FillReader | undefined {
    const f = this.#held.get(key);
    // A new reader never reads a file back unchecked: it joins a body wholly in memory, or a shared
    // read still checking the record as it reads.
    return f && f.readers > 0 && (f.wholeInMemory || (f.state === 'streaming' && f.joinable)) ? f : undefined;
  }

  /** The disk lookup of `key` in flight, if any (plain requests wait for it rather than open the record too). */
  diskLookupOf(key: string): Promise<unknown> | undefined {
    return this.#diskLookups.get(key);
  }

  /** Note a disk lookup of `key` until it settles (the first one in flight is the one waited for). */
  noteDiskLookup(key: string, lookup: Promise<unknown>): void {
    if (this.#diskLookups.has(key)) return;
    this.#diskLookups.set(key, lookup);
    const done = () => void this.#diskLookups.delete(key);
    lookup.then(done, done);
  }

  /** The fill's body was stored on disk only: while its readers last, new requests may read it here. */
  hold(fill: Fill): void {
    // Only a plain shared response: a variant or a released one is not every request's answer.
    if (fill.response?.variant || fill.released || fill.readers === 0 || !fill.wholeInMemory) return;
    this.#keep(fill);
  }

  #keep(fill: Fill): void {
    this.#held.set(fill.key, fill);
    fill.onDropped = () => {
      if (this.#held.get(fill.key) === fill) this.#held.delete(fill.key);
    };
  }

  /**
   * Serve a stored disk record through one shared read: the caller becomes its first reader, and
   * requests for the key that arrive while it is read join it (heldBody). `corrupt` drops a record
   * that fails its checksum, before every reader is cut short.
   */
  shareRecord(key: string, st: StoredObject, corrupt: () => Promise<void>): { fill: FillReader; readerId: number } {
    const body = st.body;
    if (body.kind !== 'file') throw new TypeError('shareRecord needs a disk record');
    const fill = new Fill(key, this.clock.now(), this.cfg.fillWindowBytes, this.budget);
    const spill = new RecordSpill(body, st.size);
    // The last byte waits for the record's checksum (holdBack).
    fill.respond({ head: { status: st.meta.status, headers: { ...st.meta.headers, 'content-length': String(st.size) }, contentLength: st.size }, shared: true, policy: st.policy, holdBack: true }, spill);
    fill.upstream = { pause() {}, resume() {}, abort() {} }; // the pump stops when the fill has ended
    const readerId = fill.addReader();
    fill.retire(); // never in the fill registry: with its last reader, it ends and its memory goes
    this.#keep(fill);
    void pumpRecord(fill, body, spill, st.size, corrupt);
    return { fill, readerId };
  }

  isUncacheable(primary: string): boolean {
    return this.#uncacheable.has(primary);
  }

  refreshFailedRecently(key: string): boolean {
    return this.#refreshFailed.has(key);
  }

  noteRefreshFailed(key: string): void {
    if (this.cfg.staleRetryMs > 0) this.#refreshFailed.set(key, true);
  }

  markUncacheable(primary: string): void {
    this.#uncacheable.set(primary, true);
  }

  setVary(primary: string, names: string[] | undefined): void {
    if (names) this.varySpecs.set(primary, names);
    else this.varySpecs.delete(primary);
  }

  corruptFrom(key: string): ReadonlySet<string> | undefined {
    return this.#corruptFrom.get(key);
  }

  noteCorrupt(key: string, origin: string): void {
    const bad = this.#corruptFrom.get(key) ?? new Set<string>();
    bad.add(origin);
    this.#corruptFrom.set(key, bad);
  }

  superseded(fill: Fill): boolean {
    return this.#superseded.has(fill);
  }

  noteCommit(key: string, landing: Promise<unknown>): void {
    const set = this.#commits.get(key) ?? new Set<Promise<unknown>>();
    this.#commits.set(key, set);
    set.add(landing);
    const done = () => {
      set.delete(landing);
      if (set.size === 0 && this.#commits.get(key) === set) this.#commits.delete(key);
    };
    landing.then(done, done);
  }

  /** Until the disk commits of `key` in flight have landed (a superseded one removing its record again). */
  async commitsLanded(key: string): Promise<void> {
    const s = this.#commits.get(key);
    if (s) await Promise.allSettled([...s]);
  }

  /** Is a fill of `key` running whose answer is to be stored (a PURGE now still finds a copy)? */
  storing(key: string): boolean {
    for (const r of this.#running) if ((r.key === key || r.response?.variant?.key === key) && r.response?.shared && !this.#superseded.has(r)) return true;
    return false;
  }

  /** Forget in-flight state of a key (unsafe method succeeded, PURGE): its fill is not stored. */
  invalidate(key: string): void {
    const f = this.#fills.get(key);
    if (f) this.unmap(f);
    this.#held.delete(key);
    // Also a fill that new requests no longer find but whose disk commit is still landing.
    for (const r of this.#running) if (r.key === key || r.response?.variant?.key === key) this.#superseded.add(r);
  }

  /** Start a fill; the starting client is its reader 0. A newer fill for the key supersedes the older. */
  start(r: FillRequest): { fill: FillReader; readerId: number } {
    const fill = new Fill(r.key, this.clock.now(), this.cfg.fillWindowBytes, this.budget, r.nothingStored);
    const readerId = fill.addReader();
    this.#held.delete(r.key); // a refetch or revalidation: the old body is no longer the stored one
    const prev = this.#fills.get(r.key);
    if (prev) {
      this.#superseded.add(prev);
      prev.retire();
    }
    this.#fills.set(r.key, fill);
    this.stats.fillsStarted++;
    this.#running.add(fill);
    // runFetch never rejects: its own steps turn every failure into the fill's end.
    void runFetch(this, fill, r).finally(() => {
      this.#running.delete(fill);
      if (this.#running.size === 0) for (const f of this.#idle.splice(0)) f();
    });
    this.#watch();
    return { fill, readerId };
  }

  unmap(fill: Fill): void {
    if (this.#fills.get(fill.key) === fill) this.#fills.delete(fill.key);
    const alias = fill.response?.variant?.key;
    if (alias !== undefined && this.#fills.get(alias) === fill) this.#fills.delete(alias);
    fill.retire();
  }

  alias(fill: Fill, key: string): void {
    if (!this.#fills.has(key)) this.#fills.set(key, fill);
  }

  /** A fill's end, counted once however it ends (a released fill ends at its head, then its body). */
  done(fill: Fill): void {
    this.unmap(fill);
    if (this.#finished.has(fill)) return;
    this.#finished.add(fill);
    this.onFillDone?.(fill.attached);
  }

  /** Resolves when no fetch is running or being committed (graceful shutdown waits for this). */
  settle(): Promise<void> {
    if (this.#running.size === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /** Shutdown past its timeout: give every running fill up now (readers are cut short). */
  abortAll(why: string): void {
    for (const fill of this.#running) fill.abandon(new ProxyError('ERR_FILL_ABANDONED', why));
  }

  /**
   * No fill sits without progress beyond its timeouts: a streaming fill that received nothing for
   * --read-timeout (paused behind a reader that stopped reading, or a disk that stopped writing; undici's
   * own body timeout covers only an upstream that goes quiet while we read) is given up.
   */
  #watch(): void {
    if (this.#watchdog) return;
    const limit = this.cfg.readTimeoutMs;
    this.#watchdog = setInterval(() => {
      if (this.#running.size === 0) {
        clearInterval(this.#watchdog);
        this.#watchdog = undefined;
        return;
      }
      const now = performance.now();
      for (const fill of this.#running) {
        if (fill.state === 'streaming' && now - fill.lastProgressAt > limit) fill.abandon(new ProxyError('ERR_READ_TIMEOUT', `no progress for ${limit} ms`));
      }
    }, Math.max(100, Math.min(1000, limit / 4)));
    this.#watchdog.unref();
  }

  /** Stop the watchdog (the proxy is closing). */
  close(): void {
    clearInterval(this.#watchdog);
    this.#watchdog = undefined;
  }
}
