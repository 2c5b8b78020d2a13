// The config `cuttle import-squid` prints, run by the real proxy: a Squid 4+ frontier config that relies on
// Squid's built-in localhost acl lets local clients use and PURGE the cache, as Squid did. And the
// frontier-squid configs of sites behind regional caches, imported and checked by cuttle itself.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Pool } from 'undici';
import { parse } from 'yaml';
import { startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, tmpDir } from '../helpers/proxy.ts';

describe('an imported squid.conf, served', () => {
  it("keeps Squid's built-in localhost acl: a local client is served and may PURGE, another client of the same host is denied", async () => {
    const out = spawnSync(process.execPath, ['src/main.ts', 'import-squid', 'test/fixtures/frontier-squid-restrict.conf'], { encoding: 'utf8' });
    assert.equal(out.status, 0, out.stderr);
    const { 'cache-dir': _dir, listen: _listen, 'access-log': _log, ...imported } = parse(out.stdout) as Record<string, unknown>;
    const origin = await startOrigin({ '/cvmfs/repo/data/ab': { headers: { 'cache-control': 'max-age=600' }, body: 'chunk' } });
    const p = await startProxy(imported);
    const local = proxyClient(p.url);
    const other = new Pool(p.url, { localAddress: '127.0.0.2' }); // loopback, but not Squid's localhost (127.0.0.1/32)
    try {
      const url = `${origin.url}/cvmfs/repo/data/ab`;
      assert.equal((await get(local, url)).status, 200);
      assert.match(String((await get(local, url)).headers['x-cache']), /^HIT/);
      assert.equal(origin.count('/cvmfs/repo/data/ab'), 1);
      const denied = await get(other, url);
      assert.equal(denied.status, 403);
      assert.equal(p.proxy.counters.denied, 1);
      assert.equal((await get(local, url, {}, 'PURGE')).status, 200);
      assert.equal((await get(local, url)).status, 200);
      assert.equal(origin.count('/cvmfs/repo/data/ab'), 2, 'the PURGE dropped the stored copy');
    } finally {
      await other.close();
      await local.close();
      await p.close();
      await origin.close();
    }
  });
});

describe('a frontier-squid behind regional caches, imported and checked by cuttle', () => {
  /** `cuttle import-squid FIXTURE`, its YAML parsed, and `cuttle --check-config` run on it (paths pointed at a writable place). */
  function importAndCheck(fixture: string) {
    const file = `test/fixtures/${fixture}`;
    const out = spawnSync(process.execPath, ['src/main.ts', 'import-squid', file], { encoding: 'utf8' });
    assert.equal(out.status, 0, out.stderr);
    assert.equal(out.stderr, '');
    const dir = tmpDir();
    const yamlFile = join(dir, 'cuttle.yaml');
    writeFileSync(yamlFile, out.stdout.replaceAll('/var/cache/cuttle', join(dir, 'cache')).replaceAll('/var/log/cuttle', dir).replaceAll('/run/cuttle', dir));
    const check = spawnSync(process.execPath, ['src/main.ts', '--config', yamlFile, '--check-config', '--listen', '127.0.0.1:3128', '--snmp-listen', '127.0.0.1:3401'], { encoding: 'utf8' });
    const lineOf = (start: string) => readFileSync(file, 'utf8').split('\n').findIndex((l) => l.startsWith(start)) + 1;
    return { yaml: parse(out.stdout) as Record<string, unknown>, stdout: out.stdout, check, lineOf };
  }

  it('imports a site behind a regional cache (cache_peer parent no-query, never_direct allow all), and cuttle --check-config takes it', () => {
    const r = importAndCheck('frontier-squid-parent.conf');
    assert.deepEqual(r.yaml.parent, ['http://regional.example.org:3128']);
    assert.equal(r.yaml['parent-policy'], 'first-up');
    assert.equal(r.yaml['never-direct'], true);
    assert.equal(r.yaml['always-direct'], undefined);
    assert.deepEqual(r.yaml['allow-client'], ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7', 'fe80::/10', '127.0.0.1/32', '::1'], 'access as without the parent');
    const peer = r.lineOf('cache_peer regional.example.org');
    assert.match(r.stdout, new RegExp(`# Needs no setting in cuttle[^]*#   line ${peer}: cache_peer regional\\.example\\.org parent 3128 0 no-query\\n#     no-query: cuttle never sends ICP`));
    assert.match(r.stdout, /# Not mapped \(1\):\n#   line \d+: http_access allow localhost manager\n/, 'nothing about the parent is lost');
    assert.equal(r.check.status, 0, r.check.stderr);
    assert.match(r.check.stdout, /^configuration OK/);
  });

  it('imports three carp parents with weights and names in squid.conf order, the host as spelled, and always_direct for the site; cuttle --check-config takes it', () => {
    const r = importAndCheck('frontier-squid-carp.conf');
    assert.deepEqual(r.yaml.parent, [
      'http://Cache1.Regional.example.org:3128 weight=2 name=cache1',
      'http://cache2.regional.example.org:3128 name=cache2',
      'http://cache3.regional.example.org:3128 weight=3 name=cache3',
    ]);
    assert.equal(r.yaml['parent-policy'], 'carp');
    assert.equal(r.yaml['never-direct'], true);
    assert.deepEqual(r.yaml['always-direct'], ['.site.example.edu']);
    assert.match(r.stdout, new RegExp(`#   line ${r.lineOf('cache_peer cache3')}: cache_peer cache3[^\\n]*\\n#     [^\\n]*connect-fail-limit=5: cuttle marks a parent down by its own passive-failure rule`));
    assert.match(r.stdout, /# Not mapped \(1\):\n#   line \d+: http_access allow localhost manager\n/);
    assert.equal(r.check.status, 0, r.check.stderr);
  });
});
