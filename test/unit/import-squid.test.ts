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
  writeFileSync(file, yaml.replaceAll('/var/cache/squid', join(dir, 'cache')).replaceAll('/var/log/squid', dir));
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
      'cache-dir': '/var/cache/squid',
      'disk-cache': '10000MB',
      'negative-ttl': '60s',
      'snmp-listen': '3401',
      'snmp-community': 'public',
      'allow-snmp': ['127.0.0.1/32', '128.142.0.0/16', '188.184.128.0/17', '188.185.48.0/20', '188.185.128.0/17'],
      'access-log': '/var/log/squid/access.log',
      'access-log-format': 'frontier',
      'pid-file': '/var/run/squid/squid.pid',
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
    writeFileSync(file, out.stdout.replaceAll('/var/cache/squid', join(dir, 'cache')).replaceAll('/var/log/squid', dir).replaceAll('/var/run/squid', dir));
    const check = spawnSync(process.execPath, ['src/main.ts', '--config', file, '--check-config', '--listen', '127.0.0.1:3128', '--snmp-listen', '127.0.0.1:3401'], { encoding: 'utf8' });
    assert.equal(check.status, 0, check.stderr);
  });

  it('maps a customized site: accel port and its origin, continued lines, a destination list; lists parents, a second cache_dir, workers', () => {
    const text = fixture('site-customized.conf');
    const r = importSquid(text);
    assert.deepEqual(r.options['allow-client'], ['131.225.0.0/16', '2001:400:2410::/48'], 'continuation lines joined');
    assert.deepEqual(r.options['allow-dest'], ['.cern.ch', '.fnal.gov', '.openhtc.io']);
    assert.deepEqual(r.options.listen, ['3128']);
    assert.equal(r.options['accel-listen'], '8000');
    assert.deepEqual(r.options.stratum1, ['http://localhost:8081']);
    assert.equal(r.options['memory-cache'], '51200MB');
    assert.equal(r.options['cache-dir'], '/srv/squid');
    assert.equal(r.options['disk-cache'], '900000MB');
    assert.equal(r.options['shutdown-timeout'], '5s');
    assert.equal(r.options['access-log-format'], 'squid');
    const why = (start: string) => r.unmapped.find((u) => u.line === lineOf(text, start))?.why ?? '';
    assert.match(why('cache_peer squid-parent'), /parent and sibling proxies are not supported yet/);
    assert.match(why('cache_dir ufs /srv/squid2'), /one cache directory/);
    assert.match(why('workers 4'), /no cuttle equivalent/);
    assert.match(why('http_access allow MAJOR_CVMFS'), /lets every client reach these domains/);
    assert.match(why('acl MAJOR_CVMFS'), /not used by a mapped access rule/);
    assert.match(why('http_port 8000 accel'), /^$/, 'accel options are understood');
    assert.equal(r.unmapped.length, 5);
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

