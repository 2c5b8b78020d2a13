// Prometheus metrics on the admin listener: every counter and gauge of the one table (counters.ts),
// read at scrape time, so the hot path pays for a few integer increments, not a prom-client label
// lookup per counter. A counter is a prom-client Counter that only ever grows: each scrape adds what its
// source grew by since the last one. The per-request duration histogram is counted here too and written
// after the registry's text: prom-client's observe() builds and hashes a label object on every call.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Transaction } from './access-log.ts';
import { countRequest, labelled, METRICS, type CounterSources, type Metric } from './counters.ts';

/** Export one table entry into `r`. */
function register(m: Metric, src: CounterSources, r: Registry): void {
  const labelNames = m.labelNames ?? [];
  const config = { name: m.name, help: m.help, labelNames, registers: [r] };
  if (m.kind === 'gauge') {
    // A label set that is gone (a mirror a reload dropped) goes with the reset.
    new Gauge({ ...config, collect() { this.reset(); for (const [labels, v] of labelled(m.read(src))) this.set(labels, v); } });
    return;
  }
  // What each label set's source read at the last scrape. A source that starts over (a mirror that a
  // reload dropped and brought back) adds its new count: the counter never goes down.
  const last = new Map<string, number>();
  new Counter({
    ...config,
    collect() {
      for (const [labels, v] of labelled(m.read(src))) {
        const key = labelNames.map((n) => labels[n]).join('\0');
        const before = last.get(key);
        last.set(key, v);
        if (before === undefined || v < before) this.inc(labels, v);
        else if (v > before) this.inc(labels, v - before);
      }
    },
  });
}

export class Metrics {
  readonly registry = new Registry();
  readonly #waiters: Histogram;
  readonly #duration = new DurationHistogram('cuttle_request_duration_seconds', 'Time from request to the last byte handed to the socket', [0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30]);
  readonly #src: CounterSources;

  constructor(src: CounterSources) {
    this.#src = src;
    const r = this.registry;
    collectDefaultMetrics({ register: r, prefix: 'cuttle_process_', eventLoopMonitoringPrecision: 20 });
    for (const m of METRICS) register(m, src, r);
    this.#waiters = new Histogram({ name: 'cuttle_fill_readers', help: 'Clients served by one upstream fill (1 = no coalescing)', buckets: [1, 2, 5, 10, 50, 100, 500, 1000, 5000], registers: [r] });
  }

  /** One finished transaction. */
  observe(tx: Transaction, errorToken: string | undefined, nowMs: number): void {
    const group = countRequest(this.#src.counters, tx, errorToken);
    this.#duration.observe(group, Math.max(0, nowMs - tx.startedAt) / 1000);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The Prometheus text of every metric (GET /metrics), in the registry's content type. */
  async text(): Promise<string> {
    return (await this.registry.metrics()) + this.#duration.text();
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
