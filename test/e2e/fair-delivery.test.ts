// Fair delivery (pacer.ts): every reader of a fill advances while bytes are there, beside a fast reader
// and a stalled one; bodies leave in paced slices, whole and in order.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

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
  before(async () => {
    held = gate();
    origin = await startOrigin({
      '/held': { headers: { 'cache-control': 'max-age=600' }, body: big, bodyGate: { after: FIRST, gate: held } },
      '/hot': { headers: { 'cache-control': 'max-age=600' }, body: big },
    });
    p = await startProxy({ 'memory-cache': '64MB', 'max-memory-object-size': '16MB' });
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
});
