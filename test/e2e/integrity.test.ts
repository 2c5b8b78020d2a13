// Shared-cache integrity: nothing one client or one origin sends can crash, wedge, poison or disable
// cuttle for the others. One test per defect of issue 10, each over real sockets, each asserting the
// upstream fetch counters.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { once } from 'node:events';
import { Pool } from 'undici';
import { gate, startOrigin, type Origin, type Route } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, useProxy, withProxy, type TestProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

const REPO = 'integrity.cern.ch';

function casPath(body: Buffer): string {
  const h = createHash('sha1').update(body).digest('hex');
  return `/cvmfs/${REPO}/data/${h.slice(0, 2)}/${h.slice(2)}`;
}

/** A scripted origin that is the group's only Stratum 1, and another host that is no mirror. */
async function mirrorAndStranger(extra: Record<string, unknown> = {}): Promise<{ mirror: Origin; stranger: Origin; p: TestProxy; pool: Pool }> {
  const mirror = await startOrigin();
  const stranger = await startOrigin();
  const p = await startProxy({ stratum1: [mirror.url], 'probe-interval': '60s', ...extra });
  return { mirror, stranger, p, pool: proxyClient(p.url, 32) };
}

describe('integrity: one response can never crash the proxy', () => {
  const rig = useProxy({}, 4);

  it('two Cache-Control lines (and other repeated caching headers) are joined, stored and served', async () => {
    rig.origin.route('/dup', { headers: { 'cache-control': ['max-age=60', 'public'], expires: ['Thu, 01 Jan 2037 00:00:00 GMT', 'garbage'], etag: ['"a"', '"b"'] }, body: 'dup' });
    const a = await get(rig.pool, `${rig.origin.url}/dup`);
    assert.equal(a.status, 200);
    assert.equal(a.body.toString(), 'dup');
    const b = await get(rig.pool, `${rig.origin.url}/dup`);
    assert.equal(b.status, 200);
    assert.equal(rig.origin.count('/dup'), 1, 'stored and served from the cache');
    assert.match(String(b.headers['x-cache']), /HIT/);
  });

  it('a 304 with repeated headers to a revalidation is merged without a crash', async () => {
    rig.origin.route('/reval', (req) =>
      req.headers['if-none-match'] ? { status: 304, headers: { etag: '"v1"', 'cache-control': ['max-age=0', 'must-revalidate'] } } : { headers: { etag: '"v1"', 'cache-control': 'max-age=0' }, body: 'v1' },
    );
    assert.equal((await get(rig.pool, `${rig.origin.url}/reval`)).body.toString(), 'v1');
    const r = await get(rig.pool, `${rig.origin.url}/reval`);
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), 'v1');
    assert.equal(rig.origin.count('/reval'), 2);
  });

  it('a 206 to a request without Range is an invalid response, not shared', async () => {
    rig.origin.route('/odd206', { status: 206, headers: { 'content-range': 'bytes 0-1/10', 'cache-control': 'max-age=60' }, body: 'ab' });
    const r = await get(rig.pool, `${rig.origin.url}/odd206`);
    assert.equal(r.status, 502);
    assert.match(String(r.headers['proxy-status']), /http_protocol_error/);
    assert.equal(rig.origin.count('/odd206'), 1);
  });
});

describe('integrity: stuck fills end and release their slot', () => {
  it('a chunked body past --max-object-size whose only client left ends, and the next miss is served', async () => {
    await withProxy({ 'max-object-size': '64KB', 'max-fills': 1, 'fill-window': '16KB' }, async ({ origin, p, pool }) => {
    const g = gate();
    origin.route('/grow', { chunked: true, body: randomBytes(512 * 1024), chunkBytes: 8192, headers: { 'cache-control': 'max-age=60' }, bodyGate: { after: 8192, gate: g } });
    origin.route('/next', { body: 'next', headers: { 'cache-control': 'max-age=60' } });
    // The only client reads the head and the first bytes, then leaves.
    const res = await pool.request({ path: `${origin.url}/grow`, method: 'GET' });
    for await (const _c of res.body) break;
    res.body.destroy();
    g.open(); // the rest of the body grows past --max-object-size, with nobody to read it
    await waitFor('the fill ended', () => p.proxy.coalescer.running === 0 && p.proxy.coalescer.inFlight === 0);
    assert.equal(p.proxy.coalescer.budget.usedBytes, 0, 'its memory is released');
    assert.equal(p.proxy.coalescer.stats.fillsAbandoned, 1);
    const n = await get(pool, `${origin.url}/next`);
    assert.equal(n.status, 200, 'the --max-fills slot is free again');
    assert.equal(origin.count('/grow'), 1);
    assert.equal(origin.count('/next'), 1);
    }, 2);
  });

  it('a fill with nothing received for --read-timeout is given up by the watchdog (a reader that stopped reading)', async () => {
    const origin = await startOrigin();
    // fill-memory as small as the window: with the default 128 MB, a window keeps the whole body, and
    // a fast origin could finish the fill before it ever paused.
    const p = await startProxy({ 'read-timeout': '1s', 'fill-window': '16KB', 'fill-memory': '16KB', 'max-object-size': '64KB' });
    try {
      // Far more than the socket buffers between the proxy and a client that never reads can absorb
      // (the kernel grows a loopback send buffer to tcp_wmem's 4 MiB): the fill must pause.
      origin.route('/big', { chunked: true, body: randomBytes(24 * 1024 * 1024), headers: { 'cache-control': 'max-age=60' } });
      // A raw client that asks, then never reads: the not-stored fill's window fills and it pauses.
      const sock = connect(p.port, '127.0.0.1');
      sock.pause();
      sock.write(`GET ${origin.url}/big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
      await waitFor('the fill paused behind the reader', () => p.proxy.coalescer.running === 1 && p.proxy.coalescer.budget.usedBytes > 0);
      await waitFor('the fill given up', () => p.proxy.coalescer.running === 0, 20_000);
      const { fillsAbandoned, fillsFailed } = p.proxy.coalescer.stats;
      assert.equal(fillsAbandoned + fillsFailed, 1, 'by the watchdog, or by undici\'s body timeout');
      sock.destroy();
      assert.equal(origin.count('/big'), 1);
    } finally {
      await p.close();
      await origin.close();
    }
  });
});

describe('integrity: content-addressed objects are fed and joined only through mirrors', () => {
  let mirror: Origin;
  let stranger: Origin;
  let p: TestProxy;
  let pool: Pool;
  const body = randomBytes(20_000);
  const path = casPath(body);
  before(async () => {
    ({ mirror, stranger, p, pool } = await mirrorAndStranger());
    mirror.route(path, { body, headers: { 'cache-control': 'max-age=3600', 'x-evil': 'mirror-extra', 'content-type': 'application/octet-stream' } });
  });
  after(async () => {
    await pool.close();
    await p.close();
    await mirror.close();
    await stranger.close();
  });

  it('a no-cache fill through another host neither hides the stored copy nor is joined', async () => {
    assert.equal((await get(pool, `${mirror.url}${path}`)).status, 200);
    const g = gate();
    stranger.route(path, { status: 404, gate: g, body: 'nope' });
    const hijack = get(pool, `${stranger.url}${path}`, { 'cache-control': 'no-cache' });
    await waitFor('the stranger holding its answer', () => g.waiting === 1);
    const r = await get(pool, `${mirror.url}${path}`);
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(body));
    assert.match(String(r.headers['x-cache']), /HIT/);
    g.open();
    assert.equal((await hijack).status, 404);
    assert.equal(mirror.count(path), 1);
    assert.equal(stranger.count(path), 1);
  });

  it('a hit carries only the object headers of a mirror, never another host\'s (X-Evil, Set-Cookie)', async () => {
    stranger.route(path, { body, headers: { 'x-evil': '1', 'set-cookie': 'a=b', 'content-type': 'text/html', 'cache-control': 'max-age=3600' } });
    assert.equal((await get(pool, `${stranger.url}${path}`)).status, 200);
    const r = await get(pool, `${mirror.url}${path}`);
    assert.equal(r.headers['x-evil'], undefined, 'nothing but the safe set, from a mirror');
    assert.equal(r.headers['set-cookie'], undefined);
    assert.equal(r.headers['content-type'], 'application/octet-stream');
    assert.equal(mirror.count(path), 1);
  });

  it('POST, PUT and DELETE through any host never evict the content-addressed object', async () => {
    for (const method of ['POST', 'PUT', 'DELETE']) {
      stranger.route(path, { status: 200, body: 'ok' });
      assert.equal((await get(pool, `${stranger.url}${path}`, {}, method, 'x')).status, 200);
      mirror.route(path, (req) => (req.method === 'GET' ? { body, headers: { 'cache-control': 'max-age=3600' } } : { status: 200, body: 'ok' }));
      assert.equal((await get(pool, `${mirror.url}${path}`, {}, method, 'x')).status, 200);
    }
    const r = await get(pool, `${mirror.url}${path}`);
    assert.match(String(r.headers['x-cache']), /HIT/);
    assert.equal(mirror.seen.filter((s) => s.method === 'GET' && s.path === path).length, 1, 'still one upstream GET');
  });

  it('a Vary from another host never keys the object; 20 concurrent clients cost one mirror fetch', async () => {
    const big = randomBytes(256 * 1024);
    const bigPath = casPath(big);
    stranger.route(bigPath, { status: 404, headers: { vary: 'X-Poison', 'cache-control': 'max-age=60' }, body: 'no' });
    assert.equal((await get(pool, `${stranger.url}${bigPath}`, { 'x-poison': '1' })).status, 404);
    const g = gate();
    mirror.route(bigPath, { body: big, gate: g, headers: { vary: 'X-Other', 'cache-control': 'max-age=3600' } });
    const all = Array.from({ length: 20 }, (_, i) => get(pool, `${mirror.url}${bigPath}`, { 'x-poison': String(i), 'x-other': String(i) }));
    await waitFor('the herd waiting on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 20);
    g.open();
    for (const r of await Promise.all(all)) assert.ok(r.body.equals(big));
    assert.equal(mirror.count(bigPath), 1);
    assert.match(String((await get(pool, `${mirror.url}${bigPath}`, { 'x-poison': 'new' })).headers['x-cache']), /HIT/);
    assert.equal(mirror.count(bigPath), 1);
  });

  it('a ranged request never shares its answer with plain requests', async () => {
    const obj = randomBytes(50_000);
    const objPath = casPath(obj);
    const g = gate();
    mirror.route(objPath, (req): Route =>
      req.headers.range ? { status: 206, headers: { 'content-range': 'bytes 0-9/50000' }, body: obj.subarray(0, 10) } : { body: obj, gate: g, headers: { 'cache-control': 'max-age=3600' } },
    );
    const ranged = get(pool, `${mirror.url}${objPath}`, { range: 'bytes=0-9' });
    const plain = get(pool, `${mirror.url}${objPath}`);
    await waitFor('the plain fill waiting', () => g.waiting === 1);
    g.open();
    const [rr, pr] = await Promise.all([ranged, plain]);
    assert.ok(pr.body.equals(obj), 'the plain GET gets the whole object');
    assert.equal(pr.status, 200);
    assert.equal(pr.headers['content-range'], undefined);
    assert.ok(rr.status === 206 || rr.status === 200);
    assert.equal(mirror.seen.filter((s) => s.path === objPath && !s.headers.range).length, 1);
  });
});

describe('integrity: one request never makes a URL uncacheable for everyone', () => {
  const rig = useProxy({}, 4);

  for (const [name, headers] of [
    ['Range', { range: 'bytes=0-3' }],
    ['If-None-Match', { 'if-none-match': '"m1"' }],
    ['Cache-Control: no-store', { 'cache-control': 'no-store' }],
    ['Authorization', { authorization: 'Basic dTpw' }],
  ] as const) {
    it(`a request with ${name} leaves plain polls coalesced and cached`, async () => {
      const path = `/manifest-${name.replace(/\W/g, '')}`;
      rig.origin.route(path, (req): Route =>
        req.headers['if-none-match'] === '"m1"'
          ? { status: 304, headers: { etag: '"m1"' } }
          : req.headers.range
            ? { status: 206, headers: { 'content-range': 'bytes 0-3/8' }, body: 'mani' }
            : { headers: { etag: '"m1"', 'cache-control': 'max-age=60' }, body: 'manifest' },
      );
      const special = await get(rig.pool, `${rig.origin.url}${path}`, headers);
      assert.ok([200, 206, 304].includes(special.status));
      const before = rig.origin.count(path);
      for (let i = 0; i < 6; i++) assert.equal((await get(rig.pool, `${rig.origin.url}${path}`)).body.toString(), 'manifest');
      assert.ok(rig.origin.count(path) - before <= 1, `plain polls went upstream ${rig.origin.count(path) - before} times`);
      assert.equal(rig.p.proxy.coalescer.isUncacheable(`${rig.origin.url}${path}`), false);
    });
  }

  it('a response without Vary clears an old Vary spec', async () => {
    let vary = true;
    rig.origin.route('/vary', () => ({ headers: { 'cache-control': 'max-age=60', ...(vary ? { vary: 'X-A' } : {}) }, body: 'v' }));
    await get(rig.pool, `${rig.origin.url}/vary`, { 'x-a': '1' });
    assert.deepEqual(rig.p.proxy.coalescer.varySpecs.get(`${rig.origin.url}/vary`), ['x-a']);
    vary = false;
    await get(rig.pool, `${rig.origin.url}/vary`, { 'x-a': '1', 'cache-control': 'no-cache' });
    assert.equal(rig.p.proxy.coalescer.varySpecs.get(`${rig.origin.url}/vary`), undefined);
    assert.equal(rig.origin.count('/vary'), 2);
  });
});

describe('integrity: cookies, stored headers and destinations', () => {
  const rig = useProxy({ 'max-memory-object-size': '1KB' }, 4);

  it('Set-Cookie goes to the client that caused the fetch, never to a joiner or a hit', async () => {
    const g = gate();
    rig.origin.route('/cookie', { gate: g, headers: { 'set-cookie': 'session=alice', 'cache-control': 'public, max-age=60' }, body: 'c' });
    const first = get(rig.pool, `${rig.origin.url}/cookie`);
    await waitFor('the fill waiting', () => g.waiting === 1);
    const joiner = get(rig.pool, `${rig.origin.url}/cookie`);
    await waitFor('the joiner attached', () => rig.p.proxy.coalescer.topFills(1, 0)[0]?.readers === 2);
    g.open();
    assert.deepEqual((await first).headers['set-cookie'], 'session=alice');
    assert.equal((await joiner).headers['set-cookie'], undefined);
    const hit = await get(rig.pool, `${rig.origin.url}/cookie`);
    assert.match(String(hit.headers['x-cache']), /HIT/);
    assert.equal(hit.headers['set-cookie'], undefined);
    assert.equal(rig.origin.count('/cookie'), 1);
  });

  it('a fresh response with Set-Cookie and no `public` is stored too (RFC 9111 §3, as Squid does), without its cookie', async () => {
    rig.origin.route('/cookie-plain', { headers: { 'set-cookie': 'session=bob', 'cache-control': 'max-age=60' }, body: 'd' });
    assert.equal((await get(rig.pool, `${rig.origin.url}/cookie-plain`)).headers['set-cookie'], 'session=bob');
    const hit = await get(rig.pool, `${rig.origin.url}/cookie-plain`);
    assert.match(String(hit.headers['x-cache']), /HIT/);
    assert.equal(hit.headers['set-cookie'], undefined);
    assert.equal(rig.origin.count('/cookie-plain'), 1);
  });

  it('a flipped byte in a stored header fails the record checksum: dropped and refetched', async () => {
    const body = randomBytes(8192);
    rig.origin.route('/flip', { headers: { 'cache-control': 'max-age=600', 'x-note': 'aaaaaaaa' }, body });
    assert.equal((await get(rig.pool, `${rig.origin.url}/flip`)).status, 200);
    await waitFor('the record committed to disk', () => rig.p.proxy.coalescer.running === 0);
    const file = findRecord(rig.p.cacheDir, 'aaaaaaaa');
    const buf = readFileSync(file);
    const at = buf.indexOf('aaaaaaaa');
    buf[at] = 'b'.charCodeAt(0);
    writeFileSync(file, buf);
    const r = await get(rig.pool, `${rig.origin.url}/flip`);
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-note'], 'aaaaaaaa', 'the refetched headers, not the flipped ones');
    assert.ok(r.body.equals(body));
    assert.equal(rig.origin.count('/flip'), 2);
  });

  it('a CONNECT reset by its client during the 403 does not take the process down; a failed one is closed', async () => {
    for (let i = 0; i < 20; i++) {
      const s = connect(rig.p.port, '127.0.0.1');
      s.on('error', () => {});
      s.write('CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n');
      s.resetAndDestroy();
    }
    const s = connect(rig.p.port, '127.0.0.1');
    s.write('CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n');
    let text = '';
    s.on('data', (c) => (text += c));
    await once(s, 'close'); // the proxy closes it: not left half-open
    assert.match(text, /^HTTP\/1.1 403/);
    assert.equal((await get(rig.pool, `${rig.origin.url}/cookie`)).status, 200, 'still serving');
  });
});

describe('integrity: a loopback mirror opens exactly its own port', () => {
  it('the admin listener and other ports of that host stay denied', async () => {
    const mirror = await startOrigin({ '/hello': { body: 'hi' } });
    const p = await startProxy({ stratum1: [mirror.url], 'allow-local-dest': [], 'probe-interval': '60s' });
    const pool = proxyClient(p.url, 2);
    try {
      assert.equal((await get(pool, `${mirror.url}/hello`)).status, 200);
      const admin = p.proxy.adminAddress()!;
      const r = await get(pool, `http://127.0.0.1:${admin.port}/metrics`);
      assert.equal(r.status, 403);
      assert.match(String(r.headers['proxy-status']), /destination_ip_prohibited/);
      const other = await get(pool, `http://localhost:${admin.port}/status`);
      assert.equal(other.status, 403);
      assert.equal(mirror.count('/hello'), 1);
    } finally {
      await pool.close();
      await p.close();
      await mirror.close();
    }
  });
});

describe('integrity: clients cannot steer the health probes', () => {
  it('requests for a repository that does not exist leave every mirror healthy and unprobed for it', async () => {
    const mirror = await startOrigin({ '/cvmfs/info/v1/repositories.json': { body: '{}' } });
    const p = await startProxy({ stratum1: [mirror.url], 'probe-interval': '100ms', 'probe-window': 4, 'probe-threshold': 2 });
    const pool = proxyClient(p.url, 2);
    try {
      for (let i = 0; i < 5; i++) assert.equal((await get(pool, `${mirror.url}/cvmfs/no.such.repo${i}/.cvmfspublished`)).status, 404);
      const probesBefore = p.proxy.mirrors.snapshot()[0]!.probes;
      await waitFor('several more probe rounds', () => p.proxy.mirrors.snapshot()[0]!.probes >= probesBefore + 6);
      assert.equal(p.proxy.mirrors.snapshot()[0]!.healthy, true);
      assert.equal(mirror.seen.filter((s) => s.headers['user-agent'] === 'cuttle-probe' && s.path.includes('no.such.repo')).length, 0);
      for (let i = 0; i < 5; i++) assert.equal(mirror.count(`/cvmfs/no.such.repo${i}/.cvmfspublished`), 1);
    } finally {
      await pool.close();
      await p.close();
      await mirror.close();
    }
  });
});

function findRecord(cacheDir: string, needle: string): string {
  const root = join(cacheDir, 'v1', 'objects');
  for (const sub of readdirSync(root)) {
    for (const f of readdirSync(join(root, sub))) {
      const path = join(root, sub, f);
      if (readFileSync(path).includes(needle)) return path;
    }
  }
  throw new Error(`no record holds ${needle}`);
}
