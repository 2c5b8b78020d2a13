// The drain state: a proxy taken out of service without being taken offline (POST /drain on the admin
// listener, cvmfs#2945), or on its way out (SIGTERM). While draining, /readyz answers 503, every
// response closes its connection (Connection: close, in node:http and the hit lane), and new
// connections are still served, so clients that have not re-resolved the bank's name are not refused.
// An admin's drain lasts until POST /drain?cancel; a stop's cannot be cancelled and ends the process
// by --shutdown-timeout (shutdown.ts).

export type DrainState = 'serving' | 'draining' | 'stopping';

/** What /status shows of the drain (the main thread's view with --workers). */
export interface DrainSnapshot {
  state: DrainState;
  /** Seconds since the drain began (null while serving). */
  forS: number | null;
  /** Seconds left until a stop cuts what is still open (null unless stopping). */
  leftS: number | null;
  /** Whether POST /drain?cancel would put it back in service. */
  cancellable: boolean;
}

export class Drain {
  #state: DrainState = 'serving';
  #since = 0;
  #deadline = 0;
  readonly #now: () => number;
  readonly #watchers: ((draining: boolean) => void)[] = [];

  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  /** Call `fn` whenever the proxy starts or stops draining (--workers: the main thread tells its workers). */
  watch(fn: (draining: boolean) => void): void {
    this.#watchers.push(fn);
  }

  #changed(draining: boolean): void {
    for (const fn of this.#watchers) fn(draining);
  }

  get state(): DrainState {
    return this.#state;
  }

  /** Draining or stopping: responses close their connections, /readyz answers 503. */
  get draining(): boolean {
    return this.#state !== 'serving';
  }

  /** Start draining (POST /drain); a drain or stop under way stays as it is. */
  start(): void {
    if (this.#state !== 'serving') return;
    this.#state = 'draining';
    this.#since = this.#now();
    this.#changed(true);
  }

  /** Back in service (POST /drain?cancel); false when a stop is under way, which can't be undone. */
  cancel(): boolean {
    if (this.#state === 'stopping') return false;
    if (this.#state === 'draining') {
      this.#state = 'serving';
      this.#changed(false);
    }
    return true;
  }

  /** The stop (SIGTERM): draining until the process ends, at the latest `timeoutMs` from now. */
  stop(timeoutMs: number): void {
    if (this.#state === 'stopping') return;
    const was = this.#state;
    const now = this.#now();
    if (was === 'serving') this.#since = now;
    this.#state = 'stopping';
    this.#deadline = now + timeoutMs;
    if (was === 'serving') this.#changed(true);
  }

  snapshot(): DrainSnapshot {
    const now = this.#now();
    const s = this.#state;
    return {
      state: s,
      forS: s === 'serving' ? null : Math.round((now - this.#since) / 1000),
      leftS: s === 'stopping' ? Math.max(0, Math.round((this.#deadline - now) / 1000)) : null,
      cancellable: s !== 'stopping',
    };
  }
}
