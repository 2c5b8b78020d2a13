// The refuser: a thread that holds the client ports while the proxy is full. Past
// --max-client-connections, or while the event loop lags, the proxy's own refusals (a 503 at accept)
// wait for its turns, and in a burst of thousands of connects those turns are tens of milliseconds
// each: the 503s went out after a second. So the proxy hands its ports over (the thread listens on them
// beside the proxy's sockets, SO_REUSEPORT, then the proxy stops listening) and the thread answers each
// new connection at once; with room again the proxy listens again and the thread lets go. When to hand
// over is overload.ts's policy and the hand-over listeners.ts's; this file owns the thread.
import { Worker } from 'node:worker_threads';

export type ToRefuser =
  | { type: 'open'; addrs: { host: string; port: number }[]; sockets: number; maxOpen: number; backlog: number; answer: Uint8Array }
  | { type: 'answer'; answer: Uint8Array }
  | { type: 'close' };
export type FromRefuser =
  | { type: 'listening' }
  | { type: 'failed'; message: string }
  /** Connections refused since the last report; records: [client address, when (Date.now())], at most a bounded number. */
  | { type: 'refused'; count: number; records: [string, number][] }
  | { type: 'closed' };

/** Listening sockets per address in the refuser: its loop does nothing else, so a few take a burst. */
export const REFUSER_SOCKETS = 8;
/** Connections the refuser holds at once (each until its 503 is written); past it, it resets them. */
const MAX_OPEN = 512;
/** The open-files limit below which there is no refuser: it may hold up to 8 × addresses + 512 descriptors, an eighth of this at most. */
export const REFUSER_MIN_OPEN_FILES = 8192;

/** Descriptors the refuser may hold for `addresses` listen addresses: its sockets and its open refusals. */
export function refuserDescriptors(addresses: number): number {
  return addresses * REFUSER_SOCKETS + MAX_OPEN;
}

export class Refuser {
  readonly #onRefused: (count: number, records: [string, number][]) => void;
  readonly #onFailed: (err: Error) => void;
  #worker: Worker | undefined;
  #waiting: { want: FromRefuser['type']; resolve: () => void; reject: (err: Error) => void } | undefined;

  /** onRefused: a report of refusals (count them, log them); onFailed: the thread died. */
  constructor(onRefused: (count: number, records: [string, number][]) => void, onFailed: (err: Error) => void) {
    this.#onRefused = onRefused;
    this.#onFailed = onFailed;
  }

  /**
   * Listen on `addrs` (the proxy's bound addresses) and answer every connection with `answer`; resolves
   * once every socket listens. The first call starts the thread (~40 ms alone, ~200 ms beside a busy
   * proxy on its core; about 20 MiB of memory, kept from then on). Started ahead, at a quarter of the
   * cap, it cost a 10,000-node herd that never reached the cap its slowest first bytes: 3.4 and 4.5 s
   * against 2.0 and 1.7 s.
   */
  open(addrs: { host: string; port: number }[], backlog: number, answer: Buffer): Promise<void> {
    const w = (this.#worker ??= this.#start());
    return this.#ask(w, { type: 'open', addrs, sockets: REFUSER_SOCKETS, maxOpen: MAX_OPEN, backlog, answer }, 'listening');
  }

  /** Answer `answer` from now on (the reason changed while it holds the ports). */
  answer(answer: Buffer): void {
    this.#worker?.postMessage({ type: 'answer', answer } satisfies ToRefuser);
  }

  /** Stop listening (the connections being refused finish); resolves after the last report. */
  close(): Promise<void> {
    return this.#worker ? this.#ask(this.#worker, { type: 'close' }, 'closed') : Promise.resolve();
  }

  /** Close, and end the thread. */
  async stop(): Promise<void> {
    const w = this.#worker;
    if (!w) return;
    await this.close().catch(() => {});
    this.#worker = undefined;
    await w.terminate();
  }

  #ask(w: Worker, m: ToRefuser, want: FromRefuser['type']): Promise<void> {
    if (this.#waiting) return Promise.reject(new Error('the refuser is busy'));
    return new Promise((resolve, reject) => {
      this.#waiting = { want, resolve, reject };
      w.postMessage(m);
    });
  }

  #settle(err?: Error): void {
    const waiting = this.#waiting;
    this.#waiting = undefined;
    if (err) waiting?.reject(err);
    else waiting?.resolve();
  }

  #start(): Worker {
    // Small heap bounds: it holds a few sockets and a report of at most a few thousand records.
    const w = new Worker(new URL('./refuser-main.js', import.meta.url), { resourceLimits: { maxOldGenerationSizeMb: 32, maxYoungGenerationSizeMb: 4 } });
    // It never keeps the process alive: stop() ends it at shutdown.
    w.unref();
    w.on('message', (m: FromRefuser) => {
      if (m.type === 'refused') return this.#onRefused(m.count, m.records);
      if (m.type === 'failed') return this.#settle(new Error(m.message));
      if (this.#waiting?.want === m.type) this.#settle();
    });
    const died = (err: Error) => {
      if (this.#worker !== w) return;
      this.#worker = undefined;
      this.#settle(err);
      this.#onFailed(err);
    };
    w.on('error', died);
    w.on('exit', (code) => died(new Error(`the refuser thread exited (${code})`)));
    return w;
  }
}
