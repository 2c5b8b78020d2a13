// Time source. Everything that reads time takes a Clock, so tests can move time without sleeping.
export interface Clock {
  now(): number; // milliseconds since the epoch
}

export const systemClock: Clock = { now: () => Date.now() };

/**
 * Wait for `p` for at most `ms` of real time; true when it settled in time (a rejection counts as
 * settled). The bounded waits of a shutdown: nothing a sink or a fill does may hold it longer.
 */
export async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true, () => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A clock that only moves when told to (tests). */
export class ManualClock implements Clock {
  #t: number;
  constructor(startMs = Date.now()) {
    this.#t = startMs;
  }
  now(): number {
    return this.#t;
  }
  advance(ms: number): void {
    this.#t += ms;
  }
}
