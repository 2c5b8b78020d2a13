// Configuration: one OPTIONS table (each option's default, help text, validation, repeatability and
// runtime field name, declared once; the defaults, --help, the zod schema, the Config type and
// toConfig all derive from it), the YAML file and the command line merged (the command line wins),
// validated once with every problem named by its key, then deep-frozen. Runtime code only ever sees the
// frozen `Config` (typed values with units in the names); nothing on the hot path re-checks it.
import { readFileSync } from 'node:fs';
import { availableParallelism, hostname } from 'node:os';
import { parseArgs } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { ConfigError } from './errors.ts';
import type { MirrorGroupConfig, ProbeConfig } from './mirrors.ts';
import { insideLocalRange, parseCidr, type Cidr } from './cidr.ts';

// Re-exported for main and import-squid, which name them here.

/** Options a reload (SIGHUP) applies to the running proxy; the others need a restart. */
export const LIVE_OPTIONS: ReadonlySet<OptionName> = new Set<OptionName>([
  'allow-client', 'allow-dest', 'allow-local-dest', 'allow-admin', 'allow-port', 'allow-connect-port', 'allow-purge',
  'stratum1', 'probe-interval', 'probe-timeout', 'probe-window', 'probe-threshold', 'probe-initial', 'probe-repo',
  'mirror-fail-threshold', 'mirror-timeout', 'mirror-max-lag',
]);

const UNITS: Record<string, number> = { B: 1, K: 1024, KB: 1024, KIB: 1024, M: 1024 ** 2, MB: 1024 ** 2, MIB: 1024 ** 2, G: 1024 ** 3, GB: 1024 ** 3, GIB: 1024 ** 3, T: 1024 ** 4, TB: 1024 ** 4, TIB: 1024 ** 4 };
const DURATIONS: Record<string, number> = { ms: 1, '': 1000, s: 1000, m: 60_000, min: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * A size needs its unit: a bare number would be bytes here but MB in Squid's `cache_dir`, so an admin
 * coming from Squid would get a cache a millionth of the size meant. Units are 1024-based.
 */
export function parseSize(v: string | number): number | undefined {
  if (typeof v === 'number') return undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(v);
  const unit = m && UNITS[m[2]!.toUpperCase()];
  return m && unit ? Math.floor(Number(m[1]) * unit) : undefined;
}

/** A byte count as people read it: 1024-based, one decimal (`10 GiB`, `195.3 KiB`). */
export function formatSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${Number.isInteger(n) ? n : n.toFixed(1)} ${units[i]}`;
}

export function parseDurationMs(v: string | number): number | undefined {
  if (typeof v === 'number') return v >= 0 ? v * 1000 : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d|)\s*$/i.exec(v);
  const unit = m && DURATIONS[m[2]!.toLowerCase()];
  return m && unit ? Math.round(Number(m[1]) * unit) : undefined;
}

export interface PortRange { from: number; to: number }

function parsePorts(v: string | number | (string | number)[]): PortRange[] | undefined {
  const parts = Array.isArray(v) ? v.map(String) : String(v).split(',');
  const out: PortRange[] = [];
  for (const raw of parts) {
    const p = raw.trim();
    if (p === '') continue;
    const m = /^(\d+)(?:-(\d+))?$/.exec(p);
    if (!m) return undefined;
    const from = Number(m[1]);
    const to = m[2] ? Number(m[2]) : from;
    if (from < 1 || to > 65535 || from > to) return undefined;
    out.push({ from, to });
  }
  return out;
}

export interface ListenAddr { host: string; port: number }

function parseListen(v: string | number): ListenAddr | undefined {
  const s = String(v).trim();
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(s) ?? /^()()(\d+)$/.exec(s);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  // A bare port listens on every address, IPv6 and IPv4 alike (Squid's `http_port 3128`).
  return { host: m[1] || m[2] || '::', port };
}

export type DestRule = { kind: 'cidr'; cidr: Cidr } | { kind: 'host'; host: string } | { kind: 'domain'; suffix: string } | { kind: 'regex'; source: string };

function parseDest(v: string): DestRule | undefined {
  // ~REGEX: a host name that matches it anywhere, as Squid's dstdom_regex (host names are lower case).
  if (v.startsWith('~')) {
    try {
      new RegExp(v.slice(1));
    } catch {
      return undefined;
    }
    return v.length > 1 ? { kind: 'regex', source: v.slice(1) } : undefined;
  }
  const s = v.trim().toLowerCase();
  const cidr = parseCidr(s);
  if (cidr) return { kind: 'cidr', cidr };
  if (!/^\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(s)) return undefined;
  return s.startsWith('.') ? { kind: 'domain', suffix: s } : { kind: 'host', host: s };
}

/** allow-local-dest: an address range (a CIDR inside the loopback or link-local ranges) or a host name, optionally with a port. */
export type LocalDestRule = ({ kind: 'cidr'; cidr: Cidr } | { kind: 'host'; host: string }) & { port?: number };

function parseLocalDest(v: string | number): LocalDestRule | string {
  const s = String(v).trim().toLowerCase();
  const bracket = /^\[([^\]]+)\](?::(\d+))?$/.exec(s);
  const hostPort = /^([^:]+):(\d+)$/.exec(s);
  const [addr, portText] = bracket ? [bracket[1]!, bracket[2]] : hostPort ? [hostPort[1]!, hostPort[2]] : [s, undefined];
  const port = portText === undefined ? undefined : Number(portText);
  if (port !== undefined && !(port >= 1 && port <= 65535)) return 'a port from 1 to 65535';
  const cidr = parseCidr(addr);
  if (cidr) return insideLocalRange(cidr) ? { kind: 'cidr', cidr, port } : `an address or CIDR inside the loopback or link-local ranges (127.0.0.0/8, ::1, 169.254.0.0/16, fe80::/10); ${addr} is not: public destinations need no option, or list them in allow-dest`;
  if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(addr)) return 'IP[:PORT], [IPv6][:PORT], a CIDR or HOST[:PORT]';
  return { kind: 'host', host: addr, port };
}

/** A Stratum 1 base URL; only its origin matters (a /cvmfs/@fqrn@ path as clients write it is dropped). */
function parseMirror(v: string): string | undefined {
  let u: URL;
  try {
    u = new URL(String(v).replace('@fqrn@', 'x'));
  } catch {
    return undefined;
  }
  return u.protocol === 'http:' && u.hostname ? u.origin : undefined;
}

/** A parent or bank member: `http://HOST:PORT [weight=N] [name=NAME]` (Squid's cache_peer options). */
export interface MemberSpec {
  /** http://host:port, as given (the name CARP hashes defaults to the host as spelled). */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  readonly name: string;
  readonly weight: number;
}

function parseMember(v: string | number): MemberSpec | string {
  const [first = '', ...attrs] = String(v).trim().split(/\s+/);
  const expected = 'http://HOST:PORT followed by optional weight=N and name=NAME';
  // The host as spelled: WHATWG URL lower-cases it, but Squid's CARP hashes the configured spelling.
  const m = /^http:\/\/(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(\d+))?\/?$/.exec(first);
  if (!m) return expected;
  const port = Number(m[2] ?? 3128);
  if (!(port >= 1 && port <= 65535)) return expected;
  let weight = 1;
  let name = m[1]!.replace(/^\[|\]$/g, '');
  for (const a of attrs) {
    const kv = /^(weight|name)=(.+)$/.exec(a);
    if (!kv) return `${expected} (unknown option ${a})`;
    if (kv[1] === 'weight') {
      if (!/^\d+$/.test(kv[2]!)) return `${expected} (weight is a whole number)`;
      weight = Number(kv[2]);
    } else name = kv[2]!;
  }
  return { url: `http://${m[1]}:${port}`, host: m[1]!.replace(/^\[|\]$/g, ''), port, name, weight };
}

function parseNamePort(v: string): { host: string; port: number } | undefined {
  const m = /^([A-Za-z0-9._-]+):(\d+)$/.exec(v.trim());
  const port = m ? Number(m[2]) : 0;
  return m && port >= 1 && port <= 65535 ? { host: m[1]!, port } : undefined;
}

// A zod field that turns a user string into a typed value, with the expectation in the error text
// (also for a value of the wrong YAML type, such as `disk-cache: true`).
const conv = <T>(fn: (v: never) => T | undefined, expected: string) =>
  z.unknown().transform((v, ctx) => {
    const out = typeof v === 'string' || typeof v === 'number' ? fn(v as never) : undefined;
    if (out === undefined) {
      ctx.addIssue({ code: 'custom', message: `expected ${expected}, got ${JSON.stringify(v)}` });
      return z.NEVER;
    }
    return out;
  });
// Like conv, for parsers that explain what was wrong instead of returning undefined.
const explained = <T extends object>(fn: (v: string | number) => T | string) =>
  z.unknown().transform((v, ctx) => {
    const out = typeof v === 'string' || typeof v === 'number' ? fn(v) : 'a string';
    if (typeof out === 'string') {
      ctx.addIssue({ code: 'custom', message: `expected ${out}, got ${JSON.stringify(v)}` });
      return z.NEVER;
    }
    return out;
  });
const list = <T extends z.ZodType>(item: T) => z.preprocess((v) => (Array.isArray(v) ? v : [v]), z.array(item));
/** A switch: true or false in YAML (or as the strings), a bare flag or its --no- form on the command line. */
const bool = z.unknown().transform((v, ctx) => {
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === 'false') return v === 'true';
  // YAML 1.1 (and Squid's on/off) read yes/no/on/off as switches; YAML 1.2, which cuttle reads, as strings.
  const yaml11 = typeof v === 'string' && /^(yes|no|on|off|y|n)$/i.test(v) ? ' (yes/no/on/off are strings in YAML 1.2: write true or false)' : '';
  ctx.addIssue({ code: 'custom', message: `expected true or false, got ${JSON.stringify(v)}${yaml11}` });
  return z.NEVER;
});
const SIZE_EXPECTED = 'a size with its unit (B, KB, MB, GB or TB, 1024-based), such as 512KB, 256MB or 10GB; a bare number is refused, since Squid reads one as MB';
const size = conv(parseSize, SIZE_EXPECTED);
/** A tier's bound: a tier of 0 bytes can't hold anything (the tiers refuse it at start), so 0 is refused here, under its own key. */
const tierSize = (tier: string) =>
  z.unknown().transform((v, ctx) => {
    const n = typeof v === 'string' ? parseSize(v) : undefined;
    if (n === undefined || n === 0) {
      ctx.addIssue({ code: 'custom', message: n === 0 ? `expected a size above 0 (the ${tier} tier holds nothing in 0 bytes), got ${JSON.stringify(v)}` : `expected ${SIZE_EXPECTED}, got ${JSON.stringify(v)}` });
      return z.NEVER;
    }
    return n;
  });
const duration = conv(parseDurationMs, 'a duration such as 500ms, 60s, 5m or 1h');
const listenOrNone = conv((v: string | number) => (v === 'none' ? ('none' as const) : parseListen(v)), '[HOST:]PORT or none');
const cidrs = (example: string) => list(conv(parseCidr, `an IP address or CIDR such as ${example}`));
const count = z.number({ error: 'expected a positive integer' }).int('expected a positive integer').positive('expected a positive integer');

/** One option: CLI flag and YAML key share its name; a `multiple` option is a list (repeatable flag). */
interface OptionSpec {
  readonly default: unknown;
  /** Its name in the runtime Config (units in the name), or its place in Config.probe. */
  readonly field?: string;
  readonly probe?: keyof ProbeConfig;
  readonly help: string;
  readonly schema: z.ZodType;
  readonly multiple?: true;
}

export const OPTIONS = {
  listen: {
    default: ['3128'],
    field: 'listen',
    help: '[HOST:]PORT to accept proxy requests on (repeatable)',
    schema: list(conv(parseListen, '[HOST:]PORT')).refine((l) => l.length > 0, 'expected at least one [HOST:]PORT'),
    multiple: true,
  },
  'cache-dir': {
    default: './var/cache',
    field: 'cacheDir',
    help: 'directory of the disk tier',
    schema: z.string().min(1, 'expected a directory path'),
  },
  'disk-cache': {
    default: '10GB',
    field: 'diskCacheBytes',
    help: 'disk tier size bound (KB/MB/GB)',
    schema: tierSize('disk'),
  },
  'memory-cache': {
    default: '256MB',
    field: 'memoryCacheBytes',
    help: 'memory tier size bound',
    schema: tierSize('memory'),
  },
  'max-object-size': {
    default: '1GB',
    field: 'maxObjectBytes',
    help: 'largest object kept on disk',
    schema: size,
  },
  'max-memory-object-size': {
    default: '1MB',
    field: 'maxMemoryObjectBytes',
    help: 'largest object kept in memory',
    schema: size,
  },
  'allow-client': {
    default: ['127.0.0.0/8', '::1/128', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7', 'fe80::/10'],
    field: 'allowClient',
    help: 'client CIDR allowed to use the proxy (repeatable)',
    schema: cidrs('10.0.0.0/8'),
    multiple: true,
  },
  'allow-dest': {
    default: [] as string[],
    field: 'allowDest',
    help: 'public destination host (.domain for subdomains), IP, CIDR or ~REGEX of host names (repeatable); when given, only these',
    schema: list(
      explained((v) => {
        const r = parseDest(String(v));
        if (!r) return 'a host name, .domain, IP, CIDR or ~REGEX';
        const local = r.kind === 'cidr' ? insideLocalRange(r.cidr) : r.kind === 'host' && (r.host === 'localhost' || r.host.endsWith('.localhost'));
        return local ? 'a public destination: loopback and link-local ones go in allow-local-dest (which never narrows the public default)' : r;
      }),
    ),
    multiple: true,
  },
  'allow-local-dest': {
    default: [] as string[],
    field: 'allowLocalDest',
    help: 'loopback or link-local destination to allow, such as a local test origin: IP[:PORT], [IPv6][:PORT], CIDR inside those ranges, or HOST[:PORT] (repeatable); never narrows the public destinations',
    schema: list(explained(parseLocalDest)),
    multiple: true,
  },
  'allow-port': {
    default: '80,8000,8080,1025-65535',
    field: 'allowPorts',
    help: 'destination ports allowed, e.g. 80,8000,1025-65535',
    schema: conv(parsePorts, 'ports such as 80,8000,1025-65535'),
  },
  'allow-connect-port': {
    default: '',
    field: 'allowConnectPorts',
    help: 'ports CONNECT may tunnel to (default: none, CONNECT denied)',
    schema: z.union([z.array(z.union([z.string(), z.number()])), z.string(), z.number()]).transform((v, ctx) => {
      const out = parsePorts(v);
      if (!out) {
        ctx.addIssue({ code: 'custom', message: `expected ports such as 443,8443, got ${JSON.stringify(v)}` });
        return z.NEVER;
      }
      return out;
    }),
  },
  'negative-ttl': {
    default: '60s',
    field: 'negativeTtlMs',
    help: 'how long a 404/410 without explicit freshness is cached',
    schema: duration,
  },
  'uncacheable-ttl': {
    default: '120s',
    field: 'uncacheableTtlMs',
    help: 'how long a key whose response was not storable bypasses coalescing',
    schema: duration,
  },
  'max-stale': {
    default: '7d',
    field: 'maxStaleMs',
    help: 'how stale a stored copy may be and still be served when the upstream is down (0 = never)',
    schema: duration,
  },
  'range-offset-limit': {
    default: '16MB',
    field: 'rangeOffsetLimitBytes',
    help: 'a Range request that misses and starts within this many bytes fills the whole object (then 206 from it); beyond, it is passed (Squid range_offset_limit)',
    schema: size,
  },
  'stale-retry': {
    default: '10s',
    field: 'staleRetryMs',
    help: 'after a failed refresh, how long stale copies are served before the upstream is asked again',
    schema: duration,
  },
  'access-log': {
    default: '-',
    field: 'accessLog',
    help: 'Squid-format access log file, - for stdout, none to disable',
    schema: z.string().min(1, 'expected a file path, - or none'),
  },
  'access-log-format': {
    default: 'squid',
    field: 'accessLogFormat',
    help: 'squid (Squid native) or frontier (frontier-squid, as WLCG awstats and failover monitoring parse)',
    schema: z.enum(['squid', 'frontier']),
  },
  'pid-file': {
    default: 'none',
    field: 'pidFile',
    help: 'file that holds the process id while cuttle runs (Squid pid_filename), or none',
    schema: z.string().min(1, 'expected a file path or none'),
  },
  'log-level': {
    default: 'info',
    field: 'logLevel',
    help: 'operational log level (fatal,error,warn,info,debug,trace)',
    schema: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']),
  },
  'visible-hostname': {
    default: hostname(),
    field: 'visibleHostname',
    help: 'name used in Via and X-Cache',
    schema: z.string().regex(/^[A-Za-z0-9._-]+$/, 'expected a host name'),
  },
  'connect-timeout': {
    default: '10s',
    field: 'connectTimeoutMs',
    help: 'upstream connect timeout',
    schema: duration,
  },
  'read-timeout': {
    default: '60s',
    field: 'readTimeoutMs',
    help: 'upstream timeout for headers and between body bytes',
    schema: duration,
  },
  'tunnel-idle-timeout': {
    default: '300s',
    field: 'tunnelIdleTimeoutMs',
    help: 'idle timeout of CONNECT tunnels',
    schema: duration,
  },
  'client-idle-timeout': {
    default: '120s',
    field: 'clientIdleTimeoutMs',
    help: 'idle keep-alive timeout of client connections',
    schema: duration,
  },
  'hit-lane': {
    default: true,
    field: 'hitLane',
    help: 'answer plain requests for fresh memory hits without node:http (the fast path for small hits); --no-hit-lane sends every request through node:http',
    schema: bool,
  },
  'max-fills': {
    default: 1024,
    field: 'maxFills',
    help: 'concurrent upstream cache fills; beyond it misses get 503',
    schema: count,
  },
  'max-passes': {
    default: 1024,
    field: 'maxPasses',
    help: 'concurrent uncached (pass/tunnel) requests; beyond it 503',
    schema: count,
  },
  'max-client-connections': {
    default: 65536,
    field: 'maxClientConnections',
    help: 'open client connections; beyond it a new one gets 503',
    schema: count,
  },
  'listen-backlog': {
    default: 65535,
    field: 'listenBacklog',
    help: 'listen(2) backlog of each client listener, so a burst of connects waits in the kernel rather than being dropped; Linux caps it at net.core.somaxconn',
    schema: count,
  },
  'max-loop-lag': {
    default: '1s',
    field: 'maxLoopLagMs',
    help: 'while the event loop runs later than this, new client connections and new fills get 503 at once (0 = never)',
    schema: duration,
  },
  'background-load': {
    default: 0.5,
    field: 'backgroundLoad',
    help: 'a request marked Priority: u=7 (cuttle warm) starts a new fill only while the event loop is busy at most this share of the time, or serves no other client (1 = never held)',
    schema: z.number({ error: 'expected a number from 0 to 1' }).min(0, 'expected a number from 0 to 1').max(1, 'expected a number from 0 to 1'),
  },
  'background-wait': {
    default: '30s',
    field: 'backgroundWaitMs',
    help: 'how long a background request waits for the event loop to have room before it is refused with 503 (cuttle warm asks again); at most 10m',
    schema: duration.refine((ms) => ms <= 600_000, 'expected at most 10m (cuttle warm waits 15 minutes for an answer)'),
  },
  workers: {
    default: availableParallelism(),
    field: 'workers',
    help: 'event loops (threads) serving clients, each key owned by one of them, so an object is fetched once whichever takes the request; the default is the number of cores (1: a single event loop)',
    schema: count.max(256, 'expected at most 256'),
  },
  'upstream-connections': {
    default: 64,
    field: 'upstreamConnections',
    help: 'connections per upstream host',
    schema: count,
  },
  'fill-window': {
    default: '2MB',
    field: 'fillWindowBytes',
    help: 'memory each in-flight fill keeps when fill-memory is spent; older bytes are read back from disk',
    schema: size,
  },
  'fill-memory': {
    default: '128MB',
    field: 'fillMemoryBytes',
    help: 'memory shared by in-flight fills, so a herd streams from memory; beyond it, from disk',
    schema: size,
  },
  'allow-purge': {
    default: ['127.0.0.0/8', '::1/128'],
    field: 'allowPurge',
    help: 'client CIDR allowed to PURGE cached objects (repeatable)',
    schema: cidrs('127.0.0.0/8'),
    multiple: true,
  },
  'admin-listen': {
    default: '127.0.0.1:3129',
    field: 'adminListen',
    help: '[HOST:]PORT of the admin listener (/metrics, /healthz, /readyz, /status), or none',
    schema: listenOrNone,
  },
  'allow-admin': {
    default: ['127.0.0.0/8', '::1/128'],
    field: 'allowAdmin',
    help: 'client CIDR allowed to use the admin listener (repeatable), e.g. your Prometheus host',
    schema: cidrs('127.0.0.0/8'),
    multiple: true,
  },
  'shutdown-timeout': {
    default: '30s',
    field: 'shutdownTimeoutMs',
    help: 'how long SIGTERM waits for in-flight responses before closing them',
    schema: duration,
  },
  stratum1: {
    default: [] as string[],
    field: 'mirrorGroups',
    help: 'base URL of a Stratum 1 mirror (repeatable; one group). In YAML also a map of group name: [URLs]',
    schema: z.unknown().transform((v, ctx) => {
      // A list is one group named "default"; a mapping names several groups.
      const named = v !== null && typeof v === 'object' && !Array.isArray(v);
      const out: MirrorGroupConfig[] = [];
      for (const [name, raw] of named ? Object.entries(v) : [['default', v] as const]) {
        if (!/^[A-Za-z0-9_.-]+$/.test(name)) ctx.addIssue({ code: 'custom', message: `expected a group name of letters, digits, . _ -, got ${JSON.stringify(name)}` });
        const mirrors: string[] = [];
        for (const item of Array.isArray(raw) ? raw : raw == null ? [] : [raw]) {
          const m = parseMirror(String(item));
          if (m) mirrors.push(m);
          else ctx.addIssue({ code: 'custom', message: `expected an http:// base URL such as http://cvmfs-s1.example:8000, got ${JSON.stringify(item)}` });
        }
        if (named || mirrors.length) out.push({ name, mirrors });
      }
      return out;
    }),
    multiple: true,
  },
  accel: {
    default: false,
    field: 'accel',
    help: 'accelerator mode: --listen ports also take origin-form GET /cvmfs/<repo>/... and serve it from the first mirror group',
    schema: bool,
  },
  'accel-listen': {
    default: 'none',
    field: 'accelListen',
    help: '[HOST:]PORT of an extra accelerator-mode listener, or none',
    schema: listenOrNone,
  },
  'probe-interval': {
    default: '5s',
    probe: 'intervalMs',
    help: 'mirror health probe interval (jittered by ±20%)',
    schema: duration,
  },
  'probe-timeout': {
    default: '2s',
    probe: 'timeoutMs',
    help: 'mirror health probe timeout',
    schema: duration,
  },
  'probe-window': {
    default: 8,
    probe: 'window',
    help: 'probe results remembered per mirror',
    schema: count.max(64, 'expected at most 64'),
  },
  'probe-threshold': {
    default: 3,
    probe: 'threshold',
    help: 'good probes in the window for a mirror to be healthy',
    schema: count,
  },
  'probe-initial': {
    default: 2,
    probe: 'initial',
    help: 'probes counted as good at start (below the threshold: healthy after the first good probe)',
    schema: z.number({ error: 'expected an integer' }).int().min(0),
  },
  'probe-repo': {
    default: '',
    probe: 'repo',
    help: 'repository whose .cvmfspublished is probed (default: the one each mirror last served)',
    schema: z.string().regex(/^[A-Za-z0-9._-]*$/, 'expected a repository name such as atlas.cern.ch'),
  },
  'mirror-fail-threshold': {
    default: 3,
    probe: 'failThreshold',
    help: 'failed fetches in a row that mark a mirror down until its next good probe',
    schema: count,
  },
  'mirror-timeout': {
    default: '3s',
    probe: 'answerTimeoutMs',
    help: 'time a mirror has to connect and answer with headers before the next mirror of the group is asked (clients give up after 5 s)',
    schema: duration,
  },
  'mirror-max-lag': {
    default: '1h',
    probe: 'maxLagMs',
    help: 'a mirror whose probed manifest was published this much before the group\'s newest is stale (accelerator mode moves off it)',
    schema: duration,
  },
  parent: {
    default: [] as string[],
    field: 'parents',
    help: 'parent proxy that misses go through, as URL [weight=N] [name=NAME] (repeatable; Squid cache_peer ... parent)',
    schema: list(explained(parseMember)),
    multiple: true,
  },
  'parent-policy': {
    default: 'first-up',
    field: 'parentPolicy',
    help: 'how a miss chooses among the parents: first-up (in order, the next on failure), round-robin, or carp (Squid\'s CARP, bit-exact)',
    schema: z.enum(['first-up', 'round-robin', 'carp']),
  },
  'never-direct': {
    default: false,
    field: 'neverDirect',
    help: 'never fetch from an origin directly: with every parent down a miss gets a labelled 502/504 (Squid never_direct allow all)',
    schema: bool,
  },
  'always-direct': {
    default: [] as string[],
    field: 'alwaysDirect',
    help: 'destination host (.domain, IP, CIDR or ~REGEX) always fetched directly, never through a parent or bank member (repeatable; Squid always_direct)',
    schema: list(explained((v) => parseDest(String(v)) ?? 'a host name, .domain, IP, CIDR or ~REGEX')),
    multiple: true,
  },
  bank: {
    default: [] as string[],
    field: 'bank',
    help: 'member of this proxy bank, itself included, as URL [weight=N] [name=NAME] (repeatable; every member gets the same list): each key has one owner member, the others stream its answer',
    schema: list(explained(parseMember)),
    multiple: true,
  },
  'bank-hash': {
    default: 'cvmfs-ring',
    field: 'bankHash',
    help: 'how a key\'s owner is chosen: cvmfs-ring (the CVMFS client\'s CVMFS_PROXY_SHARD ring, so sharding clients reach the owner directly) or squid-carp (Squid\'s CARP, for banks with frontier-squids)',
    schema: z.enum(['cvmfs-ring', 'squid-carp']),
  },
  'bank-dns': {
    default: 'none',
    field: 'bankDns',
    help: 'NAME:PORT whose addresses are the bank\'s members (a headless Kubernetes Service, a round-robin alias), or none',
    schema: conv((v: string | number) => (v === 'none' ? ('none' as const) : parseNamePort(String(v))), 'NAME:PORT or none'),
  },
  'bank-dns-interval': {
    default: '30s',
    field: 'bankDnsIntervalMs',
    help: 'how often --bank-dns is resolved again',
    schema: duration,
  },
  'peer-timeout': {
    default: '2s',
    field: 'peerTimeoutMs',
    help: 'time a parent has to accept a connection, and a bank owner to answer, before the next route is taken (clients give up after 5 s)',
    schema: duration,
  },
  'snmp-listen': {
    default: 'none',
    field: 'snmpListen',
    help: '[HOST:]PORT (UDP) of the SNMP agent with the Squid MIB, usually 3401, or none',
    schema: listenOrNone,
  },
  'allow-snmp': {
    default: ['127.0.0.0/8', '::1/128'],
    field: 'allowSnmp',
    help: 'CIDR allowed to query the SNMP agent (repeatable)',
    schema: cidrs('127.0.0.0/8'),
    multiple: true,
  },
  'snmp-community': {
    default: 'public',
    field: 'snmpCommunity',
    help: 'SNMP v1/v2c community string',
    schema: z.string().min(1, 'expected a community string').regex(/^[\x21-\x7e]+$/, 'expected printable characters without spaces'),
  },
} as const satisfies Record<string, OptionSpec>;

export type OptionName = keyof typeof OPTIONS;

/** Every option's default, by name (the YAML key and the CLI flag). */
export const DEFAULTS = Object.fromEntries(Object.entries(OPTIONS).map(([k, o]) => [k, o.default])) as { [K in OptionName]: (typeof OPTIONS)[K]['default'] };

const schema = z
  .object(Object.fromEntries(Object.entries(OPTIONS).map(([k, o]) => [k, o.schema])) as { [K in OptionName]: (typeof OPTIONS)[K]['schema'] })
  .strict();

type Parsed = z.output<typeof schema>;

type FieldOf<K extends OptionName> = (typeof OPTIONS)[K] extends { field: infer F extends string } ? F : never;

/**
 * The validated, frozen configuration every module reads, derived from OPTIONS: each option under its
 * `field` name (units in the names), the probe options grouped as `probe`, and the raw values by
 * option name in `options`.
 */
export type Config = { readonly [K in OptionName as FieldOf<K>]: Readonly<z.output<(typeof OPTIONS)[K]['schema']>> } & {
  /** The same values by option name, as the admin wrote the keys (for messages such as reload's). */
  readonly options: Readonly<Record<OptionName, unknown>>;
  readonly probe: ProbeConfig;
};

function toConfig(p: Parsed): Config {
  const out: Record<string, unknown> = { options: p };
  const probe: Record<string, unknown> = {};
  for (const k of Object.keys(OPTIONS) as OptionName[]) {
    const o: OptionSpec = OPTIONS[k];
    if (o.field) out[o.field] = p[k];
    else probe[o.probe!] = p[k];
  }
  out.probe = probe;
  return out as Config;
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}

/**
 * A reload: the running configuration with the live options (LIVE_OPTIONS) taken from `next`, and
 * the changed options that need a restart, by name. The result is derived from the options like any
 * Config, so no field list is kept twice.
 */
export function reloaded(current: Config, next: Config): { config: Config; needRestart: OptionName[] } {
  const names = Object.keys(next.options) as OptionName[];
  const needRestart = names.filter((k) => !LIVE_OPTIONS.has(k) && JSON.stringify(next.options[k]) !== JSON.stringify(current.options[k]));
  const options = { ...current.options } as Record<OptionName, unknown>;
  for (const k of names) if (LIVE_OPTIONS.has(k)) options[k] = next.options[k];
  return { config: deepFreeze(toConfig(options as Parsed)), needRestart };
}

/** Validate a raw options object (YAML keys). Throws ConfigError listing every problem. */
export function buildConfig(raw: Record<string, unknown>): Config {
  const merged = { ...structuredClone(DEFAULTS), ...raw } as Record<string, unknown>;
  const res = schema.safeParse(merged);
  if (!res.success) {
    const problems = res.error.issues.flatMap((i) => {
      const key = i.path.length ? String(i.path[0]) : '(config)';
      if (i.code === 'unrecognized_keys') return i.keys.map((k) => unknownName('key', k, '', Object.keys(DEFAULTS)));
      return [`${key}: ${i.message}`];
    });
    throw new ConfigError(problems);
  }
  const cfg = toConfig(res.data);
  const cross: string[] = [];
  // A bound below its largest object: the message names the key the admin wrote, not a default.
  for (const [bound, largest] of [['memory-cache', 'max-memory-object-size'], ['disk-cache', 'max-object-size']] as const) {
    if ((res.data[largest] as number) <= (res.data[bound] as number)) continue;
    if (largest in raw) cross.push(`${largest}: must not exceed ${bound} (${String(merged[bound])}${bound in raw ? '' : ', its default'})`);
    else cross.push(`${bound}: ${String(merged[bound])} is below ${largest} (${String(merged[largest])}, its default): raise ${bound} or lower ${largest}`);
  }
  if (cfg.probe.threshold > cfg.probe.window) cross.push('probe-threshold: must not exceed probe-window');
  if (cfg.probe.initial > cfg.probe.window) cross.push('probe-initial: must not exceed probe-window');
  if ((cfg.accel || cfg.accelListen !== 'none') && cfg.mirrorGroups.length === 0) cross.push('accel: accelerator mode needs at least one stratum1 mirror to serve from');
  const seen = new Map<string, string>();
  for (const g of cfg.mirrorGroups) {
    if (g.mirrors.length === 0) cross.push(`stratum1: group "${g.name}" has no mirrors`);
    for (const m of g.mirrors) {
      if (seen.has(m)) cross.push(`stratum1: ${m} is listed twice (groups "${seen.get(m)}" and "${g.name}")`);
      seen.set(m, g.name);
    }
  }
  if (cfg.neverDirect && cfg.parents.length === 0) cross.push('never-direct: needs at least one parent to fetch through');
  if (cfg.bank.length > 0 && cfg.bankDns !== 'none') cross.push('bank-dns: give the members either as a bank list or by bank-dns, not both');
  for (const [key, list] of [['parent', cfg.parents], ['bank', cfg.bank]] as const) {
    const urls = new Set<string>();
    for (const p of list) {
      if (urls.has(p.url.toLowerCase())) cross.push(`${key}: ${p.url} is listed twice`);
      urls.add(p.url.toLowerCase());
    }
  }
  if (cross.length) throw new ConfigError(cross);
  return deepFreeze(cfg);
}

/**
 * An unknown key or option, with the nearest known name when one is close (a typo, a transposition,
 * Squid's underscores), else a pointer to --help: a list of every name hides the one meant.
 */
function unknownName(what: string, name: string, prefix: string, known: readonly string[]): string {
  const norm = (s: string) => s.toLowerCase().replace(/_/g, '-');
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const k of known) {
    const d = editDistance(norm(name), norm(k));
    if (d < bestDistance) [best, bestDistance] = [k, d];
  }
  const close = bestDistance <= Math.min(3, Math.max(1, Math.floor(name.length / 4)));
  return `unknown ${what} "${prefix}${name}"; ${close ? `did you mean "${prefix}${best}"?` : 'run cuttle --help for every option'}`;
}

/** Edits (insert, delete, substitute, swap two neighbours) that turn a into b. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i]![j] = Math.min(d[i]![j]!, d[i - 2]![j - 2]! + 1);
    }
  }
  return d[a.length]![b.length]!;
}

/** Read a YAML config file into a raw object. */
export function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError([`config: cannot read ${file}: ${(err as Error).message}`]);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new ConfigError([`config: ${file} is not valid YAML: ${(err as Error).message}`]);
  }
  if (doc == null) return {};
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new ConfigError([`config: ${file} must be a YAML mapping of option: value`]);
  return doc as Record<string, unknown>;
}

export interface Cli {
  configFile?: string;
  checkConfig: boolean;
  version: boolean;
  help: boolean;
  options: Record<string, unknown>;
}

/** Parse argv. Unknown options are errors that name the option. */
export function parseCli(argv: string[]): Cli {
  const options: Record<string, { type: 'string' | 'boolean'; multiple?: boolean }> = {
    config: { type: 'string' },
    'check-config': { type: 'boolean' },
    version: { type: 'boolean' },
    help: { type: 'boolean' },
  };
  for (const name of Object.keys(DEFAULTS) as OptionName[]) options[name] = typeof DEFAULTS[name] === 'boolean' ? { type: 'boolean' } : { type: 'string', multiple: 'multiple' in OPTIONS[name] };
  // What parseArgs would only say as "Unknown option": the nearest known option, and a switch given a value.
  const flags = Object.entries(options).flatMap(([k, o]) => (o.type === 'boolean' && k in OPTIONS ? [k, `no-${k}`] : [k]));
  const problems: string[] = [];
  for (const t of parseArgs({ args: argv, options, strict: false, allowPositionals: true, allowNegative: true, tokens: true }).tokens) {
    if (t.kind !== 'option') continue;
    const name = t.rawName.replace(/^--?/, '');
    if (!flags.includes(name)) problems.push(unknownName('option', name, t.rawName.startsWith('--') ? '--' : '-', flags));
    else if (options[t.name]!.type === 'boolean' && t.inlineValue) problems.push(`${t.name}: expected --${t.name} or --no-${t.name} (a switch takes no value), got "${t.rawName}=${t.value}"`);
  }
  if (problems.length) throw new ConfigError(problems);
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false, allowNegative: true }); // --no-hit-lane
  } catch (err) {
    throw new ConfigError([(err as Error).message.split('\n')[0]!]);
  }
  const v = parsed.values as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const name of Object.keys(DEFAULTS) as OptionName[]) {
    if (v[name] === undefined) continue;
    const def = DEFAULTS[name];
    // Numeric options arrive as strings from the command line.
    out[name] = typeof def === 'number' && /^\d+(\.\d+)?$/.test(String(v[name])) ? Number(v[name]) : v[name];
  }
  return {
    configFile: v.config as string | undefined,
    checkConfig: Boolean(v['check-config']),
    version: Boolean(v.version),
    help: Boolean(v.help),
    options: out,
  };
}

/** The options argv gives (+ the file it names), unvalidated. The command line wins over the file. */
export function rawOptions(cli: Cli): Record<string, unknown> {
  const file = cli.configFile ? readConfigFile(cli.configFile) : {};
  return { ...file, ...cli.options };
}

/** Config from argv (+ the file it names). */
export function loadConfig(cli: Cli): Config {
  return buildConfig(rawOptions(cli));
}

export function helpText(): string {
  const lines = ['usage: cuttle [--config FILE] [options]', '       cuttle import-squid [--force] /etc/squid/squid.conf   (print the equivalent cuttle YAML config)', '       cuttle health [--pid PID]   (ask the running cuttle\'s /healthz, wherever its admin-listen puts it)', '       cuttle warm REPOSITORY_URL... [options]   (fill the cache from CVMFS catalogs; cuttle warm --help)', '', 'options (each is also a key of the YAML config file):'];
  for (const name of Object.keys(DEFAULTS) as OptionName[]) {
    const d = DEFAULTS[name];
    const shown = Array.isArray(d) ? d.join(' ') : String(d);
    lines.push(`  --${name.padEnd(24)} ${OPTIONS[name].help}${shown ? ` (default: ${shown})` : ''}`);
  }
  lines.push('  --config FILE              YAML config file', '  --check-config             validate the configuration and exit', '  --version', '  --help');
  return lines.join('\n');
}
