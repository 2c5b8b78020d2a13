// Access control, compiled once from the frozen config: which clients may use the proxy, and which
// destinations and ports it may reach. CIDR matching is net.BlockList's; this file only composes rules.
// Loopback and link-local destinations are denied (Squid's to_localhost / to_linklocal) unless
// allow-local-dest names them: that option only ever opens, and allow-dest (which, when given, narrows
// the public destinations to a list) never opens them, however wide its CIDR.
import { BlockList, isIP } from 'node:net';
import { blockList, LOCAL_RANGES } from './cidr.ts';
import type { Config, DestRule, LocalDestRule, PortRange } from './config.ts';

// import-squid reads the range check from here.

const SPECIAL = blockList(LOCAL_RANGES);

/** Strip the IPv4-mapped prefix so that ::ffff:10.1.2.3 matches 10.0.0.0/8. */
export function plainAddress(addr: string): string {
  return addr.startsWith('::ffff:') && isIP(addr.slice(7)) === 4 ? addr.slice(7) : addr;
}

function family(addr: string): 'ipv4' | 'ipv6' {
  return isIP(addr) === 6 ? 'ipv6' : 'ipv4';
}

/** Client-address membership, with IPv4-mapped IPv6 addresses matched against IPv4 rules. */
function member(list: BlockList): (addr: string) => boolean {
  return (addr) => {
    const a = plainAddress(addr);
    return list.check(a, family(a));
  };
}

/**
 * A pure per-request decision, remembered per input: a site proxy sees a few thousand client addresses
 * and a handful of destinations, and every request asked the BlockList again. Bounded (cleared when
 * full), and per compiled Acl, so a reload starts afresh.
 */
function remembered<A extends unknown[], T>(max: number, key: (...a: A) => string, decide: (...a: A) => T): (...a: A) => T {
  const known = new Map<string, T>();
  return (...a) => {
    const k = key(...a);
    let v = known.get(k);
    if (v === undefined) {
      if (known.size >= max) known.clear();
      v = decide(...a);
      known.set(k, v);
    }
    return v;
  };
}

/** A loopback or link-local address, in any of its spellings. */
const isLocal = member(SPECIAL);

function inPorts(ranges: readonly PortRange[], port: number): boolean {
  return ranges.some((r) => port >= r.from && port <= r.to);
}

/** The 403 detail for a local destination: how to open exactly it (README "Access control"). */
export function localHint(host: string, port: number): string {
  const h = isIP(host) === 6 ? `[${host}]` : host;
  return `${h}:${port} is a loopback or link-local destination; to allow a local origin, start cuttle with --allow-local-dest ${h}:${port}`;
}

/** deny-local: a loopback or link-local destination that allow-local-dest does not name. */
export type DestVerdict = 'allow' | 'deny-dest' | 'deny-local' | 'deny-port';

export interface Acl {
  allowsClient(addr: string): boolean;
  /** Check the name and port before any DNS lookup. IP literals are fully checked here. */
  checkDestination(host: string, port: number): DestVerdict;
  /** Check an address that `host` resolved to, just before connecting to `port` (no DNS rebinding window). */
  allowsResolved(host: string, ip: string, port: number): boolean;
  /** Is this (resolved) address a loopback or link-local one, for the hint in a 403? */
  isLocal(ip: string): boolean;
  allowsConnect(host: string, port: number): DestVerdict;
  allowsPurge(addr: string): boolean;
  allowsAdmin(addr: string): boolean;
}

export function compileAcl(cfg: Pick<Config, 'allowClient' | 'allowDest' | 'allowPorts' | 'allowConnectPorts' | 'allowPurge'> & Partial<Pick<Config, 'mirrorGroups' | 'allowLocalDest' | 'allowAdmin'>>): Acl {
  const clients = blockList(cfg.allowClient);
  const purge = blockList(cfg.allowPurge);
  const admin = blockList(cfg.allowAdmin ?? []);
  const destCidrs = blockList(cfg.allowDest.filter((r): r is Extract<DestRule, { kind: 'cidr' }> => r.kind === 'cidr').map((r) => r.cidr));
  const hosts = new Set(cfg.allowDest.flatMap((r) => (r.kind === 'host' ? [r.host] : [])));
  // Configured Stratum 1 mirrors are named by the admin: a failover fetch to one is always allowed.
  // The exception is exactly each mirror's host and port: a loopback mirror must not open the other
  // ports of that host (the admin listener among them) to every client.
  const mirrorEnds = new Set(
    (cfg.mirrorGroups ?? []).flatMap((g) =>
      g.mirrors.map((m) => {
        const u = new URL(m);
        return `${u.hostname.replace(/^\[|\]$/g, '')}:${u.port || 80}`;
      }),
    ),
  );
  const isMirror = (host: string, port: number) => mirrorEnds.has(`${host}:${port}`);
  const locals = (cfg.allowLocalDest ?? []).map((r) => ({ ...r, list: r.kind === 'cidr' ? blockList([r.cidr]) : undefined }));
  const portOk = (r: LocalDestRule, port: number) => r.port === undefined || r.port === port;
  // A local destination is open when allow-local-dest names its address or its exact host name.
  const localNamed = (host: string, ip: string | undefined, port: number) =>
    isMirror(host, port) ||
    locals.some((r) => portOk(r, port) && (r.kind === 'host' ? r.host === host : ip !== undefined && r.list!.check(ip, family(ip))));
  const suffixes = cfg.allowDest.flatMap((r) => (r.kind === 'domain' ? [r.suffix] : []));
  const patterns = cfg.allowDest.flatMap((r) => (r.kind === 'regex' ? [new RegExp(r.source)] : []));
  const restricted = cfg.allowDest.length > 0;

  const nameMatches = (host: string) => hosts.has(host) || suffixes.some((s) => host.endsWith(s) || host === s.slice(1)) || patterns.some((p) => p.test(host));
  const ipAllowed = (host: string, ip: string, port: number) => {
    const a = plainAddress(ip);
    const fam = family(a);
    if (SPECIAL.check(a, fam)) return localNamed(host, a, port);
    if (!restricted || isMirror(host, port)) return true;
    return destCidrs.check(a, fam) || nameMatches(host);
  };

  const check = (host: string, port: number, ports: readonly PortRange[]): DestVerdict => {
    const h = host.toLowerCase().replace(/^\[|\]$/g, '');
    if (!inPorts(ports, port)) return 'deny-port';
    if (isIP(h)) return ipAllowed(h, h, port) ? 'allow' : isLocal(h) ? 'deny-local' : 'deny-dest';
    if (h === 'localhost' || h.endsWith('.localhost')) return localNamed(h, undefined, port) ? 'allow' : 'deny-local';
    if (isMirror(h, port) || localNamed(h, undefined, port)) return 'allow';
    if (restricted && !nameMatches(h) && destCidrs.rules.length === 0) return 'deny-dest';
    return 'allow';
  };

  return {
    allowsClient: remembered(65_536, (addr: string) => addr, member(clients)),
    checkDestination: remembered(4096, (host: string, port: number) => `${port} ${host}`, (host: string, port: number) => check(host, port, cfg.allowPorts)),
    allowsResolved: (host, ip, port) => ipAllowed(host.toLowerCase().replace(/^\[|\]$/g, ''), ip, port),
    isLocal,
    allowsConnect: (host, port) => check(host, port, cfg.allowConnectPorts),
    allowsPurge: member(purge),
    allowsAdmin: member(admin),
  };
}

/**
 * A host matcher for a list of destination rules (always-direct): host names, .domains and ~REGEX by
 * name, CIDRs for IP literals (a name is not resolved for it: where a miss goes is decided before DNS).
 */
export function destMatcher(rules: readonly DestRule[]): (host: string) => boolean {
  if (rules.length === 0) return () => false;
  const cidrs = blockList(rules.flatMap((r) => (r.kind === 'cidr' ? [r.cidr] : [])));
  const hosts = new Set(rules.flatMap((r) => (r.kind === 'host' ? [r.host] : [])));
  const suffixes = rules.flatMap((r) => (r.kind === 'domain' ? [r.suffix] : []));
  const patterns = rules.flatMap((r) => (r.kind === 'regex' ? [new RegExp(r.source)] : []));
  return (host) => {
    const h = host.toLowerCase().replace(/^\[|\]$/g, '');
    if (isIP(h)) return cidrs.check(plainAddress(h), family(plainAddress(h)));
    return hosts.has(h) || suffixes.some((s) => h.endsWith(s) || h === s.slice(1)) || patterns.some((p) => p.test(h));
  };
}
