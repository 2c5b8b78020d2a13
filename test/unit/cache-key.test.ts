import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { hashKey, normaliseUrl, primaryKey, variantKey, varyNames } from '../../src/cache-key.ts';
import { formatFrontier, formatSquid } from '../../src/access-log.ts';

describe('cache key', () => {
  it('lower-cases scheme and host and drops the default port; path and query stay exact', () => {
    assert.equal(primaryKey(normaliseUrl('HTTP://CVMFS.Example.ORG:80/cvmfs/A/.cvmfspublished?X=1')!), 'http://cvmfs.example.org/cvmfs/A/.cvmfspublished?X=1');
    assert.equal(primaryKey(normaliseUrl('http://h:8000/p')!), 'http://h:8000/p');
    assert.equal(normaliseUrl('https://h/p'), undefined);
    assert.equal(normaliseUrl('/origin-form'), undefined);
  });

  it('adds Vary-selected request headers', () => {
    assert.deepEqual(varyNames('Accept-Encoding, accept-language'), ['accept-encoding', 'accept-language']);
    assert.equal(variantKey('u', ['accept-language'], { 'accept-language': 'en' }), 'u\naccept-language:en');
    assert.equal(variantKey('u', [], {}), 'u');
  });

  it("names a disk record by the key's SHA-256 in hex, UTF-8 encoded: a cache dir outlives upgrades", () => {
    // Pinned values: a change here orphans every record of every existing cache.
    assert.equal(hashKey('http://h/p'), 'ec50b8b0b5741183c4186824adcf7d414a920e33785bee0a62f1fe30c14ee1ed');
    assert.equal(hashKey('u\naccept-language:é'), 'b7af85db39d657da09c5e1da24cc4a079e1fd19a7aee978db492fcddfcdef7ea');
  });
});

describe('access log', () => {
  it('writes Squid native lines stamped at the end, bytes head and body, with TCP_CF_ for coalesced and _ABORTED for hang-ups', () => {
    const tx = { startedAt: 1_700_000_000_123, client: '10.0.0.5', method: 'GET', url: 'http://s1:8000/cvmfs/a/data/ab/cd', status: 200, bytesOut: 4096, headBytes: 300, frameBytes: 0, recorded: false, result: 'TCP_MISS' as const, aborted: false, hierarchy: 'HIER_DIRECT' as const, peer: 's1', mime: 'application/octet-stream', coalesced: true };
    assert.equal(formatSquid(tx, 1_700_000_000_168), '1700000000.168     45 10.0.0.5 TCP_CF_MISS/200 4396 GET http://s1:8000/cvmfs/a/data/ab/cd - HIER_DIRECT/s1 application/octet-stream\n');
    assert.match(formatSquid({ ...tx, coalesced: false, aborted: true, result: 'TCP_HIT', hierarchy: 'HIER_NONE', peer: '' }, 1_700_000_000_200), / TCP_HIT_ABORTED\/200 4396 GET .* HIER_NONE\/- /);
  });

  it('writes frontier-squid lines (the WLCG awstats format) in local time at the end, with cvmfs-info and User-Agent', () => {
    const tx = { startedAt: Date.UTC(2026, 10, 25, 9, 58, 9, 123), client: '10.0.0.5', method: 'GET', url: 'http://s1:8000/cvmfs/a/data/ab/cd', status: 200, bytesOut: 4096, headBytes: 300, frameBytes: 0, recorded: false, result: 'TCP_MISS' as const, aborted: false, hierarchy: 'HIER_DIRECT' as const, peer: 's1', mime: '', coalesced: true, httpVersion: '1.1', headers: { 'user-agent': 'cvmfs Fuse 2.11.5', 'cvmfs-info': 'atlas.cern.ch:/sw/"x"' } };
    const tz = process.env.TZ;
    process.env.TZ = 'Asia/Kolkata'; // +0530, no daylight saving
    try {
      assert.equal(
        formatFrontier(tx, tx.startedAt + 45),
        '10.0.0.5 - - [25/Nov/2026:15:28:09.168 +0530] "GET http://s1:8000/cvmfs/a/data/ab/cd HTTP/1.1" 200 4396 TCP_CF_MISS:HIER_DIRECT 45 "- atlas.cern.ch:/sw/%22x%22" "-" "cvmfs Fuse 2.11.5"\n',
      );
      process.env.TZ = 'America/St_Johns'; // -0330 in November
      assert.match(formatFrontier(tx, tx.startedAt + 45), / - - \[25\/Nov\/2026:06:28:09\.168 -0330\] /);
    } finally {
      if (tz === undefined) delete process.env.TZ;
      else process.env.TZ = tz;
    }
  });
});
