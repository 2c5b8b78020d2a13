// Fair delivery (pacer.ts): every reader of a fill advances while bytes are there, beside a fast reader
// and a stalled one; bodies leave in paced slices, whole and in order.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { TURN_BYTES } from '../../src/pacer.ts';

/** A raw client: counts body bytes as they arrive; `paused` reads nothing until resumed. */
class Reader {
  readonly sock: Socket;
  head = '';
  #raw: Buffer[] = [];
  body = 0;
  closed = false;
  constructor(port: number, url: string, paused = false) {
    this.sock = connect({ port, host: '127.0.0.1' });
    this.sock.on('error', () => {});
    this.sock.on('close', () => (this.closed = true));
    this.sock.on('data', (c: Buffer) => {
      if (this.head) {
        this.body += c.length;
        this.#raw.push(c);
        return;
      }
      this.#raw.push(c);
      const all = Buffer.concat(this.#raw);
      const i = all.indexOf('\r\n\r\n');
      if (i < 0) return;
      this.head = all.subarray(0, i).toString('latin1');
      this.#raw = [all.subarray(i + 4)];
      this.body = all.length - i - 4;
    });
    this.sock.write(`GET ${url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    if (paused) this.sock.pause();
  }
  get bytes(): Buffer {
    return Buffer.concat(this.#raw);
  }
}

describe('fair delivery', () => {
  let origin: Origin;
  let p: TestProxy;
  let held: Gate;
  const SIZE = 8 * 2 ** 20;
  const FIRST = 2 * 2 ** 20;
  const big = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) big.writeUInt32LE(i, i);
  // Past one turn's whole budget (pacer.ts TURN_BYTES): a memory hit the lane always paces.
  const huge = Buffer.alloc(TURN_BYTES + 4 * 2 ** 20);
  for (let i = 0; i < huge.length; i += 4) huge.writeUInt32LE(i ^ 0x5a5a5a5a, i);
  before(async () => {
    held = gate();
    origin = await startOrigin({
      '/held': { headers: { 'cache-control': 'max-age=600' }, body: big, bodyGate: { after: FIRST, gate: held } },
      '/hot': { headers: { 'cache-control': 'max-age=600' }, body: big },
      '/huge': { headers: { 'cache-control': 'max-age=600' }, body: huge },
      '/small': { headers: { 'cache-control': 'max-age=600' }, body: 'small' },
    });
    p = await startProxy({ 'memory-cache': '96MB', 'max-memory-object-size': '32MB' });
  });
  after(async () => {
    await p?.close();
    await origin?.close();
  });

  it('a reader that joins a fill advances while a fast reader beside it drains, and a stalled one holds neither', async () => {
    const url = `${origin.url}/held`;
    const fast = new Reader(p.port, url);
    // The fill holds at FIRST bytes: the fast reader has them all while the origin still holds the rest.
    await waitFor('the fast reader has what the origin sent', () => fast.body >= FIRST);
    const stalled = new Reader(p.port, url, true);
    const joined = new Reader(p.port, url);
    // The join and the stalled reader arrived mid-fill: the joiner gets every byte there is, now,
    // with the origin still holding (a reader waiting on others, or on the fill's end, would not).
    await waitFor('the reader that joined has what the fill holds', () => joined.body >= FIRST);
    assert.ok(fast.body <= FIRST && joined.body <= FIRST, 'nothing past what the origin sent');
    held.open();
    await waitFor('fast and joined readers are done, the stalled one still reads nothing', () => fast.closed && joined.closed);
    for (const r of [fast, joined]) {
      assert.match(r.head, /^HTTP\/1\.1 200/);
      assert.equal(r.body, SIZE);
      assert.ok(r.bytes.equals(big), 'whole and in order');
    }
    assert.equal(stalled.closed, false, 'the stalled reader is still there, unread');
    stalled.sock.resume();
    await waitFor('the stalled reader, once reading, gets it all', () => stalled.closed);
    assert.ok(stalled.bytes.equals(big));
    assert.equal(origin.count('/held'), 1, 'one upstream fetch for all three');
  });

  it('large memory hits leave whole while the turn has budget, else in paced slices: every reader gets every byte, in order', async () => {
    const url = `${origin.url}/hot`;
    const pool = proxyClient(p.url, 1);
    for (let i = 0; i < 2; i++) assert.equal((await get(pool, url)).status, 200); // filled, then in memory
    await pool.close();
    const readers = Array.from({ length: 16 }, () => new Reader(p.port, url));
    await waitFor('every reader is done', () => readers.every((r) => r.closed));
    for (const r of readers) {
      assert.match(r.head, /^HTTP\/1\.1 200/);
      assert.match(r.head, /X-Cache: HIT/i);
      assert.ok(r.bytes.equals(big), 'whole and in order');
    }
    assert.equal(origin.count('/hot'), 1);
    assert.equal(p.proxy.pacer.waiting, 0, 'nobody is left waiting for a slice');
  });

  it('a memory hit past a turn of budget is paced in the hit lane, whole and in order, and the lane reads the connection again after it', async () => {
    const url = `${origin.url}/huge`;
    const pool = proxyClient(p.url, 1);
    for (let i = 0; i < 2; i++) assert.equal((await get(pool, url)).status, 200); // filled, then in memory
    await pool.close();
    const laneHits = p.proxy.counters.laneHits;
    // One keep-alive connection: the huge hit, then a small one after it on the same connection.
    const sock = connect({ port: p.port, host: '127.0.0.1' });
    let raw = Buffer.alloc(0);
    sock.on('data', (c: Buffer) => (raw = Buffer.concat([raw, c])));
    sock.write(`GET ${url} HTTP/1.1\r\nHost: x\r\n\r\n`);
    const headEnd = () => raw.indexOf('\r\n\r\n');
    await waitFor('the huge hit has arrived whole', () => headEnd() >= 0 && raw.length - headEnd() - 4 >= huge.length);
    const head = raw.subarray(0, headEnd()).toString('latin1');
    assert.match(head, /^HTTP\/1\.1 200/);
    assert.match(head, /X-Cache: HIT/i);
    assert.ok(raw.subarray(headEnd() + 4, headEnd() + 4 + huge.length).equals(huge), 'whole and in order');
    assert.equal(raw.length, headEnd() + 4 + huge.length, 'nothing after it');
    sock.write(`GET ${origin.url}/small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    await waitFor('the small answer after it, on the same connection', () => raw.includes('\r\n\r\nsmall'));
    sock.destroy();
    assert.equal(p.proxy.counters.laneHits, laneHits + 1, 'the lane answered the huge hit (paced: it is past a turn of budget), not node:http');
    assert.equal(origin.count('/huge'), 1);
    assert.equal(origin.count('/small'), 1);
  });
});
