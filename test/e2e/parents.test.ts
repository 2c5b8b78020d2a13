// Parents (--parent): misses go through a parent in absolute form with the client's Host and our Via;
// first-up failover with passive marking and probes; --never-direct; a parent's own failure is followed
// by the next route; round-robin; a parent's Age is honoured; mirror groups fail over through a parent.
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { after, describe, it } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { casBodies, REPO, startMirrors, waitFor } from '../helpers/mirrors.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

/** A port nothing listens on (bound, then closed): a parent that is down. */
async function deadPort(): Promise<number> {
  const s: Server = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

function peer(p: TestProxy, url: string) {
  return p.proxy.hierarchy.snapshot().find((x) => x.url === url);
}

describe('parents: misses go through the parent', () => {
  const closers: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('absolute form to the parent, the client Host kept, Via from both; one fetch each; logged FIRSTUP_PARENT', async () => {
    const origin = await startOrigin({ '/a': { body: 'through the parent', headers: { 'cache-control': 'max-age=600' } } });
    const parent = await startProxy({ 'visible-hostname': 'regional' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [`${parent.url} name=regional`] });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => parent.close(), () => child.close(), () => pool.close());
    const url = `${origin.url}/a`;
    const r = await get(pool, url, { host: `127.0.0.1:${origin.port}` });
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), 'through the parent');
    assert.equal(origin.count('/a'), 1);
    assert.equal(parent.proxy.upstream.fetches, 1, 'the parent fetched it once');
    assert.equal(child.proxy.upstream.fetches, 1, 'the child asked its parent once');
    const seen = origin.seen[0]!;
    assert.equal(seen.headers.host, `127.0.0.1:${origin.port}`);
    assert.match(String(seen.headers.via), /1\.1 site \(cuttle\/[^)]+\), 1\.1 regional \(cuttle\//);
    assert.match(child.logLines.at(-1)!, / FIRSTUP_PARENT\/127\.0\.0\.1 /);
    // Stored at both: the second request is the child's hit, nobody else is asked.
    const again = await get(pool, url);
    assert.equal(again.status, 200);
    assert.equal(child.proxy.upstream.fetches, 1);
    assert.equal(origin.count('/a'), 1);
  });

  it('a scripted parent sees the absolute-form target', async () => {
    const fake = await startOrigin({ '/x': { body: 'fake parent' } });
    fake.route('http://origin.example/x', { body: 'fake parent', headers: { 'cache-control': 'max-age=60' } });
    const child = await startProxy({ 'visible-hostname': 'site2', parent: [fake.url], 'never-direct': true });
    const pool = proxyClient(child.url);
    closers.push(() => fake.close(), () => child.close(), () => pool.close());
    const r = await get(pool, 'http://origin.example/x');
    assert.equal(r.status, 200);
    assert.equal(fake.seen.length, 1);
    assert.equal(fake.seen[0]!.path, 'http://origin.example/x', 'absolute form, as a proxy is asked');
    assert.equal(fake.seen[0]!.headers.host, 'origin.example');
    assert.equal(child.proxy.upstream.fetches, 1);
  });
});

describe('parents: failover, never-direct, own failures', () => {
  const closers: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('first-up: a dead first parent is marked down and the second serves; no client error; a probe brings it back', async () => {
    const origin = await startOrigin({ '/b': { body: 'b', headers: { 'cache-control': 'no-store' } } });
    const port = await deadPort();
    const second = await startProxy({ 'visible-hostname': 'second' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [`http://127.0.0.1:${port}`, second.url], 'never-direct': true, 'probe-interval': '50ms' });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => second.close(), () => child.close(), () => pool.close());
    const r = await get(pool, `${origin.url}/b`);
    assert.equal(r.status, 200);
    assert.equal(origin.count('/b'), 1);
    assert.equal(second.proxy.upstream.fetches, 1);
    const dead = peer(child, `http://127.0.0.1:${port}`)!;
    assert.equal(dead.up, false, 'a refused connection marks a parent down at once');
    assert.match(dead.lastError ?? '', /connection_refused/);
    // While down it is not asked: the next miss goes straight to the second parent.
    const r2 = await get(pool, `${origin.url}/b`);
    assert.equal(r2.status, 200);
    assert.equal(peer(child, `http://127.0.0.1:${port}`)!.requests, 1, 'not asked again while down');
    // It comes back on the same port: a probe finds it serving, and misses go to it first again.
    const back = await startProxy({ 'visible-hostname': 'first', listen: [`127.0.0.1:${port}`] });
    closers.push(() => back.close());
    await waitFor('the first parent to be up again', () => peer(child, `http://127.0.0.1:${port}`)!.up);
    const r3 = await get(pool, `${origin.url}/b`);
    assert.equal(r3.status, 200);
    assert.equal(back.proxy.upstream.fetches, 1, 'the first parent serves again');
    assert.equal(origin.count('/b'), 3);
  });

  it('--never-direct with every parent down: a labelled 502 at once; without it, cuttle fetches directly', async () => {
    const origin = await startOrigin({ '/c': { body: 'c' } });
    const port = await deadPort();
    const strict = await startProxy({ 'visible-hostname': 'strict', parent: [`http://127.0.0.1:${port}`], 'never-direct': true });
    const loose = await startProxy({ 'visible-hostname': 'loose', parent: [`http://127.0.0.1:${port}`] });
    const sp = proxyClient(strict.url);
    const lp = proxyClient(loose.url);
    closers.push(() => origin.close(), () => strict.close(), () => loose.close(), () => sp.close(), () => lp.close());
    const first = await get(sp, `${origin.url}/c`);
    assert.equal(first.status, 502);
    assert.match(String(first.headers['proxy-status']), /^cuttle; error=connection_refused/);
    const second = await get(sp, `${origin.url}/c?again`);
    assert.equal(second.status, 502);
    assert.match(String(second.headers['proxy-status']), /^cuttle; error=destination_unavailable/, 'the parent is down: refused without trying');
    assert.equal(second.headers['x-squid-error'], 'ERR_CANNOT_FORWARD 0');
    assert.equal(origin.count('/c'), 0, 'never fetched directly');
    const direct = await get(lp, `${origin.url}/c`);
    assert.equal(direct.status, 200);
    assert.equal(origin.count('/c'), 1, 'fetched directly when no parent can');
    assert.match(loose.logLines.at(-1)!, / HIER_DIRECT\/127\.0\.0\.1 /);
  });

  it("a parent's own failure (labelled 5xx) is followed by the next route; an origin's 5xx is the answer", async () => {
    const origin = await startOrigin({ '/d': { body: 'd' }, '/e': { status: 503, body: 'origin says no' } });
    // This parent may not reach loopback origins: it answers 403 ERR_DEST_DENIED, labelled.
    const blind = await startProxy({ 'visible-hostname': 'blind', 'allow-local-dest': [] });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [blind.url] });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => blind.close(), () => child.close(), () => pool.close());
    const r = await get(pool, `${origin.url}/d`);
    assert.equal(r.status, 200, 'went direct after the parent refused');
    assert.equal(origin.count('/d'), 1);
    assert.equal(blind.proxy.upstream.fetches, 0);
    // An unlabelled 503 from the origin, through a parent that can reach it, is the answer: not retried.
    const open = await startProxy({ 'visible-hostname': 'open' });
    const child2 = await startProxy({ 'visible-hostname': 'site3', parent: [open.url] });
    const pool2 = proxyClient(child2.url);
    closers.push(() => open.close(), () => child2.close(), () => pool2.close());
    const e = await get(pool2, `${origin.url}/e`);
    assert.equal(e.status, 503);
    assert.equal(e.headers['proxy-status'], undefined, "the origin's answer passes unlabelled");
    assert.equal(origin.count('/e'), 1, 'not fetched again directly');
  });

  it('round-robin takes the parents in turn', async () => {
    const origin = await startOrigin({ '/f': { body: 'f', headers: { 'cache-control': 'no-store' } } });
    const p1 = await startProxy({ 'visible-hostname': 'p1' });
    const p2 = await startProxy({ 'visible-hostname': 'p2' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [p1.url, p2.url], 'parent-policy': 'round-robin' });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => p1.close(), () => p2.close(), () => child.close(), () => pool.close());
    for (let i = 0; i < 4; i++) assert.equal((await get(pool, `${origin.url}/f`)).status, 200);
    assert.equal(p1.proxy.upstream.fetches, 2);
    assert.equal(p2.proxy.upstream.fetches, 2);
    assert.match(child.logLines.at(-1)!, / ROUNDROBIN_PARENT\//);
  });

  it("a parent's Age counts: a copy that was 50 s old at the parent is fresh here for 10 s of its 60", async () => {
    const origin = await startOrigin({ '/g': { body: 'g', headers: { 'cache-control': 'max-age=60', age: '50' } } });
    const clock = new ManualClock();
    const parent = await startProxy({ 'visible-hostname': 'regional' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [parent.url] }, { clock });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => parent.close(), () => child.close(), () => pool.close());
    const r = await get(pool, `${origin.url}/g`);
    assert.equal(r.status, 200);
    assert.ok(Number(r.headers.age) >= 50, `Age ${String(r.headers.age)} carries the parent's`);
    clock.advance(5_000);
    await get(pool, `${origin.url}/g`);
    assert.equal(child.proxy.upstream.fetches, 1, 'still fresh after 5 s');
    clock.advance(6_000);
    await get(pool, `${origin.url}/g`);
    assert.equal(child.proxy.upstream.fetches, 2, 'stale after 11 s: 50 + 11 > 60, asked again');
  });

  it("a parent cycle (each the other's parent) ends at the proxy that sees itself in Via: its 508 sends the other direct", async () => {
    const origin = await startOrigin({ '/h': { body: 'h' } });
    const bPort = await deadPort();
    const a = await startProxy({ 'visible-hostname': 'cycle-a', parent: [`http://127.0.0.1:${bPort}`] });
    const b = await startProxy({ 'visible-hostname': 'cycle-b', listen: [`127.0.0.1:${bPort}`], parent: [a.url] });
    const pool = proxyClient(a.url);
    closers.push(() => origin.close(), () => a.close(), () => b.close(), () => pool.close());
    const r = await get(pool, `${origin.url}/h`);
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), 'h');
    assert.equal(origin.count('/h'), 1, 'fetched once, by b, directly');
    assert.match(String(origin.seen[0]!.headers.via), /cycle-a .*cycle-b/);
    assert.equal(a.proxy.counters.byError.get('proxy_loop_detected'), 1, 'a answered its own loop once');
  });
});

describe('parents: a parent that dies mid-body', () => {
  const closers: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('a content-addressed body a parent breaks off is continued with Range through the next parent: the client gets every byte', async () => {
    const bodies = casBodies([256 * 1024]);
    const [path, body] = [...bodies][0]!;
    const origin = await startOrigin({ [path]: { body, headers: { 'cache-control': 'max-age=600' } } });
    const url = `${origin.url}${path}`;
    // The first parent sends a third of the body, then its connection dies.
    const dying = await startOrigin({ [url]: { body, resetAfter: 80 * 1024 } });
    const second = await startProxy({ 'visible-hostname': 'second' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [dying.url, second.url], 'never-direct': true });
    const pool = proxyClient(child.url);
    closers.push(() => origin.close(), () => dying.close(), () => second.close(), () => child.close(), () => pool.close());
    const r = await get(pool, url);
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(body), 'whole and exact: the rest came through the second parent');
    assert.equal(child.proxy.coalescer.stats.resumes, 1);
    assert.equal(dying.count(url), 1);
    assert.equal(origin.count(path), 1, 'the second parent fetched it once');
    assert.match(String(origin.seen[0]!.headers.range ?? ''), /^$/, 'the second parent filled the whole object for the Range');
    const p = peer(child, dying.url)!;
    assert.equal(p.failures, 1, 'the break counts against the parent');
    // Stored whole: the next request is a hit.
    assert.ok((await get(pool, url)).body.equals(body));
    assert.equal(origin.count(path), 1);
  });
});

describe('parents: mirror groups through a parent', () => {
  const closers: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('a content-addressed miss fails over across the group through the parent; the manifest only from the named mirror', async () => {
    const bodies = casBodies([4096]);
    const [path, body] = [...bodies][0]!;
    const [m1, m2] = await startMirrors(bodies, [1, 1], [{ errorRate: 1 }, {}]);
    const parent = await startProxy({ 'visible-hostname': 'regional' });
    const child = await startProxy({ 'visible-hostname': 'site', parent: [parent.url], 'never-direct': true, stratum1: [m1!.url, m2!.url], 'probe-interval': '1h' });
    const pool = proxyClient(child.url);
    closers.push(() => m1!.stop(), () => m2!.stop(), () => parent.close(), () => child.close(), () => pool.close());
    const r = await get(pool, `${m1!.url}${path}`);
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(body));
    assert.equal(m1!.count(path) + m2!.count(path), 2, 'each mirror asked once, through the parent');
    assert.equal(m2!.count(path), 1);
    assert.equal(parent.proxy.upstream.fetches, 2);
    const manifest = await get(pool, `${m1!.url}/cvmfs/${REPO}/.cvmfspublished`);
    assert.equal(manifest.status, 503, "a manifest is the named mirror's: never taken from another");
    assert.equal(m2!.count(`/cvmfs/${REPO}/.cvmfspublished`), 0);
  });
});
