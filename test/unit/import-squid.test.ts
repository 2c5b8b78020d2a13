// cuttle import-squid on frontier-squid's shipped defaults and on a customized site config: the YAML it
// prints is a valid cuttle config with the mapped values, and every other directive is listed by line.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { buildConfig } from '../../src/config.ts';
import { importSquid } from '../../src/import-squid.ts';
import { tmpDir } from '../helpers/proxy.ts';

const fixture = (name: string) => readFileSync(join('test/fixtures', name), 'utf8');
const lineOf = (text: string, start: string) => text.split('\n').findIndex((l) => l.startsWith(start)) + 1;

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
    // What could not be mapped is listed with its line: CONNECT to 443, the cache manager.
    assert.deepEqual(r.unmapped.map((u) => u.line), [lineOf(text, 'http_access deny CONNECT'), lineOf(text, 'http_access allow localhost manager'), lineOf(text, 'http_access deny manager')]);
    assert.ok(r.covered.some((c) => c.line === lineOf(text, 'collapsed_forwarding on')));

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
});
