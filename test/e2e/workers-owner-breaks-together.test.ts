// Bodies an origin breaks off behind the owner (a worker, a bank member), all at once: each relay's head was an answer
// (peer.answered() resets the run), but three heads in flight before three breaks counted three
// failures in a row against a healthy owner worker, took it down, and the other worker fetched its keys
// itself (every object twice) until a probe brought it back. A break after the head is the owner's
// fill failing (its upstream's fault); a worker that dies is announced by the main thread.
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { Pool } from 'undici';
import { gate, startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy } from '../helpers/proxy.ts';
import { freePort } from '../helpers/ports.ts';
import { Carp, carpKey } from '../../src/carp.ts';
import { startWorkers2 } from '../helpers/workers.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { urlKey } from '../../src/cache-key.ts';
import { workerOf } from '../../src/worker-ring.ts';

describe('workers: an origin that breaks several bodies off at once behind the owner worker', () => {
  const closers: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('does not take the owner worker down: its other keys are still fetched once', async () => {
    const origin = await startOrigin();
    const { proxy, ports } = await startWorkers2(['--probe-interval', '1h'], 'w-breaks');
    const owned: string[] = [];
    for (let i = 0; owned.length < 4; i++) if (workerOf(urlKey(new URL(`${origin.url}/k${i}`)), 2) === 1) owned.push(`/k${i}`);
    const broken = owned.slice(0, 3);
    const good = owned[3]!;
    const g = gate();
    for (const p of broken) origin.route(p, { body: 'z'.repeat(100_000), bodyGate: { after: 1000, gate: g }, resetAfter: 1000, headers: { 'cache-control': 'max-age=600' } });
    origin.route(good, { body: 'fine', headers: { 'cache-control': 'max-age=600' } });
    const p0 = new Pool(`http://127.0.0.1:${ports[0]}`, { connections: 4 });
    const p1 = new Pool(`http://127.0.0.1:${ports[1]}`, { connections: 1 });
    closers.push(() => origin.close(), () => proxy.stop(), () => p0.destroy(), () => p1.destroy());
    // Three relays whose heads have all arrived before any body breaks.
    const reads = broken.map(async (p) => {
      const r = await p0.request({ path: `${origin.url}${p}`, method: 'GET' });
      assert.equal(r.statusCode, 200);
      return r.body.text().then(() => 'whole', () => 'cut');
    });
    await waitFor('three bodies held at the origin', () => g.waiting === 3);
    g.open();
    assert.deepEqual(await Promise.all(reads), ['cut', 'cut', 'cut'], 'every client sees the break');
    assert.equal((await get(p0, `${origin.url}${good}`)).status, 200);
    assert.equal((await get(p1, `${origin.url}${good}`)).status, 200);
    assert.equal(origin.count(good), 1, 'the owner worker is healthy: it alone fetches its keys');
    for (const p of broken) assert.equal(origin.count(p), 1);
    assert.doesNotMatch(proxy.stderr(), /worker down/);
  });
});

describe('bank: an origin that breaks several bodies off at once behind the owner member', () => {
  const closers: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of closers.reverse()) await c();
  });

  it('does not take the owner member out of the ring: its other keys are still fetched once, by it', async () => {
    const origin = await startOrigin();
    const hosts = ['127.0.0.1', '127.0.0.2'];
    const ports = await Promise.all(hosts.map(freePort));
    const urls = hosts.map((h, i) => `http://${h}:${ports[i]}`);
    const members = [];
    for (const [i, h] of hosts.entries()) members.push(await startProxy({ listen: [`${h}:${ports[i]}`], 'visible-hostname': `member${i}`, bank: urls, 'bank-hash': 'squid-carp', 'probe-interval': '1h' }));
    const [a, b] = members as [Awaited<ReturnType<typeof startProxy>>, Awaited<ReturnType<typeof startProxy>>];
    const pa = proxyClient(urls[0]!);
    const pb = proxyClient(urls[1]!);
    closers.push(() => origin.close(), () => a.close(), () => b.close(), () => pa.close(), () => pb.close());
    const carp = new Carp(hosts.map((name) => ({ name, weight: 1 })));
    const owned: string[] = [];
    for (let i = 0; owned.length < 4; i++) if (carp.owner(carpKey(new URL(`${origin.url}/m${i}`))) === 1) owned.push(`/m${i}`);
    const broken = owned.slice(0, 3);
    const good = owned[3]!;
    const g = gate();
    for (const p of broken) origin.route(p, { body: 'z'.repeat(100_000), bodyGate: { after: 1000, gate: g }, resetAfter: 1000, headers: { 'cache-control': 'max-age=600' } });
    origin.route(good, { body: 'fine', headers: { 'cache-control': 'max-age=600' } });
    const reads = broken.map(async (p) => {
      const r = await pa.request({ path: `${origin.url}${p}`, method: 'GET' });
      assert.equal(r.statusCode, 200);
      return r.body.text().then(() => 'whole', () => 'cut');
    });
    await waitFor('three bodies held at the origin', () => g.waiting === 3);
    g.open();
    assert.deepEqual(await Promise.all(reads), ['cut', 'cut', 'cut'], 'every client sees the break');
    assert.equal((await get(pa, `${origin.url}${good}`)).status, 200);
    assert.equal((await get(pb, `${origin.url}${good}`)).status, 200);
    assert.equal(origin.count(good), 1, 'the owner member is healthy: it alone fetches its keys');
    assert.equal(a.proxy.upstream.fetches, 4, 'a asked b for each');
    assert.equal(b.proxy.upstream.fetches, 4);
    assert.ok(a.proxy.hierarchy.bank!.snapshot().every((p) => p.up));
  });
});
