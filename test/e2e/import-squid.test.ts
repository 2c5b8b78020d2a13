// The config `cuttle import-squid` prints, run by the real proxy: a Squid 4+ frontier config that relies on
// Squid's built-in localhost acl lets local clients use and PURGE the cache, as Squid did.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, it } from 'node:test';
import { Pool } from 'undici';
import { parse } from 'yaml';
import { startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy } from '../helpers/proxy.ts';

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
