// Stratum 1 awareness: nearest healthy mirror, failover, Range resume, hash verification, host-independent
// keys for content-addressed objects, and manifests that never cross mirrors. Real loopback mirrors.
import assert from 'node:assert/strict';
import { createServer, type AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { buildConfig } from '../../src/config.ts';
import { casObject } from '../../src/content-hash.ts';
import { gate, startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { casBodies, healthy, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';

const MANIFEST = `/cvmfs/${REPO}/.cvmfspublished`;

function mirrorOptions(mirrors: TestMirror[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { stratum1: mirrors.map((m) => m.url), 'probe-interval': '150ms', 'probe-timeout': '1s', 'probe-repo': REPO, ...extra };
}

const total = (mirrors: TestMirror[], path: string) => mirrors.reduce((n, m) => n + m.count(path), 0);

describe('mirrors: nearest healthy, failover and return', () => {
  let mirrors: TestMirror[];
  let p: TestProxy;
  let pool: Pool;
  const bodies = casBodies(Array.from({ length: 24 }, (_, i) => 2048 + i * 100));
  const paths = [...bodies.keys()];
  before(async () => {
    mirrors = await startMirrors(bodies, [10, 40, 80]);
    p = await startProxy(mirrorOptions(mirrors));
    pool = proxyClient(p.url, 4);
    await waitFor('all mirrors healthy', () => mirrors.every((m) => healthy(p.proxy, m.url)));
  });
  after(async () => {
    await pool?.close();
    await p?.close();
    for (const m of mirrors ?? []) await m.stop().catch(() => {});
  });

  it('misses go to the 10 ms mirror whichever mirror the client names', async () => {
    const [a, , c] = mirrors;
    for (const path of paths.slice(0, 4)) {
      const r = await get(pool, `${c!.url}${path}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(path)!));
      assert.equal(a!.count(path), 1, 'fetched from the nearest mirror');
      assert.equal(total(mirrors, path), 1, 'one upstream fetch in all');
    }
    const snap = p.proxy.mirrors.snapshot();
    assert.ok(snap[0]!.rttMs! < snap[1]!.rttMs! && snap[1]!.rttMs! < snap[2]!.rttMs!, JSON.stringify(snap));
  });

  it('a stopped mirror is failed over at once, marked down, and misses move to the 40 ms one', async () => {
    const [a, b] = mirrors;
    await a!.stop();
    // Requests naming the dead mirror still succeed: the fill asks the next one.
    for (const path of paths.slice(4, 8)) {
      const r = await get(pool, `${a!.url}${path}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(path)!));
      assert.equal(b!.count(path), 1);
    }
    await waitFor('the stopped mirror marked down', () => !healthy(p.proxy, a!.url));
    const before = p.proxy.coalescer.stats.failovers;
    for (const path of paths.slice(8, 12)) {
      assert.equal((await get(pool, `${a!.url}${path}`)).status, 200);
      assert.equal(b!.count(path), 1, 'a down mirror is not tried first');
      assert.equal(total(mirrors, path), 1);
    }
    assert.equal(p.proxy.coalescer.stats.failovers, before, 'no failover needed once it is down');
  });

  it('returns to the 10 ms mirror after good probes', async () => {
    const [a] = mirrors;
    await a!.start();
    await waitFor('the mirror back up', () => healthy(p.proxy, a!.url));
    for (const path of paths.slice(12, 16)) {
      assert.equal((await get(pool, `${mirrors[2]!.url}${path}`)).status, 200);
      assert.equal(a!.count(path), 1);
      assert.equal(total(mirrors, path), 1);
    }
  });

  it('content-addressed keys are host-independent: via mirror A, then via mirror B, is a HIT', async () => {
    const [a, b] = mirrors;
    const path = paths[16]!;
    assert.equal((await get(pool, `${a!.url}${path}`)).headers['x-cache'], 'MISS from cuttle-test');
    const second = await get(pool, `${b!.url}${path}`);
    assert.match(String(second.headers['x-cache']), /^HIT/);
    assert.ok(second.body.equals(bodies.get(path)!));
    assert.equal(total(mirrors, path), 1);
  });

  it('exposes each mirror in /metrics', async () => {
    const text = await (await fetch(`http://127.0.0.1:${p.proxy.adminAddress()!.port}/metrics`)).text();
    for (const m of mirrors) assert.match(text, new RegExp(`cuttle_mirror_healthy\\{group="default",mirror="${m.url.replace(/\./g, '\\.')}"\\} 1`));
    assert.match(text, /cuttle_mirror_rtt_seconds\{/);
    assert.match(text, /cuttle_mirror_failovers_total \d+/);
  });
});

describe('mirrors: 404 failover, corrupt bytes, Range resume', () => {
  let p: TestProxy | undefined;
  let mirrors: TestMirror[] = [];
  let pool: Pool | undefined;
  const stop = async () => {
    await pool?.close();
    await p?.close();
    for (const m of mirrors) await m.stop().catch(() => {});
    [pool, p, mirrors] = [undefined, undefined, []];
  };
  after(stop);

  it('a 404 on one mirror with 200 on another is served as 200; a 404 everywhere is a plain 404', async () => {
    const bodies = casBodies([5000, 6000]);
    const [have, missing] = [...bodies.keys()];
    const partial = new Map([[have!, bodies.get(have!)!]]);
    mirrors = await startMirrors(bodies, [5, 30], [{ bodies: partial }]);
    p = await startProxy(mirrorOptions(mirrors));
    pool = proxyClient(p.url, 2);
    await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p!.proxy, m.url)));
    const r = await get(pool, `${mirrors[0]!.url}${missing}`);
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(bodies.get(missing!)!));
    assert.equal(mirrors[0]!.count(missing!), 1);
    assert.equal(mirrors[1]!.count(missing!), 1);
    assert.equal(p.proxy.coalescer.stats.failovers, 1);
    const nowhere = `/cvmfs/${REPO}/data/00/${'0'.repeat(38)}`;
    const r404 = await get(pool, `${mirrors[0]!.url}${nowhere}`);
    assert.equal(r404.status, 404);
    assert.equal(r404.headers['proxy-status'], undefined, "a Stratum 1's own 404 is not labelled as the proxy's");
    assert.equal(total(mirrors, nowhere), 2, 'every mirror was asked');
    await p.proxy.coalescer.settle();
    const again = await get(pool, `${mirrors[1]!.url}${nowhere}`);
    assert.equal(again.status, 404);
    assert.match(String(again.headers['x-cache']), /^HIT/, 'a 404 from every mirror is negatively cached');
    assert.equal(total(mirrors, nowhere), 2);
    // A herd asking for an object no mirror has yet: one request per mirror, the same 404 for all.
    const absent = `/cvmfs/${REPO}/data/ff/${'f'.repeat(38)}`;
    const herd = await Promise.all(Array.from({ length: 20 }, () => get(pool!, `${mirrors[0]!.url}${absent}`)));
    assert.deepEqual([...new Set(herd.map((r) => r.status))], [404]);
    assert.equal(total(mirrors, absent), 2);
    await stop();
  });

  it('when every mirror fails with 5xx, a herd shares one answer per mirror: 503 to all, unlabelled, not stored', async () => {
    const path = `/cvmfs/${REPO}/data/ab/${'c'.repeat(38)}`;
    // Both mirrors hold their 503 behind one gate, opened once the whole herd is on the fill.
    const g = gate();
    const routes = { [`/cvmfs/${REPO}/.cvmfspublished`]: { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' }, [path]: { status: 503, gate: g, body: 'overloaded\n' } };
    const [o1, o2] = await Promise.all([startOrigin(routes), startOrigin(routes)]);
    p = await startProxy({ stratum1: [o1.url, o2.url], 'probe-interval': '150ms', 'probe-repo': REPO });
    pool = proxyClient(p.url, 20);
    try {
      await waitFor('mirrors healthy', () => healthy(p!.proxy, o1.url) && healthy(p!.proxy, o2.url));
      const asked = Promise.all(Array.from({ length: 20 }, () => get(pool!, `${o1.url}${path}`)));
      await waitFor('twenty readers on one fill', () => g.waiting === 1 && p!.proxy.coalescer.topFills(1, 0)[0]?.readers === 20);
      g.open();
      const herd = await asked;
      assert.deepEqual([...new Set(herd.map((r) => r.status))], [503]);
      assert.equal(herd[0]!.headers['proxy-status'], undefined, "the Stratum 1's own 503 passes unlabelled");
      assert.equal(o1.count(path) + o2.count(path), 2, 'one request per mirror for the whole herd');
      await p.proxy.coalescer.settle();
      await get(pool, `${o1.url}${path}`);
      assert.equal(o1.count(path) + o2.count(path), 4, 'not stored: the next request asks again');
    } finally {
      await stop();
      await o1.close();
      await o2.close();
    }
  });

  it('a mirror that accepts but does not answer within --mirror-timeout is given up for the next one', async () => {
    const bodies = casBodies([8000]);
    const [path] = [...bodies.keys()];
    // The nearest mirror answers its probes at once but never answers a data request (a gate never opened).
    const slow = await startOrigin({
      [`/cvmfs/${REPO}/.cvmfspublished`]: { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' },
      [path!]: { gate: gate(), body: bodies.get(path!)! },
    });
    let slowAnswered = false;
    slow.onComplete = (p) => (slowAnswered ||= p === path);
    mirrors = await startMirrors(bodies, [40]);
    p = await startProxy({ stratum1: [slow.url, mirrors[0]!.url], 'probe-interval': '150ms', 'probe-repo': REPO, 'mirror-timeout': '500ms' });
    pool = proxyClient(p.url, 2);
    try {
      await waitFor('mirrors healthy', () => healthy(p!.proxy, slow.url) && healthy(p!.proxy, mirrors[0]!.url));
      assert.equal(p.proxy.mirrors.byHost(new URL(slow.url).host)!.group.ranked()[0]!.origin, slow.url, 'the slow one ranks first');
      const r = await get(pool, `${slow.url}${path}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(path!)!));
      assert.equal(slowAnswered, false, 'served before the slow mirror ever answered');
      assert.equal(slow.count(path!), 1);
      assert.equal(mirrors[0]!.count(path!), 1);
      assert.equal(p.proxy.mirrors.snapshot()[0]!.failures, 1, 'the slow mirror was charged a failure');
    } finally {
      await stop();
      await slow.close();
    }
  });

  it('a body that stalls mid-way for --mirror-timeout is resumed from another mirror', async () => {
    const bodies = casBodies([4 * 1024 * 1024], 'P');
    const [path] = [...bodies.keys()];
    // The nearest mirror sends 1 MiB, then nothing (a gate never opened).
    const stall = await startOrigin({
      [`/cvmfs/${REPO}/.cvmfspublished`]: { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' },
      [path!]: { headers: { 'cache-control': 'max-age=259200' }, body: bodies.get(path!)!, bodyGate: { after: 1024 * 1024, gate: gate() } },
    });
    mirrors = await startMirrors(bodies, [40]);
    p = await startProxy({ stratum1: [stall.url, mirrors[0]!.url], 'probe-interval': '150ms', 'probe-repo': REPO, 'mirror-timeout': '500ms' });
    pool = proxyClient(p.url, 2);
    try {
      await waitFor('mirrors healthy', () => healthy(p!.proxy, stall.url) && healthy(p!.proxy, mirrors[0]!.url));
      const r = await get(pool, `${stall.url}${path}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(path!)!), 'exact bytes');
      assert.equal(p.proxy.coalescer.stats.resumes, 1);
      assert.deepEqual(mirrors[0]!.emu.stats.ranges, [`${path} bytes=${1024 * 1024}-`]);
    } finally {
      await stop();
      await stall.close();
    }
  });

  it('an empty 200 for a content-addressed object fails its hash: never answered as a complete response, nothing stored', async () => {
    const [path] = [...casBodies([1000]).keys()];
    const broken = await startOrigin({
      [`/cvmfs/${REPO}/.cvmfspublished`]: { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' },
      [path!]: { headers: { 'cache-control': 'max-age=259200' }, body: '' },
    });
    p = await startProxy({ stratum1: [broken.url], 'probe-interval': '60s', 'probe-repo': REPO });
    pool = proxyClient(p.url, 2);
    try {
      // Content-Length: 0 has no last byte to withhold: the head itself must wait for the hash.
      await assert.rejects(get(pool, `${broken.url}${path}`), 'no complete empty 200 for a corrupt object');
      assert.equal(p.proxy.coalescer.stats.hashMismatches, 1);
      assert.equal(broken.count(path!), 1);
      await p.proxy.coalescer.settle();
      assert.equal(await p.proxy.store.get(casObject(path!)!.key), undefined, 'nothing stored');
    } finally {
      await stop();
      await broken.close();
    }
  });

  it('a corrupt mirror: nothing stored, the client is cut short, the retry gets a good copy elsewhere', async () => {
    const bodies = casBodies([300_000]);
    const [path] = [...bodies.keys()];
    mirrors = await startMirrors(bodies, [5, 30], [{ corruptPaths: new Set([path!]) }]);
    p = await startProxy(mirrorOptions(mirrors));
    pool = proxyClient(p.url, 2);
    await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p!.proxy, m.url)));
    await assert.rejects(get(pool, `${mirrors[0]!.url}${path}`), 'the client sees a truncated body, not a complete one');
    assert.equal(p.proxy.coalescer.stats.hashMismatches, 1);
    await p.proxy.coalescer.settle();
    assert.equal(await p.proxy.store.get(casObject(path!)!.key), undefined, 'nothing stored');
    const retry = await get(pool, `${mirrors[0]!.url}${path}`, { 'cache-control': 'no-cache', pragma: 'no-cache' });
    assert.equal(retry.status, 200);
    assert.ok(retry.body.equals(bodies.get(path!)!));
    assert.equal(mirrors[0]!.count(path!), 1, 'the corrupt mirror is not asked again');
    assert.equal(mirrors[1]!.count(path!), 1);
    await p.proxy.coalescer.settle();
    const hit = await get(pool, `${mirrors[1]!.url}${path}`);
    assert.match(String(hit.headers['x-cache']), /^HIT/);
    await stop();
  });

  it('a 16 MiB body broken off mid-way is resumed with Range from another mirror; clients get the exact bytes', async () => {
    const bodies = casBodies([16 * 1024 * 1024], 'P');
    const [path] = [...bodies.keys()];
    mirrors = await startMirrors(bodies, [5, 30], [{ resetAfterBytes: 5 * 1024 * 1024 + 123 }]);
    p = await startProxy(mirrorOptions(mirrors));
    pool = proxyClient(p.url, 4);
    await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p!.proxy, m.url)));
    const [r1, r2] = await Promise.all([get(pool, `${mirrors[0]!.url}${path}`), get(pool, `${mirrors[1]!.url}${path}`)]);
    for (const r of [r1, r2]) {
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(bodies.get(path!)!), 'exact bytes');
    }
    assert.equal(p.proxy.coalescer.stats.resumes, 1);
    assert.equal(mirrors[0]!.count(path!), 1);
    assert.equal(mirrors[1]!.count(path!), 1);
    const ranges = mirrors[1]!.emu.stats.ranges;
    assert.equal(ranges.length, 1, 'the second mirror saw one Range request');
    const from = Number(/^\S+ bytes=(\d+)-$/.exec(ranges[0]!)?.[1]);
    assert.ok(from >= 4 * 1024 * 1024 && from <= 5 * 1024 * 1024 + 123, `resumed from the byte the first mirror stopped at (${ranges[0]})`);
    await p.proxy.coalescer.settle();
    assert.match(String((await get(pool, `${mirrors[0]!.url}${path}`)).headers['x-cache']), /^HIT/, 'the resumed object was verified and stored');
    await stop();
  });
});

describe('mirrors: manifests are never crossed', () => {
  let mirrors: TestMirror[];
  let p: TestProxy;
  let pool: Pool;
  let accel: Pool;
  const bodies = casBodies([1000, 2000]);
  before(async () => {
    mirrors = await startMirrors(bodies, [5, 40]);
    mirrors[0]!.emu.revision = 5;
    mirrors[1]!.emu.revision = 9;
    p = await startProxy(mirrorOptions(mirrors, { 'accel-listen': '127.0.0.1:0' }));
    pool = proxyClient(p.url, 2);
    accel = new Pool(`http://127.0.0.1:${p.proxy.addresses()[1]!.port}`, { connections: 2 });
    await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p.proxy, m.url)));
  });
  after(async () => {
    await pool?.close();
    await accel?.close();
    await p?.close();
    for (const m of mirrors ?? []) await m.stop().catch(() => {});
  });

  it('forward mode: each client gets the manifest of the mirror it named', async () => {
    for (let i = 0; i < 2; i++) {
      assert.match((await get(pool, `${mirrors[0]!.url}${MANIFEST}`)).body.toString(), /\nS5\n/);
      assert.match((await get(pool, `${mirrors[1]!.url}${MANIFEST}`)).body.toString(), /\nS9\n/);
    }
  });

  it('accelerator mode: origin-form requests are served from the sticky mirror, manifest and data alike', async () => {
    const r = await accel.request({ path: MANIFEST, method: 'GET' });
    assert.equal(r.statusCode, 200);
    assert.match(await r.body.text(), /\nS5\n/, 'the nearest mirror is the sticky one');
    const [path] = [...bodies.keys()];
    const d = await accel.request({ path: path!, method: 'GET' });
    assert.equal(d.statusCode, 200);
    assert.ok(Buffer.from(await d.body.arrayBuffer()).equals(bodies.get(path!)!));
    assert.equal(mirrors[0]!.count(path!), 1);
    // The forward proxy port still refuses origin-form.
    assert.equal((await get(pool, MANIFEST)).status, 400);
  });

  it('accelerator mode: when the sticky mirror dies, the repository moves to the next mirror, manifest included', async () => {
    await mirrors[0]!.stop();
    const r = await accel.request({ path: MANIFEST, method: 'GET', headers: { 'cache-control': 'no-cache' } });
    assert.equal(r.statusCode, 200);
    assert.match(await r.body.text(), /\nS9\n/);
    const again = await accel.request({ path: MANIFEST, method: 'GET' });
    assert.match(await again.body.text(), /\nS9\n/, 'never the old mirror\'s manifest once the repository moved');
    const [, path] = [...bodies.keys()];
    const d = await accel.request({ path: path!, method: 'GET' });
    assert.equal(d.statusCode, 200);
    await d.body.arrayBuffer();
    assert.equal(mirrors[1]!.count(path!), 1);
  });
});

describe('mirrors: a stale mirror', () => {
  it('accelerator mode does not stick a repository to a mirror whose manifest lags by more than --mirror-max-lag', async () => {
    const bodies = casBodies([1000]);
    const mirrors = await startMirrors(bodies, [5, 40]);
    mirrors[0]!.emu.revision = 5;
    mirrors[0]!.emu.publishedAtS = Math.floor(Date.now() / 1000) - 7200;
    mirrors[1]!.emu.revision = 9;
    const p = await startProxy(mirrorOptions(mirrors, { 'accel-listen': '127.0.0.1:0', 'mirror-max-lag': '30m' }));
    const accel = new Pool(`http://127.0.0.1:${p.proxy.addresses()[1]!.port}`, { connections: 1 });
    try {
      await waitFor('both probed', () => p.proxy.mirrors.snapshot().every((m) => m.healthy && m.revision !== null));
      const snap = p.proxy.mirrors.snapshot();
      assert.deepEqual(snap.map((m) => [m.revision, m.stale]), [[5, true], [9, false]]);
      const r = await accel.request({ path: MANIFEST, method: 'GET' });
      assert.match(await r.body.text(), /\nS9\n/, 'the current mirror, though farther');
      assert.equal(mirrors[0]!.count(MANIFEST), 0, 'the stale mirror was not asked for the manifest');
    } finally {
      await accel.close();
      await p.close();
      for (const m of mirrors) await m.stop();
    }
  });
});

describe('mirrors: --accel on the main listener', () => {
  it('takes origin-form and absolute-form requests on the same port', async () => {
    const bodies = casBodies([1234]);
    const [path] = [...bodies.keys()];
    const mirrors = await startMirrors(bodies, [5]);
    const p = await startProxy(mirrorOptions(mirrors, { accel: true }));
    const pool = proxyClient(p.url, 1);
    try {
      await waitFor('mirror healthy', () => healthy(p.proxy, mirrors[0]!.url));
      const origin = await get(pool, path!);
      assert.equal(origin.status, 200);
      assert.ok(origin.body.equals(bodies.get(path!)!));
      const absolute = await get(pool, `${mirrors[0]!.url}${path}`);
      assert.match(String(absolute.headers['x-cache']), /^HIT/, 'the same object, one key');
      assert.equal(mirrors[0]!.count(path!), 1);
    } finally {
      await pool.close();
      await p.close();
      for (const m of mirrors) await m.stop();
    }
  });
});

describe('mirrors: probe timeouts', () => {
  it('a mirror whose manifest takes longer than --probe-timeout fails its probes and is never marked healthy', async () => {
    const slow = await startOrigin({ [`/cvmfs/${REPO}/.cvmfspublished`]: { gate: gate(), headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' } });
    const p = await startProxy({ stratum1: [slow.url], 'probe-interval': '100ms', 'probe-timeout': '100ms', 'probe-repo': REPO });
    try {
      await waitFor('two probes timed out', () => p.proxy.mirrors.snapshot()[0]!.probeFailures >= 2);
      assert.equal(healthy(p.proxy, slow.url), false);
    } finally {
      await p.close();
      await slow.close();
    }
  });
});

describe('mirrors: reload', () => {
  it('a reload adds a mirror live; one that stays keeps its health, RTT and totals', async () => {
    const bodies = casBodies([1000, 2000, 3000]);
    const [p1, p2, p3] = [...bodies.keys()];
    const mirrors = await startMirrors(bodies, [5, 40]);
    const base = { listen: ['127.0.0.1:0'], 'allow-local-dest': ['127.0.0.1'], 'access-log': 'none', 'visible-hostname': 'cuttle-test', 'admin-listen': '127.0.0.1:0' };
    const p = await startProxy(mirrorOptions([mirrors[0]!]));
    const pool = proxyClient(p.url, 2);
    try {
      await waitFor('first mirror healthy', () => healthy(p.proxy, mirrors[0]!.url));
      assert.equal((await get(pool, `${mirrors[1]!.url}${p1}`)).status, 200);
      assert.equal(mirrors[1]!.count(p1!), 1, 'not a mirror yet: fetched from the host named');
      assert.equal((await get(pool, `${mirrors[0]!.url}${p2}`)).status, 200);
      const before = p.proxy.mirrors.snapshot()[0]!;
      p.proxy.reload(buildConfig({ ...base, 'cache-dir': p.cacheDir, ...mirrorOptions(mirrors) }));
      const after = p.proxy.mirrors.snapshot();
      assert.equal(after.length, 2);
      assert.equal(after[0]!.healthy, true, 'the mirror that stayed is still healthy');
      assert.equal(after[0]!.fetches, before.fetches);
      await waitFor('the added mirror healthy', () => healthy(p.proxy, mirrors[1]!.url));
      assert.equal((await get(pool, `${mirrors[1]!.url}${p3}`)).status, 200);
      assert.equal(mirrors[0]!.count(p3!), 1, 'now one group: the nearest mirror serves it');
      assert.equal(mirrors[1]!.count(p3!), 0);
    } finally {
      await pool.close();
      await p.close();
      for (const m of mirrors) await m.stop();
    }
  });
});

describe('mirrors: one that never comes up is not silent', () => {
  it('logs a warning with the reason once (again only if the reason changes), and /status shows the last probe error', async () => {
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', () => r()));
    const port = (closed.address() as AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    const p = await startProxy({ stratum1: [`http://127.0.0.1:${port}`], 'probe-interval': '50ms' });
    const status = async () => (await (await fetch(`http://127.0.0.1:${p.proxy.adminAddress()!.port}/status`)).json()) as { mirrors: { lastProbeError: string | null; lastProbeOk: boolean | null; probes: number }[] };
    const downs = () => p.logs.filter((l) => l.msg === 'mirror down');
    await waitFor('a mirror-down warning', () => downs().length > 0);
    assert.equal(downs()[0]!.level, 40, 'a warning');
    assert.match(String(downs()[0]!.reason), /^probe failed: connection_refused: .*ECONNREFUSED/);
    await waitFor('three more probes', () => p.proxy.mirrors.snapshot()[0]!.probes >= 4);
    const s = await status();
    assert.equal(downs().length, 1, 'the same reason is not repeated every probe');
    assert.equal(s.mirrors[0]!.lastProbeOk, false);
    assert.match(String(s.mirrors[0]!.lastProbeError), /^connection_refused: /);
    await p.close();
  });
});
