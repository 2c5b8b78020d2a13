// Background requests: fills that yield to clients. A request that says `Priority: u=7` (RFC 9218's
// lowest urgency, "reserved for background tasks such as delivery of software updates"; cuttle warm
// sends it) may start a new fill only while the event loop has room: a fill costs the loop a few
// milliseconds, and on a loop busy with clients that lands on their latency. Hits and joins of running
// fills are never held. Here: the marker, and the gate; tick() is the whole policy, with time passed in,
// and start() drives it from the loop's own utilisation.
import type { IncomingHttpHeaders } from 'node:http';
import { performance } from 'node:perf_hooks';

/** RFC 9218 urgency 7: the request is background work. */
export function isBackground(headers: IncomingHttpHeaders | undefined): boolean {
  const p = headers?.priority;
  if (p === undefined) return false;
  // A Structured Fields dictionary; the last `u` wins (RFC 8941 §4.2.2).
  const all = [...String(p).matchAll(/(?:^|,)\s*u\s*=\s*(-?\d+)\s*(?=,|;|$)/g)];
  return all.length > 0 && all.at(-1)![1] === '7';
}

/** How often the gate looks at the loop: short, so that a warm stops soon after clients come. */
export const BACKGROUND_TICK_MS = 25;

/** Waiters let go per tick with room: a warm's few at once, not a queue's worth of fills in one turn. */
const RELEASE_PER_TICK = 8;

/** go: start the fill; refused: answer 503; gone: the client left while it waited. */
export type BackgroundAnswer = 'go' | 'refused' | 'gone';

interface Waiter {
  since: number;
  resolve: (a: BackgroundAnswer) => void;
}

/**
 * Busy: over the last tick the loop was active for more than `maxLoad` of the time, and it served
 * foreground requests (in flight, or finished in the tick; a warm alone on an idle proxy runs at full
 * speed: its own work does not hold it). While busy, a background request that would start a fill
 * waits, at most `maxWaitMs` and at most `maxWaiters` of them, then is refused (503, so cuttle warm
 * backs off and asks again). A tick that is not busy lets the waiters go, RELEASE_PER_TICK at most, so
 * that the next tick measures their fills before more start. Once stopped (the proxy is stopping) every
 * background fill is refused.
 */
export class BackgroundGate {
  readonly #maxLoad: number;
  readonly #maxWaitMs: number;
  readonly #maxWaiters: number;
  readonly #waiters: Waiter[] = [];
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;
  busy = false;
  /** Background requests that waited, in all (the caller counts refusals: overload.ts). */
  held = 0;
  /** The background requests in flight (the request path adds and removes them): not foreground. */
  readonly inFlight = new Set<object>();

  /** maxLoad 1: never busy (background requests are treated as any other). */
  constructor(maxLoad: number, maxWaitMs: number, maxWaiters = 256) {
    this.#maxLoad = maxLoad;
    this.#maxWaitMs = maxWaitMs;
    this.#maxWaiters = maxWaiters;
  }

  get waiting(): number {
    return this.#waiters.length;
  }

  /** A tick at `now` (ms): the loop's utilisation, and the foreground requests in flight or finished since the last one. */
  tick(now: number, load: number, foreground: number): void {
    this.busy = this.#maxLoad < 1 && load > this.#maxLoad && foreground > 0;
    if (!this.busy) {
      for (const w of this.#waiters.splice(0, RELEASE_PER_TICK)) w.resolve('go');
      return;
    }
    while (this.#waiters.length && now - this.#waiters[0]!.since >= this.#maxWaitMs) this.#waiters.shift()!.resolve('refused');
  }

  /**
   * 'go' at once when not busy and nobody waits; else a promise of 'go' once there is room, or
   * 'refused'; 'gone' if `gone` aborts first (the waiter leaves the queue at once).
   */
  admit(now: number, gone?: AbortSignal): BackgroundAnswer | Promise<BackgroundAnswer> {
    if (this.#stopped) return 'refused';
    if (!this.busy && this.#waiters.length === 0) return 'go';
    if (this.#waiters.length >= this.#maxWaiters || this.#maxWaitMs === 0) return 'refused';
    this.held++;
    return new Promise((resolve) => {
      const w: Waiter = { since: now, resolve };
      this.#waiters.push(w);
      gone?.addEventListener(
        'abort',
        () => {
          const i = this.#waiters.indexOf(w);
          if (i < 0) return;
          this.#waiters.splice(i, 1);
          resolve('gone');
        },
        { once: true },
      );
    });
  }

  /**
   * Drive tick() from a timer and the loop's own utilisation. `foreground()`: foreground requests
   * finished so far (a running count) and in flight now.
   */
  start(foreground: () => { finished: number; inFlight: number }): void {
    if (this.#maxLoad >= 1 || this.#timer || this.#stopped) return;
    let elu = performance.eventLoopUtilization();
    let seen = foreground().finished;
    // Unref'd: the gate alone never keeps the process alive.
    this.#timer = setInterval(() => {
      const now = performance.eventLoopUtilization();
      const f = foreground();
      this.tick(performance.now(), performance.eventLoopUtilization(now, elu).utilization, f.finished - seen + f.inFlight);
      elu = now;
      seen = f.finished;
    }, BACKGROUND_TICK_MS).unref();
  }

  /** Stop sampling the loop, waiters and state left as they are: tick() alone decides (tests drive it so). */
  stopSampling(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** The proxy is stopping: whoever waits is refused, and so is every background fill from now on. */
  stop(): void {
    this.stopSampling();
    this.#stopped = true;
    for (const w of this.#waiters.splice(0)) w.resolve('refused');
  }
}
