// cuttle import-squid on frontier-squid's shipped defaults and on a customized site config: the YAML it
// prints is a valid cuttle config with the mapped values, and every other directive is listed by line.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { compileAcl } from '../../src/acl.ts';
import { buildConfig } from '../../src/config.ts';
import { importSquid } from '../../src/import-squid.ts';
import { tmpDir } from '../helpers/proxy.ts';

const fixture = (name: string) => readFileSync(join('test/fixtures', name), 'utf8');
const lineOf = (text: string, start: string) => text.split('\n').findIndex((l) => l.startsWith(start)) + 1;

/** Run `cuttle import-squid [--force]` on `text` as a file; its output, status, and the file's path. */
function cli(text: string, force = false) {
  const conf = join(tmpDir(), 'squid.conf');
  writeFileSync(conf, text);
  const out = spawnSync(process.execPath, ['src/main.ts', 'import-squid', ...(force ? ['--force'] : []), conf], { encoding: 'utf8' });
  return { ...out, conf };
}

/** `cuttle --check-config` on printed YAML, its paths pointed at a place this test may write. */
function checkConfig(yaml: string) {
  const dir = tmpDir();
  const file = join(dir, 'cuttle.yaml');
  writeFileSync(file, yaml.replaceAll('/var/cache/cuttle', join(dir, 'cache')).replaceAll('/var/log/cuttle', dir).replaceAll('/run/cuttle', dir));
  return spawnSync(process.execPath, ['src/main.ts', '--config', file, '--check-config', '--listen', '127.0.0.1:3128'], { encoding: 'utf8' });
}

describe('cuttle import-squid', () => {
  it("maps frontier-squid's shipped defaults, and the printed YAML passes --check-config", () => {
    const text = fixture('frontier-squid-default.conf');
    const r = importSquid(text);
    assert.deepEqual(r.options, {
      'allow-port': '80,8000,8080,1025-65535',
      'allow-client': ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7', 'fe80::/10', '127.0.0.1/32', '::1'],
      listen: ['3128'],
      'memory-cache': '128MB',
      'max-memory-object-size': '128KB',
      'max-object-size': '1048576KB',
      'cache-dir': '/var/cache/cuttle',
      'disk-cache': '10000MB',
      'negative-ttl': '60s',
      'snmp-listen': '3401',
      'snmp-community': 'public',
      'allow-snmp': ['127.0.0.1/32', '128.142.0.0/16', '188.184.128.0/17', '188.185.48.0/20', '188.185.128.0/17'],
      'access-log': '/var/log/cuttle/access.log',
      'access-log-format': 'frontier',
      'pid-file': '/run/cuttle/cuttle.pid',
      'visible-hostname': 'squid1.example.org',
    });
    const cfg = buildConfig(r.options);
    assert.equal(cfg.memoryCacheBytes, 128 * 1024 ** 2);
    assert.equal(cfg.diskCacheBytes, 10000 * 1024 ** 2);
    // What could not be mapped is listed with its line: the cache manager. Denying CONNECT and the
    // manager needs no setting (cuttle has neither), and nothing lost widens access.
    assert.deepEqual(r.unmapped.map((u) => u.line), [lineOf(text, 'http_access allow localhost manager')]);
    assert.deepEqual(r.widening, []);
    for (const start of ['collapsed_forwarding on', 'http_access deny CONNECT', 'http_access deny manager']) assert.ok(r.covered.some((c) => c.line === lineOf(text, start)), start);

    const dir = tmpDir();
    const conf = join(dir, 'squid.conf');
    writeFileSync(conf, text);
    const out = spawnSync(process.execPath, ['src/main.ts', 'import-squid', conf], { encoding: 'utf8' });
    assert.equal(out.status, 0, out.stderr);
    assert.match(out.stdout, new RegExp(`#   line ${lineOf(text, 'http_access deny manager')}: http_access deny manager\\n#     no cache manager`));
    // Point the paths at places this test may write, then let cuttle itself check the file.
    const yaml = parse(out.stdout) as Record<string, unknown>;
    assert.deepEqual(yaml, r.options);
    const file = join(dir, 'cuttle.yaml');
    writeFileSync(file, out.stdout.replaceAll('/var/cache/cuttle', join(dir, 'cache')).replaceAll('/var/log/cuttle', dir).replaceAll('/run/cuttle', dir));
    const check = spawnSync(process.execPath, ['src/main.ts', '--config', file, '--check-config', '--listen', '127.0.0.1:3128', '--snmp-listen', '127.0.0.1:3401'], { encoding: 'utf8' });
    assert.equal(check.status, 0, check.stderr);
  });

  it('maps a customized site: accel port and its origin, continued lines, a destination list, its parent; lists a second cache_dir, workers', () => {
    const text = fixture('site-customized.conf');
    const r = importSquid(text);
    assert.deepEqual(r.options['allow-client'], ['131.225.0.0/16', '2001:400:2410::/48'], 'continuation lines joined');
    assert.deepEqual(r.options['allow-dest'], ['.cern.ch', '.fnal.gov', '.openhtc.io']);
    assert.deepEqual(r.options.listen, ['3128']);
    assert.equal(r.options['accel-listen'], '8000');
    assert.deepEqual(r.options.stratum1, ['http://localhost:8081']);
    assert.equal(r.options['memory-cache'], '51200MB');
    assert.equal(r.options['cache-dir'], '/srv/cuttle');
    assert.equal(r.options['disk-cache'], '900000MB');
    assert.equal(r.options['shutdown-timeout'], '5s');
    assert.equal(r.options['access-log-format'], 'squid');
    const why = (start: string) => r.unmapped.find((u) => u.line === lineOf(text, start))?.why ?? '';
    assert.deepEqual(r.options.parent, ['http://squid-parent.example.org:3128']);
    assert.equal(r.options['parent-policy'], 'first-up');
    assert.ok(r.covered.some((c) => c.line === lineOf(text, 'cache_peer squid-parent') && /^no-query: cuttle never sends ICP.*; default: /.test(c.why)));
    assert.ok(r.covered.some((c) => c.line === lineOf(text, 'cache_peer localhost') && /not a parent: mapped to stratum1/.test(c.why)));
    assert.match(why('cache_dir ufs /srv/squid2'), /one cache directory/);
    assert.match(why('workers 4'), /no cuttle equivalent/);
    assert.match(why('http_access allow MAJOR_CVMFS'), /lets every client reach these domains/);
    assert.match(why('acl MAJOR_CVMFS'), /not used by a mapped access rule/);
    assert.match(why('http_port 8000 accel'), /^$/, 'accel options are understood');
    assert.equal(r.unmapped.length, 4);
    assert.doesNotThrow(() => buildConfig({ ...r.options, stratum1: ['http://s1.example.org:8081'] }));
  });

  it("maps Squid's built-in localhost acl, a dstdom_regex RESTRICT_DEST, PURGE from localhost and range_offset_limit, and the ACL built from the output behaves", () => {
    const text = fixture('frontier-squid-restrict.conf');
    const out = cli(text);
    assert.equal(out.status, 0, out.stderr);
    assert.equal(out.stderr, '');
    const yaml = parse(out.stdout) as Record<string, unknown>;
    const cfg = buildConfig(yaml);
    const acl = compileAcl(cfg);
    // localhost is Squid's own acl (no "acl localhost" line): local clients and local PURGE are allowed.
    for (const a of ['127.0.0.1', '::1', '10.1.2.3']) assert.equal(acl.allowsClient(a), true, a);
    assert.equal(acl.allowsClient('131.225.1.1'), false);
    assert.equal(acl.allowsPurge('127.0.0.1'), true);
    assert.equal(acl.allowsPurge('10.1.2.3'), false, '"http_access deny PURGE" after "allow PURGE localhost"');
    // RESTRICT_DEST: only the hosts the regex matches; any other public host is denied before DNS.
    for (const h of ['cvmfs-stratum-one.cern.ch', 'hcc-stratum-one.cern.ch', 'atlas-x-frontier.cern.ch', 'cvmfs.fnal.gov', 'cvmfs-s1bnl.opensciencegrid.org']) assert.equal(acl.checkDestination(h, 8000), 'allow', h);
    for (const h of ['www.example.org', 'cmsfrontier.cern.ch', 'fnal.gov', 'cern.ch.example.org', 'cvmfs-s1-x.opensciencegrid.org', '192.0.2.1']) assert.equal(acl.checkDestination(h, 8000), 'deny-dest', h);
    // range_offset_limit none: every range that misses fills the whole object, up to the largest stored.
    assert.equal(cfg.rangeOffsetLimitBytes, cfg.maxObjectBytes);
    assert.equal(cfg.maxObjectBytes, 1024 ** 3);
    const r = importSquid(text);
    assert.deepEqual(r.unmapped.map((u) => u.line), [lineOf(text, 'http_access allow localhost manager')]);
    const check = checkConfig(out.stdout);
    assert.equal(check.status, 0, check.stderr);
  });

  it('refuses, naming file:line, every line it cannot map whose loss would let cuttle allow what Squid denies; --force accepts the loss and prints it', () => {
    const text = [
      'acl NET_LOCAL src 10.0.0.0/8',
      'acl BAD dstdomain .example.net',
      'acl CVMFS dstdomain .cern.ch .fnal.gov',
      'acl FNAL dstdom_regex -i \\.FNAL\\.gov$',
      'acl ODD dstdomain .example.com',
      'http_access deny !CVMFS',
      'http_access deny !FNAL', // a second destination restriction: Squid requires both
      'http_access deny BAD',
      'http_access allow NET_LOCAL',
      'http_access deny ODD', // after the last allow: reached by no client cuttle allows
      'http_access deny all',
      'miss_access deny !NET_LOCAL',
      'follow_x_forwarded_for allow localhost',
      'http_port 3128',
    ].join('\n');
    const refused = cli(text);
    assert.equal(refused.status, 2);
    assert.equal(refused.stdout, '');
    const named = [...refused.stderr.matchAll(/^ {2}(\S+):(\d+): /gm)].map((m) => [m[1], Number(m[2])]);
    assert.deepEqual(named, [7, 8, 12, 13].map((l) => [refused.conf, l]));
    assert.match(refused.stderr, /--force/);

    const forced = cli(text, true);
    assert.equal(forced.status, 0, forced.stderr);
    assert.deepEqual([...forced.stderr.matchAll(/^ {2}\S+:(\d+): /gm)].map((m) => Number(m[1])), [7, 8, 12, 13]);
    assert.match(forced.stdout, /# WARNING \(--force\): cuttle allows what these lines denied \(4\):\n# {3}line 7: http_access deny !FNAL\n/);
    const r = importSquid(text);
    assert.ok(r.covered.some((c) => c.line === 10 && /no client cuttle allows reaches it/.test(c.why)));
    const yaml = parse(forced.stdout) as Record<string, unknown>;
    assert.deepEqual(yaml['allow-client'], ['10.0.0.0/8']);
    assert.deepEqual(yaml['allow-dest'], ['.cern.ch', '.fnal.gov']);
    assert.equal(checkConfig(forced.stdout).status, 0);
  });

  it('allows no client when no http_access allow rule maps (cuttle\'s default ranges would allow more), and SNMP to none without an snmp_access allow', () => {
    const text = ['acl NET_LOCAL src 10.0.0.0-10.255.255.255', 'http_access allow NET_LOCAL', 'http_access deny all', 'snmp_port 3401', 'http_port 3128'].join('\n');
    const out = cli(text);
    assert.equal(out.status, 0, out.stderr);
    const cfg = buildConfig(parse(out.stdout) as Record<string, unknown>);
    assert.deepEqual(cfg.allowClient, []);
    assert.deepEqual(cfg.allowSnmp, []);
    assert.equal(compileAcl(cfg).allowsClient('10.1.2.3'), false);
    assert.match(out.stdout, /line 2: http_access allow NET_LOCAL\n# {5}an address form cuttle does not take/);
    assert.match(out.stdout, /line 0: \(http_access\)\n# {5}no http_access allow rule maps to allow-client/);
  });

  it('maps a dstdom_regex only as Squid reads it: a case-insensitive pattern with capitals is refused, and cuttle refuses a ~REGEX it cannot compile', () => {
    const text = ['acl R dstdom_regex -i ^CVMFS\\.cern\\.ch$', 'http_access deny !R', 'http_access allow localhost', 'http_port 3128'].join('\n');
    const r = importSquid(text);
    assert.deepEqual(r.widening.map((w) => [w.line, w.why]), [[2, '^CVMFS\\.cern\\.ch$ is case-insensitive (-i) with capitals: write it in lower case; the clients of line 3 would reach what it denies']]);
    assert.equal(cli(text).status, 2);
    const lower = importSquid(text.replace('CVMFS', 'cvmfs'));
    assert.deepEqual(lower.options['allow-dest'], ['~^cvmfs\\.cern\\.ch$']);
    assert.equal(compileAcl(buildConfig(lower.options)).checkDestination('cvmfs.cern.ch', 80), 'allow');
    assert.throws(() => buildConfig({ 'allow-dest': ['~^(cvmfs'] }), /allow-dest: expected a host name, \.domain, IP, CIDR or ~REGEX/);
  });
});


// Where misses go: cache_peer parents, never_direct, always_direct. Routing, not access: a line that
// cannot be mapped is listed, never refuses the import.
describe('cuttle import-squid: parents and direct fetches', () => {
  const conf = (...lines: string[]) => ['acl NET_LOCAL src 10.0.0.0/8', 'http_access allow NET_LOCAL', 'http_access deny all', 'http_port 3128', ...lines].join('\n');
  /** The import of these lines (after 4 lines of access rules), checked to be a config cuttle takes and to widen nothing. */
  const imp = (...lines: string[]) => {
    const r = importSquid(conf(...lines));
    assert.doesNotThrow(() => buildConfig(r.options));
    assert.deepEqual(r.widening, []);
    const row = (rows: { line: number; why: string }[], line: number) => rows.filter((x) => x.line === line + 4).map((x) => x.why).join(' | ');
    return { ...r, unmappedWhy: (line: number) => row(r.unmapped, line), coveredWhy: (line: number) => row(r.covered, line) };
  };

  it('maps a parent without ICP and never_direct allow all; no-query, no-digest, no-netdb-exchange, proxy-only, default need no setting', () => {
    const r = imp('cache_peer regional.example.org parent 3128 0 no-query no-digest no-netdb-exchange proxy-only default', 'never_direct allow all');
    assert.deepEqual(r.options.parent, ['http://regional.example.org:3128']);
    assert.equal(r.options['parent-policy'], 'first-up', "Squid's default order");
    assert.equal(r.options['never-direct'], true);
    assert.match(r.coveredWhy(1), /^no-query: cuttle never sends ICP or HTCP.*; no-digest: .*; no-netdb-exchange: .*; proxy-only: .*; default: /);
    assert.equal(r.unmappedWhy(1), '');
    assert.equal(r.unmappedWhy(2) + r.coveredWhy(2), '', 'never_direct allow all is mapped');
    const cfg = buildConfig(r.options);
    assert.deepEqual(cfg.parents.map((p) => [p.host, p.port, p.name, p.weight]), [['regional.example.org', 3128, 'regional.example.org', 1]]);
    assert.equal(cfg.neverDirect, true);
  });

  it('maps carp parents in line order, with the host as spelled, weight= when not 1 and name= when given', () => {
    const r = imp(
      'cache_peer Cache2.Example.org parent 3128 0 no-query carp weight=3 name=c2',
      'cache_peer cache1.example.org parent 8080 0 no-query carp weight=1',
      'cache_peer 2001:db8::3 parent 3128 0 no-query carp name=c3',
    );
    assert.deepEqual(r.options.parent, ['http://Cache2.Example.org:3128 weight=3 name=c2', 'http://cache1.example.org:8080', 'http://[2001:db8::3]:3128 name=c3']);
    assert.equal(r.options['parent-policy'], 'carp');
    assert.deepEqual(r.unmapped, []);
    assert.deepEqual(buildConfig(r.options).parents.map((p) => [p.name, p.weight]), [['c2', 3], ['cache1.example.org', 1], ['c3', 1]]);
  });

  it("maps round-robin; a weight with it is listed, since cuttle's round-robin takes the parents in turn; without policy options the weight needs nothing", () => {
    const rr = imp('cache_peer a.example.org parent 3128 0 no-query round-robin weight=2', 'cache_peer b.example.org parent 3128 0 no-query round-robin');
    assert.equal(rr.options['parent-policy'], 'round-robin');
    assert.deepEqual(rr.options.parent, ['http://a.example.org:3128 weight=2', 'http://b.example.org:3128']);
    assert.match(rr.unmappedWhy(1), /^weight=2: Squid gives a round-robin parent turns in proportion to its weight.*\(the parent itself is mapped\)$/);
    const first = imp('cache_peer a.example.org parent 3128 0 no-query weight=2');
    assert.equal(first.options['parent-policy'], 'first-up');
    assert.match(first.coveredWhy(1), /weight=2: the first-up order ignores weights/);
    assert.equal(first.unmappedWhy(1), '');
  });

  it('chooses carp when some parents have it and others not, and lists each other parent: Squid asks it only when no carp parent can serve', () => {
    const r = imp('cache_peer a.example.org parent 3128 0 no-query', 'cache_peer b.example.org parent 3128 0 no-query carp', 'cache_peer c.example.org parent 3128 0 no-query round-robin');
    assert.equal(r.options['parent-policy'], 'carp');
    assert.deepEqual(r.options.parent, ['http://a.example.org:3128', 'http://b.example.org:3128', 'http://c.example.org:3128'], 'line order kept');
    assert.match(r.unmappedWhy(1), /^no carp option: Squid asks this parent only when no carp parent can serve; cuttle has one parent-policy, carp/);
    assert.equal(r.unmappedWhy(2), '');
    assert.match(r.unmappedWhy(3), /^no carp option/);
    const rr = imp('cache_peer a.example.org parent 3128 0 no-query', 'cache_peer b.example.org parent 3128 0 no-query round-robin');
    assert.equal(rr.options['parent-policy'], 'round-robin');
    assert.match(rr.unmappedWhy(1), /^no round-robin option/);
  });

  it('lists sibling and multicast peers, an originserver becomes stratum1 (not a parent), and a peer needing login= or TLS is not emitted', () => {
    const r = imp(
      'cache_peer sib.example.org sibling 3128 3130 proxy-only',
      'cache_peer 239.0.0.1 multicast 3128 3130 ttl=16',
      'cache_peer s1.example.org parent 8000 0 no-query originserver',
      'cache_peer auth.example.org parent 3128 0 no-query login=user:secret',
      'cache_peer tls.example.org parent 3129 0 no-query tls tls-cafile=/etc/ca.pem',
      'cache_peer ssl.example.org parent 3129 0 no-query ssl',
      'never_direct allow all',
    );
    assert.match(r.unmappedWhy(1), /cuttle has no siblings.*--bank/);
    assert.match(r.unmappedWhy(2), /multicast.*--bank/);
    assert.deepEqual(r.options.stratum1, ['http://s1.example.org:8000']);
    assert.match(r.coveredWhy(3), /not a parent: mapped to stratum1/);
    assert.match(r.unmappedWhy(4), /^login= sends credentials.*: this parent is not mapped$/);
    assert.doesNotMatch(r.unmappedWhy(4), /secret/);
    assert.match(r.unmappedWhy(5), /^tls: cuttle talks to peers in plain HTTP only; tls-cafile=\/etc\/ca.pem: .*: this parent is not mapped$/);
    assert.match(r.unmappedWhy(6), /^ssl: /);
    assert.equal(r.options.parent, undefined);
    assert.equal(r.options['never-direct'], undefined, 'cuttle takes never-direct only with a parent');
    assert.match(r.unmappedWhy(7), /no parent is mapped, so never-direct is not set/);
    const origin = imp('cache_peer s1.example.org parent 8443 0 no-query originserver ssl');
    assert.equal(origin.options.stratum1, undefined);
    assert.match(origin.unmappedWhy(1), /this origin server is not mapped/);
  });

  it('says what cuttle does for the other options: connect-fail-limit needs nothing, connect-timeout, max-conn and unknown options are listed; a parent given twice is listed', () => {
    const r = imp('cache_peer a.example.org parent 3128 0 no-query connect-fail-limit=3 connect-timeout=5 max-conn=20 monitorurl=http://x/', 'cache_peer A.example.org parent 3128 0 no-query name=again');
    assert.deepEqual(r.options.parent, ['http://a.example.org:3128']);
    assert.match(r.coveredWhy(1), /connect-fail-limit=3: cuttle marks a parent down by its own passive-failure rule/);
    assert.match(r.unmappedWhy(1), /^connect-timeout=5: .*--peer-timeout.*; max-conn=20: cuttle does not cap .*; monitorurl=http:\/\/x\/: no cuttle equivalent \(the parent itself is mapped\)$/);
    assert.match(r.unmappedWhy(2), /once per host and port/);
  });

  it('maps always_direct of dstdomain, dst and dstdom_regex acls with never_direct allow all; lists other acls, a narrower never_direct and prefer_direct on', () => {
    const r = imp(
      'acl LOCAL dstdomain .Site.example.edu cvmfs.example.edu',
      'acl LOCALNET dst 192.0.2.0/24 2001:db8::/32',
      'acl LOCALRE dstdom_regex ^s1\\.site\\.',
      'acl CLIENTS src 10.1.0.0/16',
      'acl CVMFS dstdomain .cern.ch',
      'cache_peer regional.example.org parent 3128 0 no-query',
      'always_direct allow LOCAL',
      'always_direct allow LOCALNET',
      'always_direct allow LOCALRE',
      'always_direct allow CLIENTS',
      'never_direct allow CVMFS',
      'never_direct allow all',
      'prefer_direct on',
      'cache_peer_access regional.example.org deny LOCAL',
    );
    assert.deepEqual(r.options['always-direct'], ['.site.example.edu', 'cvmfs.example.edu', '192.0.2.0/24', '2001:db8::/32', '~^s1\\.site\\.']);
    assert.equal(r.options['never-direct'], true);
    assert.match(r.unmappedWhy(8), /only against URLs that name an IP address/, 'a dst acl maps, with what differs');
    assert.match(r.unmappedWhy(10), /a src acl has no always-direct equivalent/);
    assert.match(r.unmappedWhy(11), /never-direct is for every destination or none/);
    assert.match(r.unmappedWhy(13), /cuttle tries the parents first/);
    assert.match(r.unmappedWhy(14), /cuttle sends every miss to its parents/);
    for (const l of [1, 2, 3]) assert.equal(r.unmappedWhy(l), '', 'acls used by a mapped always_direct');
    assert.match(r.unmappedWhy(5), /not used by a mapped access rule/);
    const cfg = buildConfig(r.options);
    assert.deepEqual(cfg.alwaysDirect.map((d) => d.kind), ['domain', 'host', 'cidr', 'cidr', 'regex']);
  });

  it('a narrow never_direct alone is listed and sets nothing; a trailing "never_direct deny ACL" means every other destination, so never-direct is set and the exception listed', () => {
    const narrow = imp('acl CVMFS dstdomain .cern.ch', 'cache_peer regional.example.org parent 3128 0 no-query', 'never_direct allow CVMFS');
    assert.equal(narrow.options['never-direct'], undefined);
    assert.match(narrow.unmappedWhy(3), /fetched directly when no parent can serve them/);
    const deny = imp('acl LOCAL dstdomain .site.example.edu', 'cache_peer regional.example.org parent 3128 0 no-query', 'never_direct deny LOCAL');
    assert.equal(deny.options['never-direct'], true);
    assert.match(deny.unmappedWhy(3), /never-direct has no exceptions/);
    const off = imp('cache_peer regional.example.org parent 3128 0 no-query', 'never_direct deny all', 'prefer_direct off');
    assert.equal(off.options['never-direct'], undefined);
    assert.match(off.coveredWhy(2), /cuttle's default/);
    assert.match(off.coveredWhy(3), /cuttle's behaviour/);
  });

  it('always_direct allow all: every miss goes directly, so no parent is emitted, and each is listed', () => {
    const r = imp('cache_peer a.example.org parent 3128 0 no-query carp', 'never_direct allow all', 'always_direct allow all');
    assert.equal(r.options.parent, undefined);
    assert.equal(r.options['never-direct'], undefined);
    assert.match(r.unmappedWhy(1), /always_direct allow all \(line 7\) fetches every miss directly: Squid never uses this parent/);
    assert.match(r.coveredWhy(2), /never reached: always_direct allow all \(line 7\) is checked first/);
    assert.match(r.coveredWhy(3), /no parent is emitted/);
    const deny = imp('acl LOCAL dstdomain .site.example.edu', 'cache_peer a.example.org parent 3128 0 no-query', 'always_direct deny LOCAL');
    assert.deepEqual(deny.options.parent, ['http://a.example.org:3128']);
    assert.equal(deny.options['always-direct'], undefined);
    assert.match(deny.unmappedWhy(3), /Squid fetches every other destination directly.*cannot say "all but these"/);
  });

  it('the printed YAML of parents passes --check-config, and the import is never refused for them', () => {
    const text = conf('cache_peer regional.example.org parent 3128 0 no-query login=PASSTHRU', 'cache_peer backup.example.org parent 3128 0 no-query', 'never_direct allow all', 'cache_peer_access backup.example.org deny all');
    const out = cli(text);
    assert.equal(out.status, 0, out.stderr);
    assert.equal(out.stderr, '');
    const yaml = parse(out.stdout) as Record<string, unknown>;
    assert.deepEqual(yaml.parent, ['http://backup.example.org:3128']);
    assert.equal(yaml['never-direct'], true);
    const check = checkConfig(out.stdout);
    assert.equal(check.status, 0, check.stderr);
  });
});
