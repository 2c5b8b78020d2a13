// A content-addressed body continued with Range after it broke off: the resume's answer must be
// exactly the rest of the object. Whatever a mirror answers the Range with, no client is sent more
// (or other) bytes than the object's own as a complete response, and nothing wrong is stored.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { describe, it } from 'node:test';
import { casObject } from '../../src/content-hash.ts';
import { gate, startOrigin, type Gate, type Origin, type Route, type SeenRequest } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { healthy, REPO, waitFor } from '../helpers/mirrors.ts';

const MANIFEST = { headers: { 'cache-control': 'max-age=61' }, body: 'Ntest\n' };

function casObjectOf(size: number): { body: Buffer; path: string } {
  const body = randomBytes(size);
  const h = createHash('sha1').update(body).digest('hex');
  return { body, path: `/cvmfs/${REPO}/data/${h.slice(0, 2)}/${h.slice(2)}` };
}

/** Where a Range request starts (`bytes=N-`). */
const rangeStart = (req: SeenRequest) => Number(/^bytes=(\d+)-$/.exec(String(req.headers.range))![1]);

/** Mirrors that all run `route` for the object (so whichever is nearest, the others see the resumes). */
async function mirrorsWith(n: number, path: string, route: (req: SeenRequest) => Route): Promise<Origin[]> {
  return Promise.all(Array.from({ length: n }, () => startOrigin({ [`/cvmfs/${REPO}/.cvmfspublished`]: MANIFEST, [path]: route })));
}

/** A raw client: the head and body bytes it has received, and whether the proxy closed on it. */
function rawGet(port: number, url: string): { s: Socket; body: () => Buffer; head: () => string; closed: () => boolean } {
  const s = connect(port, '127.0.0.1');
  const parts: Buffer[] = [];
  let closed = false;
  s.on('data', (c: Buffer) => parts.push(c));
  s.on('error', () => {});
  s.on('close', () => (closed = true));
  s.write(`GET ${url} HTTP/1.1\r\nHost: x\r\n\r\n`);
  const split = () => {
    const raw = Buffer.concat(parts);
    const cut = raw.indexOf('\r\n\r\n');
    return cut < 0 ? { head: '', body: Buffer.alloc(0) } : { head: raw.subarray(0, cut).toString('latin1'), body: raw.subarray(cut + 4) };
  };
  return { s, body: () => split().body, head: () => split().head, closed: () => closed };
}

describe('resume: a Range answer that is not exactly the rest of the object', () => {
  const N = 100_000;
  const CUT = 40_000;
  // The mirror that answers the first Range sends wrong bytes past the object's end: the object's last
  // byte arrives while the rest waits behind a gate (so readers are caught up when it does).
  const cases: [string, (from: number, g: Gate) => Route][] = [
    [
      'a 206 whose Content-Length runs past the Content-Range it states',
      (from, g) => ({ status: 206, headers: { 'content-range': `bytes ${from}-${N - 1}/${N}` }, body: randomBytes(N - from + 11), bodyGate: { after: N - from + 1, gate: g } }),
    ],
    [
      'a chunked 206 (no length to hold its body to the rest), whose body runs past the object\'s end',
      (from, g) => ({ status: 206, chunked: true, headers: { 'content-range': `bytes ${from}-${N - 1}/${N}` }, body: randomBytes(N - from + 11), bodyGate: { after: N - from + 1, gate: g } }),
    ],
    [
      'a 206 of only part of the rest (Content-Range ends before the object does)',
      (from) => ({ status: 206, headers: { 'content-range': `bytes ${from}-${from + 99}/${N}` }, body: randomBytes(100) }),
    ],
  ];
  for (const [name, overlong] of cases) {
    it(`${name} is refused: no client gets the object's length of wrong bytes, the next mirror finishes it`, async () => {
      const obj = casObjectOf(N);
      const g = gate();
      let ranges = 0;
      // The first request breaks off at CUT; the first resume is overlong; the second is right.
      const route = (req: SeenRequest): Route => {
        if (!req.headers.range) return { headers: { 'cache-control': 'max-age=3600' }, body: obj.body, resetAfter: CUT };
        const from = rangeStart(req);
        if (++ranges === 1) return overlong(from, g);
        return { status: 206, headers: { 'content-range': `bytes ${from}-${N - 1}/${N}` }, body: obj.body.subarray(from) };
      };
      const mirrors = await mirrorsWith(3, obj.path, route);
      let p: TestProxy | undefined;
      const c = { s: undefined as Socket | undefined };
      try {
        p = await startProxy({ stratum1: mirrors.map((m) => m.url), 'probe-interval': '150ms', 'probe-repo': REPO });
        await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p!.proxy, m.url)));
        const r = rawGet(p.port, `${mirrors[0]!.url}${obj.path}`);
        c.s = r.s;
        await waitFor('the whole body or the close', () => r.closed() || r.body().length >= N);
        assert.match(r.head(), /content-length: 100000/i);
        assert.ok(r.body().subarray(0, N).equals(obj.body), `the client's ${r.body().length} body bytes are the object's, not another`);
        assert.equal(r.body().length, N, 'nothing past the object');
        const fetches = mirrors.reduce((n, m) => n + m.count(obj.path), 0);
        assert.equal(fetches, 3, 'the first request, the refused resume, the one that finished it');
        assert.equal(p.proxy.coalescer.stats.hashMismatches, 0);
        await p.proxy.coalescer.settle();
        const pool = proxyClient(p.url, 1);
        try {
          const hit = await get(pool, `${mirrors[1]!.url}${obj.path}`);
          assert.match(String(hit.headers['x-cache']), /^HIT/);
          assert.ok(hit.body.equals(obj.body), 'stored as the object');
        } finally {
          await pool.close();
        }
        assert.ok(await p.proxy.store.get(casObject(obj.path)!.key));
      } finally {
        g.open();
        c.s?.destroy();
        await p?.close();
        for (const m of mirrors) await m.close();
      }
    });
  }
});

describe('resume: a resume that breaks off too', () => {
  it('is continued from the next mirror: the client gets every byte, the object is stored', async () => {
    const N = 100_000;
    const obj = casObjectOf(N);
    let ranges = 0;
    // The first request breaks off at 30,000 bytes, the first resume 20,000 bytes later; the second
    // resume, from a third mirror, finishes it.
    const route = (req: SeenRequest): Route => {
      if (!req.headers.range) return { headers: { 'cache-control': 'max-age=3600' }, body: obj.body, resetAfter: 30_000 };
      const from = rangeStart(req);
      const rest: Route = { status: 206, headers: { 'content-range': `bytes ${from}-${N - 1}/${N}` }, body: obj.body.subarray(from) };
      return ++ranges === 1 ? { ...rest, resetAfter: 20_000 } : rest;
    };
    const mirrors = await mirrorsWith(3, obj.path, route);
    let p: TestProxy | undefined;
    const pool = { p: undefined as ReturnType<typeof proxyClient> | undefined };
    try {
      p = await startProxy({ stratum1: mirrors.map((m) => m.url), 'probe-interval': '150ms', 'probe-repo': REPO });
      await waitFor('mirrors healthy', () => mirrors.every((m) => healthy(p!.proxy, m.url)));
      pool.p = proxyClient(p.url, 1);
      const r = await get(pool.p, `${mirrors[0]!.url}${obj.path}`);
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(obj.body), 'exact bytes');
      assert.equal(p.proxy.coalescer.stats.resumes, 2);
      const asked = mirrors.map((m) => m.seen.filter((s) => s.path === obj.path).map((s) => s.headers.range ?? 'whole'));
      assert.deepEqual(asked.map((a) => a.length), [1, 1, 1], 'each mirror asked once');
      assert.equal(asked.flat().filter((a) => a.startsWith('bytes=')).length, 2, 'the whole, then the rest twice');
      await p.proxy.coalescer.settle();
      const hit = await get(pool.p, `${mirrors[2]!.url}${obj.path}`);
      assert.match(String(hit.headers['x-cache']), /^HIT/);
      assert.ok(hit.body.equals(obj.body));
    } finally {
      await pool.p?.close();
      await p?.close();
      for (const m of mirrors) await m.close();
    }
  });
});
