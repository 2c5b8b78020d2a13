// Address ranges: what a CIDR is, and the loopback and link-local ranges a proxy must not reach unless
// told to. Both the config (which checks allow-local-dest names only these) and the access rules (which
// deny them) read them from here, so neither has to import the other.
import { BlockList, isIP } from 'node:net';

/** "a.b.c.d/n", "::/n" or a bare address (a /32 or /128). Matching itself is net.BlockList's job. */
export interface Cidr { address: string; prefix: number; family: 'ipv4' | 'ipv6' }

export function parseCidr(v: string): Cidr | undefined {
  const [addr, bits, extra] = v.trim().split('/');
  if (extra !== undefined || !addr) return undefined;
  const fam = isIP(addr);
  if (!fam) return undefined;
  const max = fam === 4 ? 32 : 128;
  const prefix = bits === undefined ? max : /^\d+$/.test(bits) ? Number(bits) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return undefined;
  return { address: addr, prefix, family: fam === 4 ? 'ipv4' : 'ipv6' };
}

export function blockList(cidrs: readonly Cidr[]): BlockList {
  const bl = new BlockList();
  for (const c of cidrs) bl.addSubnet(c.address, c.prefix, c.family);
  return bl;
}

/** Destinations denied unless allow-local-dest names them (a CIDR must lie inside one of these). */
export const LOCAL_RANGES: readonly Cidr[] = [
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
];

/** Does `c` lie inside one local range (so that naming it opens only local addresses)? */
export function insideLocalRange(c: Cidr): boolean {
  return LOCAL_RANGES.some((r) => r.family === c.family && c.prefix >= r.prefix && blockList([r]).check(c.address, c.family));
}
