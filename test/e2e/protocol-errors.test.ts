// Protocol errors on either side are labelled by who made them: an origin that breaks HTTP gets a 502
// ERR_INVALID_RESPONSE (never cuttle's own 500), and a client that sends garbage while its response is
// streaming loses its connection, never a 400 written into the middle of that response.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { describe, it } from 'node:test';
import { gate, rawOrigin, startOrigin } from '../helpers/origin.ts';
import { REPO } from '../helpers/mirrors.ts';
import { get, proxyClient, rawClient, startProxy, withProxy } from '../helpers/proxy.ts';
import { PIPELINE_DEPTH } from '../../src/listeners.ts';
import { waitFor } from '../helpers/mirrors.ts';

/** What a raw origin answers each request: `answer`'s bytes (of the request head), or a reset for undefined. */
function answering(answer: string | ((head: string) => string | undefined)): (s: Socket, n: number, head: string) => void {
  return (s, _n, head) => {
    const a = typeof answer === 'string' ? answer : answer(head);
    if (a === undefined) s.resetAndDestroy();
    else s.end(a);
  };
}

const BROKEN = {
  'a negative Content-Length': 'HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc',
  'a four-digit status': 'HTTP/1.1 2000 X\r\nContent-Length: 1\r\n\r\na',
  'an ICY status line': 'ICY 200 OK\r\n\r\nabc',
};

describe('upstream protocol errors are the upstream\'s', () => {
  for (const [name, answer] of Object.entries(BROKEN)) {
    it(`an origin that sends ${name} gets 502 ERR_INVALID_RESPONSE, not an internal error`, async () => {
      const origin = await rawOrigin(answering(answer));
      try {
        await withProxy({}, async ({ p, pool }) => {
          const r = await get(pool, `${origin.url}/broken`);
          assert.equal(r.status, 502);
          assert.match(String(r.headers['proxy-status']), /^cuttle; error=http_protocol_error/);
          assert.match(String(r.headers['x-squid-error']), /^ERR_INVALID_RESP/);
          assert.equal(p.proxy.coalescer.stats.internalErrors, 0);
          assert.equal(p.proxy.coalescer.stats.fillsFailed, 1);
          assert.equal(origin.requests(), 1);
          // (p.close() fails the test if the proxy logged an internal error.)
        });
      } finally {
        await origin.close();
      }
    });
  }

  it('a body that breaks HTTP after its head (an overflowing chunk size) is cut short for the client, not blamed on cuttle', async () => {
    const origin = await rawOrigin(answering('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nabc'));
    try {
      await withProxy({}, async ({ p, pool }) => {
        // The head went out before the body broke: the client sees a truncation, never a whole answer.
        await assert.rejects(get(pool, `${origin.url}/broken`));
        await p.proxy.coalescer.settle();
        assert.equal(p.proxy.coalescer.stats.internalErrors, 0);
        assert.equal(p.proxy.counters.truncated, 1);
        assert.equal(origin.requests(), 1);
      });
    } finally {
      await origin.close();
    }
  });
});

describe('a client that sends garbage mid-response', () => {
  it('loses its connection: no 400 is written into the streaming body', async () => {
    await withProxy({}, async ({ origin, p }) => {
      const g = gate();
      origin.route('/stream', { chunked: true, body: 'x'.repeat(5000), bodyGate: { after: 1000, gate: g }, headers: { 'cache-control': 'max-age=60' } });
      const { c, got } = rawClient(p.port);
      c.write(`GET ${origin.url}/stream HTTP/1.1\r\nHost: x\r\n\r\n`);
      await waitFor('the first 1000 body bytes at the client', () => got().split('\r\n\r\n')[1]?.replaceAll(/[0-9a-f]+\r\n|\r\n/g, '').length === 1000);
      // Garbage while the response streams: node's parser fails the connection (clientError).
      c.write('\x00\x01 NOT HTTP\r\n\r\n');
      await once(c, 'close');
      g.open();
      assert.doesNotMatch(got(), /400 Bad Request/);
      assert.equal((got().match(/HTTP\/1\.1 /g) ?? []).length, 1);
      assert.equal(origin.count('/stream'), 1);
      // The fill carries on without that client and is stored: the next request is a hit.
      await waitFor('the fill stored', () => p.proxy.coalescer.running === 0);
      const { default: undici } = await import('undici');
      const pool = new undici.Pool(p.url);
      try {
        const r = await get(pool, `${origin.url}/stream`);
        assert.equal(r.body.length, 5000);
        assert.equal(origin.count('/stream'), 1);
      } finally {
        await pool.close();
      }
    });
  });
});

describe('a client that pipelines, then sends garbage', () => {
  it('loses its connection while any answer is under way: no 400 inside the one streaming, nor before the one waiting', async () => {
    await withProxy({}, async ({ origin, p }) => {
      const streaming = gate();
      const waiting = gate();
      origin.route('/a', { chunked: true, body: 'a'.repeat(5000), bodyGate: { after: 1000, gate: streaming }, headers: { 'cache-control': 'max-age=60' } });
      origin.route('/b', { gate: waiting, body: 'b'.repeat(10), headers: { 'cache-control': 'max-age=60' } });
      const { c, got } = rawClient(p.port);
      c.write(`GET ${origin.url}/a HTTP/1.1\r\nHost: x\r\n\r\nGET ${origin.url}/b HTTP/1.1\r\nHost: x\r\n\r\n`);
      await waitFor('the first answer streaming, the second at the origin', () => waiting.waiting === 1 && got().includes('\r\n\r\n3e8\r\n'));
      c.write('\x00\x01 NOT HTTP\r\n\r\n');
      await once(c, 'close');
      streaming.open();
      waiting.open();
      assert.doesNotMatch(got(), /400 Bad Request/);
      assert.equal((got().match(/HTTP\/1\.1 /g) ?? []).length, 1);
      assert.equal(origin.count('/a'), 1);
      assert.equal(origin.count('/b'), 1);
    });
  });
});

describe('a 404 held while the next mirror is asked', () => {
  it('is answered whole, or without its body, never cut short under its own Content-Length; and not stored cut short', async () => {
    const path = `/cvmfs/${REPO}/data/ab/${'d'.repeat(38)}`;
    const manifest = { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' };
    // The first mirror lacks the object and says so at length (a 100 KiB error page); the second
    // answers its probes but resets the connection on the object: the held 404 is the answer.
    const o1 = await startOrigin({ [`/cvmfs/${REPO}/.cvmfspublished`]: manifest, [path]: { status: 404, body: 'n'.repeat(100 * 1024), headers: { 'cache-control': 'max-age=60' } } });
    const o2 = await rawOrigin(answering((head) => (head.includes('.cvmfspublished') ? 'HTTP/1.1 200 OK\r\nCache-Control: max-age=61\r\nContent-Length: 6\r\n\r\nNtest\n' : undefined)));
    const p = await startProxy({ stratum1: [o1.url, o2.url], 'probe-interval': '1h', 'probe-repo': REPO });
    const pool = proxyClient(p.url, 2);
    try {
      const r = await get(pool, `${o1.url}${path}`);
      assert.equal(r.status, 404);
      const cl = r.headers['content-length'];
      assert.ok(cl === undefined || Number(cl) === r.body.length, `Content-Length ${String(cl)} for ${r.body.length} bytes`);
      assert.equal(o1.count(path), 1);
      assert.equal(p.proxy.coalescer.stats.failovers, 1);
      await p.proxy.coalescer.settle();
      // Not negatively cached in a form the origin never sent: the next request asks again.
      const again = await get(pool, `${o1.url}${path}`);
      assert.equal(again.status, 404);
      assert.ok(again.headers['content-length'] === undefined || Number(again.headers['content-length']) === again.body.length);
      assert.doesNotMatch(String(again.headers['x-cache']), /^HIT/);
      assert.equal(o1.count(path), 2);
    } finally {
      await pool.close();
      await p.close();
      await o1.close();
      await o2.close();
    }
  });
});

describe('requests after a request that closes the connection', () => {
  for (const lane of [true, false]) {
    it(`are ignored: the closing request is answered whole, then the connection closes, no 400 (hit lane ${lane ? 'on' : 'off'})`, async () => {
      await withProxy({ 'hit-lane': lane }, async ({ origin, p, pool }) => {
        origin.route('/hit', { body: 'h'.repeat(100), headers: { 'cache-control': 'max-age=60' } });
        assert.equal((await get(pool, `${origin.url}/hit`)).status, 200);
        const { c, got } = rawClient(p.port);
        // RFC 9112 §9.6: a server must not process requests after one with the "close" option.
        c.write(`GET ${origin.url}/hit HTTP/1.1\r\nHost: x\r\n\r\nGET ${origin.url}/hit HTTP/1.1\r\nHost: x\r\nProxy-Connection: close\r\n\r\nGET ${origin.url}/hit HTTP/1.1\r\nHost: x\r\n\r\n`);
        await once(c, 'close');
        assert.doesNotMatch(got(), /400 Bad Request/);
        assert.equal((got().match(/HTTP\/1\.1 200 OK/g) ?? []).length, 2, got());
        assert.ok(got().endsWith('h'.repeat(100)), 'the closing request is answered whole');
        assert.equal(origin.count('/hit'), 1);
      });
    });
  }
});

describe('a request node:http cannot parse', () => {
  for (const lane of [true, false]) {
    it(`gets the labelled 400, one access-log line and its count, as any other answer (hit lane ${lane ? 'on' : 'off'})`, async () => {
      await withProxy({ 'hit-lane': lane }, async ({ origin, p }) => {
        const garbage = {
          'a bad request line': 'GARBAGE\r\n\r\n',
          'a head past node\'s limit': `GET ${origin.url}/x HTTP/1.1\r\nX: ${'a'.repeat(20_000)}\r\n\r\n`,
          'Content-Length beside Transfer-Encoding': `GET ${origin.url}/x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n`,
        };
        for (const [name, bytes] of Object.entries(garbage)) {
          const { c, got } = rawClient(p.port);
          c.end(bytes);
          await once(c, 'close');
          assert.match(got(), /^HTTP\/1\.1 400 Bad Request\r\n/, name);
          assert.match(got(), /Proxy-Status: cuttle; error=http_request_error/, name);
        }
        // Before, none of them was logged or counted: a client's garbage left no trace but its 400.
        const lines = p.logLines.filter((l) => / NONE\/400 \d+ NONE error:invalid-request /.test(l));
        assert.equal(lines.length, 3, p.logLines.join(''));
        assert.match(lines[0]!, / 127\.0\.0\.1 NONE\/400 \d+ NONE error:invalid-request - HIER_NONE\/- -\n$/);
        assert.equal(p.proxy.counters.requests, 3);
        assert.equal(p.proxy.counters.errors, 3);
        assert.equal(origin.count('/x'), 0);
      });
    });
  }
});

describe('a client that pipelines more requests than node:http should hold', () => {
  // node:http reads a whole read's requests at once and holds each until its answer is read: past
  // PIPELINE_DEPTH in flight on one connection, the connection is cut instead of growing without bound.
  for (const lane of [true, false]) {
    it(`is cut past ${PIPELINE_DEPTH} requests in flight through node:http (hit lane ${lane ? 'on: the lane answers up to its queue, node:http the rest' : 'off'})`, async () => {
      await withProxy({ 'hit-lane': lane }, async ({ origin, p, pool }) => {
        origin.route('/s', { body: 'x'.repeat(1024), headers: { 'cache-control': 'max-age=600' } });
        assert.equal((await get(pool, `${origin.url}/s`)).status, 200);
        const before = p.proxy.counters.requests;
        const c = connect(p.port, '127.0.0.1');
        c.on('error', () => {});
        let closed = false;
        c.on('data', () => {}); // it reads what it is sent
        c.once('close', () => (closed = true));
        // 600 requests in one write (one read of the proxy's): more than the lane queues answers for.
        const n = 600;
        c.write(`GET ${origin.url}/s HTTP/1.1\r\nHost: x\r\n\r\n`.repeat(n));
        await waitFor('the connection cut, or every request answered', () => closed || p.proxy.counters.requests - before === n);
        assert.ok(closed, `all ${n} pipelined requests were answered: nothing bounds what one connection holds`);
        assert.ok(p.proxy.counters.requests - before < n);
        assert.equal(origin.count('/s'), 1);
      });
    });
  }
});
