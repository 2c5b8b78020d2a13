// `cuttle import-squid squid.conf`: a migration aid. Reads a Squid (frontier-squid) configuration and
// prints the equivalent cuttle YAML, then lists, with line numbers, what needs no setting in cuttle and
// every directive it could not map. It maps what a CVMFS site proxy sets; the rest is listed, not guessed.
import { stringify } from 'yaml';
import { buildConfig, parseCidr } from './config.ts';

interface Directive {
  line: number;
  text: string;
  words: string[];
}

export interface SquidImport {
  /** cuttle options by name, as they go into the YAML file. */
  options: Record<string, unknown>;
  /** Directives that need no cuttle setting (cuttle's behaviour already), with why. */
  covered: { line: number; text: string; why: string }[];
  /** Directives that could not be mapped, with why. */
  unmapped: { line: number; text: string; why: string }[];
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

export function importSquid(text: string): SquidImport {
  const options: Record<string, unknown> = {};
  const covered: SquidImport['covered'] = [];
  const unmapped: SquidImport['unmapped'] = [];
  const list = (key: string, ...v: unknown[]) => ((options[key] ??= []) as unknown[]).push(...v);
  const skip = (d: Directive, why: string) => unmapped.push({ line: d.line, text: d.text, why });
  const fine = (d: Directive, why: string) => covered.push({ line: d.line, text: d.text, why });
  const all = directives(text);

  // ACLs first: http_access and snmp_access refer to them by name.
  const acls = new Map<string, { type: string; values: string[] }>();
  for (const d of all.filter((x) => x.words[0] === 'acl')) {
    const [, name, type, ...values] = d.words;
    if (!name || !type) continue;
    const a = acls.get(name) ?? { type, values: [] };
    a.values.push(...values);
    acls.set(name, a);
  }
  const used = new Set<string>();
  const logformats = new Map<string, string>();
  let cacheDirs = 0;

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
          options['cache-dir'] = path;
          options['disk-cache'] = `${mb}MB`;
          if (type !== 'ufs' && type !== 'aufs' && type !== 'diskd') fine(d, `${type} becomes cuttle's own record format`);
        }
        break;
      }
      case 'http_access': {
        const [action, ...names] = args;
        if (action === 'deny' && names.length === 1 && names[0] === 'all') fine(d, 'cuttle denies every client not in allow-client');
        else if (action === 'deny' && names.length === 1 && names[0]!.startsWith('!') && acls.get(names[0]!.slice(1))?.type === 'port') {
          const ports = acls.get(names[0]!.slice(1))!.values;
          options['allow-port'] = ports.join(',');
          used.add(names[0]!.slice(1));
        } else if (action === 'allow' && names.length === 1 && acls.get(names[0]!)?.type === 'src') {
          const c = cidrs(acls.get(names[0]!)!.values);
          if (c) {
            list('allow-client', ...c);
            used.add(names[0]!);
            if (c.some((x) => x.endsWith('/0'))) skip(d, 'WARNING: this allows every address: an open proxy (mapped as written)');
          } else skip(d, 'an address form cuttle does not take (use CIDRs)');
        } else if (action === 'deny' && names.length === 1 && names[0]!.startsWith('!') && acls.get(names[0]!.slice(1))?.type === 'dstdomain') {
          list('allow-dest', ...acls.get(names[0]!.slice(1))!.values);
          used.add(names[0]!.slice(1));
        } else if (action === 'allow' && names.length === 1 && acls.get(names[0]!)?.type === 'dstdomain') {
          skip(d, 'in Squid this lets every client reach these domains; cuttle has no such rule (its allow-dest narrows destinations, as "deny !ACL" does)');
        } else if (names.some((n) => /^!?CONNECT$/.test(n))) skip(d, 'CONNECT is off in cuttle unless allow-connect-port names ports');
        else if (names.some((n) => /^!?manager$/.test(n))) skip(d, 'no cache manager: the admin listener (/status, /metrics) is guarded by allow-admin');
        else skip(d, 'only "allow <src acl>", "deny !<port or dstdomain acl>" and "deny all" map to cuttle options');
        break;
      }
      case 'snmp_port':
        if (args[0] && /^\d+$/.test(args[0])) options['snmp-listen'] = args[0] === '0' ? 'none' : args[0];
        else skip(d, 'not a port');
        break;
      case 'snmp_access': {
        const [action, ...names] = args;
        if (action === 'deny' && names.join(' ') === 'all') {
          fine(d, 'cuttle answers SNMP only to allow-snmp');
          break;
        }
        const src = names.filter((n) => acls.get(n)?.type === 'src');
        const community = names.filter((n) => acls.get(n)?.type === 'snmp_community');
        const rest = names.filter((n) => !src.includes(n) && !community.includes(n));
        if (action !== 'allow' || rest.length) {
          skip(d, 'only "allow" with src and snmp_community acls maps (to allow-snmp and snmp-community)');
          break;
        }
        for (const n of src) {
          const c = cidrs(acls.get(n)!.values);
          if (c) list('allow-snmp', ...c);
          used.add(n);
        }
        for (const n of community) {
          options['snmp-community'] = acls.get(n)!.values[0];
          used.add(n);
        }
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
        options['pid-file'] = args[0];
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
          options['access-log'] = path;
          if (fmt && path !== 'none') options['access-log-format'] = fmt;
        }
        break;
      }
      case 'cache_peer': {
        const [host, type, port, , ...opts] = args;
        if (type === 'parent' && opts.includes('originserver') && host && port) list('stratum1', `http://${host}:${port}`);
        else skip(d, 'parent and sibling proxies are not supported yet: keep this proxy as cuttle\'s upstream by pointing clients at cuttle and cuttle\'s misses at the mirrors');
        break;
      }
      case 'acl':
        break; // judged below, by whether an access rule used it
      default:
        if (name && NEEDS_NO_SETTING[name]) fine(d, NEEDS_NO_SETTING[name]);
        else skip(d, 'no cuttle equivalent');
    }
  }
  for (const d of all.filter((x) => x.words[0] === 'acl')) {
    const n = d.words[1]!;
    if (used.has(n)) continue;
    if (['SSL_ports', 'CONNECT', 'manager', 'localhost', 'to_localhost', 'to_linklocal', 'all'].includes(n)) fine(d, 'cuttle has this built in (loopback and link-local destinations denied, CONNECT off)');
    else skip(d, 'not used by a mapped access rule');
  }
  if (options['accel-listen'] !== undefined && !options.stratum1) unmapped.push({ line: 0, text: '(accel)', why: 'accelerator mode needs stratum1: list the Stratum 1 mirrors it serves' });
  return { options, covered: covered.sort((a, b) => a.line - b.line), unmapped: unmapped.sort((a, b) => a.line - b.line) };
}

/** The YAML text `cuttle import-squid` prints: the options, then what needed no setting and what was not mapped. */
export function importSquidText(text: string, file: string): string {
  const r = importSquid(text);
  let valid = '';
  try {
    buildConfig(r.options);
  } catch (err) {
    valid = `# NOTE: cuttle rejects this as it stands: ${(err as Error).message.replace(/\n/g, '\n#   ')}\n`;
  }
  const row = (x: { line: number; text: string; why: string }) => `#   line ${x.line}: ${x.text}\n#     ${x.why}\n`;
  return [
    `# cuttle configuration imported from ${file} by cuttle import-squid.\n# Check it with: cuttle --config FILE --check-config\n`,
    valid,
    stringify(r.options),
    r.covered.length ? `\n# Needs no setting in cuttle (${r.covered.length}):\n${r.covered.map(row).join('')}` : '',
    `\n# Not mapped (${r.unmapped.length}):\n${r.unmapped.length ? r.unmapped.map(row).join('') : '#   none\n'}`,
  ].join('');
}
