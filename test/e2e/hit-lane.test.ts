// The hit lane (src/hit-lane.ts) answers plain memory hits without node:http, and hands a connection to
// node:http at the first request it does not fully understand. These tests hold it to node:http's own
// answers: the same bytes on the wire, the same access log line, the same framing on a shared
// connection, and a clean hand-over with pipelined and split requests.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect } from 'node:net';
import { describe, it } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

/** Write `parts` to one connection, one write each; resolve with all the proxy sent until it closed. */
async function exchange(port: number, parts: string[], between?: (got: () => string) => Promise<void>): Promise<string> {
  const s = connect(port, '127.0.0.1');
  let got = '';
  s.setEncoding('latin1');
  s.on('data', (d: string) => (got += d));
  await once(s, 'connect');
  for (const [i, part] of parts.entries()) {
    if (i > 0 && between) await between(() => got);
    s.write(part, 'latin1');
  }
  await once(s, 'close');
  return got;
}

const CVMFS_HEADERS = 'Host: origin\r\nUser-Agent: cvmfs Fuse 2.11.5\r\nPragma:\r\nConnection: Keep-Alive\r\n';
const req = (url: string, extra = '', method = 'GET') => `${method} ${url} HTTP/1.1\r\n${CVMFS_HEADERS}${extra}\r\n`;
const lastReq = (url: string) => `GET ${url} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n`;
/** Status lines and X-Cache, in order: what answered each request. */
const answers = (raw: string) => raw.match(/HTTP\/1\.1 \d{3} [^\r]*|x-cache: [^\r]*|content-range: [^\r]*/g) ?? [];

async function rig(origin: Origin, overrides: Record<string, unknown>, clock: ManualClock): Promise<TestProxy> {
  const p = await startProxy(overrides, { clock });
  const pool = proxyClient(p.url, 1);
  assert.equal((await get(pool, `${origin.url}/obj`)).status, 200); // the fill: the object is now in memory
  await pool.close();
  return p;
}

describe('hit lane', () => {
  it('answers a plain hit with the bytes and the log line node:http gives, and counts it', async () => {
    const origin = await startOrigin({ '/obj': { headers: { 'cache-control': 'max-age=600', 'content-type': 'application/x-cvmfs', etag: '"v1"' }, body: Buffer.alloc(5000, 3) } });
    const clock = new ManualClock();
    const lane = await rig(origin, {}, clock);
    const node = await rig(origin, { 'hit-lane': false }, clock);
    clock.advance(7000); // a non-zero Age
    try {
      const url = `${origin.url}/obj`;
      const script = [req(url) + req(url, '', 'HEAD') + req(url) + lastReq(url)];
      const viaLane = await exchange(lane.port, script);
      const viaNode = await exchange(node.port, script);
      assert.equal(viaLane, viaNode);
      assert.deepEqual(answers(viaLane), ['HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test']);
      assert.match(viaLane, /\r\nage: 7\r\n/);
      await waitFor('four log lines each', () => lane.logLines.length === 5 && node.logLines.length === 5);
      assert.deepEqual(lane.logLines, node.logLines);
      assert.equal(lane.proxy.counters.laneHits, 3, 'the three plain requests took the lane; the last (Connection: close) went to node:http');
      assert.equal(node.proxy.counters.laneHits, 0);
      assert.equal(lane.proxy.counters.memHits, 4);
      assert.equal(origin.count('/obj'), 2, 'one fill per proxy');
    } finally {
      await lane.close();
      await node.close();
      await origin.close();
    }
  });

  it('hands a connection to node:http at the first request it does not read, pipelined bytes and all', async () => {
    const origin = await startOrigin({
      '/obj': { headers: { 'cache-control': 'max-age=600', etag: '"v1"' }, body: 'abcdefghij' },
      '/other': { headers: { 'cache-control': 'max-age=600' }, body: 'other' },
    });
    const p = await rig(origin, {}, new ManualClock());
    try {
      const url = `${origin.url}/obj`;
      // One write: a lane hit, a range (node:http from here on), a conditional, a miss, then close.
      const raw = await exchange(p.port, [req(url) + req(url, 'Range: bytes=2-4\r\n') + req(url, 'If-None-Match: "v1"\r\n') + req(`${origin.url}/other`) + lastReq(url)]);
      assert.deepEqual(answers(raw), [
        'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test',
        'HTTP/1.1 206 Partial Content', 'x-cache: HIT from cuttle-test', 'content-range: bytes 2-4/10',
        'HTTP/1.1 304 Not Modified', 'x-cache: HIT from cuttle-test',
        'HTTP/1.1 200 OK', 'x-cache: MISS from cuttle-test',
        'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test',
      ]);
      assert.match(raw, /\r\n\r\ncde/);
      assert.equal(p.proxy.counters.laneHits, 1);
      assert.equal(origin.count('/obj'), 1);
      assert.equal(origin.count('/other'), 1);
    } finally {
      await p.close();
      await origin.close();
    }
  });

  it('a request split across reads, and one the lane does not read (a body, a bare LF, obs-fold), get node:http answers', async () => {
    const origin = await startOrigin({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' } });
    const p = await rig(origin, {}, new ManualClock());
    try {
      const url = `${origin.url}/obj`;
      const first = req(url);
      // Half a request after a whole one: the lane answers the first, and node:http reads the rest.
      const split = await exchange(p.port, [first + lastReq(url).slice(0, 20), lastReq(url).slice(20)], async (got) => {
        await waitFor('the first answer', () => got().includes('abcdefghij'));
      });
      assert.deepEqual(answers(split).filter((l) => l.startsWith('HTTP')), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK']);
      assert.equal(p.proxy.counters.laneHits, 1);
      const withBody = await exchange(p.port, [`GET ${url} HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\n\r\nxyz` + lastReq(url)]);
      assert.deepEqual(answers(withBody).filter((l) => l.startsWith('HTTP')), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK']);
      for (const bad of [`GET ${url} HTTP/1.1\nHost: o\r\n\r\n`, `GET ${url} HTTP/1.1\r\nUser-Agent: a\r\n b\r\n\r\n`]) {
        assert.match(await exchange(p.port, [bad]), /^HTTP\/1\.1 400 Bad Request\r\n/);
      }
      // A target with characters outside RFC 3986 is node:http's to judge, and so is the rest of its connection.
      const odd = await exchange(p.port, [req(`${url}?q={x}`) + lastReq(url)]);
      assert.deepEqual(answers(odd).filter((l) => l.startsWith('HTTP')), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK']);
      assert.equal(p.proxy.counters.laneHits, 1);
      assert.equal(p.proxy.counters.requests, 7); // the fill, 2 + 2 + 2 answered here; a 400 for a malformed request is not a request
    } finally {
      await p.close();
      await origin.close();
    }
  });

  it('closes a connection whose client is done, and idle lane connections at shutdown', async () => {
    const origin = await startOrigin({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' } });
    const p = await rig(origin, {}, new ManualClock());
    const url = `${origin.url}/obj`;
    // Half-close after one request: the answer comes, then the proxy closes its side.
    const s = connect(p.port, '127.0.0.1');
    let got = '';
    s.setEncoding('latin1');
    s.on('data', (d: string) => (got += d));
    s.end(req(url));
    await once(s, 'close');
    assert.match(got, /^HTTP\/1\.1 200 OK\r\n[\s\S]*abcdefghij$/);
    // An idle keep-alive connection in the lane is closed by shutdown, not left to the idle timeout.
    const idle = connect(p.port, '127.0.0.1');
    let idleGot = '';
    idle.setEncoding('latin1');
    idle.on('data', (d: string) => (idleGot += d));
    idle.write(req(url));
    await waitFor('the idle connection is answered', () => idleGot.endsWith('abcdefghij'));
    const closed = once(idle, 'close');
    await p.close();
    await closed;
    assert.equal(p.proxy.counters.laneHits, 2);
    assert.equal(origin.count('/obj'), 1);
    await origin.close();
  });
});
