// The paths nothing else exercises: an internal bug inside a fill, spill read-back once --fill-memory is
// spent, a slow reader beside a fast one, released fills with waiters, every 503 limit and recovery
// after it, a corrupt disk hit, and shutdown past --shutdown-timeout. Real sockets, gated origins.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Pool } from 'undici';
import { gate, startOrigin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, withProxy, type Rig } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

/** A raw client that sends one request and never reads the answer. */
function stalledClient(port: number, url: string): Socket {
  const s = connect(port, '127.0.0.1');
  s.pause();
  s.on('error', () => {});
  s.write(`GET ${url} HTTP/1.1\r\nHost: x\r\n\r\n`);
  return s;
}

/** Wait for the access log line a transaction writes once its response is all in the kernel. */
function logged(p: { logLines: string[] }, line: RegExp | ((l: string) => boolean)): Promise<void> {
  const is = typeof line === 'function' ? line : (l: string) => line.test(l);
  return waitFor(`an access log line ${line}`, () => p.logLines.some(is));
}

/** A whole 200's line: its bytes field is the body and the head (a few hundred bytes), as Squid counts them. */
function whole(tag: RegExp, body: number): (l: string) => boolean {
  return (l) => {
    const m = new RegExp(` ${tag.source}\\/200 (\\d+) GET `).exec(l);
    return m !== null && Number(m[m.length - 1]) > body && Number(m[m.length - 1]) < body + 2048;
  };
}

/** A large object (`bytes` random bytes at `path`) fetched once, stored on disk, and its fill gone. */
async function storedOnDisk({ origin, p, pool }: Rig, path: string, bytes: number): Promise<{ body: Buffer; url: string }> {
  const body = randomBytes(bytes);
  const url = `${origin.url}${path}`;
  origin.route(path, { body, headers: { 'cache-control': 'max-age=60' } });
  assert.ok((await get(pool, url)).body.equals(body));
  await waitFor('stored on disk, its fill gone', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0 && p.proxy.coalescer.budget.usedBytes === 0);
  return { body, url };
}

describe('guarantees', () => {
  it('an exception inside a fill fails only that fill: every waiter gets 500 ERR_INTERNAL, the process serves on', async () => {
    await withProxy({}, async ({ origin, p, pool }) => {
    const g = gate();
    origin.route('/boom', { gate: g, body: 'x', headers: { 'cache-control': 'max-age=60' } });
    origin.route('/fine', { body: 'fine', headers: { 'cache-control': 'max-age=60' } });
    // A bug, injected where every stored response passes: opening its disk record.
    const openWriter = p.proxy.store.openWriter.bind(p.proxy.store);
    p.proxy.store.openWriter = () => {
      throw new TypeError('injected bug');
    };
    const all = Array.from({ length: 4 }, () => get(pool, `${origin.url}/boom`));
    await waitFor('four waiters on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 4);
    g.open();
    for (const r of await Promise.all(all)) {
      assert.equal(r.status, 500);
      assert.match(String(r.headers['proxy-status']), /error=proxy_internal_error/);
      assert.match(String(r.headers['x-squid-error']), /ERR_CANNOT_FORWARD/);
    }
    assert.equal(p.proxy.coalescer.stats.internalErrors, 1);
    assert.equal(origin.count('/boom'), 1);
    assert.equal(p.logs.filter((l) => l.internal === true).length, 1, 'logged once, as internal');
    p.logs.length = 0; // expected here: don't fail the close
    p.proxy.store.openWriter = openWriter;
    assert.equal((await get(pool, `${origin.url}/fine`)).status, 200);
    await waitFor('nothing left running', () => p.proxy.coalescer.running === 0);
    }, 8);
  });

  it('once --fill-memory is spent, a late reader replays the start from the spill file', async () => {
    await withProxy({ 'fill-memory': '1MB', 'fill-window': '256KB' }, async ({ origin, p, pool }) => {
    const body = randomBytes(6 * 2 ** 20);
    const g = gate();
    origin.route('/spill', { body, bodyGate: { after: 4 * 2 ** 20, gate: g }, headers: { 'cache-control': 'max-age=60' } });
    const first = get(pool, `${origin.url}/spill`);
    await waitFor('4 MiB received, the window past its start', () => g.waiting === 1 && (p.proxy.coalescer.topFills(1, 0)[0]?.bytes ?? 0) >= 4 * 2 ** 20 && p.proxy.coalescer.budget.usedBytes < 4 * 2 ** 20);
    const late = get(pool, `${origin.url}/spill`);
    await waitFor('the late reader joined', () => p.proxy.coalescer.topFills(1, 0)[0]?.readers === 2);
    g.open();
    const [a, b] = await Promise.all([first, late]);
    assert.ok(a.body.equals(body));
    assert.ok(b.body.equals(body), 'the late reader got every byte, the first 3+ MiB from disk');
    assert.equal(origin.count('/spill'), 1);
    }, 4);
  });

  it('a reader that stops reading never holds back a fast one', async () => {
    await withProxy({}, async ({ origin, p, pool }) => {
    const body = randomBytes(8 * 2 ** 20);
    const g = gate();
    origin.route('/two', { body, gate: g, headers: { 'cache-control': 'max-age=60' } });
    const slow = stalledClient(p.port, `${origin.url}/two`);
    await waitFor('the fill waiting', () => g.waiting === 1);
    const fast = get(pool, `${origin.url}/two`);
    await waitFor('both attached', () => p.proxy.coalescer.topFills(1, 0)[0]?.readers === 2);
    g.open();
    const r = await fast; // would never finish if the stalled reader held the fill back
    assert.ok(r.body.equals(body));
    assert.equal(origin.count('/two'), 1);
    slow.destroy();
    }, 2);
  });

  it('a large stored object still being read from its fill is served from that memory, not the disk', async () => {
    await withProxy({ 'max-memory-object-size': '64KB' }, async ({ origin, p, pool }) => {
    const body = randomBytes(8 * 2 ** 20);
    origin.route('/held', { body, headers: { 'cache-control': 'max-age=60' } });
    // The first reader stops reading: it keeps the finished fill's body in memory after the commit.
    const slow = stalledClient(p.port, `${origin.url}/held`);
    await waitFor('the fill stored on disk', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0);
    const held = await get(pool, `${origin.url}/held`);
    assert.ok(held.body.equals(body));
    assert.match(String(held.headers['x-cache']), /^HIT/);
    await logged(p, whole(/TCP_MEM_HIT/, 8388608));
    // A range is answered from the disk record (206), as before.
    const part = await get(pool, `${origin.url}/held`, { range: 'bytes=10-19' });
    assert.equal(part.status, 206);
    assert.ok(part.body.equals(body.subarray(10, 20)));
    await logged(p, / TCP_HIT\/206 \d{3} GET /); // 10 bytes of body, and the head
    // Once its last reader is gone, the memory goes, and the disk serves.
    slow.destroy();
    await waitFor('the fill memory dropped', () => p.proxy.coalescer.budget.usedBytes === 0);
    const later = await get(pool, `${origin.url}/held`);
    assert.ok(later.body.equals(body));
    await logged(p, whole(/TCP_HIT/, 8388608));
    assert.equal(origin.count('/held'), 1);
    }, 2);
  });

  it('a plain request joins the stored copy other clients are reading without opening its record; one with directives looks on disk first', async () => {
    await withProxy({ 'max-memory-object-size': '64KB' }, async ({ origin, p, pool }) => {
    const body = randomBytes(8 * 2 ** 20);
    const url = `${origin.url}/big`;
    origin.route('/big', { body, headers: { 'cache-control': 'max-age=60' } });
    let diskLookups = 0;
    const getFromDisk = p.proxy.store.getFromDisk.bind(p.proxy.store);
    p.proxy.store.getFromDisk = (key: string) => (diskLookups++, getFromDisk(key));
    // The first reader stops reading: the finished fill's body stays held after the commit.
    const slow = stalledClient(p.port, url);
    await waitFor('the fill stored on disk, its body held', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0 && p.proxy.coalescer.heldBody(url) !== undefined);
    const before = diskLookups;
    for (const headers of [{}, { pragma: '' }] as Record<string, string>[]) {
      const r = await get(pool, url, headers);
      assert.ok(r.body.equals(body));
    }
    assert.equal(diskLookups, before, 'plain requests (an empty Pragma too, as CVMFS sends) joined the held body');
    // Request directives take the full lookup: the record, then (fresh, unconditional) the same held body.
    const directed = await get(pool, url, { 'cache-control': 'max-age=30' });
    assert.ok(directed.body.equals(body));
    assert.equal(diskLookups, before + 1);
    await waitFor('three hits from memory', () => p.logLines.filter(whole(/TCP_MEM_HIT/, 8388608)).length === 3);
    // A range is the record's to answer, as before.
    const part = await get(pool, url, { range: 'bytes=0-9' });
    assert.equal(part.status, 206);
    assert.equal(diskLookups, before + 2);
    assert.equal(origin.count('/big'), 1);
    // A PURGE drops the held body with the record: the next plain request fetches again.
    assert.equal((await get(pool, url, {}, 'PURGE')).status, 200);
    assert.equal(p.proxy.coalescer.heldBody(url), undefined);
    assert.ok((await get(pool, url)).body.equals(body));
    assert.equal(origin.count('/big'), 2);
    slow.destroy();
    assert.equal(p.proxy.counters.corruptRecords, 0);
    }, 2);
  });

  it('a herd asking together for a large disk record opens it once: the others wait for that lookup and join its shared read', async () => {
    await withProxy({ 'max-memory-object-size': '64KB' }, async (rig) => {
    const { origin, p, pool } = rig;
    const { body, url } = await storedOnDisk(rig, '/herd', 2 * 2 ** 20);
    // The first disk lookup is held until every other request waits on it.
    const g = gate();
    let diskLookups = 0;
    const getFromDisk = p.proxy.store.getFromDisk.bind(p.proxy.store);
    p.proxy.store.getFromDisk = async (key: string) => {
      if (diskLookups++ === 0) await g.opened;
      return getFromDisk(key);
    };
    let waiting = 0;
    const diskLookupOf = p.proxy.coalescer.diskLookupOf.bind(p.proxy.coalescer);
    p.proxy.coalescer.diskLookupOf = (key: string) => {
      const inFlight = diskLookupOf(key);
      if (inFlight) waiting++;
      return inFlight;
    };
    const n = 8;
    const answers = Array.from({ length: n }, () => get(pool, url));
    await waitFor('one lookup in flight, the others waiting on it', () => diskLookups === 1 && waiting === n - 1);
    g.open();
    for (const r of await Promise.all(answers)) assert.ok(r.body.equals(body));
    assert.equal(diskLookups, 1, 'the record was looked up once');
    await waitFor('every answer logged', () => p.logLines.filter(whole(/TCP_(MEM_)?HIT/, 2097152)).length === n);
    assert.equal(p.logLines.filter((l) => / TCP_HIT\/200 /.test(l)).length, 1, 'one shared read of the record');
    assert.equal(origin.count('/herd'), 1);
    assert.equal(p.proxy.counters.corruptRecords, 0);
    }, 8);
  });

  it('clients asking for a large disk record at the same time share one read of it', async () => {
    await withProxy({ 'max-memory-object-size': '64KB' }, async (rig) => {
    const { origin, p, pool } = rig;
    const { body, url } = await storedOnDisk(rig, '/shared', 8 * 2 ** 20);
    // A reader that stops reading keeps the shared read of the record open.
    const slow = stalledClient(p.port, url);
    await waitFor('a shared read of the record', () => p.proxy.coalescer.heldBody(url) !== undefined);
    const r = await get(pool, url);
    assert.ok(r.body.equals(body));
    assert.match(String(r.headers['x-cache']), /^HIT/);
    await logged(p, whole(/TCP_MEM_HIT/, 8388608));
    slow.destroy();
    await waitFor('the shared read gone with its readers', () => p.proxy.coalescer.heldBody(url) === undefined && p.proxy.coalescer.budget.usedBytes === 0);
    await logged(p, / TCP_HIT(_ABORTED)?\/200 \d+ GET /);
    assert.equal(origin.count('/shared'), 1);
    assert.equal(p.proxy.counters.corruptRecords, 0);
    }, 2);
  });

  it('a response that is not shared releases its waiters: each gets its own answer', async () => {
    await withProxy({}, async ({ origin, p, pool }) => {
    const g = gate();
    let n = 0;
    origin.route('/private', () => ({ gate: n++ === 0 ? g : undefined, body: `answer ${n}`, headers: { 'cache-control': 'private' } }));
    const all = Array.from({ length: 5 }, () => get(pool, `${origin.url}/private`));
    await waitFor('five waiters on the first fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 5);
    g.open();
    const bodies = (await Promise.all(all)).map((r) => r.body.toString());
    assert.equal(new Set(bodies).size, 5, 'every client its own answer');
    assert.equal(origin.count('/private'), 5);
    assert.equal(p.proxy.coalescer.stats.fillsReleased, 1);
    assert.equal(p.proxy.coalescer.running, 0);
    }, 8);
  });

  it('--max-fills, --max-passes and --max-client-connections answer 503 with Proxy-Status, and recover', async () => {
    const origin = await startOrigin();
    const p = await startProxy({ 'max-fills': 1, 'max-passes': 1, 'max-client-connections': 3 });
    const pool = new Pool(p.url, { connections: 2 });
    try {
      const g = gate();
      origin.route('/held', { gate: g, body: 'held', headers: { 'cache-control': 'max-age=60' } });
      origin.route('/other', { body: 'other', headers: { 'cache-control': 'max-age=60' } });
      origin.route('/post', { gate: g, body: 'posted' });
      const held = get(pool, `${origin.url}/held`);
      await waitFor('one fill held', () => g.waiting === 1);
      const r1 = await get(pool, `${origin.url}/other`);
      assert.equal(r1.status, 503);
      assert.match(String(r1.headers['proxy-status']), /connection_limit_reached/);
      const post = get(pool, `${origin.url}/post`, {}, 'POST', 'x');
      await waitFor('one pass held', () => g.waiting === 2);
      const extra = new Pool(p.url, { connections: 1 });
      const r2 = await get(extra, `${origin.url}/post`, {}, 'POST', 'y');
      assert.equal(r2.status, 503);
      // Three client connections are open (the pool's two, the extra one): a fourth is answered 503.
      const sock = connect(p.port, '127.0.0.1');
      let text = '';
      sock.on('data', (c) => (text += c));
      await once(sock, 'close');
      assert.match(text, /^HTTP\/1.1 503 .*\r\nProxy-Status: cuttle; error=connection_limit_reached/s);
      g.open();
      assert.equal((await held).status, 200);
      assert.equal((await post).status, 200);
      await extra.close();
      assert.equal((await get(pool, `${origin.url}/other`)).body.toString(), 'other', 'served again');
      assert.equal(origin.count('/other'), 1);
      assert.equal(origin.count('/held'), 1);
      assert.equal(origin.count('/post'), 1);
    } finally {
      await pool.close();
      await p.close();
      await origin.close();
    }
  });

  it('a disk hit whose body fails its checksum is cut short, dropped, and refetched', async () => {
    await withProxy({ 'max-memory-object-size': '1KB' }, async ({ origin, p, pool }) => {
    const body = randomBytes(256 * 1024);
    origin.route('/crc', { body, headers: { 'cache-control': 'max-age=600' } });
    assert.ok((await get(pool, `${origin.url}/crc`)).body.equals(body));
    await waitFor('committed', () => p.proxy.coalescer.running === 0);
    const root = join(p.cacheDir, 'v1', 'objects');
    const file = readdirSync(root).flatMap((d) => readdirSync(join(root, d)).map((f) => join(root, d, f))).find((f) => statSync(f).size > body.length)!;
    const buf = readFileSync(file);
    const at = buf.length - 1000; // a body byte near the end
    buf[at] = buf[at]! ^ 0xff;
    writeFileSync(file, buf);
    await assert.rejects(get(pool, `${origin.url}/crc`), 'the client sees a truncation, never a complete corrupt body');
    assert.equal(p.proxy.counters.corruptRecords, 1);
    const again = await get(pool, `${origin.url}/crc`);
    assert.ok(again.body.equals(body));
    assert.equal(origin.count('/crc'), 2);
    }, 2);
  });

  it('shutdown past --shutdown-timeout cuts a running fill and an open tunnel, and returns', async () => {
    const origin = await startOrigin();
    const p = await startProxy({ 'allow-connect-port': String(origin.port) });
    const pool = proxyClient(p.url, 2);
    const g = gate();
    try {
      origin.route('/forever', { body: randomBytes(64 * 1024), bodyGate: { after: 1024, gate: g }, headers: { 'cache-control': 'max-age=60' } });
      const res = await pool.request({ path: `${origin.url}/forever`, method: 'GET' });
      const reading = res.body.arrayBuffer().then(
        () => 'complete',
        () => 'cut',
      );
      await waitFor('the fill mid-body', () => g.waiting === 1);
      const tunnel = connect(p.port, '127.0.0.1');
      tunnel.on('error', () => {});
      tunnel.write(`CONNECT 127.0.0.1:${origin.port} HTTP/1.1\r\nHost: x\r\n\r\n`);
      await once(tunnel, 'data');
      const tunnelClosed = once(tunnel, 'close');
      await p.proxy.close(300); // returns although the fill and the tunnel would never end by themselves
      await tunnelClosed;
      assert.equal(await reading, 'cut');
      assert.equal(p.proxy.coalescer.running, 0);
      assert.equal(p.proxy.coalescer.stats.fillsAbandoned, 1);
      assert.equal(origin.count('/forever'), 1);
    } finally {
      g.open();
      await pool.close();
      await p.close();
      await origin.close();
    }
  });
});
