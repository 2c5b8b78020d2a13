// Access control, compiled once from the frozen config: which clients may use the proxy, and which
// destinations and ports it may reach. CIDR matching is net.BlockList's; this file only composes rules.
// Loopback and link-local destinations are denied (Squid's to_localhost / to_linklocal) unless an
// allow-dest entry names them explicitly.
import { BlockList, isIP } from 'node:net';
import type { Cidr, Config, DestRule, PortRange } from './config.ts';

function blockList(cidrs: readonly Cidr[]): BlockList {
  const bl = new BlockList();
  for (const c of cidrs) bl.addSubnet(c.address, c.prefix, c.family);
  return bl;
}

const SPECIAL = blockList([
  { address: '127.0.0.0', prefix: 8, family: 'ipv4' },
  { address: '::1', prefix: 128, family: 'ipv6' },
  { address: '169.254.0.0', prefix: 16, family: 'ipv4' },
  { address: 'fe80::', prefix: 10, family: 'ipv6' },
  { address: '0.0.0.0', prefix: 8, family: 'ipv4' },
  // IPv4-compatible (::a.b.c.d, deprecated) and SIIT IPv4-translated (::ffff:0:a.b.c.d) spellings of
  // IPv4 addresses, loopback among them ([::7f00:1], [::ffff:0:7f00:1]). IPv4-mapped ::ffff:a.b.c.d is
  // matched against the IPv4 rules above by BlockList itself.
  { address: '::', prefix: 96, family: 'ipv6' },
  { address: '::ffff:0:0:0', prefix: 96, family: 'ipv6' },
]);

/** Strip the IPv4-mapped prefix so that ::ffff:10.1.2.3 matches 10.0.0.0/8. */
export function plainAddress(addr: string): string {
  return addr.startsWith('::ffff:') && isIP(addr.slice(7)) === 4 ? addr.slice(7) : addr;
}

function family(addr: string): 'ipv4' | 'ipv6' {
  return isIP(addr) === 6 ? 'ipv6' : 'ipv4';
}

function inPorts(ranges: readonly PortRange[], port: number): boolean {
  return ranges.some((r) => port >= r.from && port <= r.to);
}

export type DestVerdict = 'allow' | 'deny-dest' | 'deny-port';

export interface Acl {
  allowsClient(addr: string): boolean;
  /** Check the name and port before any DNS lookup. IP literals are fully checked here. */
  checkDestination(host: string, port: number): DestVerdict;
  /** Check an address that `host` resolved to, just before connecting to `port` (no DNS rebinding window). */
  allowsResolved(host: string, ip: string, port: number): boolean;
  allowsConnect(host: string, port: number): DestVerdict;
  allowsPurge(addr: string): boolean;
}

export function compileAcl(cfg: Pick<Config, 'allowClient' | 'allowDest' | 'allowPorts' | 'allowConnectPorts' | 'allowPurge'> & Partial<Pick<Config, 'mirrorGroups'>>): Acl {
  const clients = blockList(cfg.allowClient);
  const purge = blockList(cfg.allowPurge);
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
  const suffixes = cfg.allowDest.flatMap((r) => (r.kind === 'domain' ? [r.suffix] : []));
  const restricted = cfg.allowDest.length > 0;

  const nameMatches = (host: string) => hosts.has(host) || suffixes.some((s) => host.endsWith(s) || host === s.slice(1));
  const ipAllowed = (host: string, ip: string, port: number) => {
    const a = plainAddress(ip);
    const fam = family(a);
    const explicitIp = destCidrs.check(a, fam);
    // A special address passes only when named explicitly: by IP/CIDR, or by exact host name.
    if (SPECIAL.check(a, fam)) return explicitIp || hosts.has(host) || isMirror(host, port);
    if (!restricted || isMirror(host, port)) return true;
    return explicitIp || nameMatches(host);
  };

  const check = (host: string, port: number, ports: readonly PortRange[]): DestVerdict => {
    const h = host.toLowerCase().replace(/^\[|\]$/g, '');
    if (!inPorts(ports, port)) return 'deny-port';
    if (isIP(h)) return ipAllowed(h, h, port) ? 'allow' : 'deny-dest';
    if (h === 'localhost' || h.endsWith('.localhost')) return hosts.has(h) || isMirror(h, port) ? 'allow' : 'deny-dest';
    if (isMirror(h, port)) return 'allow';
    if (restricted && !nameMatches(h) && destCidrs.rules.length === 0) return 'deny-dest';
    return 'allow';
  };

  return {
    allowsClient: (addr) => {
      const a = plainAddress(addr);
      return clients.check(a, family(a));
    },
    checkDestination: (host, port) => check(host, port, cfg.allowPorts),
    allowsResolved: (host, ip, port) => ipAllowed(host.toLowerCase().replace(/^\[|\]$/g, ''), ip, port),
    allowsConnect: (host, port) => check(host, port, cfg.allowConnectPorts),
    allowsPurge: (addr) => {
      const a = plainAddress(addr);
      return purge.check(a, family(a));
    },
  };
}
