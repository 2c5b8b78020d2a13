// The hit lane (src/hit-lane.ts) answers plain memory hits without node:http, and hands a connection to
// node:http at the first request it does not fully understand. These tests hold it to node:http's own
// answers: the same bytes on the wire, the same access log line, the same framing on a shared
// connection, a clean hand-over with pipelined and split requests, and a differential fuzz against
// node's own parser. lane-fuzz.test.ts fuzzes whole connections against node:http.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { execFileSync } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { parsePlain } from '../../src/hit-lane.ts';
import { ManualClock } from '../../src/clock.ts';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { assertNoInternalErrors, get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
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

/** An origin with `routes` and a proxy that has filled /obj, for the length of `body`. */
async function withRig(routes: Parameters<typeof startOrigin>[0], body: (origin: Origin, p: TestProxy) => Promise<void>): Promise<void> {
  const origin = await startOrigin(routes);
  const p = await rig(origin, {}, new ManualClock());
  try {
    await body(origin, p);
  } finally {
    await p.close();
    await origin.close();
  }
}

async function rig(origin: Origin, overrides: Record<string, unknown>, clock: ManualClock): Promise<TestProxy> {
  const p = await startProxy(overrides, { clock });
  const pool = proxyClient(p.url, 1);
  assert.equal((await get(pool, `${origin.url}/obj`)).status, 200); // the fill: the object is now in memory
  await pool.close();
  return p;
}

const RUNS = Number(process.env.FUZZ_RUNS ?? 40) * 10;

/** What node:http's parser (cuttle's settings) makes of one raw request head, or 'rejected'. */
async function nodeReads(port: number, head: string, seen: { last?: { method: string; url: string; headers: IncomingHttpHeaders } }): Promise<'rejected' | { method: string; url: string; headers: IncomingHttpHeaders }> {
  seen.last = undefined;
  const s = connect(port, '127.0.0.1');
  let got = '';
  s.setEncoding('latin1');
  s.on('data', (d: string) => (got += d));
  s.on('error', () => {});
  s.end(`${head}\r\n\r\n`, 'latin1');
  await once(s, 'close');
  return got.startsWith('HTTP/1.1 204') && seen.last ? seen.last : 'rejected';
}

// Pieces of request heads, tricky ones included: other methods and versions, odd whitespace, bytes
// outside visible ASCII, bare LF, obs-fold, duplicate and unknown fields.
const odd = ['\t', ' ', '\x00', '\x7f', '\x80', '\xff', '\n', '\r', '"', '{', '}', '<', '>', '\\', '^', '`', '|', '#', '%', '%zz', ':', ';', ','];
const textChar = fc.oneof(fc.constantFrom(...'abcXYZ019-._~/?=&@!$()*+'.split('')), fc.constantFrom(...odd));
const text = fc.string({ unit: textChar, maxLength: 12 });
const fieldName = fc.oneof(fc.constantFrom('Host', 'User-Agent', 'Accept', 'Connection', 'Proxy-Connection', 'Pragma', 'cvmfs-info', 'X-Frontier-Id', 'Content-Length', 'Transfer-Encoding', 'X-Other', 'Host ', ' Host', 'Ho\tst', ''), text);
const fieldValue = fc.oneof(fc.constantFrom('keep-alive', 'Keep-Alive', 'close', '', ' ', '0', '1', 'chunked'), text);
const requestHead = fc
  .record({
    method: fc.constantFrom('GET', 'HEAD', 'get', 'POST', 'GET ', 'OPTIONS'),
    target: fc.oneof(text.map((t) => `http://origin.example/${t}`), fc.constantFrom('/x', 'http://origin.example', 'HTTP://origin.example/x', 'http://[::1]:8000/x', '*')),
    version: fc.constantFrom('HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0', 'http/1.1', 'HTTP/1.1 ', 'HTTP/2.0'),
    fields: fc.array(fc.tuple(fieldName, fc.constantFrom(':', ': ', ':\t', ' :'), fieldValue, fc.constantFrom('\r\n', '\r\n', '\r\n', '\n', '\r\n ')), { maxLength: 5 }),
  })
  .map(({ method, target, version, fields }) => `${method} ${target} ${version}\r\n${fields.map(([n, c, v, eol]) => `${n}${c}${v}${eol}`).join('')}`.replace(/(\r\n|\n| )+$/, ''))
  .filter((h) => !h.includes('\r\n\r\n'));
// Heads close to a plain request, so that many are read by the lane and compared.
const plainChar = fc.oneof({ weight: 9, arbitrary: fc.constantFrom(...'abcXYZ019-._~/?=&@!$()*+,;:% \t'.split('')) }, { weight: 1, arbitrary: fc.constantFrom(...odd) });
const plainText = fc.string({ unit: plainChar, maxLength: 16 });
const nearPlainHead = fc
  .record({
    method: fc.constantFrom('GET', 'HEAD'),
    path: plainText,
    fields: fc.uniqueArray(fc.tuple(fc.constantFrom('Host', 'host', 'USER-AGENT', 'Accept', 'Connection', 'Proxy-Connection', 'Pragma', 'cvmfs-info', 'X-Frontier-Id', 'x-cvmfs-pid', 'Referer'), fc.constantFrom(':', ': ', ':\t', ':  '), fc.oneof(plainText, fc.constantFrom('keep-alive', 'Keep-Alive', ''))), { maxLength: 5, selector: ([n]) => n.toLowerCase() }),
  })
  .map(({ method, path, fields }) => `${method} http://origin.example/${path} HTTP/1.1\r\n${fields.map(([n, c, v]) => `${n}${c}${v}\r\n`).join('')}`.replace(/\r\n$/, ''))
  .filter((h) => !h.includes('\r\n\r\n'));

describe('hit lane', () => {
  it('reads only what node:http reads, and reads it the same way (differential fuzz against node\'s parser)', async () => {
    const seen: { last?: { method: string; url: string; headers: IncomingHttpHeaders } } = {};
    const srv = createServer({ requireHostHeader: false }, (req, res) => {
      seen.last = { method: req.method!, url: req.url!, headers: req.headers };
      res.writeHead(204, { connection: 'close' }).end();
    });
    srv.listen(0, '127.0.0.1');
    await once(srv, 'listening');
    const port = (srv.address() as AddressInfo).port;
    let accepted = 0;
    try {
      await fc.assert(
        fc.asyncProperty(fc.oneof(requestHead, nearPlainHead), async (head) => {
          const lane = parsePlain(head);
          if (!lane) return; // node:http's to judge
          accepted++;
          const node = await nodeReads(port, head, seen);
          if (node === 'rejected') assert.fail(`node:http rejects a request the lane would answer: ${JSON.stringify(head)}`);
          assert.deepEqual({ method: lane.method, url: lane.target, headers: { ...lane.headers } }, { method: node.method, url: node.url, headers: { ...node.headers } });
        }),
        { numRuns: RUNS },
      );
      // The plain request every CVMFS client sends is read, as are a share of the generated ones.
      assert.ok(parsePlain(`GET http://s1.example:8000/cvmfs/a.cern.ch/data/00/ab HTTP/1.1\r\n${CVMFS_HEADERS.slice(0, -2)}`));
      assert.ok(accepted > 0, 'some generated heads are plain ones');
    } finally {
      srv.close();
    }
  });

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
      // Each proxy filled from the origin at its own moment: the origin's Date may differ by a second.
      assert.equal(sameDate(viaLane), sameDate(viaNode));
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
    const routes = {
      '/obj': { headers: { 'cache-control': 'max-age=600', etag: '"v1"' }, body: 'abcdefghij' },
      '/other': { headers: { 'cache-control': 'max-age=600' }, body: 'other' },
    };
    await withRig(routes, async (origin, p) => {
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
    });
  });

  it('a request split across reads, and one the lane does not read (a body, a bare LF, obs-fold), get node:http answers', async () => {
    await withRig({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' } }, async (origin, p) => {
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
      assert.equal(p.proxy.counters.requests, 9); // the fill, 2 + 2 + 2 answered here, and the two 400s (logged NONE/400, as Squid logs them)
    });
  });

  it('a client that pipelines more than it reads gets the rest of its answers from node:http, in order', async () => {
    const body = Buffer.alloc(10_000, 5);
    await withRig({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body } }, async (origin, p) => {
      const url = `${origin.url}/obj`;
      const n = 100; // 1 MB of answers to one 10 KB write
      const raw = await exchange(p.port, [req(url).repeat(n - 1) + lastReq(url)]);
      const heads = answers(raw).filter((l) => l.startsWith('HTTP'));
      assert.equal(heads.length, n);
      assert.ok(heads.every((h) => h === 'HTTP/1.1 200 OK'));
      // Every answer whole: its head, then exactly its 10,000 body bytes.
      const parts = raw.split('HTTP/1.1 200 OK\r\n').slice(1);
      assert.equal(parts.length, n);
      for (const part of parts) assert.equal(part.length - part.indexOf('\r\n\r\n') - 4, body.length);
      // 256 KiB of answers queued (about 26), then node:http answered the rest.
      assert.ok(p.proxy.counters.laneHits >= 1 && p.proxy.counters.laneHits <= 27, `lane hits: ${p.proxy.counters.laneHits}`);
      assert.equal(p.proxy.counters.memHits, n);
      assert.equal(origin.count('/obj'), 1);
    });
  });

  it('answers connections that ask together once each and logs each once, and clients that reset meanwhile do no harm', async () => {
    await withRig({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' } }, async (origin, p) => {
      const url = `${origin.url}/obj`;
      const n = 40;
      const socks = await Promise.all(
        Array.from({ length: n }, async () => {
          const s = connect(p.port, '127.0.0.1');
          s.on('error', () => {});
          await once(s, 'connect');
          return s;
        }),
      );
      const got = socks.map(() => '');
      socks.forEach((s, i) => s.on('data', (d: Buffer) => (got[i] += d.toString('latin1'))));
      const quits = (i: number) => i % 4 === 3; // every fourth resets before its second answer
      const answeredTimes = (k: number) => got.every((g, i) => (k > 1 && quits(i)) || g.split('abcdefghij').length - 1 === k);
      // A first request each, so every connection is accepted and in the lane.
      for (const s of socks) s.write(req(url));
      await waitFor('every connection answered once', () => answeredTimes(1));
      // Then all ask in one go: the proxy reads many in one turn, so their answers are held and leave
      // together. Every fourth resets at once, so some answers may find their connection gone.
      for (const s of socks) s.write(req(url));
      const quitters = socks.filter((_, i) => quits(i));
      const stayers = socks.filter((_, i) => !quits(i));
      for (const s of quitters) s.resetAndDestroy();
      await waitFor('every staying connection answered twice', () => answeredTimes(2));
      for (const [i, g] of got.entries()) if (!quits(i)) assert.deepEqual(answers(g), ['HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test']);
      // One log line per request the proxy read: a hit, or a hit its client cut short.
      await waitFor('the answers logged', () => p.logLines.length === p.proxy.counters.requests);
      const answered = p.logLines.slice(1);
      assert.ok(answered.length >= n + stayers.length && answered.length <= 2 * n, `${answered.length} lines`);
      assert.ok(answered.every((l) => / TCP_MEM_HIT(_ABORTED)?\/200 /.test(l)), answered.join('\n'));
      assert.ok(answered.filter((l) => !l.includes('_ABORTED')).length >= n + stayers.length);
      assert.equal(p.proxy.counters.laneHits, answered.length);
      for (const s of stayers) s.destroy();
      // The proxy still answers.
      assert.match(await exchange(p.port, [lastReq(url)]), /^HTTP\/1\.1 200 OK\r\n[\s\S]*abcdefghij$/);
      assert.equal(origin.count('/obj'), 1);
    });
  });

  it('a connection reset before the proxy took it is dropped unlogged, not denied as an unknown client', async () => {
    await withRig({ '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' } }, async (origin, p) => {
      const url = `${origin.url}/obj`;
      // Each connects, asks and resets at once: most are gone (no peer address) before the proxy accepts them.
      const socks = Array.from({ length: 20 }, () => {
        const s = connect(p.port, '127.0.0.1');
        s.on('error', () => {});
        s.once('connect', () => {
          s.write(req(url));
          s.resetAndDestroy();
        });
        return s;
      });
      await Promise.all(socks.map((s) => once(s, 'close')));
      await waitFor('the proxy has closed them all', () => p.proxy.clientConnections() === 0);
      assert.match(await exchange(p.port, [lastReq(url)]), /^HTTP\/1\.1 200 OK\r\n/);
      await waitFor('the last request logged', () => p.logLines.length === p.proxy.counters.requests);
      const lines = p.logLines.slice(1);
      assert.ok(lines.every((l) => / TCP_MEM_HIT(_ABORTED)?\/200 /.test(l)), lines.join('\n'));
      assert.equal(origin.count('/obj'), 1);
    });
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

/**
 * Send `data` and then FIN on `s` so that the proxy reads both in one turn: a child process writes and
 * shuts down the socket while this process (the proxy's) is blocked in execFileSync, so both are in
 * the kernel's buffer before the proxy reads. (s.end(data) sends the FIN a loop turn later.)
 */
function endInOneTurn(s: Socket, data: string): void {
  const fd = (s as unknown as { _handle: { fd: number } })._handle.fd;
  const child = "const s = new (require('node:net').Socket)({ fd: 0 }); s.end(Buffer.from(process.argv[1], 'latin1'), () => process.exit(0));";
  execFileSync(process.execPath, ['-e', child, data], { stdio: [fd, 'ignore', 'inherit'] });
}

describe('hit lane connection semantics, as node:http has them', () => {
  /** Both proxies (lane and node:http) with /obj (10 bytes) and /big (3 MiB) in memory. */
  async function twoRigs(body: (origin: Origin, lane: TestProxy, node: TestProxy) => Promise<void>): Promise<void> {
    const origin = await startOrigin({
      '/obj': { headers: { 'cache-control': 'max-age=600' }, body: 'abcdefghij' },
      '/big': { headers: { 'cache-control': 'max-age=600' }, body: BIG },
    });
    const clock = new ManualClock();
    const lane = await rig(origin, { 'max-memory-object-size': '4MB' }, clock);
    const node = await rig(origin, { 'max-memory-object-size': '4MB', 'hit-lane': false }, clock);
    try {
      for (const p of [lane, node]) assert.equal((await exchange(p.port, [lastReq(`${origin.url}/big`)])).length > BIG.length, true);
      await body(origin, lane, node);
    } finally {
      await lane.close();
      await node.close();
      await origin.close();
    }
  }
  const BIG = Buffer.alloc(3 * 2 ** 20, 9);

  it('a client that half-closes in the same write as its pipelined requests gets every answer in full, none logged aborted', async () => {
    await twoRigs(async (origin, lane, node) => {
      const url = `${origin.url}/obj`;
      // 63 small hits and a 3 MiB one, then FIN, in one turn. The requests fill exactly the 64 KiB
      // node reads at a time, so libuv reads again at once and finds the FIN in the same turn, before
      // the answers have left (a shorter read ends the turn, and the FIN comes in the next one).
      const plain = (u: string) => {
        const head = `GET ${u} HTTP/1.1\r\nHost: origin\r\nUser-Agent: \r\n\r\n`;
        return head.replace('User-Agent: ', `User-Agent: ${'x'.repeat(1024 - head.length)}`);
      };
      assert.equal(plain(url).length, 1024);
      const script = plain(url).repeat(63) + plain(`${origin.url}/big`);
      assert.equal(script.length, 64 * 1024);
      const got: string[] = [];
      for (const p of [lane, node]) {
        const before = p.logLines.length;
        const s = connect(p.port, '127.0.0.1');
        const chunks: Buffer[] = [];
        s.on('data', (d: Buffer) => chunks.push(d));
        await once(s, 'connect');
        endInOneTurn(s, script);
        await once(s, 'close');
        const raw = Buffer.concat(chunks).toString('latin1');
        got.push(sameDate(raw));
        const heads = answers(raw).filter((l) => l.startsWith('HTTP'));
        assert.equal(heads.length, 64, p === lane ? 'lane' : 'node');
        const last = raw.slice(raw.lastIndexOf('HTTP/1.1 200 OK'));
        assert.equal(last.length - last.indexOf('\r\n\r\n') - 4, BIG.length, 'the 3 MiB answer whole');
        await waitFor('every request logged', () => p.logLines.length === before + 64);
        const lines = p.logLines.slice(before);
        assert.ok(lines.every((l) => / TCP_MEM_HIT\/200 /.test(l)), lines.join('\n'));
      }
      assert.equal(got[0], got[1], 'the same bytes as node:http');
      assert.equal(lane.proxy.counters.laneHits, 64);
      assert.equal(origin.count('/big'), 2, 'one fill per proxy');
    });
  });

  it('Proxy-Connection: close ends the connection after its answer, as node:http ends it', async () => {
    await twoRigs(async (origin, lane, node) => {
      const url = `${origin.url}/obj`;
      // A hit and a hit that asks to close in one write; once both are answered, one more request.
      // node:http has closed the connection by then: the last request gets no answer.
      const script = req(url) + `GET ${url} HTTP/1.1\r\nHost: origin\r\nProxy-Connection: close\r\n\r\n`;
      const got: string[] = [];
      for (const p of [lane, node]) {
        const s = connect(p.port, '127.0.0.1');
        let raw = '';
        s.setEncoding('latin1');
        s.on('data', (d: string) => (raw += d));
        s.on('error', () => {}); // the last write may meet a closed connection
        const ended = once(s, 'end');
        s.write(script);
        await waitFor('two answers', () => raw.split('abcdefghij').length === 3);
        s.write(lastReq(url)); // answered only on a connection left open
        await ended;
        s.destroy();
        assert.deepEqual(answers(raw).filter((l) => l.startsWith('HTTP')), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK'], raw);
        assert.match(raw.slice(raw.indexOf('HTTP/1.1 200 OK', 1)), /\r\nConnection: close\r\n/);
        assert.ok(raw.endsWith('abcdefghij'));
        got.push(sameDate(raw));
      }
      assert.equal(got[0], got[1]);
      assert.equal(lane.proxy.counters.laneHits, 1, 'the close request went to node:http');
      assert.equal(origin.count('/obj'), 2, 'one fill per proxy');
    });
  });
});

/** A raw connection to the proxy that collects what it gets. */
function client(port: number): { s: ReturnType<typeof connect>; got: () => string; closed: Promise<unknown> } {
  const s = connect(port, '127.0.0.1');
  let got = '';
  s.setEncoding('latin1');
  s.on('data', (d: string) => (got += d));
  s.on('error', () => {});
  return { s, got: () => got, closed: once(s, 'close') };
}

/** Clients attached to `url`'s fill in flight (its starter included). */
const attached = (p: TestProxy) => p.proxy.coalescer.topFills(1, 0)[0]?.readers ?? 0;
/** Date lines (the origin's and the proxies') may fall in different seconds between two runs. */
const sameDate = (raw: string) => raw.replace(/\r\ndate: [^\r]*/gi, '\r\nDate: -');

/**
 * The starter's request goes to node:http (a miss); `joiners` connections then ask while the fill waits
 * at `g`, each sending `first` and, once answered, `then`. Resolves with what each joiner got.
 */
async function herdOnHeldFill(p: TestProxy, url: string, g: Gate, joiners: number, first: string, then: string, opened: () => void = () => g.open()): Promise<{ starter: string; joined: string[] }> {
  const starter = client(p.port);
  starter.s.write(lastReq(url));
  await waitFor('the starter attached', () => attached(p) === 1);
  const js = Array.from({ length: joiners }, () => client(p.port));
  for (const j of js) j.s.write(first);
  await waitFor('the joiners attached', () => attached(p) === 1 + joiners);
  opened();
  await Promise.all(
    js.map(async (j) => {
      await waitFor('the first answer', () => /\r\n\r\n/.test(j.got()) && answerComplete(j.got()));
      j.s.write(then);
      await j.closed;
    }),
  );
  await starter.closed;
  return { starter: starter.got(), joined: js.map((j) => j.got()) };
}

/** A whole first answer: its head, and the Content-Length's bytes or a last chunk. */
function answerComplete(raw: string): boolean {
  const head = raw.indexOf('\r\n\r\n');
  if (head < 0) return false;
  const len = /\r\ncontent-length: (\d+)\r\n/i.exec(raw.slice(0, head));
  if (len) return raw.length - head - 4 >= Number(len[1]);
  return raw.includes('\r\n0\r\n\r\n', head);
}

describe('hit lane joins', () => {
  const HEADERS = { 'cache-control': 'max-age=600', 'content-type': 'application/x-cvmfs', etag: '"j1"' };

  it('answers a plain GET that joins a fill in flight with the bytes and log lines node:http gives, from one fetch', async () => {
    const body = Buffer.alloc(30_000, 7);
    const origin = await startOrigin({ '/hot': { headers: HEADERS, body: 'hot' } });
    const clock = new ManualClock();
    const lane = await startProxy({}, { clock });
    const node = await startProxy({ 'hit-lane': false }, { clock });
    try {
      const url = `${origin.url}/obj`;
      const hot = `${origin.url}/hot`;
      const got: Record<string, { starter: string; joined: string[] }> = {};
      for (const [name, p] of [['lane', lane], ['node', node]] as const) {
        await exchange(p.port, [lastReq(hot)]); // /hot is a memory hit from now on
        const g = gate();
        origin.route('/obj', { headers: HEADERS, body, gate: g });
        // A join, then (pipelined) a memory hit; once both are answered, a last request node:http reads.
        got[name] = await herdOnHeldFill(p, url, g, 3, req(url) + req(hot), lastReq(hot));
      }
      for (const [i, raw] of got.lane!.joined.entries()) {
        assert.equal(sameDate(raw), sameDate(got.node!.joined[i]!));
        assert.deepEqual(answers(raw), ['HTTP/1.1 200 OK', 'x-cache: MISS from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test', 'HTTP/1.1 200 OK', 'x-cache: HIT from cuttle-test']);
        assert.ok(raw.includes(`\r\n\r\n${body.toString('latin1')}HTTP/1.1 200 OK`));
      }
      assert.equal(lane.proxy.counters.laneJoins, 3);
      assert.equal(node.proxy.counters.laneJoins, 0);
      assert.equal(lane.proxy.counters.coalesced, 3);
      assert.equal(node.proxy.counters.coalesced, 3);
      assert.equal(origin.count('/obj'), 2, 'one fill per proxy');
      await waitFor('every request logged', () => lane.logLines.length === lane.proxy.counters.requests && node.logLines.length === node.proxy.counters.requests);
      assert.deepEqual([...lane.logLines].sort(), [...node.logLines].sort());
      assert.equal(lane.logLines.filter((l) => / TCP_CF_MISS\/200 /.test(l)).length, 3);
    } finally {
      await lane.close();
      await node.close();
      await origin.close();
    }
  });

  it('a joined fill without Content-Length is sent chunked, as node:http sends it', async () => {
    const origin = await startOrigin({});
    const clock = new ManualClock();
    const lane = await startProxy({}, { clock });
    const node = await startProxy({ 'hit-lane': false }, { clock });
    try {
      const url = `${origin.url}/obj`;
      const bodies: string[] = [];
      for (const p of [lane, node]) {
        const g = gate();
        origin.route('/obj', { headers: HEADERS, body: 'one chunk of a chunked body', chunked: true, gate: g });
        const { joined } = await herdOnHeldFill(p, url, g, 2, req(url), lastReq(url));
        bodies.push(...joined.map(sameDate));
      }
      assert.match(bodies[0]!, /\r\nTransfer-Encoding: chunked\r\n\r\n1b\r\none chunk of a chunked body\r\n0\r\n\r\nHTTP\/1\.1 200 OK/);
      assert.deepEqual(bodies.slice(0, 2), bodies.slice(2));
      assert.equal(lane.proxy.counters.laneJoins, 2);
      assert.equal(origin.count('/obj'), 2);
    } finally {
      await lane.close();
      await node.close();
      await origin.close();
    }
  });

  it('a join whose fill fails before its head gets the error node:http gives, and no fetch of its own', async () => {
    // An upstream that holds each connection and, once the test says so, resets it (and any later
    // one, a retry) without answering.
    let connections = 0;
    let resetting = false;
    let held: ReturnType<typeof connect>[] = [];
    const dead = (await import('node:net')).createServer((s) => {
      connections++;
      s.on('error', () => {});
      if (resetting) s.resetAndDestroy();
      else held.push(s);
    });
    dead.listen(0, '127.0.0.1');
    await once(dead, 'listening');
    const url = `http://127.0.0.1:${(dead.address() as AddressInfo).port}/obj`;
    const clock = new ManualClock();
    const lane = await startProxy({}, { clock });
    const node = await startProxy({ 'hit-lane': false }, { clock });
    try {
      const got: string[][] = [];
      const fetches: number[] = [];
      for (const p of [lane, node]) {
        connections = 0;
        resetting = false;
        const reset = () => {
          resetting = true;
          for (const s of held) s.resetAndDestroy();
          held = [];
        };
        const { joined } = await herdOnHeldFill(p, url, gate(), 2, req(url), lastReq(url), reset);
        got.push(joined.map(sameDate));
        fetches.push(connections);
      }
      assert.deepEqual(got[0], got[1]);
      assert.match(got[0]![0]!, /^HTTP\/1\.1 502 Bad Gateway\r\n[\s\S]*Proxy-Status: cuttle; error=/i);
      assert.equal(fetches[0], fetches[1], 'the joins fetched nothing of their own');
      assert.equal(lane.proxy.counters.laneJoins, 2);
    } finally {
      await lane.close();
      await node.close();
      dead.close();
    }
  });

  it('a joined response that is not shared sends the join to node:http, which fetches it alone as it would have', async () => {
    const origin = await startOrigin({});
    const lane = await startProxy({}, { clock: new ManualClock() });
    try {
      const url = `${origin.url}/private`;
      const g = gate();
      origin.route('/private', { headers: { 'cache-control': 'private' }, body: 'for one client', gate: g });
      const { starter, joined } = await herdOnHeldFill(lane, url, g, 2, req(url), lastReq(url));
      assert.match(starter, /\r\n\r\nfor one client$/);
      for (const raw of joined) assert.deepEqual(answers(raw).filter((l) => l.startsWith('HTTP')), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK']);
      assert.equal(origin.count('/private'), 1 + 2 + 2, 'the starter, then each joiner twice on its own (its first request handed over)');
      assert.equal(lane.proxy.counters.laneJoins, 0, 'handed over, not answered in the lane');
      await waitFor('every request logged', () => lane.logLines.length === lane.proxy.counters.requests);
      assert.equal(lane.proxy.counters.requests, 5, 'a handed-over join is logged once, by node:http');
    } finally {
      await lane.close();
      await origin.close();
    }
  });

  it('shutdown lets a join in progress finish, as it lets node:http finish its responses, and serves new connections meanwhile', async () => {
    const origin = await startOrigin({});
    const p = await startProxy({}, { clock: new ManualClock() });
    try {
      const url = `${origin.url}/obj`;
      const g = gate();
      origin.route('/obj', { headers: HEADERS, body: 'landed', gate: g });
      const starter = client(p.port);
      starter.s.write(req(url));
      await waitFor('the starter attached', () => attached(p) === 1);
      const j = client(p.port);
      j.s.write(req(url));
      await waitFor('the joiner attached', () => attached(p) === 2);
      let closed = false;
      const closing = p.proxy.close(60_000).then(() => (closed = true));
      // Draining (drain.ts): while the join waits, a new connection is still served, and closed after its answer.
      const late = client(p.port);
      late.s.write(lastReq(`${origin.url}/other`));
      await late.closed;
      assert.match(late.got(), /^HTTP\/1\.1 /);
      assert.equal(closed, false, 'shutdown waits for the join');
      assert.equal(j.s.destroyed, false);
      g.open();
      await closing;
      assert.match(j.got(), /^HTTP\/1\.1 200 OK\r\n[\s\S]*\r\n\r\nlanded$/);
      assert.equal(p.proxy.counters.laneJoins, 1);
      assert.equal(origin.count('/obj'), 1);
      assert.equal(origin.count('/other'), 1);
    } finally {
      await p.proxy.close(1000);
      assertNoInternalErrors(p.logs);
      await origin.close();
    }
  });
});
