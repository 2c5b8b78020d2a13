// Banks (--bank): three cuttles on 127.0.0.1, .2 and .3 with the same member list. Each key has one
// owner; the others stream its answer, so the bank fetches each object once. The owner is the CVMFS
// client's shard ring (default) or Squid's CARP; a member that is down or silent costs no client an
// error, and one that comes back takes its keys back.
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { carpKey, Carp } from '../../src/carp.ts';
import { ShardRing, shardKey } from '../../src/shard-ring.ts';
import { casBodies, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import type { Pool } from 'undici';
import { freePort } from '../helpers/ports.ts';


const HOSTS = ['127.0.0.1', '127.0.0.2', '127.0.0.3'];

interface Bank {
  urls: string[];
  members: (TestProxy | undefined)[];
  pools: (Pool | undefined)[];
  start(i: number): Promise<void>;
  stop(i: number): Promise<void>;
  close(): Promise<void>;
}

async function startBank(mirror: TestMirror, extra: Record<string, unknown> = {}): Promise<Bank> {
  const ports = await Promise.all(HOSTS.map(freePort));
  const urls = HOSTS.map((h, i) => `http://${h}:${ports[i]}`);
  const b: Bank = {
    urls,
    members: [],
    pools: [],
    async start(i) {
      b.members[i] = await startProxy({ listen: [`${HOSTS[i]}:${ports[i]}`], 'visible-hostname': `member${i}`, bank: urls, stratum1: [mirror.url], 'probe-interval': '50ms', ...extra });
      b.pools[i] = proxyClient(urls[i]!);
    },
    async stop(i) {
      await b.pools[i]?.close();
      await b.members[i]?.close();
      b.pools[i] = undefined;
      b.members[i] = undefined;
    },
    async close() {
      for (let i = 0; i < HOSTS.length; i++) await b.stop(i);
    },
  };
  for (let i = 0; i < HOSTS.length; i++) await b.start(i);
  return b;
}

const fetchesOf = (b: Bank) => b.members.reduce((n, m) => n + (m?.proxy.upstream.fetches ?? 0), 0);

describe('bank: cvmfs-ring (the default)', () => {
  const bodies = casBodies(Array.from({ length: 24 }, (_, i) => 1000 + i));
  const paths = [...bodies.keys()];
  let mirror: TestMirror;
  let bank: Bank;
  before(async () => {
    [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
    bank = await startBank(mirror);
  });
  after(async () => {
    await bank.close();
    await mirror.stop();
  });

  it('every object asked of every member is fetched from the Stratum 1 once, by the member the ring names', async () => {
    const ring = new ShardRing(bank.urls);
    for (const path of paths) {
      for (const i of [0, 1, 2]) {
        const r = await get(bank.pools[i]!, `${mirror.url}${path}`);
        assert.equal(r.status, 200);
        assert.ok(r.body.equals(bodies.get(path)!), 'the exact bytes');
      }
      assert.equal(mirror.count(path), 1, `${path}: one fetch across the bank`);
    }
    // Each object was fetched by its ring owner, and every owner owns some.
    const owners = new Set<number>();
    for (const path of paths) owners.add(ring.owner(shardKey(path)));
    assert.equal(owners.size, 3, 'the keys spread over the three members');
    const routedByOthers = bank.members.map((m) => m!.proxy.hierarchy.bank!.routed);
    assert.ok(routedByOthers.every((n) => n > 0), 'each member routed keys it does not own');
    // The owner's access log shows the members' requests; a non-owner's shows its owner as CARP/peer.
    const logged = bank.members.flatMap((m) => m!.logLines).filter((l) => / CARP\/127\.0\.0\.\d /.test(l));
    assert.ok(logged.length > 0);
  });

  it('a manifest (key 0 of the ring) is never routed: every member serves its own', async () => {
    const path = `/cvmfs/${REPO}/.cvmfspublished`;
    const before = mirror.count(path);
    for (const i of [0, 1, 2]) assert.equal((await get(bank.pools[i]!, `${mirror.url}${path}`, { 'cache-control': 'no-cache' })).status, 200);
    assert.equal(mirror.count(path) - before, 3);
  });

  it('a member that dies costs no client an error; only its keys move, to the ring successor, and it takes them back when it returns', async () => {
    const more = casBodies(Array.from({ length: 60 }, (_, i) => 3000 + i));
    for (const [p, body] of more) bodies.set(p, body); // the emulator serves from the same map
    const ring = new ShardRing(bank.urls);
    const ofDead = [...more.keys()].filter((p) => ring.owner(shardKey(p)) === 2);
    const others = [...more.keys()].filter((p) => ring.owner(shardKey(p)) !== 2);
    assert.ok(ofDead.length >= 3 && others.length >= 3);
    await bank.stop(2);
    // The first requests for its keys find it gone (a refused connection, or a reset of a kept-alive
    // one) and each member fetches them itself: no error.
    const isDown = (i: number) => !bank.members[i]!.proxy.hierarchy.snapshot().find((x) => x.url === bank.urls[2])!.up;
    let n = 0;
    while (n < ofDead.length && !(isDown(0) && isDown(1))) {
      const p = ofDead[n++]!;
      for (const i of [0, 1]) assert.equal((await get(bank.pools[i]!, `${mirror.url}${p}`)).status, 200, `${p} via member ${i}`);
    }
    assert.ok(isDown(0) && isDown(1), 'marked down at both');
    assert.ok(n < ofDead.length, 'keys left to check');
    // Once both members know, its keys go to the ring's successor among the living: one fetch each.
    const alive = (i: number) => i !== 2;
    for (const p of ofDead.slice(n)) {
      for (const i of [0, 1]) assert.equal((await get(bank.pools[i]!, `${mirror.url}${p}`)).status, 200);
      assert.equal(mirror.count(p), 1, `${p}: one fetch once the dead member is known`);
    }
    for (const p of others) {
      const owner = ring.owner(shardKey(p), alive);
      assert.equal(owner, ring.owner(shardKey(p)), 'the keys of the living do not move');
      for (const i of [0, 1]) assert.equal((await get(bank.pools[i]!, `${mirror.url}${p}`)).status, 200);
      assert.equal(mirror.count(p), 1);
    }
    // It comes back: probes find it, and its keys are its own again.
    await bank.start(2);
    await waitFor('member 2 up again at both', () => [0, 1].every((i) => bank.members[i]!.proxy.hierarchy.snapshot().find((x) => x.url === bank.urls[2])!.up));
    const fresh = casBodies(Array.from({ length: 20 }, (_, i) => 5000 + i));
    for (const [p, body] of fresh) bodies.set(p, body);
    const mine = [...fresh.keys()].filter((p) => ring.owner(shardKey(p)) === 2);
    assert.ok(mine.length > 0);
    const before2 = bank.members[2]!.proxy.upstream.fetches;
    for (const p of mine) assert.equal((await get(bank.pools[0]!, `${mirror.url}${p}`)).status, 200);
    assert.equal(bank.members[2]!.proxy.upstream.fetches - before2, mine.length, 'the returned member fetched its own keys');
  });
});

describe('bank: a silent owner, and members that disagree', () => {
  const bodies = casBodies(Array.from({ length: 40 }, (_, i) => 2000 + i));
  let mirror: TestMirror;
  const closers: (() => Promise<void>)[] = [];
  before(async () => {
    [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
  });
  after(async () => {
    for (const c of closers.reverse()) await c();
    await mirror.stop();
  });

  it('an owner that accepts but never answers is given --peer-timeout, then the member fetches itself', async () => {
    const silentPort = await freePort('127.0.0.3');
    const held = new Set<Socket>();
    const silent = createServer((s) => {
      held.add(s);
      s.on('error', () => {});
    });
    await new Promise<void>((r) => silent.listen(silentPort, '127.0.0.3', r));
    const port = await freePort('127.0.0.1');
    const urls = [`http://127.0.0.1:${port}`, `http://127.0.0.3:${silentPort}`];
    const m = await startProxy({ listen: [`127.0.0.1:${port}`], 'visible-hostname': 'm0', bank: urls, stratum1: [mirror.url], 'peer-timeout': '300ms', 'probe-interval': '1h' });
    const pool = proxyClient(m.url);
    closers.push(async () => {
      await pool.close();
      await m.close();
      for (const s of held) s.destroy();
      await new Promise<void>((r) => silent.close(() => r()));
    });
    const ring = new ShardRing(urls);
    const theirs = [...bodies.keys()].filter((p) => ring.owner(shardKey(p)) === 1).slice(0, 2);
    assert.equal(theirs.length, 2);
    for (const p of theirs) {
      const r = await get(pool, `${mirror.url}${p}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(p)!));
      assert.equal(mirror.count(p), 1);
    }
    const peer = m.proxy.hierarchy.snapshot().find((x) => x.url === urls[1])!;
    assert.equal(peer.failures, 2);
    assert.match(peer.lastError ?? '', /http_response_timeout/);
  });

  it('a request forwarded by a member is never forwarded again, even when the members disagree on the owner', async () => {
    const ports = await Promise.all(['127.0.0.1', '127.0.0.2'].map(freePort));
    const urls = [`http://127.0.0.1:${ports[0]}`, `http://127.0.0.2:${ports[1]}`];
    // Different owner functions: for some keys each member thinks the other owns them.
    const a = await startProxy({ listen: [`127.0.0.1:${ports[0]}`], 'visible-hostname': 'ma', bank: urls, stratum1: [mirror.url], 'bank-hash': 'cvmfs-ring' });
    const b = await startProxy({ listen: [`127.0.0.2:${ports[1]}`], 'visible-hostname': 'mb', bank: urls, stratum1: [mirror.url], 'bank-hash': 'squid-carp' });
    const pool = proxyClient(a.url);
    closers.push(async () => {
      await pool.close();
      await a.close();
      await b.close();
    });
    const ring = new ShardRing(urls);
    const carp = new Carp(urls.map((u) => ({ name: new URL(u).hostname, weight: 1 })));
    const crossed = [...bodies.keys()].filter((p) => ring.owner(shardKey(p)) === 1 && carp.owner(carpKey(new URL(`${mirror.url}${p}`))) === 0).slice(0, 3);
    assert.ok(crossed.length > 0, 'some keys each member gives to the other');
    for (const p of crossed) {
      const was = mirror.count(p); // the test before may have fetched it already
      const r = await get(pool, `${mirror.url}${p}`);
      assert.equal(r.status, 200);
      assert.equal(mirror.count(p) - was, 1, 'fetched once, by the member a forwarded to');
    }
    assert.equal(a.proxy.upstream.fetches, crossed.length, 'a asked b for each');
    assert.equal(b.proxy.hierarchy.bank!.routed, 0, 'b never sent them back');
  });
});

describe('bank: squid-carp', () => {
  const bodies = casBodies(Array.from({ length: 12 }, (_, i) => 7000 + i));
  let mirror: TestMirror;
  let bank: Bank;
  before(async () => {
    [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
    bank = await startBank(mirror, { 'bank-hash': 'squid-carp' });
  });
  after(async () => {
    await bank.close();
    await mirror.stop();
  });

  it('each URL is fetched once, by its CARP owner; manifests are routed too', async () => {
    const carp = new Carp(bank.urls.map((u) => ({ name: new URL(u).hostname, weight: 1 })));
    const paths = [...bodies.keys(), `/cvmfs/${REPO}/.cvmfspublished`];
    const before = bank.members.map((m) => m!.proxy.upstream.fetches);
    for (const p of paths) {
      for (const i of [0, 1, 2]) assert.equal((await get(bank.pools[i]!, `${mirror.url}${p}`)).status, 200);
      assert.equal(mirror.count(p), 1, `${p}: one fetch`);
    }
    // Each member asked upstream (the mirror, or an owner) once per path it does not own, and the owner
    // once for each of its own.
    const owned = [0, 0, 0];
    for (const p of paths) owned[carp.owner(carpKey(new URL(`${mirror.url}${p}`)))]!++;
    for (const i of [0, 1, 2]) assert.equal(bank.members[i]!.proxy.upstream.fetches - before[i]!, paths.length, `member ${i}: one request per path`);
    assert.ok(owned.filter((n) => n > 0).length >= 2);
    assert.equal(fetchesOf(bank), 3 * paths.length);
  });
});
