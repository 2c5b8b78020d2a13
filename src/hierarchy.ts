// Where a miss goes: the routes one upstream request may take, in order.
//   the bank member that owns the key (--bank), unless this cuttle owns it or the request came from a
//     member already (a member's Via from a member's address: the owner never forwards again)
//   else the worker of this process that owns the key (--workers), unless it is this one or the request
//     was relayed by a worker already
//   the parents (--parent), by --parent-policy, the ones that are up
//   direct, unless --never-direct
// A destination in --always-direct goes direct only. A route that fails (no connection, no answer in
// time, or an answer that the peer labels as its own failure) is followed by the next; with none left
// the miss fails, labelled as this proxy's (fill-fetch.ts ask()). Peers are asked in absolute form,
// with the client's Host.
import { destMatcher } from './acl.ts';
import type { HierarchyTag } from './access-log.ts';
import type { Bank } from './bank.ts';
import { Carp, carpKey } from './carp.ts';
import type { Config } from './config.ts';
import type { ErrorCode, ProxyError } from './errors.ts';
import type { CasObject } from './content-hash.ts';
import type { Logger } from './log.ts';
import { workerOf } from './worker-ring.ts';
import { Peer, PeerProber, type PeerProbeFn, type PeerSnapshot } from './peer.ts';

export interface Route {
  /** The proxy asked, or undefined for the origin itself. */
  readonly peer: Peer | undefined;
  /** The access log's hierarchy code (Squid's: how the next hop was chosen). */
  readonly tag: HierarchyTag;
}

/**
 * Is this route the key's owner (a bank member, another worker)? It fails over across the mirrors
 * itself: it is asked once per fetch, and its answer is final.
 */
export function ownerRoute(route: Route): boolean {
  return route.peer?.role === 'bank' || route.peer?.role === 'worker';
}

const CONNECT_FAILURES: ReadonlySet<ErrorCode> = new Set(['ERR_CONNECT_REFUSED', 'ERR_CONNECT_TIMEOUT', 'ERR_DNS_FAIL']);

const DIRECT: Route = { peer: undefined, tag: 'HIER_DIRECT' };

const PARENT_TAG: Record<Config['parentPolicy'], HierarchyTag> = { 'first-up': 'FIRSTUP_PARENT', 'round-robin': 'ROUNDROBIN_PARENT', carp: 'CARP' };

/** Why a peer's answer is its own failure, not the origin's (RFC 9209 Proxy-Status error, Squid's X-Squid-Error), if it is. */
export function peersOwnFailure(res: { status: number; headers: Record<string, string | string[]> }): string | undefined {
  const squid = res.headers['x-squid-error'];
  if (squid !== undefined) return `HTTP ${res.status} ${String(squid)}`;
  const ps = String(res.headers['proxy-status'] ?? '');
  return /;\s*error=/.test(ps) ? `HTTP ${res.status} ${ps.slice(0, 200)}` : undefined;
}

/** Who sent a request: a client, a member of this bank, or another worker of this process (a relay). */
export type Sender = 'client' | 'bank' | 'worker';

/** The header a worker's relay carries: the process's secret, so no client can pass for a worker. */
export const RELAY_HEADER = 'x-cuttle-relay';

interface Workers {
  readonly self: number;
  /** By worker index; undefined for this worker and for one not running. */
  readonly peers: readonly (Peer | undefined)[];
  readonly token: string;
}

export class Hierarchy {
  readonly parents: readonly Peer[];
  readonly bank: Bank | undefined;
  readonly #cfg: Config;
  readonly #carp: Carp | undefined;
  readonly #direct: (host: string) => boolean;
  readonly prober: PeerProber;
  #turn = 0;
  #workers: Workers | undefined;

  constructor(cfg: Config, probe: PeerProbeFn, log: Logger, bank?: (prober: PeerProber) => Bank) {
    this.#cfg = cfg;
    this.prober = new PeerProber(probe, cfg.probe.intervalMs, log);
    this.parents = cfg.parents.map((p) => new Peer('parent', p));
    this.#carp = cfg.parentPolicy === 'carp' && this.parents.length ? new Carp(cfg.parents) : undefined;
    this.#direct = destMatcher(cfg.alwaysDirect);
    this.bank = bank?.(this.prober);
  }

  /** Routes for a cacheable miss of `url` under primary key `primary`, sent by `from`. */
  routes(url: URL, cas: CasObject | undefined, from: Sender, primary: string): Route[] {
    if (this.#direct(url.hostname)) return [DIRECT];
    const out: Route[] = [];
    const owner = from === 'client' ? this.bank?.owner(url, cas) : undefined;
    if (owner) out.push({ peer: owner, tag: 'CARP' });
    else if (from !== 'worker') {
      const w = this.#workerOwner(primary);
      if (w) out.push({ peer: w, tag: 'HIER_DIRECT' });
    }
    return this.#tail(url, out);
  }

  /**
   * --workers: this worker's index, and the relay addresses of all (undefined for this one and for one
   * not running). Health carries over for a worker whose address did not change.
   */
  setWorkers(self: number, urls: readonly (string | undefined)[], token: string): void {
    const old = this.#workers;
    const peers = urls.map((url, i) => {
      const prev = old?.peers[i];
      if (prev?.spec.url === url && i !== self) return prev;
      // A worker that exited (or moved) is probed no more, down or not.
      if (prev) this.prober.forget(prev);
      if (url === undefined || i === self) return undefined;
      const u = new URL(url);
      return new Peer('worker', { url, host: u.hostname, port: Number(u.port), name: `worker${i}`, weight: 1 });
    });
    this.#workers = { self, peers, token };
  }

  /** The worker that owns a key when it is another one that is up (--workers). */
  #workerOwner(primary: string): Peer | undefined {
    const w = this.#workers;
    if (!w) return undefined;
    const i = workerOf(primary, w.peers.length, (k) => k === w.self || (w.peers[k]?.up ?? false));
    return i === w.self ? undefined : w.peers[i];
  }

  /** Is this request a relay from another worker of this process (it carries the process's secret)? */
  isRelay(token: string | string[] | undefined): boolean {
    return this.#workers !== undefined && token === this.#workers.token;
  }

  /** The relay secret, for the requests this worker relays. */
  get relayToken(): string | undefined {
    return this.#workers?.token;
  }

  /** Routes for a request forwarded uncached (the bank owns cached keys only). */
  passRoutes(url: URL): Route[] {
    if (this.#direct(url.hostname)) return [DIRECT];
    return this.#tail(url, []);
  }

  #tail(url: URL, out: Route[]): Route[] {
    if (this.parents.length) {
      const tag = PARENT_TAG[this.#cfg.parentPolicy];
      for (const p of this.#parentOrder(url)) out.push({ peer: p, tag });
    }
    if (!this.#cfg.neverDirect) out.push(DIRECT);
    return out;
  }

  /** The parents that are up, in the order the policy asks them. */
  #parentOrder(url: URL): Peer[] {
    const up = this.parents.filter((p) => p.up);
    if (up.length <= 1) return up;
    switch (this.#cfg.parentPolicy) {
      case 'first-up':
        return up;
      case 'round-robin': {
        const at = this.#turn++ % up.length;
        if (this.#turn >= 1 << 30) this.#turn = 0;
        return [...up.slice(at), ...up.slice(0, at)];
      }
      case 'carp': {
        // The CARP owner first, then the others in order: Squid's carp choice, then every alive parent.
        const i = this.#carp!.owner(carpKey(url), (k) => this.parents[k]!.up);
        const owner = i < 0 ? undefined : this.parents[i]!;
        return owner ? [owner, ...up.filter((p) => p !== owner)] : up;
      }
    }
  }

  /**
   * A route's peer failed: the exchange (a ProxyError: a refused or timed-out connect takes it down at
   * once), or an answer that is its own failure (a string: counted, and down after several in a row).
   */
  peerFailed(peer: Peer, e: ProxyError | string): void {
    const connect = typeof e !== 'string' && CONNECT_FAILURES.has(e.code);
    if (peer.failed(typeof e === 'string' ? e : e.token, connect)) this.prober.down(peer);
  }

  /** Was this request forwarded by a bank member (its Via from a member's address)? */
  fromBank(client: string, via: string | string[] | undefined): boolean {
    return via !== undefined && this.bank !== undefined && this.bank.isMember(client);
  }

  snapshot(): PeerSnapshot[] {
    return [...this.parents.map((p) => p.snapshot()), ...(this.bank?.snapshot() ?? []), ...(this.#workers?.peers.flatMap((p) => (p ? [p.snapshot()] : [])) ?? [])];
  }

  stop(): void {
    this.prober.stop();
    this.bank?.stop();
  }
}
