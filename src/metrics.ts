// Prometheus metrics, declared in one table (Varnish VSC style) and served on the admin listener.
// Counters that the request path keeps (Counters, tier stats, coalescer stats, and the per-label counts
// below) are read at scrape time, so the hot path pays for a few integer increments, not a prom-client
// label lookup per counter. The per-request duration histogram is counted here too and written after
// the registry's text: prom-client's observe() builds and hashes a label object on every call.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Transaction } from './access-log.ts';
import type { CoalescerStats } from './coalescer.ts';
import type { MirrorSnapshot } from './mirrors.ts';
import { countRequest, REQUEST_COUNTERS, type Counters, type RequestCounter } from './counters.ts';

export interface MetricsSources {
  fillsInFlight: () => number;
  fillMemoryBytes: () => number;
  upstreamFetches: () => number;
  upstreamBytes: () => number;
  tiers: () => { tier: 'memory' | 'disk'; objects: number; bytes: number; maxBytes: number; evictions: number }[];
  clientConnections: () => number;
  mirrors: () => MirrorSnapshot[];
  fillStats: () => CoalescerStats;
  accessLogDroppedLines: () => number;
  /** Memory held outside the tiers and fills: the disk index, and the pool of read-back buffers. */
  heldMemory: () => { diskIndex: { entries: number; maxEntries: number; heapBytes: number }; bufferPoolBytes: number };
}

const RESULT_GROUP: Record<string, string> = {
  TCP_HIT: 'HIT',
  TCP_MEM_HIT: 'MEM_HIT',
  TCP_NEGATIVE_HIT: 'HIT',
  // A stale copy served within stale-while-revalidate while a background fill refreshes it.
  TCP_STALE_HIT: 'HIT',
  TCP_MISS: 'MISS',
  TCP_CLIENT_REFRESH_MISS: 'MISS',
  TCP_SWAPFAIL_MISS: 'MISS',
  TCP_REFRESH_MODIFIED: 'REFRESH_MODIFIED',
  TCP_REFRESH_UNMODIFIED: 'REFRESH_UNMODIFIED',
  // A stale copy served because the upstream could not be reached (RFC 9111 §4.2.4).
  TCP_REFRESH_FAIL_OLD: 'STALE',
  TCP_DENIED: 'DENIED',
  TCP_TUNNEL: 'TUNNEL',
  NONE: 'ERROR',
};

const KNOWN_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'OPTIONS', 'TRACE', 'PATCH', 'CONNECT', 'PURGE', 'NONE']);

export class Metrics {
  readonly registry = new Registry();
  // Per-label counts kept as plain numbers and handed to prom-client when scraped.
  // Requests by result group, then by method (two lookups of interned strings, no key built per request).
  readonly #requests = new Map<string, Map<string, { labels: { result: string; method: string }; n: number }>>();
  readonly #errors = new Map<string, number>();
  readonly #waiters: Histogram;
  readonly #duration = new DurationHistogram('cuttle_request_duration_seconds', 'Time from request to the last byte handed to the socket', [0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30]);

  readonly #counters: Counters;

  constructor(src: MetricsSources, counters: Counters) {
    this.#counters = counters;
    const r = this.registry;
    collectDefaultMetrics({ register: r, prefix: 'cuttle_process_', eventLoopMonitoringPrecision: 20 });
    const requests = this.#requests;
    const errors = this.#errors;
    const served = this.served;
    new Counter({ name: 'cuttle_requests_total', help: 'Client requests by result group (HIT, MEM_HIT, MISS, REFRESH_*, STALE, DENIED, TUNNEL, ERROR) and method', labelNames: ['result', 'method'], registers: [r], collect() { this.reset(); for (const byMethod of requests.values()) for (const { labels, n } of byMethod.values()) this.inc(labels, n); } });
    new Counter({ name: 'cuttle_served_bytes_total', help: 'Body bytes sent to clients, by where they came from (memory, disk, upstream)', labelNames: ['tier'], registers: [r], collect() { this.reset(); for (const [tier, n] of Object.entries(served)) if (n > 0) this.inc({ tier }, n); } });
    new Counter({ name: 'cuttle_errors_total', help: "cuttle's own failures by Proxy-Status error token", labelNames: ['error'], registers: [r], collect() { this.reset(); for (const [error, n] of errors) this.inc({ error }, n); } });
    this.#waiters = new Histogram({ name: 'cuttle_fill_readers', help: 'Clients served by one upstream fill (1 = no coalescing)', buckets: [1, 2, 5, 10, 50, 100, 500, 1000, 5000], registers: [r] });
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({ name, help, registers: [r], collect() { this.set(read()); } });
    gauge('cuttle_fills_in_flight', 'Upstream fills running now', src.fillsInFlight);
    gauge('cuttle_fill_memory_bytes', 'Memory held by in-flight fills (bounded by --fill-memory)', src.fillMemoryBytes);
    gauge('cuttle_client_connections', 'Open client connections', src.clientConnections);
    gauge('cuttle_disk_index_entries', 'Records in the disk index (one per object on disk)', () => src.heldMemory().diskIndex.entries);
    gauge('cuttle_disk_index_max_entries', 'Bound of the disk index: --disk-cache / 4 KiB (each record is charged whole 4 KiB blocks)', () => src.heldMemory().diskIndex.maxEntries);
    gauge('cuttle_disk_index_heap_bytes', 'Heap held by the disk index (its entries at their measured cost)', () => src.heldMemory().diskIndex.heapBytes);
    gauge('cuttle_buffer_pool_bytes', 'Read-back buffers kept for reuse, at what they cost (bounded at 32 MiB)', () => src.heldMemory().bufferPoolBytes);
    new Counter({ name: 'cuttle_upstream_fetches_total', help: 'Requests sent upstream (fills and passes)', registers: [r], collect() { this.reset(); this.inc(src.upstreamFetches()); } });
    new Counter({ name: 'cuttle_access_log_dropped_lines_total', help: 'Access-log lines dropped: the file could not take them (a full disk, a write error, 16 MiB behind)', registers: [r], collect() { this.reset(); this.inc(src.accessLogDroppedLines()); } });
    new Counter({ name: 'cuttle_upstream_bytes_total', help: 'Body bytes received from upstreams', registers: [r], collect() { this.reset(); this.inc(src.upstreamBytes()); } });
    const tierGauge = (name: string, help: string, pick: (t: ReturnType<MetricsSources['tiers']>[number]) => number) =>
      new Gauge({ name, help, labelNames: ['tier'], registers: [r], collect() { for (const t of src.tiers()) this.set({ tier: t.tier }, pick(t)); } });
    tierGauge('cuttle_cache_objects', 'Objects stored, by tier', (t) => t.objects);
    tierGauge('cuttle_cache_bytes', 'Bytes stored, by tier', (t) => t.bytes);
    tierGauge('cuttle_cache_max_bytes', 'Configured bound, by tier', (t) => t.maxBytes);
    const mirrorGauge = (name: string, help: string, pick: (m: MirrorSnapshot) => number | null) =>
      new Gauge({
        name,
        help,
        labelNames: ['group', 'mirror'],
        registers: [r],
        collect() {
          for (const m of src.mirrors()) {
            const v = pick(m);
            if (v !== null) this.set({ group: m.group, mirror: m.mirror }, v);
          }
        },
      });
    mirrorGauge('cuttle_mirror_healthy', 'Stratum 1 mirror health (1 healthy, 0 down)', (m) => (m.healthy ? 1 : 0));
    mirrorGauge('cuttle_mirror_rtt_seconds', 'Smoothed RTT of a mirror (EWMA of probes and time to first byte)', (m) => (m.rttMs === null ? null : m.rttMs / 1000));
    mirrorGauge('cuttle_mirror_stale', "1 when the mirror's probed manifest lags the group's newest by more than --mirror-max-lag", (m) => (m.stale ? 1 : 0));
    mirrorGauge('cuttle_mirror_manifest_revision', "Revision (S) of the probed repository's manifest on the mirror", (m) => m.revision);
    mirrorGauge('cuttle_mirror_fetches', 'Fetches sent to a mirror since start (a gauge of a monotonic count)', (m) => m.fetches);
    mirrorGauge('cuttle_mirror_failures', 'Failed fetches of a mirror since start: connect, timeout, 5xx, broken body, bad hash', (m) => m.failures);
    mirrorGauge('cuttle_mirror_bytes', 'Body bytes received from a mirror since start', (m) => m.bytes);
    mirrorGauge('cuttle_mirror_probe_failures', 'Failed health probes of a mirror since start', (m) => m.probeFailures);
    const fillCounter = (name: string, help: string, pick: (s: CoalescerStats) => number) =>
      new Counter({ name, help, registers: [r], collect() { this.reset(); this.inc(pick(src.fillStats())); } });
    fillCounter('cuttle_mirror_failovers_total', 'Upstream answers skipped for the next mirror (error, 5xx, or 404 of a content-addressed object)', (s) => s.failovers);
    fillCounter('cuttle_fill_resumes_total', 'Broken bodies continued with Range from another mirror', (s) => s.resumes);
    fillCounter('cuttle_hash_mismatches_total', 'Content-addressed bodies that failed their hash (cut short, never stored)', (s) => s.hashMismatches);
    // The request counters of /status and SNMP, from the same table and the same counts.
    new Counter({
      name: 'cuttle_requests_counted_total',
      help: `The request counters that /status and SNMP show, by name: ${Object.entries(REQUEST_COUNTERS).map(([k, v]) => `${k} = ${v.help}`).join('; ')}`,
      labelNames: ['counter'],
      registers: [r],
      collect() {
        this.reset();
        for (const k of Object.keys(REQUEST_COUNTERS) as RequestCounter[]) this.inc({ counter: k }, counters[k]);
      },
    });
    tierGauge('cuttle_cache_evictions', 'Objects evicted since start, by tier (a gauge of a monotonic count)', (t) => t.evictions);
  }

  /** One finished transaction. */
  observe(tx: Transaction, errorToken: string | undefined, nowMs: number): void {
    countRequest(this.#counters, tx, errorToken);
    const group = errorToken && tx.result !== 'TCP_DENIED' ? 'ERROR' : (RESULT_GROUP[tx.result] ?? 'ERROR');
    // Methods are whatever clients send: an unknown one is counted as OTHER, so they can't grow the map.
    const method = KNOWN_METHODS.has(tx.method) ? tx.method : 'OTHER';
    let byMethod = this.#requests.get(group);
    if (!byMethod) this.#requests.set(group, (byMethod = new Map()));
    const rc = byMethod.get(method);
    if (rc) rc.n++;
    else byMethod.set(method, { labels: { result: group, method }, n: 1 });
    const tier = tx.result === 'TCP_MEM_HIT' ? 'memory' : tx.result === 'TCP_HIT' || tx.result === 'TCP_REFRESH_UNMODIFIED' || tx.result === 'TCP_REFRESH_FAIL_OLD' || tx.result === 'TCP_STALE_HIT' ? 'disk' : 'upstream';
    if (tx.bytesOut > 0 && !errorToken) this.served[tier] += tx.bytesOut;
    if (errorToken) this.#errors.set(errorToken, (this.#errors.get(errorToken) ?? 0) + 1);
    this.#duration.observe(group, Math.max(0, nowMs - tx.startedAt) / 1000);
  }

  /** The Prometheus text of every metric (GET /metrics), in the registry's content type. */
  async text(): Promise<string> {
    return (await this.registry.metrics()) + this.#duration.text();
  }

  /** Body bytes served by tier, as plain numbers (for /status, the dashboard and Prometheus). */
  readonly served = { memory: 0, disk: 0, upstream: 0 };
  /** Requests by result group: the per-method counts, summed when asked (for /status). */
  get results(): Record<string, number> {
    const by: Record<string, number> = {};
    for (const [group, byMethod] of this.#requests) for (const { n } of byMethod.values()) by[group] = (by[group] ?? 0) + n;
    return by;
  }

  fillDone(readers: number): void {
    this.#waiters.observe(readers);
  }
}

/**
 * A histogram labelled by result group, kept as plain numbers per group and written in Prometheus' text
 * format (exposition 0.0.4, as the registry's) when scraped.
 */
export class DurationHistogram {
  readonly #name: string;
  readonly #help: string;
  readonly #bounds: number[];
  readonly #groups = new Map<string, { counts: number[]; sum: number }>();

  constructor(name: string, help: string, bounds: number[]) {
    this.#name = name;
    this.#help = help;
    this.#bounds = bounds;
  }

  observe(group: string, value: number): void {
    let g = this.#groups.get(group);
    if (!g) this.#groups.set(group, (g = { counts: new Array<number>(this.#bounds.length + 1).fill(0), sum: 0 }));
    let i = 0;
    while (i < this.#bounds.length && value > this.#bounds[i]!) i++;
    g.counts[i]!++;
    g.sum += value;
  }

  text(): string {
    const n = this.#name;
    let out = `# HELP ${n} ${this.#help}\n# TYPE ${n} histogram\n`;
    for (const [group, g] of this.#groups) {
      let cumulative = 0;
      for (let i = 0; i <= this.#bounds.length; i++) {
        cumulative += g.counts[i]!;
        out += `${n}_bucket{le="${i < this.#bounds.length ? this.#bounds[i] : '+Inf'}",result="${group}"} ${cumulative}\n`;
      }
      out += `${n}_sum{result="${group}"} ${g.sum}\n${n}_count{result="${group}"} ${cumulative}\n`;
    }
    return out;
  }
}
