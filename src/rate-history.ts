// The recent past of a few counters, kept on the server so the dashboard's charts show the last hour
// however long the page has been open: a bounded ring of samples, one per interval, each holding how
// much every series grew during it. It reads the /status figures (counters.ts), so with --workers the
// main thread feeds it the workers' figures and it holds the summed rate. A source whose count went
// down (a restarted worker) starts again from zero instead of subtracting.
import { figureAt, type Figures } from './counters.ts';

/** The series kept: their name in /status's history, and the /status figure they follow. */
export const HISTORY_SERIES = {
  requests: 'counters.requests',
  upstreamFetches: 'upstream.fetches',
  memoryBytes: 'servedBytes.memory',
  diskBytes: 'servedBytes.disk',
  upstreamServedBytes: 'servedBytes.upstream',
  upstreamBytes: 'upstream.bytes',
} as const;

export type Series = keyof typeof HISTORY_SERIES;
const SERIES = Object.keys(HISTORY_SERIES) as Series[];

/** One interval: when it ended, how long it was, and how much each series grew in it. */
export interface Sample {
  /** End of the interval, ms since the epoch. */
  at: number;
  seconds: number;
  counts: Record<Series, number>;
}

/** 10 s samples for an hour. */
export const HISTORY_INTERVAL_MS = 10_000;
export const HISTORY_SAMPLES = 360;

const zero = (): Record<Series, number> => Object.fromEntries(SERIES.map((s) => [s, 0])) as Record<Series, number>;
const read = (f: Figures, s: Series) => {
  const v = figureAt(f, HISTORY_SERIES[s]);
  return typeof v === 'number' ? v : 0;
};

export class RateHistory {
  readonly #ring: Sample[] = [];
  #next = 0;
  /** Each source's figures when it was last sampled (one missing from a sample is kept a while: a late worker). */
  #last = new Map<string, { at: number; v: Record<Series, number> }>();
  #lastAt: number;
  readonly intervalMs: number;
  readonly capacity: number;

  constructor(startedAt: number, intervalMs = HISTORY_INTERVAL_MS, capacity = HISTORY_SAMPLES) {
    this.#lastAt = startedAt;
    this.intervalMs = intervalMs;
    this.capacity = capacity;
  }

  /** How much each series grew since the last sample, over every source (without recording it). */
  #growth(sources: ReadonlyMap<string, Figures>): Record<Series, number> {
    const sum = zero();
    for (const [id, f] of sources) {
      const before = this.#last.get(id)?.v;
      for (const s of SERIES) {
        const now = read(f, s);
        sum[s] += before === undefined || now < before[s] ? now : now - before[s];
      }
    }
    return sum;
  }

  /** Close an interval at `now` with the sources' figures (keyed by source: a worker and its start). */
  sample(now: number, sources: ReadonlyMap<string, Figures>): void {
    if (now <= this.#lastAt) return; // no time passed (a clock that was not moved): nothing to close
    const sample: Sample = { at: now, seconds: (now - this.#lastAt) / 1000, counts: this.#growth(sources) };
    if (this.#ring.length < this.capacity) this.#ring.push(sample);
    else this.#ring[this.#next] = sample;
    this.#next = (this.#next + 1) % this.capacity;
    for (const [id, f] of sources) this.#last.set(id, { at: now, v: Object.fromEntries(SERIES.map((s) => [s, read(f, s)])) as Record<Series, number> });
    for (const [id, l] of this.#last) if (now - l.at > 6 * this.intervalMs) this.#last.delete(id);
    this.#lastAt = now;
  }

  #timer: NodeJS.Timeout | undefined;
  #tick: () => Promise<void> = async () => {};

  /** Sample every interval from `sources` until stop(). */
  start(now: () => number, sources: () => ReadonlyMap<string, Figures> | Promise<ReadonlyMap<string, Figures>>, onError: (err: Error) => void): void {
    this.#tick = () => Promise.resolve(sources()).then((s) => this.sample(now(), s), onError);
    this.#timer = setInterval(() => void this.#tick(), this.intervalMs);
    this.#timer.unref();
  }

  /** Take the next sample now (the timer's step; tests with a manual clock call it). */
  tick(): Promise<void> {
    return this.#tick();
  }

  stop(): void {
    clearInterval(this.#timer);
  }

  /** The samples, oldest first, then the interval running now (up to `now`, from the sources' figures). */
  snapshot(now: number, sources: ReadonlyMap<string, Figures>): { intervalS: number; series: typeof HISTORY_SERIES; samples: Sample[] } {
    const full = this.#ring.length < this.capacity ? this.#ring : [...this.#ring.slice(this.#next), ...this.#ring.slice(0, this.#next)];
    const running: Sample = { at: now, seconds: Math.max(0, now - this.#lastAt) / 1000, counts: this.#growth(sources) };
    return { intervalS: this.intervalMs / 1000, series: HISTORY_SERIES, samples: [...full, running] };
  }
}
