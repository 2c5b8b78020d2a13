// Peers: other proxies a miss may go through, a parent (--parent) or a member of this bank (--bank).
// Health is passive, as Squid's: a failure to connect marks a peer down at once (nothing listens there);
// other failures of the exchange (a reset, no answer within --peer-timeout) mark it down after
// PEER_FAIL_LIMIT in a row. A down peer is not asked again until a probe (OPTIONS with Max-Forwards: 0,
// which a proxy answers itself) finds it serving; meanwhile the next route is taken. The state here is
// pure; PeerProber at the bottom owns the timers.
import type { MemberSpec } from './config.ts';
import type { Logger } from './log.ts';

/** A parent (--parent), a member of this bank (--bank), or another worker of this process (--workers). */
export type PeerRole = 'parent' | 'bank' | 'worker';

/** Failures in a row (other than a refused or timed-out connect) that mark a peer down. */
const PEER_FAIL_LIMIT = 3;

export interface PeerSnapshot {
  role: PeerRole;
  url: string;
  name: string;
  weight: number;
  /** This cuttle itself (a bank member recognised by its listen address). */
  self: boolean;
  up: boolean;
  requests: number;
  failures: number;
  bytes: number;
  probes: number;
  lastError: string | null;
}

export class Peer {
  readonly role: PeerRole;
  readonly spec: MemberSpec;
  /** http://host:port, what requests are sent to. */
  readonly origin: string;
  /** This cuttle itself: never sent to, never probed. */
  readonly self: boolean;
  up = true;
  consecutiveFailures = 0;
  requests = 0;
  failures = 0;
  bytes = 0;
  probes = 0;
  lastError: string | undefined;

  constructor(role: PeerRole, spec: MemberSpec, self = false) {
    this.role = role;
    this.spec = spec;
    this.origin = new URL(spec.url).origin;
    this.self = self;
  }

  /** An answer came through this peer. */
  answered(): void {
    this.requests++;
    this.consecutiveFailures = 0;
  }

  /**
   * The exchange with this peer failed. `connect`: the connection itself failed (refused, timed out,
   * no route). Returns true when this failure took the peer down.
   */
  failed(why: string, connect: boolean): boolean {
    this.requests++;
    this.failures++;
    this.consecutiveFailures++;
    this.lastError = why;
    if (!this.up || (!connect && this.consecutiveFailures < PEER_FAIL_LIMIT)) return false;
    this.up = false;
    return true;
  }

  /**
   * A bank owner did not answer within --peer-timeout: this request goes elsewhere, but a slow owner
   * (waiting on a slow Stratum 1) is not a dead one, and is not marked down for it.
   */
  slow(why: string): void {
    this.requests++;
    this.failures++;
    this.lastError = why;
  }

  /**
   * A key's owner (a bank member, another worker) answered, then its body broke off: its own fill failed
   * (its upstream's fault). Counted and shown, never toward down: heads in flight together would add up
   * to 'down' for a healthy owner.
   */
  brokeOff(why: string): void {
    this.failures++;
    this.lastError = why;
  }

  probed(ok: boolean, why?: string): boolean {
    this.probes++;
    if (!ok) {
      this.lastError = why ?? 'probe failed';
      return false;
    }
    const cameBack = !this.up;
    this.up = true;
    this.consecutiveFailures = 0;
    return cameBack;
  }

  /** Take over health and totals of the same peer (a bank re-formed from DNS). */
  inherit(old: Peer): void {
    this.up = old.up;
    this.consecutiveFailures = old.consecutiveFailures;
    this.requests = old.requests;
    this.failures = old.failures;
    this.bytes = old.bytes;
    this.probes = old.probes;
    this.lastError = old.lastError;
  }

  snapshot(): PeerSnapshot {
    const { role, self, up, requests, failures, bytes, probes } = this;
    return { role, url: this.spec.url, name: this.spec.name, weight: this.spec.weight, self, up, requests, failures, bytes, probes, lastError: this.lastError ?? null };
  }
}

const ROLE: Record<PeerRole, string> = { parent: 'parent', bank: 'bank member', worker: 'worker' };

export type PeerProbeFn = (peer: Peer) => Promise<{ ok: boolean; why?: string }>;

/** Probes each down peer every interval (jittered by ±20%) until one probe finds it serving. */
export class PeerProber {
  readonly #probe: PeerProbeFn;
  readonly #intervalMs: number;
  readonly #log: Logger;
  readonly #timers = new Map<Peer, NodeJS.Timeout>();
  /** Peers that left: a probe in flight for one when it left schedules no other. */
  readonly #forgotten = new WeakSet<Peer>();
  #stopped = false;

  constructor(probe: PeerProbeFn, intervalMs: number, log: Logger) {
    this.#probe = probe;
    this.#intervalMs = intervalMs;
    this.#log = log;
  }

  /** The peer went down: log it once and probe it until it is back. */
  down(peer: Peer): void {
    this.#log.warn({ peer: peer.spec.url, role: peer.role, reason: peer.lastError }, `${ROLE[peer.role]} down: the next route is taken until a probe finds it serving`);
    this.#schedule(peer);
  }

  /** Down peers being probed now. */
  get probing(): number {
    return this.#timers.size;
  }

  #schedule(peer: Peer): void {
    if (this.#stopped || this.#timers.has(peer) || this.#forgotten.has(peer)) return;
    const t = setTimeout(() => {
      this.#timers.delete(peer);
      void this.#round(peer);
    }, this.#intervalMs * (0.8 + 0.4 * Math.random()));
    t.unref();
    this.#timers.set(peer, t);
  }

  async #round(peer: Peer): Promise<void> {
    if (this.#stopped || peer.up) return;
    const r = await this.#probe(peer).catch((err: Error) => ({ ok: false, why: err.message }));
    if (this.#stopped) return;
    if (peer.probed(r.ok, r.why)) this.#log.info({ peer: peer.spec.url, role: peer.role }, `${ROLE[peer.role]} up: a probe found it serving`);
    else if (!peer.up) this.#schedule(peer);
  }

  /** Forget a peer that left (a bank re-formed, a worker exited). */
  forget(peer: Peer): void {
    this.#forgotten.add(peer);
    const t = this.#timers.get(peer);
    if (t) clearTimeout(t);
    this.#timers.delete(peer);
  }

  stop(): void {
    this.#stopped = true;
    for (const t of this.#timers.values()) clearTimeout(t);
    this.#timers.clear();
  }
}
