// Prometheus metrics, declared in one table (Varnish VSC style) and served on the admin listener.
// Counters that the request path already keeps (Counters, tier stats, coalescer stats) are read at
// scrape time, so the hot path pays for nothing but a few integer increments.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Transaction } from './access-log.ts';

export interface MetricsSources {
  fillsInFlight: () => number;
  fillMemoryBytes: () => number;
  upstreamFetches: () => number;
  upstreamBytes: () => number;
  tiers: () => { tier: 'memory' | 'disk'; objects: number; bytes: number; maxBytes: number; evictions: number }[];
  clientConnections: () => number;
}

const RESULT_GROUP: Record<string, string> = {
  TCP_HIT: 'HIT',
  TCP_MEM_HIT: 'MEM_HIT',
  TCP_NEGATIVE_HIT: 'HIT',
  TCP_MISS: 'MISS',
  TCP_CLIENT_REFRESH_MISS: 'MISS',
  TCP_SWAPFAIL_MISS: 'MISS',
  TCP_REFRESH_MODIFIED: 'REFRESH_MODIFIED',
  TCP_REFRESH_UNMODIFIED: 'REFRESH_UNMODIFIED',
  TCP_DENIED: 'DENIED',
  TCP_TUNNEL: 'TUNNEL',
  NONE: 'ERROR',
};

export class Metrics {
  readonly registry = new Registry();
  readonly #requests: Counter<'result' | 'method'>;
  readonly #bytes: Counter<'tier'>;
  readonly #errors: Counter<'error'>;
  readonly #waiters: Histogram;
  readonly #duration: Histogram<'result'>;

  constructor(src: MetricsSources) {
    const r = this.registry;
    collectDefaultMetrics({ register: r, prefix: 'cuttle_process_', eventLoopMonitoringPrecision: 20 });
    this.#requests = new Counter({ name: 'cuttle_requests_total', help: 'Client requests by result group (HIT, MEM_HIT, MISS, REFRESH_*, DENIED, TUNNEL, ERROR) and method', labelNames: ['result', 'method'], registers: [r] });
    this.#bytes = new Counter({ name: 'cuttle_served_bytes_total', help: 'Body bytes sent to clients, by where they came from (memory, disk, upstream)', labelNames: ['tier'], registers: [r] });
    this.#errors = new Counter({ name: 'cuttle_errors_total', help: "cuttle's own failures by Proxy-Status error token", labelNames: ['error'], registers: [r] });
    this.#waiters = new Histogram({ name: 'cuttle_fill_readers', help: 'Clients served by one upstream fill (1 = no coalescing)', buckets: [1, 2, 5, 10, 50, 100, 500, 1000, 5000], registers: [r] });
    this.#duration = new Histogram({ name: 'cuttle_request_duration_seconds', help: 'Time from request to the last byte handed to the socket', labelNames: ['result'], buckets: [0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30], registers: [r] });
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({ name, help, registers: [r], collect() { this.set(read()); } });
    gauge('cuttle_fills_in_flight', 'Upstream fills running now', src.fillsInFlight);
    gauge('cuttle_fill_memory_bytes', 'Memory held by in-flight fills (bounded by --fill-memory)', src.fillMemoryBytes);
    gauge('cuttle_client_connections', 'Open client connections', src.clientConnections);
    new Counter({ name: 'cuttle_upstream_fetches_total', help: 'Requests sent upstream (fills and passes)', registers: [r], collect() { this.reset(); this.inc(src.upstreamFetches()); } });
    new Counter({ name: 'cuttle_upstream_bytes_total', help: 'Body bytes received from upstreams', registers: [r], collect() { this.reset(); this.inc(src.upstreamBytes()); } });
    const tierGauge = (name: string, help: string, pick: (t: ReturnType<MetricsSources['tiers']>[number]) => number) =>
      new Gauge({ name, help, labelNames: ['tier'], registers: [r], collect() { for (const t of src.tiers()) this.set({ tier: t.tier }, pick(t)); } });
    tierGauge('cuttle_cache_objects', 'Objects stored, by tier', (t) => t.objects);
    tierGauge('cuttle_cache_bytes', 'Bytes stored, by tier', (t) => t.bytes);
    tierGauge('cuttle_cache_max_bytes', 'Configured bound, by tier', (t) => t.maxBytes);
    tierGauge('cuttle_cache_evictions', 'Objects evicted since start, by tier (a gauge of a monotonic count)', (t) => t.evictions);
  }

  /** One finished transaction. */
  observe(tx: Transaction, errorToken: string | undefined, nowMs: number): void {
    const group = errorToken && tx.result !== 'TCP_DENIED' ? 'ERROR' : (RESULT_GROUP[tx.result] ?? 'ERROR');
    this.#requests.inc({ result: group, method: tx.method });
    const tier = tx.result === 'TCP_MEM_HIT' ? 'memory' : tx.result === 'TCP_HIT' || tx.result === 'TCP_REFRESH_UNMODIFIED' ? 'disk' : 'upstream';
    if (tx.bytesOut > 0 && !errorToken) this.#bytes.inc({ tier }, tx.bytesOut);
    if (errorToken) this.#errors.inc({ error: errorToken });
    this.#duration.observe({ result: group }, Math.max(0, nowMs - tx.startedAt) / 1000);
  }

  fillDone(readers: number): void {
    this.#waiters.observe(readers);
  }
}
