// `cuttle import-squid squid.conf`: a migration aid. Reads a Squid (frontier-squid) configuration and
// prints the equivalent cuttle YAML, then lists, with line numbers, what needs no setting in cuttle and
// every directive it could not map. It maps what a CVMFS site proxy sets; the rest is listed, not guessed.
import { dirname } from 'node:path';
import { stringify } from 'yaml';
import { insideLocalRange, parseCidr } from './cidr.ts';
import { buildConfig, DEFAULTS } from './config.ts';

interface Directive {
  line: number;
  text: string;
  words: string[];
}

interface Row {
  line: number;
  text: string;
  why: string;
}

export interface SquidImport {
  /** cuttle options by name, as they go into the YAML file. */
  options: Record<string, unknown>;
  /** Directives that need no cuttle setting (cuttle's behaviour already), with why. */
  covered: Row[];
  /** Directives that could not be mapped, with why; without them cuttle allows less than Squid, never more. */
  unmapped: Row[];
  /** Directives that could not be mapped and without which cuttle would allow what Squid denies. */
  widening: Row[];
  /** Directives whose path was Squid's: mapped to cuttle's own, with what it means for the systemd unit. */
  moved: Row[];
}

/** Where docker/cuttle.service lets cuttle write: its ReadWritePaths and its RuntimeDirectory (the pid file). */
export const UNIT_WRITABLE = ['/var/cache/cuttle', '/var/log/cuttle', '/run/cuttle'];

/**
 * Squid's path as cuttle's own: every "squid" in it becomes "cuttle" (/var/cache/squid, /var/log/squid,
 * /var/run/squid/squid.pid become the unit's /var/cache/cuttle, /var/log/cuttle, /run/cuttle/cuttle.pid).
 * A cache directory without "squid" in its name gets "-cuttle" appended: cuttle refuses Squid's own.
 */
export function cuttlePath(path: string, cacheDir = false): string {
  const own = path.replace(/squid/g, 'cuttle').replace(/^\/var\/run\//, '/run/');
  return cacheDir && own === path ? `${path.replace(/\/+$/, '')}-cuttle` : own;
}

/** Logical lines: comments dropped, backslash continuations joined, each with its first line number. */
function directives(text: string): Directive[] {
  const out: Directive[] = [];
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const first = i + 1;
    let s = lines[i]!;
    while (s.endsWith('\\') && i + 1 < lines.length) s = s.slice(0, -1) + ' ' + lines[++i]!;
    s = s.replace(/(^|\s)#.*$/, '').trim();
    if (s) out.push({ line: first, text: s, words: s.split(/\s+/) });
  }
  return out;
}

const SIZE_UNITS: Record<string, string> = { bytes: 'B', byte: 'B', b: 'B', kb: 'KB', k: 'KB', mb: 'MB', m: 'MB', gb: 'GB', g: 'GB' };
const SECONDS: Record<string, number> = { second: 1, seconds: 1, minute: 60, minutes: 60, hour: 3600, hours: 3600, day: 86400, days: 86400, week: 604800, weeks: 604800 };

/** "128 MB" (Squid) -> "128MB" (cuttle); a bare number is bytes, as Squid reads it for these options. */
function size(words: string[]): string | undefined {
  const [n, unit = 'bytes'] = words;
  const u = SIZE_UNITS[unit.toLowerCase()];
  return n && /^\d+(\.\d+)?$/.test(n) && u ? `${n}${u}` : undefined;
}

function duration(words: string[]): string | undefined {
  const [n, unit = 'seconds'] = words;
  const f = SECONDS[unit.toLowerCase()];
  return n && /^\d+(\.\d+)?$/.test(n) && f ? `${Number(n) * f}s` : undefined;
}

/** Squid's `all` and CIDRs; a Squid-only spelling (a range a-b, a netmask) is refused. */
function cidrs(values: string[]): string[] | undefined {
  const out: string[] = [];
  for (const v of values) {
    if (v === 'all') out.push('0.0.0.0/0', '::/0');
    else if (parseCidr(v)) out.push(v);
    else return undefined;
  }
  return out;
}

/** The allow-dest entries of a dstdomain or dstdom_regex acl, or why it has none that mean the same. */
function destinations(a: AclDef): string[] | string {
  if (a.file) return 'the acl reads its values from a file: list them in allow-dest';
  const odd = [...a.flags].filter((f) => !['-n', '-i', '+i'].includes(f));
  if (odd.length) return `acl flags ${odd.join(' ')} have no cuttle equivalent`;
  if (!a.values.length) return 'the acl has no values';
  if (a.type === 'dstdomain') return a.values.map((v) => v.toLowerCase());
  // dstdom_regex: cuttle's ~REGEX is tested, as Squid's, anywhere in the lower-case host name.
  const out: string[] = [];
  for (const v of a.values) {
    if (a.flags.has('-i') && /[A-Z]/.test(v)) return `${v} is case-insensitive (-i) with capitals: write it in lower case`;
    try {
      new RegExp(v);
    } catch {
      return `${v} is not a regular expression cuttle reads`;
    }
    out.push(`~${v}`);
  }
  return out;
}

const NEEDS_NO_SETTING: Record<string, string> = {
  collapsed_forwarding: 'cuttle always coalesces concurrent misses',
  minimum_expiry_time: 'cuttle stores objects however close to expiry',
  quick_abort_min: 'a fill continues for the other readers, or ends when it cannot be stored',
  quick_abort_max: 'as quick_abort_min',
  quick_abort_pct: 'as quick_abort_min',
  max_filedescriptors: 'cuttle raises its open-files limit to the hard limit at start',
  cache_effective_user: 'run cuttle as that user (the systemd unit uses User=cuttle)',
  cache_effective_group: 'as cache_effective_user',
  coredump_dir: 'not applicable',
  cache_log: 'cuttle logs to stderr (journald under systemd)',
  cache_store_log: 'not applicable',
  dns_v4_first: 'cuttle tries the addresses a name resolves to in turn',
  uri_whitespace: 'cuttle refuses malformed request lines',
  cache_replacement_policy: 'cuttle uses LRU in both tiers',
  memory_replacement_policy: 'cuttle uses LRU in both tiers',
  client_persistent_connections: 'keep-alive is always on',
  server_persistent_connections: 'keep-alive is always on',
  via: 'cuttle always adds Via',
  forwarded_for: 'cuttle forwards X-Forwarded-For',
  cache_mgr: 'not applicable',
  httpd_suppress_version_string: 'cuttle names no version in errors',
  logfile_rotate: 'rotate with logrotate: docker/cuttle.logrotate',
  refresh_pattern: 'cuttle follows the origin\'s Cache-Control and Expires (heuristics per RFC 9111)',
};

/** An acl as squid.conf defines it: its type, its values, the flags among them (-i, -n, ...), and whether it reads a file. */
interface AclDef {
  type: string;
  values: string[];
  flags: Set<string>;
  file: boolean;
}

const acl = (type: string, ...values: string[]): AclDef => ({ type, values, flags: new Set(), file: false });

/** Squid 4+ predefines these (a squid.conf may redefine them, as older frontier-squid configs do). */
const BUILTIN_ACLS: Record<string, AclDef> = {
  all: acl('src', 'all'),
  localhost: acl('src', '127.0.0.1/32', '::1'),
  to_localhost: acl('dst', '127.0.0.0/8', '0.0.0.0/32', '::1/128', '::/128'),
  to_linklocal: acl('dst', '169.254.0.0/16', 'fe80::/10'),
  CONNECT: acl('method', 'CONNECT'),
  manager: acl('url_regex', '^cache_object://', '^[^:]+://[^/]+/squid-internal-mgr/'),
};

/**
 * Directives that can deny what http_access allows: dropping one would let cuttle allow what Squid
 * denied. Only their harmless spelling (`allow all`, or `deny all` for follow_x_forwarded_for) is dropped.
 */
const NARROWS_ACCESS: Record<string, string> = {
  http_reply_access: 'denies replies to some requests',
  adapted_http_access: 'denies requests after adaptation',
  miss_access: 'denies some clients the fetches of misses',
  follow_x_forwarded_for: 'judges clients by X-Forwarded-For; cuttle judges the connecting address, so a trusted front end would pass every client as itself',
  url_rewrite_program: 'a rewriter can refuse or redirect requests',
  redirect_program: 'a rewriter can refuse or redirect requests',
  url_rewrite_access: 'chooses the requests a rewriter sees',
  adaptation_access: 'ICAP/eCAP adaptation can refuse requests',
  icap_service: 'ICAP adaptation can refuse requests',
  ecap_service: 'eCAP adaptation can refuse requests',
};

const ICP = 'cuttle never sends ICP or HTCP queries (it chooses among parents by parent-policy)';

/** cache_peer options (`key` or `key=value`) that need no cuttle setting, with why. */
const PEER_COVERED: Record<string, string> = {
  'no-query': ICP,
  htcp: ICP,
  'background-ping': ICP,
  'closest-only': ICP,
  ttl: ICP,
  basetime: ICP,
  'multicast-responder': ICP,
  'multicast-siblings': ICP,
  'no-digest': 'cuttle fetches no cache digests',
  'no-netdb-exchange': 'cuttle keeps no netdb',
  'proxy-only': 'cuttle stores what comes through a parent as any other fill (Squid would not store it; the option is meant for a peer whose cache is next door)',
  default: 'cuttle asks every parent by parent-policy: a last-resort mark changes nothing',
  'no-delay': 'cuttle has no delay pools',
  'no-tproxy': 'cuttle never spoofs client addresses',
  'allow-miss': 'an option for siblings',
  'connect-fail-limit': 'cuttle marks a parent down by its own passive-failure rule (at once when a connect fails, not after N) and asks it again when a probe finds it serving',
};

/** cache_peer options that cuttle cannot honour, though the parent itself maps, with why. */
const PEER_UNMAPPED: Record<string, string> = {
  'connect-timeout': 'cuttle gives every parent --peer-timeout (default 2s) to accept a connection: set peer-timeout by hand',
  'max-conn': 'cuttle does not cap the connections to a parent',
  standby: 'cuttle keeps no standby connections',
  'carp-key': "cuttle's CARP hashes the URL as Squid does without carp-key",
  userhash: 'cuttle has no per-user hashing: this parent is chosen by parent-policy',
  sourcehash: 'cuttle has no per-client hashing: this parent is chosen by parent-policy',
  'weighted-round-robin': "Squid weighs the turns by each parent's ICP round-trip time; cuttle's round-robin takes the parents in turn",
  forceddomain: 'cuttle sends the Host the client names',
};

/** Why a cache_peer option makes the peer unusable by cuttle, or undefined. */
function peerRefusal(o: string): string | undefined {
  if (o.startsWith('login=')) return 'login= sends credentials to the peer; cuttle sends none, and a peer that needs them would refuse every miss';
  if (/^(ssl|tls)/.test(o)) return `${o}: cuttle talks to peers in plain HTTP only`;
  return undefined;
}

type Policy = 'carp' | 'round-robin' | 'first-up';
const POLICY_RANK: Record<Policy, number> = { carp: 2, 'round-robin': 1, 'first-up': 0 };

/** The always-direct entries of a dstdomain, dstdom_regex or dst acl, or why it has none that mean the same. */
function directDestinations(a: AclDef): string[] | string {
  if (a.type === 'dstdomain' || a.type === 'dstdom_regex') return destinations(a);
  if (a.type !== 'dst') return `a ${a.type} acl has no always-direct equivalent (a dstdomain, dstdom_regex or dst acl maps)`;
  if (a.file) return 'the acl reads its values from a file: list them in always-direct';
  if (a.flags.size) return `acl flags ${[...a.flags].join(' ')} have no cuttle equivalent`;
  return cidrs(a.values) ?? 'an address form cuttle does not take (use CIDRs)';
}

/** What the peer mapping reads from and writes into importSquid's state. */
interface PeerContext {
  options: Record<string, unknown>;
  aclOf: (name: string) => AclDef | undefined;
  used: Set<string>;
  list: (key: string, ...v: unknown[]) => void;
  fine: (d: Directive, why: string) => void;
  skip: (d: Directive, why: string) => void;
}

/** A list of a Directive's notes, option by option, grouped by why: "a, b: why; c: why". */
class Notes {
  #by = new Map<string, string[]>();
  add(label: string, why: string) {
    this.#by.set(why, [...(this.#by.get(why) ?? []), label]);
  }
  text(): string | undefined {
    return this.#by.size ? [...this.#by].map(([why, labels]) => `${labels.join(', ')}: ${why}`).join('; ') : undefined;
  }
}

/**
 * Where misses go: cache_peer parents (in line order: CARP depends on it), never_direct and
 * always_direct. This is routing, not access: what cannot be mapped is listed, never a widening.
 */
function importPeers(all: Directive[], c: PeerContext): void {
  const { options, aclOf, used, list, fine, skip } = c;
  const parents: { d: Directive; entry: string; url: string; policy: Policy; weight: number; ok: Notes; lossy: Notes }[] = [];
  for (const d of all.filter((x) => x.words[0] === 'cache_peer')) {
    const [, host, type, port, icp, ...opts] = d.words;
    if (!host || !type || !port || !/^\d+$/.test(port) || !icp) {
      skip(d, 'expected cache_peer HOST TYPE HTTP_PORT ICP_PORT [options]');
      continue;
    }
    if (type === 'sibling') {
      skip(d, 'cuttle has no siblings (a sibling is asked for hits only); proxies that share their caches form a bank: --bank');
      continue;
    }
    if (type === 'multicast') {
      skip(d, 'cuttle sends no ICP, multicast or not; proxies that share their caches form a bank: --bank');
      continue;
    }
    if (type !== 'parent') {
      skip(d, 'expected a parent, sibling or multicast peer');
      continue;
    }
    const origin = opts.includes('originserver');
    const refused = opts.map(peerRefusal).filter((r) => r !== undefined);
    if (refused.length) {
      skip(d, `${refused.join('; ')}: this ${origin ? 'origin server' : 'parent'} is not mapped`);
      continue;
    }
    // A host as spelled (CARP hashes the configured spelling); an IPv6 address takes brackets in a URL.
    const url = `http://${host.includes(':') && !host.startsWith('[') ? `[${host}]` : host}:${port}`;
    if (origin) {
      // A Stratum 1 behind an accelerator: cuttle's accel mode serves from stratum1, not through a parent.
      list('stratum1', url);
      fine(d, 'an origin server (a Stratum 1 this accelerator fronts), not a parent: mapped to stratum1, which accelerator mode (accel-listen) serves from');
      continue;
    }
    let policy: Policy = 'first-up';
    let weight = 1;
    let name: string | undefined;
    const ok = new Notes();
    const lossy = new Notes();
    if (icp !== '0' && !opts.includes('no-query')) ok.add(`ICP port ${icp}`, ICP);
    for (const o of opts) {
      const k = o.replace(/=.*$/, '');
      const v = o.slice(k.length + 1);
      const p: Policy | undefined = k === 'carp' ? 'carp' : k === 'round-robin' || k === 'weighted-round-robin' ? 'round-robin' : undefined;
      if (p && POLICY_RANK[p] > POLICY_RANK[policy]) policy = p;
      if (k === 'carp' || k === 'round-robin') continue;
      if (k === 'weight' && /^\d+$/.test(v)) weight = Number(v);
      else if (k === 'name' && v) name = v;
      else if (Object.hasOwn(PEER_COVERED, k)) ok.add(o, PEER_COVERED[k]!);
      else if (Object.hasOwn(PEER_UNMAPPED, k)) lossy.add(o, PEER_UNMAPPED[k]!);
      else lossy.add(o, 'no cuttle equivalent');
    }
    const entry = [url, ...(weight !== 1 ? [`weight=${weight}`] : []), ...(name !== undefined ? [`name=${name}`] : [])].join(' ');
    if (parents.some((q) => q.url.toLowerCase() === url.toLowerCase())) {
      skip(d, `cuttle lists a parent once per host and port: ${url} is an earlier parent`);
      continue;
    }
    try {
      buildConfig({ parent: [entry] });
    } catch (err) {
      skip(d, `cuttle does not take ${JSON.stringify(entry)} as a parent: ${(err as Error).message}`);
      continue;
    }
    parents.push({ d, entry, url, policy, weight, ok, lossy });
  }

  // always_direct, in order (first match wins; a list ends with the opposite of its last line).
  const directs = all.filter((x) => x.words[0] === 'always_direct');
  let alwaysAll: Directive | undefined;
  let alwaysEnded = false;
  let alwaysDenied = false;
  const alwaysMapped: { d: Directive; values: string[]; acl: string }[] = [];
  for (const d of directs) {
    const [, action, ...names] = d.words;
    const isAll = names.length === 1 && names[0] === 'all';
    if (alwaysEnded) fine(d, 'never reached: an earlier always_direct matches every request');
    else if (isAll && action === 'deny') {
      alwaysEnded = true;
      fine(d, "cuttle's default: a miss goes through the parents");
    } else if (isAll && action === 'allow' && !alwaysDenied) {
      alwaysEnded = true;
      alwaysAll = d;
    } else if (isAll && action === 'allow') {
      alwaysEnded = true;
      skip(d, 'cuttle\'s always-direct has no exceptions, so "every destination but those denied above" cannot be said: misses go through the parents');
    } else if (action === 'deny') {
      alwaysDenied = true;
      const last = d === directs.at(-1);
      skip(d, last
        ? "Squid fetches every other destination directly (an access list ends with the opposite of its last line); cuttle's always-direct cannot say \"all but these\": misses go through the parents"
        : "cuttle's always-direct has no exceptions: the destinations that later allow lines name go directly even where this line denies");
    } else if (action !== 'allow') skip(d, 'expected allow or deny');
    else {
      const a = names.length === 1 && !names[0]!.startsWith('!') ? aclOf(names[0]!) : undefined;
      const values = a ? directDestinations(a) : 'only "allow <one dstdomain, dstdom_regex or dst acl>" maps to always-direct';
      if (typeof values === 'string') {
        skip(d, `${values}; these destinations go through the parents`);
        continue;
      }
      try {
        buildConfig({ 'always-direct': values });
      } catch (err) {
        skip(d, `cuttle does not take these as always-direct: ${(err as Error).message}`);
        continue;
      }
      alwaysMapped.push({ d, values, acl: names[0]! });
    }
  }

  // never_direct, likewise; a trailing "deny ACL" means every other destination is never fetched directly.
  const nevers = all.filter((x) => x.words[0] === 'never_direct');
  let neverAll: Directive | undefined;
  let neverEnded = false;
  for (const d of nevers) {
    const [, action, ...names] = d.words;
    const isAll = names.length === 1 && names[0] === 'all';
    const last = d === nevers.at(-1);
    if (neverEnded) fine(d, 'never reached: an earlier never_direct matches every request');
    else if (isAll && action === 'deny') {
      neverEnded = true;
      fine(d, "cuttle's default: when no parent can serve a miss, it is fetched directly");
    } else if (isAll && action === 'allow') {
      neverEnded = true;
      neverAll = d;
    } else if (action === 'deny') {
      if (last) neverAll = d; // the list's implicit "allow all" after it
      skip(d, "cuttle's never-direct has no exceptions (always-direct sends a destination directly first, not after the parents): with never-direct these destinations are never fetched directly either");
    } else skip(d, `cuttle's never-direct is for every destination or none: these destinations are fetched directly when no parent can serve them${action === 'allow' ? '' : ' (expected allow or deny)'}`);
  }

  if (alwaysAll) {
    fine(alwaysAll, "every miss is fetched directly: cuttle's behaviour without a parent, so no parent is emitted");
    for (const p of parents) skip(p.d, `always_direct allow all (line ${alwaysAll.line}) fetches every miss directly: Squid never uses this parent, so it is not emitted`);
    for (const a of alwaysMapped) fine(a.d, `moot: always_direct allow all (line ${alwaysAll.line}) fetches every miss directly`);
    if (neverAll) fine(neverAll, `never reached: always_direct allow all (line ${alwaysAll.line}) is checked first`);
    return;
  }
  if (!parents.length) {
    for (const a of alwaysMapped) fine(a.d, 'no parent is mapped: cuttle fetches every miss directly');
    if (neverAll) skip(neverAll, 'no parent is mapped, so never-direct is not set (cuttle takes it only with a parent): cuttle fetches misses directly');
    return;
  }
  // Squid asks carp parents first, then round-robin ones, then the rest in order; cuttle has one policy.
  const policy = parents.reduce<Policy>((best, p) => (POLICY_RANK[p.policy] > POLICY_RANK[best] ? p.policy : best), 'first-up');
  for (const p of parents) {
    if (p.policy !== policy) p.lossy.add(`no ${policy} option`, `Squid asks this parent only when no ${policy} parent can serve; cuttle has one parent-policy, ${policy}, which ${policy === 'carp' ? 'hashes over it with the others' : 'takes it in turn with the others'}`);
    if (p.weight !== 1 && policy === 'round-robin') p.lossy.add(`weight=${p.weight}`, "Squid gives a round-robin parent turns in proportion to its weight; cuttle's round-robin takes the parents in turn (the weight is kept in the entry)");
    if (p.weight !== 1 && policy === 'first-up') p.ok.add(`weight=${p.weight}`, 'the first-up order ignores weights, as Squid\'s does (kept in the entry)');
    const ok = p.ok.text();
    const lossy = p.lossy.text();
    if (ok) fine(p.d, ok);
    if (lossy) skip(p.d, `${lossy} (the parent itself is mapped)`);
  }
  options.parent = parents.map((p) => p.entry);
  options['parent-policy'] = policy;
  if (neverAll) options['never-direct'] = true;
  for (const a of alwaysMapped) {
    list('always-direct', ...a.values);
    used.add(a.acl);
    // Squid matches a dst acl against the address a name resolves to; cuttle decides the route before
    // any DNS, so its CIDRs match only requests that name an IP address.
    if (aclOf(a.acl)?.type === 'dst') skip(a.d, 'mapped, but cuttle matches always-direct CIDRs only against URLs that name an IP address (Squid also matches the address a host name resolves to): list the host names too');
  }
}

export function importSquid(text: string): SquidImport {
  const options: Record<string, unknown> = {};
  const covered: Row[] = [];
  const unmapped: Row[] = [];
  const widening: Row[] = [];
  const moved: Row[] = [];
  /** Map a Squid path option to cuttle's own path, saying so, and what the unit needs when it lies outside it. */
  const movePath = (d: Directive, key: string, path: string) => {
    const own = cuttlePath(path, key === 'cache-dir');
    options[key] = own;
    const why = [own === path ? `${key}: ${own}` : `${key}: ${own}, not Squid's ${path}`];
    if (key === 'cache-dir') why.push("cuttle can't read Squid's records and refuses a directory that holds them; if Squid's was a disk of its own, mount it (or a directory on it) here");
    if (!UNIT_WRITABLE.some((w) => own === w || own.startsWith(`${w}/`))) {
      why.push(`outside what the systemd unit may write (ReadWritePaths ${UNIT_WRITABLE.join(' ')}): add ${key === 'cache-dir' ? own : dirname(own)} to ReadWritePaths (systemctl edit cuttle)`);
    }
    if (key === 'pid-file' && own !== '/run/cuttle/cuttle.pid') why.push("the unit's --pid-file /run/cuttle/cuttle.pid wins over this, and logrotate signals that one");
    moved.push({ line: d.line, text: d.text, why: why.join('; ') });
  };
  const list = (key: string, ...v: unknown[]) => ((options[key] ??= []) as unknown[]).push(...v);
  const skip = (d: Directive, why: string) => unmapped.push({ line: d.line, text: d.text, why });
  const fine = (d: Directive, why: string) => covered.push({ line: d.line, text: d.text, why });
  const widens = (d: Directive, why: string) => widening.push({ line: d.line, text: d.text, why });
  const all = directives(text);

  // ACLs first: http_access and snmp_access refer to them by name. A definition replaces a built-in.
  const defined = new Map<string, AclDef>();
  for (const d of all.filter((x) => x.words[0] === 'acl')) {
    const [, name, type, ...values] = d.words;
    if (!name || !type) continue;
    const a = defined.get(name) ?? acl(type);
    for (const v of values) {
      if (/^(--|[-+][a-zA-Z](=\S*)?)$/.test(v)) a.flags.add(v);
      else if (v.startsWith('"')) a.file = true;
      else a.values.push(v);
    }
    defined.set(name, a);
  }
  const aclOf = (name: string): AclDef | undefined => defined.get(name) ?? (Object.hasOwn(BUILTIN_ACLS, name) ? BUILTIN_ACLS[name] : undefined);
  const isMethod = (name: string, method: string) => {
    const a = aclOf(name);
    return a?.type === 'method' && a.values.length > 0 && a.values.every((v) => v === method);
  };
  // The cache manager's acl, built in or defined as Squid 3 did (proto cache_object, or url_regex).
  const isManager = (name: string) => name === 'manager' && ['proto', 'url_regex'].includes(aclOf(name)?.type ?? '');
  const used = new Set<string>();
  const logformats = new Map<string, string>();
  let cacheDirs = 0;

  // http_access is ordered, first match wins; cuttle allows a request only when its client is in
  // allow-client (the mapped "allow <src acl>" rules) and it passes the mapped restrictions. So a deny
  // cuttle cannot map matters only when a mapped allow follows it: then it is access lost.
  let httpEnded = false; // after "deny all" or "allow all" no rule is reached
  let clientsMapped = false;
  let pendingDenies: Row[] = [];
  let destMapped = false;
  const purgeFrom: { d: Directive; cidrs: string[]; names: string[] }[] = [];
  const httpAccess = (d: Directive, action: string | undefined, names: string[]) => {
    const positive = names.filter((n) => !n.startsWith('!'));
    const only = names.length === 1 ? names[0]! : undefined;
    const negated = only?.startsWith('!') ? aclOf(only.slice(1)) : undefined;
    if (httpEnded) return fine(d, 'never reached: an earlier http_access matches every request');
    if (only === 'all') {
      httpEnded = true;
      if (action === 'deny') return fine(d, 'cuttle denies every client not in allow-client');
    }
    if (action === 'deny') {
      if (negated?.type === 'port' && options['allow-port'] === undefined && !negated.file) {
        options['allow-port'] = negated.values.join(',');
        used.add(only!.slice(1));
        return;
      }
      if ((negated?.type === 'dstdomain' || negated?.type === 'dstdom_regex') && !destMapped) {
        const dest = destinations(negated);
        if (typeof dest !== 'string') {
          list('allow-dest', ...dest);
          used.add(only!.slice(1));
          destMapped = true;
          return;
        }
        return void pendingDenies.push({ line: d.line, text: d.text, why: dest });
      }
      if (positive.some((n) => isMethod(n, 'CONNECT'))) return fine(d, 'CONNECT is denied in cuttle unless allow-connect-port names ports (this import names none)');
      if (positive.some(isManager)) return fine(d, 'no cache manager: the admin listener (/status, /metrics) is guarded by allow-admin');
      if (positive.some((n) => aclOf(n)?.type === 'dst' && cidrs(aclOf(n)!.values)?.every((c) => parseCidr(c) && insideLocalRange(parseCidr(c)!))))
        return fine(d, 'cuttle denies loopback and link-local destinations unless allow-local-dest names them');
      if (positive.some((n) => isMethod(n, 'PURGE'))) {
        if (options['allow-purge'] !== undefined) return fine(d, 'PURGE is already limited to allow-purge by an earlier rule');
        // "allow PURGE <src>" rules, then "deny PURGE": allow-purge is exactly their clients.
        options['allow-purge'] = purgeFrom.flatMap((p) => p.cidrs);
        for (const p of purgeFrom) p.names.forEach((n) => used.add(n));
        for (const n of positive) used.add(n);
        purgeFrom.length = 0;
        return;
      }
      const why = negated && (negated.type === 'dstdomain' || negated.type === 'dstdom_regex') ? 'cuttle has one allow-dest list: a second destination restriction (Squid requires both) cannot be added to it' : 'cuttle has no rule that denies this';
      return void pendingDenies.push({ line: d.line, text: d.text, why });
    }
    if (action !== 'allow') return skip(d, 'expected allow or deny');
    const src = only !== undefined ? aclOf(only) : undefined;
    if (src?.type === 'src' && !src.file) {
      const c = cidrs(src.values);
      if (!c?.length) return skip(d, 'an address form cuttle does not take (use CIDRs); no client is allowed by it');
      list('allow-client', ...c);
      used.add(only!);
      clientsMapped = true;
      for (const p of pendingDenies) widening.push({ ...p, why: `${p.why}; the clients of line ${d.line} would reach what it denies` });
      pendingDenies = [];
      if (c.some((x) => x.endsWith('/0'))) skip(d, 'WARNING: this allows every address: an open proxy (mapped as written)');
      return;
    }
    // A PURGE rule for some clients sets allow-purge when a "deny PURGE" follows it.
    const purgeSrc = names.length === 2 ? names.find((n) => aclOf(n)?.type === 'src') : undefined;
    const c = purgeSrc && names.some((n) => isMethod(n, 'PURGE')) ? cidrs(aclOf(purgeSrc)!.values) : undefined;
    if (c) return void purgeFrom.push({ d, cidrs: c, names });
    if (src?.type === 'dstdomain' || src?.type === 'dstdom_regex') return skip(d, 'in Squid this lets every client reach these domains; cuttle has no such rule (its allow-dest narrows destinations, as "deny !ACL" does)');
    if (names.some((n) => isMethod(n.replace(/^!/, ''), 'CONNECT'))) return skip(d, 'CONNECT is off in cuttle unless allow-connect-port names ports');
    if (names.some((n) => isManager(n.replace(/^!/, '')))) return skip(d, 'no cache manager: the admin listener (/status, /metrics) is guarded by allow-admin');
    return skip(d, 'only "allow <src acl>" maps to allow-client; cuttle allows less than Squid here');
  };

  // snmp_access likewise: cuttle answers allow-snmp with snmp-community, Squid denies the rest.
  let snmpEnded = false;
  let snmpMapped = false;
  let snmpPending: Row[] = [];
  const snmpAccess = (d: Directive, action: string | undefined, names: string[]) => {
    if (snmpEnded) return fine(d, 'never reached: an earlier snmp_access matches every query');
    if (names.join(' ') === 'all') {
      snmpEnded = true;
      if (action === 'deny') return fine(d, 'cuttle answers SNMP only to allow-snmp');
    }
    const src = names.filter((n) => aclOf(n)?.type === 'src');
    const community = names.filter((n) => aclOf(n)?.type === 'snmp_community');
    const rest = names.filter((n) => !src.includes(n) && !community.includes(n));
    if (action === 'deny') return void snmpPending.push({ line: d.line, text: d.text, why: 'cuttle has no SNMP rule that denies this' });
    const c = src.length ? cidrs(src.flatMap((n) => aclOf(n)!.values)) : undefined;
    const name = community.length === 1 ? aclOf(community[0]!)!.values[0] : undefined;
    if (action !== 'allow' || rest.length || src.length !== 1 || !c || community.length > 1 || (options['snmp-community'] !== undefined && name !== options['snmp-community']))
      return skip(d, 'only "allow" with one src acl and the one snmp_community acl maps (to allow-snmp and snmp-community); cuttle answers fewer queries than Squid here');
    list('allow-snmp', ...c);
    used.add(src[0]!);
    if (name !== undefined) {
      options['snmp-community'] = name;
      used.add(community[0]!);
    }
    snmpMapped = true;
    for (const p of snmpPending) widening.push({ ...p, why: `${p.why}; the clients of line ${d.line} would reach what it denies` });
    snmpPending = [];
  };

  let rangeLimit: { d: Directive; value: string | 'none' } | undefined;
  for (const d of all) {
    const [name, ...args] = d.words;
    switch (name) {
      case 'http_port': {
        const [addr, ...opts] = args;
        const accel = opts.includes('accel');
        const other = opts.filter((o) => o !== 'accel' && !/^(defaultsite=|vhost$|no-vhost$)/.test(o));
        if (!addr || !/^(\[[^\]]+\]:|[^:]+:)?\d+$/.test(addr)) skip(d, 'not a [HOST:]PORT');
        else if (accel && options['accel-listen'] !== undefined) skip(d, 'cuttle has one accel-listen address');
        else {
          if (accel) options['accel-listen'] = addr;
          else list('listen', addr);
          if (other.length) skip(d, `options ${other.join(' ')} have no cuttle equivalent (the port itself is mapped)`);
        }
        break;
      }
      case 'cache_mem':
      case 'maximum_object_size':
      case 'maximum_object_size_in_memory': {
        const key = { cache_mem: 'memory-cache', maximum_object_size: 'max-object-size', maximum_object_size_in_memory: 'max-memory-object-size' }[name];
        const v = size(args);
        if (v) options[key] = v;
        else skip(d, 'not a size');
        break;
      }
      case 'cache_dir': {
        const [type, path, mb] = args;
        if (type === 'null') skip(d, 'cuttle always keeps a disk tier');
        else if (cacheDirs++ > 0) skip(d, 'cuttle has one cache directory: add this size to disk-cache if they share a disk');
        else if (!path || !mb || !/^\d+$/.test(mb)) skip(d, 'expected cache_dir TYPE PATH SIZE_MB');
        else {
          movePath(d, 'cache-dir', path);
          options['disk-cache'] = `${mb}MB`;
          if (type !== 'ufs' && type !== 'aufs' && type !== 'diskd') fine(d, `${type} becomes cuttle's own record format`);
        }
        break;
      }
      case 'http_access':
        httpAccess(d, args[0], args.slice(1));
        break;
      case 'snmp_access':
        snmpAccess(d, args[0], args.slice(1));
        break;
      case 'snmp_port':
        if (args[0] && /^\d+$/.test(args[0])) options['snmp-listen'] = args[0] === '0' ? 'none' : args[0];
        else skip(d, 'not a port');
        break;
      case 'range_offset_limit': {
        // range_offset_limit SIZE [units] [acl...]: the first line that matches applies; cuttle has one limit.
        const v = args[0] === 'none' || args[0] === '-1' ? 'none' : size(args.slice(0, 2));
        const rest = args.slice(args[0] === 'none' || args[0] === '-1' || !args[1] || !SIZE_UNITS[args[1].toLowerCase()] ? 1 : 2);
        if (rangeLimit) fine(d, 'never reached: an earlier range_offset_limit applies to every request');
        else if (!v) skip(d, 'not a size');
        else if (rest.length) skip(d, 'cuttle has one range-offset-limit for every request, not one per acl');
        else rangeLimit = { d, value: v };
        break;
      }
      case 'negative_ttl':
      case 'shutdown_lifetime': {
        const v = duration(args);
        if (v) options[name === 'negative_ttl' ? 'negative-ttl' : 'shutdown-timeout'] = v;
        else skip(d, 'not a duration');
        break;
      }
      case 'visible_hostname':
        options['visible-hostname'] = args[0];
        break;
      case 'pid_filename':
        if (args[0] === 'none' || !args[0]) options['pid-file'] = 'none';
        else movePath(d, 'pid-file', args[0]);
        break;
      case 'logformat':
        if (args[0]) logformats.set(args[0], args.slice(1).join(' '));
        fine(d, 'cuttle writes the squid or the frontier (awstats) format: see access_log');
        break;
      case 'access_log': {
        const [where, format = 'squid'] = args;
        const path = where === 'none' ? 'none' : where?.replace(/^(daemon|stdio):/, '');
        const def = logformats.get(format) ?? '';
        const fmt = format === 'squid' ? 'squid' : format === 'awstats' || /X-Frontier-Id/i.test(def) ? 'frontier' : undefined;
        if (!path || /^(syslog|tcp|udp):/.test(where ?? '')) skip(d, 'cuttle writes the access log to a file or stdout');
        else if (options['access-log'] !== undefined) skip(d, 'cuttle writes one access log');
        else if (!fmt && path !== 'none') skip(d, `log format ${format} is neither squid nor frontier's awstats`);
        else {
          if (path === 'none' || path === '-') options['access-log'] = path;
          else movePath(d, 'access-log', path);
          if (fmt && path !== 'none') options['access-log-format'] = fmt;
        }
        break;
      }
      case 'cache_peer':
      case 'never_direct':
      case 'always_direct':
        break; // judged below, together: where misses go
      case 'prefer_direct':
        if (args[0] === 'off') fine(d, "cuttle's behaviour: a miss goes through the parents first, directly only when no parent can serve it");
        else skip(d, 'cuttle tries the parents first and an origin directly only when no parent can serve a miss (Squid\'s default, prefer_direct off)');
        break;
      case 'cache_peer_access':
      case 'cache_peer_domain':
      case 'neighbor_type_domain':
        skip(d, 'cuttle sends every miss to its parents (but always-direct destinations): it cannot choose the parents per request');
        break;
      case 'peer_connect_timeout':
        skip(d, PEER_UNMAPPED['connect-timeout']!);
        break;
      case 'acl':
        break; // judged below, by whether an access rule used it
      default:
        if (name && Object.hasOwn(NARROWS_ACCESS, name)) {
          if (args.join(' ') === (name === 'follow_x_forwarded_for' ? 'deny all' : 'allow all')) fine(d, 'cuttle behaves so already');
          else widens(d, `${NARROWS_ACCESS[name]}; cuttle has no equivalent`);
        } else if (name && NEEDS_NO_SETTING[name]) fine(d, NEEDS_NO_SETTING[name]);
        else skip(d, 'no cuttle equivalent');
    }
  }
  for (const p of purgeFrom) skip(p.d, 'PURGE is allowed from allow-purge (loopback) clients that allow-client allows; without a "deny PURGE" after it this rule is not mapped');
  // A deny after the last mapped allow is reached by no client cuttle allows.
  for (const p of [...pendingDenies, ...snmpPending]) covered.push({ ...p, why: `${p.why}, but it follows every allow rule that cuttle maps, so no client cuttle allows reaches it` });
  // cuttle's defaults allow the private ranges (and SNMP from loopback); Squid denies what its rules do not allow.
  if (!clientsMapped) {
    options['allow-client'] = [];
    unmapped.push({ line: 0, text: '(http_access)', why: 'no http_access allow rule maps to allow-client, so cuttle denies every client (its default, the private ranges, would allow more than this squid.conf)' });
  }
  if (options['snmp-listen'] !== undefined && options['snmp-listen'] !== 'none' && !snmpMapped) options['allow-snmp'] = [];
  if (rangeLimit) {
    // "none": every range that misses fills the whole object, up to the largest object cuttle stores.
    options['range-offset-limit'] = rangeLimit.value === 'none' ? (options['max-object-size'] ?? DEFAULTS['max-object-size']) : rangeLimit.value;
  }
  importPeers(all, { options, aclOf, used, list, fine, skip });
  for (const d of all.filter((x) => x.words[0] === 'acl')) {
    const n = d.words[1]!;
    if (used.has(n)) continue;
    if (Object.hasOwn(BUILTIN_ACLS, n) || n === 'SSL_ports') fine(d, 'cuttle has this built in (loopback and link-local destinations denied, CONNECT off)');
    else skip(d, 'not used by a mapped access rule');
  }
  if (options['accel-listen'] !== undefined && !options.stratum1) unmapped.push({ line: 0, text: '(accel)', why: 'accelerator mode needs stratum1: list the Stratum 1 mirrors it serves' });
  const byLine = (a: Row, b: Row) => a.line - b.line;
  return { options, covered: covered.sort(byLine), unmapped: unmapped.sort(byLine), widening: widening.sort(byLine), moved: moved.sort(byLine) };
}

/** What `cuttle import-squid [--force] FILE` prints and exits with. */
export interface ImportOutput {
  stdout: string;
  stderr: string;
  status: number;
}

/**
 * The YAML text: the options, then what needed no setting and what was not mapped. A line that cannot
 * be mapped and whose loss would let cuttle allow what Squid denies refuses the import (status 2, the
 * lines named on stderr) unless `force`, which prints the access it loses.
 */
export function importSquidText(text: string, file: string, force = false): ImportOutput {
  const r = importSquid(text);
  const lost = r.widening.map((x) => `  ${file}:${x.line}: ${x.text}\n    ${x.why}\n`).join('');
  if (r.widening.length && !force) {
    return {
      stdout: '',
      stderr: `cuttle import-squid: refused: without these lines of ${file} cuttle would allow what Squid denies:\n${lost}Map them by hand, or run cuttle import-squid --force to accept the loss.\n`,
      status: 2,
    };
  }
  let valid = '';
  try {
    buildConfig(r.options);
  } catch (err) {
    valid = `# NOTE: cuttle rejects this as it stands: ${(err as Error).message.replace(/\n/g, '\n#   ')}\n`;
  }
  const row = (x: Row) => `#   line ${x.line}: ${x.text}\n#     ${x.why}\n`;
  const stdout = [
    `# cuttle configuration imported from ${file} by cuttle import-squid.\n# Check it with: cuttle --config FILE --check-config\n`,
    valid,
    stringify(r.options),
    r.widening.length ? `\n# WARNING (--force): cuttle allows what these lines denied (${r.widening.length}):\n${r.widening.map(row).join('')}` : '',
    r.moved.length ? `\n# Squid's paths, changed to cuttle's own (${r.moved.length}):\n${r.moved.map(row).join('')}` : '',
    r.covered.length ? `\n# Needs no setting in cuttle (${r.covered.length}):\n${r.covered.map(row).join('')}` : '',
    `\n# Not mapped (${r.unmapped.length}):\n${r.unmapped.length ? r.unmapped.map(row).join('') : '#   none\n'}`,
  ].join('');
  const stderr = r.widening.length ? `cuttle import-squid: --force: cuttle will allow what these lines of ${file} denied:\n${lost}` : '';
  return { stdout, stderr, status: 0 };
}
