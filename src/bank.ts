// A bank of proxies (--bank, --bank-dns): every member gets the same member list, and every key has one
// owner member. A member that is not the owner streams the owner's answer (hierarchy.ts routes the miss
// there), so the bank fetches each object from the Stratum 1s once.
//
// The owner is chosen as the clients would choose it, so that nobody disagrees:
//   cvmfs-ring  the CVMFS client's CVMFS_PROXY_SHARD ring over the members' http://IP:PORT URLs, keyed by
//               the first 32 bits of the object's content hash. Clients that shard reach the owner
//               directly; key 0 (manifests, whitelists, anything without a content hash) is never routed.
//               Names are expanded to their addresses, as the client's DNS expansion does.
//   squid-carp  Squid's CARP over the members as squid.conf spells them, keyed by the request URL: a
//               bank mixed with frontier-squids, or a Squid front with `cache_peer … parent … carp`,
//               agrees on every key.
// Members that are down are left out, as the client rebuilds its ring from the alive ones (and Squid's
// CARP skips dead peers), so only their keys move, and they come back with them.
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { Carp, carpKey } from './carp.ts';
import type { Config, ListenAddr, MemberSpec } from './config.ts';
import type { CasObject } from './content-hash.ts';
import type { Logger } from './log.ts';
import { plainAddress } from './acl.ts';
import { Peer, type PeerProber, type PeerSnapshot } from './peer.ts';
import { memberUrl, shardKey, ShardRing } from './shard-ring.ts';

export type Resolve = (host: string) => Promise<string[]>;

/** Every IPv4 address of a name (IPv6 when it has none), as the CVMFS client expands a proxy name. */
export const resolveAll: Resolve = async (host) => {
  if (isIP(host)) return [host];
  const all = await lookup(host, { all: true });
  const v4 = all.filter((a) => a.family === 4).map((a) => a.address);
  return v4.length ? v4 : all.map((a) => a.address);
};

/** Is `ip` one of this host's addresses (any of 127.0.0.0/8 counts: the loopback interface owns them all)? */
function localAddress(ip: string): boolean {
  const a = plainAddress(ip);
  if (a.startsWith('127.') || a === '::1') return true;
  return Object.values(networkInterfaces()).some((list) => list?.some((i) => plainAddress(i.address) === a));
}

/** Does this cuttle listen on ip:port? */
export function listensOn(listen: readonly ListenAddr[], ip: string, port: number): boolean {
  const a = plainAddress(ip);
  return listen.some((l) => l.port === port && (plainAddress(l.host) === a || ((l.host === '::' || l.host === '0.0.0.0') && localAddress(a))));
}

interface Members {
  peers: Peer[];
  ring?: ShardRing;
  carp?: Carp;
  /** Every member's address: a request from one of them with a Via was forwarded by the bank. */
  addresses: Set<string>;
}

export class Bank {
  readonly #cfg: Config;
  readonly #prober: PeerProber;
  readonly #log: Logger;
  readonly #resolve: Resolve;
  #m: Members = { peers: [], addresses: new Set() };
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;
  /** Keys sent to their owner, and keys fetched here because the owner was down (for /status). */
  routed = 0;

  constructor(cfg: Config, prober: PeerProber, log: Logger, resolve: Resolve = resolveAll) {
    this.#cfg = cfg;
    this.#prober = prober;
    this.#log = log;
    this.#resolve = resolve;
  }

  /** Resolve the members and form the ring; with names or --bank-dns, again every --bank-dns-interval. */
  async start(): Promise<void> {
    await this.#refresh();
    const names = this.#cfg.bankDns !== 'none' || this.#cfg.bank.some((m) => !isIP(m.host));
    if (names && !this.#stopped) this.#schedule();
  }

  #schedule(): void {
    this.#timer = setTimeout(() => {
      void this.#refresh().finally(() => {
        if (!this.#stopped) this.#schedule();
      });
    }, this.#cfg.bankDnsIntervalMs);
    this.#timer.unref();
  }

  /** The member specs now: the list as given, names expanded for the ring, or --bank-dns's addresses. */
  async #specs(): Promise<{ specs: { spec: MemberSpec; self: boolean }[]; addresses: Set<string> }> {
    const addresses = new Set<string>();
    const dns = this.#cfg.bankDns;
    if (dns !== 'none') {
      const ips = await this.#resolve(dns.host);
      for (const ip of ips) addresses.add(plainAddress(ip));
      // Sorted, so every member forms the same list whatever order DNS answered in.
      const specs = [...new Set(ips)].sort().map((ip) => ({ spec: { url: memberUrl(ip, dns.port), host: ip, port: dns.port, name: ip, weight: 1 }, self: this.#listensOn(ip, dns.port) }));
      return { specs, addresses };
    }
    const specs: { spec: MemberSpec; self: boolean }[] = [];
    for (const m of this.#cfg.bank) {
      const ips = await this.#resolve(m.host).catch((err: Error) => {
        this.#log.warn({ member: m.url, err: err.message }, 'bank member name does not resolve: left out until it does');
        return [] as string[];
      });
      for (const ip of ips) addresses.add(plainAddress(ip));
      // The ring holds one member per address, as the client's expansion; CARP hashes names as spelled.
      if (this.#cfg.bankHash === 'cvmfs-ring') for (const ip of ips) specs.push({ spec: { ...m, url: memberUrl(ip, m.port), host: ip }, self: this.#listensOn(ip, m.port) });
      else if (ips.length) specs.push({ spec: m, self: ips.some((ip) => this.#listensOn(ip, m.port)) });
    }
    return { specs, addresses };
  }

  async #refresh(): Promise<void> {
    let got;
    try {
      got = await this.#specs();
    } catch (err) {
      this.#log.warn({ err: (err as Error).message, bankDns: this.#cfg.bankDns }, 'bank members could not be resolved: the last known members stay');
      return;
    }
    if (this.#stopped) return;
    const old = this.#m;
    const same = old.peers.length === got.specs.length && old.peers.every((p, i) => p.spec.url === got.specs[i]!.spec.url && p.spec.name === got.specs[i]!.spec.name);
    if (same) {
      old.addresses = got.addresses;
      return;
    }
    const byUrl = new Map(old.peers.map((p) => [p.spec.url, p]));
    const peers = got.specs.map(({ spec, self }) => {
      const p = new Peer('bank', spec, self);
      const prev = byUrl.get(spec.url);
      if (prev) p.inherit(prev);
      return p;
    });
    for (const p of old.peers) if (!peers.some((q) => q.spec.url === p.spec.url)) this.#prober.forget(p);
    const m: Members = { peers, addresses: got.addresses };
    if (this.#cfg.bankHash === 'cvmfs-ring') m.ring = new ShardRing(peers.map((p) => p.spec.url));
    else m.carp = new Carp(peers.map((p) => p.spec));
    this.#m = m;
    const selves = peers.filter((p) => p.self).length;
    this.#log.info({ members: peers.map((p) => p.spec.url), hash: this.#cfg.bankHash, self: peers.find((p) => p.self)?.spec.url ?? null }, 'bank formed');
    if (selves === 0) this.#log.warn({ members: peers.map((p) => p.spec.url), listen: this.#cfg.listen }, 'no bank member is this cuttle (none matches a listen address): it sends every routed key to its owner and owns none');
  }

  #listensOn(ip: string, port: number): boolean {
    return listensOn(this.#cfg.listen, ip, port);
  }

  /**
   * The member that owns this key, when it is another member that is up; undefined when this cuttle
   * owns it, or the key is not routed (a manifest on the ring), or no member is known yet.
   */
  owner(url: URL, _cas: CasObject | undefined): Peer | undefined {
    const m = this.#m;
    if (m.peers.length < 2) return undefined;
    const alive = (i: number) => m.peers[i]!.self || m.peers[i]!.up;
    let i: number;
    if (m.ring) {
      const key = shardKey(url.pathname);
      if (key === 0) return undefined;
      i = m.ring.owner(key, alive);
    } else i = m.carp!.owner(carpKey(url), alive);
    const p = i < 0 ? undefined : m.peers[i];
    if (!p || p.self) return undefined;
    this.routed++;
    return p;
  }

  /** Is `addr` a member's address? */
  isMember(addr: string): boolean {
    return this.#m.addresses.has(plainAddress(addr));
  }

  snapshot(): PeerSnapshot[] {
    return this.#m.peers.map((p) => p.snapshot());
  }

  stop(): void {
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
  }
}
