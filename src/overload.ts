// Overload: refuse fast, never trickle. A CVMFS client drops a proxy that sends under 1 KiB/s for 5 s and
// can't tell an overloaded proxy from a dead one, so past a limit cuttle answers a labelled 503 at once
// (the client fails over to its next proxy, cleanly) rather than take on work it would serve slowly.
// Here: the refusal reasons and their count, the event-loop lag monitor (--max-loop-lag), and the
// kernel's accept-queue counters.
import { readFileSync } from 'node:fs';
import type { Counters } from './counters.ts';
import { ProxyError } from './errors.ts';

/** Why a connection or a request was refused with 503 ERR_OVERLOADED. */
export type RefusalReason = 'connections' | 'fills' | 'passes' | 'fill_memory' | 'loop_lag' | 'background';

const WHY: Record<RefusalReason, string> = {
  connections: 'too many client connections',
  fills: 'too many fills in flight',
  passes: 'too many uncached requests in flight',
  fill_memory: 'fill memory is spent',
  loop_lag: 'the event loop lags',
  background: 'a background request (Priority: u=7) found no room on the event loop within --background-wait',
};

export function newRefusals(): Record<RefusalReason, number> {
  return { connections: 0, fills: 0, passes: 0, fill_memory: 0, loop_lag: 0, background: 0 };
}

/** One 503 per reason, made once: a burst refuses thousands, and an Error takes its stack each time. */
const REFUSALS = new Map<RefusalReason, ProxyError>();

/** The 503 that says why (not counted). */
export function refusal(reason: RefusalReason): ProxyError {
  let err = REFUSALS.get(reason);
  if (!err) REFUSALS.set(reason, (err = new ProxyError('ERR_OVERLOADED', WHY[reason])));
  return err;
}

/** Count a refusal; returns the 503 that says why. */
export function refuse(counters: Counters, reason: RefusalReason): ProxyError {
  counters.refused[reason]++;
  return refusal(reason);
}

/** Who accepts new client connections: the proxy, or the refuser thread that answers each with a 503 (refuser.ts). */
export type AcceptHand = 'proxy' | 'refuser';

/**
 * Who should accept next. The proxy hands its ports over once it holds --max-client-connections (its
 * next connection would be refused) or its loop lags, and takes them back once the loop is on time and
 * there is room: below the cap after a lag; after the cap, a sixteenth of it free, so that a proxy at
 * its cap does not hand them to and fro at each close.
 */
export function acceptHand(s: { hand: AcceptHand; connections: number; cap: number; lagging: boolean; handedFor?: RefusalReason | undefined }): AcceptHand {
  if (s.hand === 'proxy') return s.connections >= s.cap || s.lagging ? 'refuser' : 'proxy';
  const room = s.handedFor === 'loop_lag' ? s.connections < s.cap : s.connections <= s.cap - Math.max(1, Math.ceil(s.cap / 16));
  return !s.lagging && room ? 'proxy' : 'refuser';
}

/**
 * Why a request may not start a new fill now, if it may not (joining one, or a hit, is never refused
 * here): --max-fills reached, --fill-memory spent (its bytes would only trickle from disk behind the
 * others), or the event loop lagging.
 */
export function fillRefusal(f: { inFlight: number; maxFills: number; usedBytes: number; limitBytes: number; windowsBytes: number; lagging: boolean }): RefusalReason | undefined {
  if (f.inFlight >= f.maxFills) return 'fills';
  // Spent: the budget is used up, and by more than the fills' windows at their own bound would hold
  // (--fill-window each): bytes no window can drop yet (not on disk, or a reader behind them). Fills
  // whose windows are at their bound spill to disk and serve at speed: they refuse nothing.
  if (f.usedBytes >= f.limitBytes && f.usedBytes > f.windowsBytes) return 'fill_memory';
  if (f.lagging) return 'loop_lag';
  return undefined;
}

/** How often the lag monitor ticks: its lateness, not this period, is what --max-loop-lag bounds. */
export const LAG_TICK_MS = 100;

/**
 * The event-loop lag monitor. Two ticks in a row that each fire more than --max-loop-lag after they were
 * due set `lagging`; the next tick on time clears it. One long turn is not overload (a burst of thousands
 * of connects is accepted in one); two in a row are: a new connection's first byte would then near the
 * client's 5 s watchdog, so new connections and new fills are refused; hits and joiners on open
 * connections go on. tick() is the whole policy, with time passed in; start() drives it from a timer.
 */
export class LoopLag {
  readonly #maxLagMs: number;
  #due: number | undefined;
  #timer: NodeJS.Timeout | undefined;
  #lateBefore = false;
  lagging = false;
  /** How late the last tick fired (ms). */
  lastLateMs = 0;
  /** Called when `lagging` changes (the proxy logs it). */
  onChange: ((lagging: boolean, lateMs: number) => void) | undefined;

  /** maxLagMs 0: never lagging, and no timer. */
  constructor(maxLagMs: number) {
    this.#maxLagMs = maxLagMs;
  }

  /** A tick at `now` (ms, monotonic); the next one is due a period later. */
  tick(now: number): void {
    if (this.#due !== undefined) {
      this.lastLateMs = Math.max(0, now - this.#due);
      const late = this.#maxLagMs > 0 && this.lastLateMs > this.#maxLagMs;
      const was = this.lagging;
      this.lagging = late && this.#lateBefore;
      this.#lateBefore = late;
      if (this.lagging !== was) this.onChange?.(this.lagging, this.lastLateMs);
    }
    this.#due = now + LAG_TICK_MS;
  }

  start(): void {
    if (this.#maxLagMs === 0 || this.#timer) return;
    this.tick(performance.now());
    // Unref'd: the monitor alone never keeps the process alive.
    this.#timer = setInterval(() => this.tick(performance.now()), LAG_TICK_MS).unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.#due = undefined;
    this.#lateBefore = false;
    this.lagging = false;
  }
}

/** The kernel's accept-queue counters of this network namespace (TcpExt in /proc/net/netstat). */
export interface ListenQueueCounters {
  /** ListenOverflows: connections that found an accept queue full. */
  overflows: number;
  /** ListenDrops: connections dropped at a listener for any reason (overflows included). */
  drops: number;
}

/** ListenOverflows and ListenDrops from the text of /proc/net/netstat; undefined if it has not both. */
export function parseListenQueue(text: string): ListenQueueCounters | undefined {
  // Two TcpExt lines: the names, then the values in the same order.
  const [names, values] = text.split('\n').filter((l) => l.startsWith('TcpExt:')).map((l) => l.trim().split(/\s+/));
  if (!names || !values) return undefined;
  const at = (name: string) => {
    const i = names.indexOf(name);
    const v = i > 0 ? Number(values[i]) : NaN;
    return Number.isSafeInteger(v) ? v : undefined;
  };
  const overflows = at('ListenOverflows');
  const drops = at('ListenDrops');
  return overflows === undefined || drops === undefined ? undefined : { overflows, drops };
}

/** Read when scraped (a small file in procfs); undefined where there is none (not Linux, no procfs). */
export function readListenQueue(file = '/proc/net/netstat'): ListenQueueCounters | undefined {
  try {
    return parseListenQueue(readFileSync(file, 'utf8'));
  } catch {
    return undefined;
  }
}

/** A whole number from a one-value procfs file; undefined where it can't be read. */
function readProcNumber(file: string): number | undefined {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** net.core.somaxconn, which caps every listen backlog; undefined where it can't be read. */
export function readSomaxconn(file = '/proc/sys/net/core/somaxconn'): number | undefined {
  const n = readProcNumber(file);
  return n === 0 ? undefined : n;
}

/**
 * net.ipv4.tcp_migrate_req (Linux 5.14 on): at 1, the connections waiting in the accept queue of a
 * listening socket that closes move to another socket of its port (SO_REUSEPORT); at 0 they are reset.
 */
export function readMigrateReq(file = '/proc/sys/net/ipv4/tcp_migrate_req'): number | undefined {
  return readProcNumber(file);
}

/** The process's open-files limits (RLIMIT_NOFILE, soft and hard); undefined where they can't be read. */
export function openFilesLimit(file = '/proc/self/limits'): { soft: number; hard: number } | undefined {
  try {
    const line = readFileSync(file, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
    const [soft, hard] = line!.split(/\s{2,}/).slice(1, 3).map((v) => (v === 'unlimited' ? Infinity : Number(v)));
    return { soft: soft!, hard: hard! };
  } catch {
    return undefined; // not Linux
  }
}

/**
 * How many client connections may be open at once: --max-client-connections, and no more than the
 * open-files limit leaves after what is not a client (upstream connections, fills' spill and record
 * files, logs). Past the descriptors, accept(2) fails and node resets connections without a word; below
 * this cap a connection too many gets its 503 and fails over. `listenerDescriptors`: what the listeners
 * hold (their sockets, and the refuser thread's sockets and refusals).
 */
export function connectionCap(cfg: { maxClientConnections: number; upstreamConnections: number; maxFills: number }, openFiles: number | undefined, listenerDescriptors = 0): { cap: number; reserve: number; byDescriptors: boolean } {
  // At most half the descriptors are kept: under a low limit (1,024) clients still get the other half.
  const wanted = 256 + listenerDescriptors + 4 * cfg.upstreamConnections + 2 * cfg.maxFills;
  const reserve = openFiles === undefined ? wanted : Math.min(wanted, Math.floor(openFiles / 2));
  const byFiles = openFiles === undefined ? Infinity : Math.max(1, openFiles - reserve);
  return { cap: Math.min(cfg.maxClientConnections, byFiles), reserve, byDescriptors: byFiles < cfg.maxClientConnections };
}
