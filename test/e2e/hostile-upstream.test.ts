// Upstreams that break HTTP in ways the parser lets through: whatever they send, no partial object is
// served as complete or stored, and the next client is not answered with it.
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { describe, it } from 'node:test';
import { gzipSync } from 'node:zlib';
import { waitFor } from '../helpers/mirrors.ts';
import { rawOrigin } from '../helpers/origin.ts';
import { get, rawClient, withProxy } from '../helpers/proxy.ts';

describe('a body delimited by the connection\'s close', () => {
  it('cut short by a reset is a broken body: the client is cut short and nothing is stored (RFC 9112 §8)', async () => {
    // No Content-Length, not chunked: the body ends when the connection does. A reset is an error of the
    // connection, not its end, so what came before it is not the whole body.
    let upstream: Socket | undefined;
    const head = 'HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n';
    const origin = await rawOrigin((s, n) => {
      if (n > 1) return s.end(`${head}whole`);
      upstream = s;
      s.write(`${head}partial-`);
    });
    try {
      await withProxy({}, async ({ p, pool }) => {
        const { c, got } = rawClient(p.port);
        c.write(`GET ${origin.url}/cut HTTP/1.1\r\nHost: x\r\n\r\n`);
        await waitFor('the first body bytes at the client', () => got().includes('partial-'));
        let closed = false;
        c.once('close', () => (closed = true));
        upstream!.resetAndDestroy();
        // The client never sees the end of the body (chunked: the terminating chunk); its connection closes.
        await waitFor('the answer over', () => closed || got().endsWith('\r\n0\r\n\r\n'));
        assert.doesNotMatch(got(), /\r\n0\r\n\r\n$/, got());
        assert.ok(closed);
        await p.proxy.coalescer.settle();
        assert.equal(p.proxy.counters.truncated, 1);
        assert.equal(p.proxy.coalescer.stats.fillsCommitted, 0);
        // Nothing stored: the next request goes upstream again, and gets what the origin sends now.
        const again = await get(pool, `${origin.url}/cut`);
        assert.equal(again.body.toString(), 'whole');
        assert.match(String(again.headers['x-cache']), /^MISS/);
        assert.equal(origin.requests(), 2);
      });
    } finally {
      await origin.close();
    }
  });

  it('ended by a close is the whole body, stored (the control)', async () => {
    const origin = await rawOrigin((s) => s.end('HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\nwhole'));
    try {
      await withProxy({}, async ({ p, pool }) => {
        const first = await get(pool, `${origin.url}/whole`);
        assert.equal(first.body.toString(), 'whole');
        await p.proxy.coalescer.settle();
        const again = await get(pool, `${origin.url}/whole`);
        assert.equal(again.body.toString(), 'whole');
        assert.match(String(again.headers['x-cache']), /^HIT/);
        assert.equal(origin.requests(), 1);
      });
    } finally {
      await origin.close();
    }
  });
});

describe('a transfer coding that transforms the bytes', () => {
  // cuttle removes the message framing and decodes only chunked: the bytes under a transforming transfer
  // coding (gzip, compress, deflate) are not the representation, and must not be served or stored as it.
  const gz = gzipSync(Buffer.from('the representation'));
  const chunked = `${gz.length.toString(16)}\r\n${gz.toString('latin1')}\r\n0\r\n\r\n`;
  for (const [name, te, body] of [
    ['gzip, chunked', 'gzip, chunked', chunked],
    ['gzip alone (delimited by the close)', 'gzip', gz.toString('latin1')],
  ] as const) {
    it(`(${name}) is a 502 ERR_INVALID_RESPONSE, never stored, for a fill and a pass`, async () => {
      const origin = await rawOrigin((s) => s.end(Buffer.from(`HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: ${te}\r\n\r\n${body}`, 'latin1')));
      try {
        await withProxy({}, async ({ p, pool }) => {
          for (const method of ['GET', 'GET', 'POST']) {
            const r = await get(pool, `${origin.url}/coded`, {}, method, method === 'POST' ? 'x' : undefined);
            assert.equal(r.status, 502, `${method}: ${r.status} ${r.body.toString('latin1')}`);
            assert.match(String(r.headers['proxy-status']), /^cuttle; error=http_protocol_error/);
            assert.match(String(r.headers['x-squid-error']), /^ERR_INVALID_RESP/);
          }
          // Each GET asked again: nothing was stored.
          assert.equal(origin.requests(), 3);
          assert.equal(p.proxy.coalescer.stats.fillsCommitted, 0);
          assert.equal(p.proxy.coalescer.stats.internalErrors, 0);
        });
      } finally {
        await origin.close();
      }
    });
  }

  it('a token that names no coding is framing noise: the bytes it frames are the 200, stored (as the caching conformance suite asks)', async () => {
    const origin = await rawOrigin((s) => s.end('HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: x-not-a-coding\r\n\r\nplain bytes'));
    try {
      await withProxy({}, async ({ p, pool }) => {
        const first = await get(pool, `${origin.url}/noise`);
        assert.equal(first.status, 200);
        assert.equal(first.body.toString(), 'plain bytes');
        await p.proxy.coalescer.settle();
        const again = await get(pool, `${origin.url}/noise`);
        assert.match(String(again.headers['x-cache']), /^HIT/);
        assert.equal(again.headers['transfer-encoding'] === 'x-not-a-coding', false, 'the hop-by-hop field is not stored');
        assert.equal(again.body.toString(), 'plain bytes');
        assert.equal(origin.requests(), 1);
      });
    } finally {
      await origin.close();
    }
  });
});

describe('a suffix range of a stored empty object', () => {
  it('is answered with the whole (empty) 200, never a 206 with the malformed Content-Range "bytes 0--1/0"', async () => {
    await withProxy({}, async ({ origin, p, pool }) => {
      origin.route('/empty', { body: '', headers: { 'cache-control': 'max-age=600' } });
      assert.equal((await get(pool, `${origin.url}/empty`)).status, 200);
      await p.proxy.coalescer.settle();
      // RFC 9110 §14.1.1: a suffix longer than the representation selects all of it, here no byte at all.
      const r = await get(pool, `${origin.url}/empty`, { range: 'bytes=-5' });
      assert.match(String(r.headers['x-cache']), /^HIT/);
      assert.equal(r.status, 200, `${r.status} Content-Range: ${String(r.headers['content-range'])}`);
      assert.equal(r.headers['content-range'], undefined);
      assert.equal(r.body.length, 0);
      assert.equal(origin.count('/empty'), 1);
    });
  });
});
