// Differential fuzz of the hit lane's connection semantics: random scripts of pipelined requests on one
// connection (plain hits of three sizes, HEAD, HTTP/1.0 with and without keep-alive, Connection and
// Proxy-Connection close and keep-alive, a range, a request directive, a miss, a conditional), written
// in one go or split at random byte offsets, optionally followed by the client's FIN (after the last
// write, or read in the same turn as 64 KiB of requests). Each script runs at once against two proxies
// over one origin, the lane on and off, and both must give the same bytes on the wire (Date lines
// normalised: each proxy and the origin write their own second; Age is not, the proxies share one
// ManualClock), the same connection fate (closed after which answer, or open), the same access-log
// fields per request (all but time and elapsed), and the same upstream fetches and request counters.
// A script stops at its first request that closes the connection. Bytes after it are not the lane's
// question: read with it, protocol-errors.test.ts covers them; read later, while earlier answers are
// still queued, node:http itself loses those answers (a bare node:http server does too).
//   npm test runs LANE_FUZZ_RUNS (default 25) scripts; LANE_FUZZ_RUNS=1000 for a longer run.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { execFileSync } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { ManualClock } from '../../src/clock.ts';
import { REQUEST_COUNTERS, type RequestCounter } from '../../src/counters.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

const RUNS = Number(process.env.LANE_FUZZ_RUNS ?? 25);

// Three stored sizes: two the lane answers from a built response (head and body in one buffer), and one
// past its bound (BUILT_MAX_BODY, 64 KiB), written as head and body.
const OBJECTS = {
  small: Buffer.from('abcdefghij'),
  mid: Buffer.alloc(5000, 'm'),
  big: Buffer.alloc(100 * 1024, 'b'),
};
type Obj = keyof typeof OBJECTS;
const STORED = { 'cache-control': 'max-age=600', 'content-type': 'application/x-cvmfs', etag: '"v1"' };

type Step =
  | { kind: 'hit' | 'head' | 'http10' | 'http10ka' | 'close' | 'pclose' | 'pka'; obj: Obj; cvmfs: boolean }
  | { kind: 'range'; obj: Obj; range: string }
  | { kind: 'cc'; obj: Obj; cc: string }
  | { kind: 'cond'; obj: Obj; cond: string }
  | { kind: 'miss' };

/** Requests after which node:http closes the connection: a script ends with the first of them. */
const CLOSES = new Set<Step['kind']>(['http10', 'close', 'pclose']);

/** Requests that node:http answers only once the origin has: a miss, a revalidation. */
const waitsUpstream = (s: Step) => s.kind === 'miss' || (s.kind === 'cc' && s.cc === 'no-cache');

const obj = fc.constantFrom<Obj>('small', 'mid', 'big');
const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constantFrom('hit' as const), obj, cvmfs: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constantFrom('head' as const, 'pka' as const, 'http10ka' as const), obj, cvmfs: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constantFrom('http10' as const, 'close' as const, 'pclose' as const), obj, cvmfs: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('range' as const), obj, range: fc.constantFrom('bytes=2-4', 'bytes=-3', 'bytes=0-', 'bytes=999999-') }) },
  // max-age=3600: a hit through node:http; no-cache: a revalidation (the origin answers 200 in full).
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('cc' as const), obj, cc: fc.constantFrom('max-age=3600', 'no-cache') }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('cond' as const), obj, cond: fc.constantFrom('If-None-Match: "v1"', 'If-None-Match: "v0"', 'If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT') }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('miss' as const) }) },
);
const script = fc.record({
  steps: fc.array(step, { minLength: 1, maxLength: 8 }),
  /** Where the bytes are split into writes (offsets modulo their length). */
  cuts: fc.array(fc.nat({ max: 100_000 }), { maxLength: 4 }),
  /** Then the client's FIN: none, after the last write, or read with all of the script in one turn. */
  fin: fc.constantFrom('none', 'after', 'oneTurn'),
});

const CVMFS = 'User-Agent: cvmfs Fuse 2.11.5\r\nPragma:\r\nConnection: Keep-Alive\r\n';

/** One request's bytes and method. `miss` names this script's own miss key. */
function render(s: Step, base: string, miss: string): { text: string; method: string } {
  if (s.kind === 'miss') return { text: `GET ${base}/miss?${miss} HTTP/1.1\r\nHost: origin\r\n\r\n`, method: 'GET' };
  const url = `${base}/${s.obj}`;
  const plain = (extra: string, method = 'GET', version = '1.1') => ({ text: `${method} ${url} HTTP/${version}\r\nHost: origin\r\n${extra}\r\n`, method });
  const fields = 'cvmfs' in s && s.cvmfs ? CVMFS : '';
  switch (s.kind) {
    case 'hit': return plain(fields);
    case 'head': return plain(fields, 'HEAD');
    case 'http10': return plain('', 'GET', '1.0');
    case 'http10ka': return plain('Connection: keep-alive\r\n', 'GET', '1.0');
    case 'close': return plain('Connection: close\r\n');
    case 'pclose': return plain('Proxy-Connection: close\r\n');
    case 'pka': return plain('Proxy-Connection: keep-alive\r\n');
    case 'range': return plain(`Range: ${s.range}\r\n`);
    case 'cc': return plain(`Cache-Control: ${s.cc}\r\n`);
    case 'cond': return plain(`${s.cond}\r\n`);
  }
}

interface Answer {
  status: number;
  /** Bytes of the whole answer, head and body. */
  bytes: number;
}

/**
 * The whole answers at the front of `raw`, read as a client reads them (`methods`: the requests in
 * order): Content-Length, chunked, or to the close (`closed`); no body for HEAD, 1xx, 204 and 304.
 */
function parseAnswers(raw: Buffer, methods: string[], closed: boolean): Answer[] {
  const out: Answer[] = [];
  let pos = 0;
  for (const method of methods) {
    const headEnd = raw.indexOf('\r\n\r\n', pos);
    if (headEnd < 0) break;
    const head = raw.toString('latin1', pos, headEnd);
    const status = Number(/^HTTP\/1\.[01] (\d{3}) /.exec(head)?.[1]);
    assert.ok(status >= 100, `not a status line: ${JSON.stringify(head.slice(0, 80))}`);
    let end = headEnd + 4;
    const len = /\r\ncontent-length: *(\d+)/i.exec(head);
    if (method === 'HEAD' || status < 200 || status === 204 || status === 304) {
      // no body
    } else if (/\r\ntransfer-encoding: *chunked/i.test(head)) {
      let ok = false;
      for (;;) {
        const line = raw.indexOf('\r\n', end);
        if (line < 0) break;
        const size = parseInt(raw.toString('latin1', end, line), 16);
        if (size === 0) {
          // The last chunk, then trailers (if any) up to an empty line.
          const t = raw.indexOf('\r\n\r\n', line);
          if (t >= 0) {
            end = t + 4;
            ok = true;
          }
          break;
        }
        end = line + 2 + size + 2;
        if (end > raw.length) break;
      }
      if (!ok) break;
    } else if (len) {
      end += Number(len[1]);
    } else if (closed) {
      end = raw.length;
    } else break;
    if (end > raw.length) break;
    out.push({ status, bytes: end - pos });
    pos = end;
  }
  return out;
}

interface Run {
  /** What the proxy sent, Date lines normalised. */
  raw: string;
  /** Whole answers before the proxy closed the connection, or 'open' when it answered the probe after all of them. */
  fate: number | 'open';
  log: string[];
  /** Upstream fetches, and the request counters (but the lane's own), over the script. */
  counts: Record<string, number>;
}

/** The counters both proxies must move alike: upstream fetches and the request counters but the lane's own. */
function counts(p: TestProxy): Record<string, number> {
  const out: Record<string, number> = { upstreamFetches: p.proxy.upstream.fetches };
  for (const k of Object.keys(REQUEST_COUNTERS) as RequestCounter[]) if (k !== 'laneHits' && k !== 'laneJoins') out[k] = p.proxy.counters[k];
  return out;
}
const minus = (a: Record<string, number>, b: Record<string, number>) => Object.fromEntries(Object.entries(a).map(([k, v]) => [k, v - (b[k] ?? 0)]));

const PROBE = (base: string) => `GET ${base}/small HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n`;
const sameDate = (raw: string) => raw.replace(/\r\ndate: [^\r]*/gi, '\r\nDate: -');
/** An access-log line without its time and elapsed fields. */
const logFields = (line: string) => line.trim().split(/ +/).slice(2).join(' ');

/** A client connection to one proxy: what it got, and waits on its reads and its close. */
class Client {
  readonly s: Socket;
  readonly #chunks: Buffer[] = [];
  closed = false;
  #wake = () => {};
  constructor(port: number) {
    this.s = connect(port, '127.0.0.1');
    this.s.on('data', (d: Buffer) => {
      this.#chunks.push(d);
      this.#wake();
    });
    this.s.on('error', () => {});
    this.s.on('close', () => {
      this.closed = true;
      this.#wake();
    });
  }
  got(): Buffer {
    return Buffer.concat(this.#chunks);
  }
  /** Wait for `cond`, checked at each read and at the close (bounded, as waitFor is). */
  until(what: string, cond: () => boolean): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`timed out waiting for ${what}: ${JSON.stringify(sameDate(this.got().toString('latin1')).slice(-400))}`)), 15_000);
      this.#wake = () => {
        if (!cond()) return;
        clearTimeout(t);
        this.#wake = () => {};
        resolve();
      };
      this.#wake();
    });
  }
}

/**
 * The connection's fate, what the proxy sent and logged. Once the proxy has sent every answer on a
 * connection that should stay open, a probe with Connection: close tells an open connection (the probe
 * is answered) from one that is closing.
 */
async function fateOf(c: Client, p: TestProxy, base: string, methods: string[], ends: boolean, logBefore: number, countsBefore: Record<string, number>): Promise<Run> {
  await c.until('every answer, or the close', () => c.closed || parseAnswers(c.got(), methods, false).length === methods.length);
  let fate: number | 'open';
  if (c.closed || ends) {
    // The last request asked to close, or the client is done: the proxy ends the connection once its
    // answers have left (a probe now would be data after a close, clientError's question).
    await c.until('the close', () => c.closed);
    fate = parseAnswers(c.got(), methods, true).length;
  } else {
    c.s.write(PROBE(base));
    await c.until('the probe answered and the close', () => c.closed);
    fate = parseAnswers(c.got(), [...methods, 'GET'], true).length === methods.length + 1 ? 'open' : parseAnswers(c.got(), methods, true).length;
  }
  const answered = parseAnswers(c.got(), fate === 'open' ? [...methods, 'GET'] : methods, true).length;
  await waitFor('every answer logged', () => p.logLines.length >= logBefore + answered);
  return { raw: sameDate(c.got().toString('latin1')), fate, log: p.logLines.slice(logBefore).map(logFields), counts: minus(counts(p), countsBefore) };
}

/** How the bytes go: writes at the cuts (then FIN, or not), or all of them and the FIN in one turn. */
type Send = { how: 'writes'; parts: Buffer[]; fin: boolean } | { how: 'oneTurn'; bytes: Buffer };

/** Run one script on a connection to each proxy at once. */
async function runBoth(proxies: TestProxy[], base: string, send: Send, methods: string[], closes: boolean): Promise<Run[]> {
  const before = proxies.map((p) => ({ log: p.logLines.length, counts: counts(p) }));
  const clients = proxies.map((p) => new Client(p.port));
  await Promise.all(clients.map((c) => once(c.s, 'connect')));
  if (send.how === 'oneTurn') endInOneTurn(clients.map((c) => c.s), send.bytes);
  else {
    await Promise.all(
      clients.map(async (c) => {
        for (const [i, part] of send.parts.entries()) {
          if (send.fin && i === send.parts.length - 1) c.s.end(part);
          else {
            // Written, then a whole turn of the loop (its poll phase between two check phases): the
            // proxy, in this process, reads the part before the next one is written.
            await new Promise<void>((r) => c.s.write(part, () => r()));
            for (let turn = 0; turn < 2; turn++) await new Promise<void>((r) => setImmediate(r));
          }
        }
      }),
    );
  }
  const ends = closes || send.how === 'oneTurn' || send.fin;
  return Promise.all(clients.map((c, i) => fateOf(c, proxies[i]!, base, methods, ends, before[i]!.log, before[i]!.counts)));
}

/**
 * Send `data` and then FIN on each socket so that its proxy reads both in one turn: a child process
 * writes and shuts down the sockets while this process (the proxies') is blocked in execFileSync.
 * (hit-lane.test.ts's endInOneTurn, for several sockets.)
 */
function endInOneTurn(socks: Socket[], data: Buffer): void {
  const fds = socks.map((s) => (s as unknown as { _handle: { fd: number } })._handle.fd);
  const child = "const net = require('node:net'); const d = Buffer.from(process.argv[1], 'latin1'); let left = process.argv.length - 2; for (const fd of process.argv.slice(2)) new net.Socket({ fd: Number(fd) }).end(d, () => --left || process.exit(0));";
  const stdio: ('ignore' | 'inherit' | number)[] = ['ignore', 'ignore', 'inherit', ...fds];
  execFileSync(process.execPath, ['-e', child, data.toString('latin1'), ...fds.map((_, i) => String(3 + i))], { stdio });
}

/**
 * Plain hits of /small, `n` bytes in all, each of at most 2 KiB: ahead of a script, they make it end
 * at a 64 KiB boundary, so that the proxy reads the FIN in the same turn as the script (a read that
 * fills node's 64 KiB buffer is followed by another at once; a shorter one ends the turn).
 */
function padding(base: string, n: number): string[] {
  const one = (size: number) => {
    const head = `GET ${base}/small HTTP/1.1\r\nHost: origin\r\nUser-Agent: \r\n\r\n`;
    return head.replace('User-Agent: ', `User-Agent: ${'x'.repeat(size - head.length)}`);
  };
  const out: string[] = [];
  while (n >= 2048) {
    out.push(one(1024));
    n -= 1024;
  }
  if (n > 0) out.push(one(n));
  return out;
}

describe('hit lane differential fuzz: the bytes on the wire and the connection fate node:http gives', () => {
  let origin: Origin;
  let lane: TestProxy;
  let node: TestProxy;
  let n = 0;
  const clock = new ManualClock();
  before(async () => {
    origin = await startOrigin({
      ...Object.fromEntries(Object.entries(OBJECTS).map(([name, body]) => [`/${name}`, { headers: STORED, body }])),
      '/miss': { headers: { 'cache-control': 'max-age=600' }, body: 'missed' },
    });
    const same = { 'max-memory-object-size': '4MB' };
    lane = await startProxy(same, { clock });
    node = await startProxy({ ...same, 'hit-lane': false }, { clock });
    // Both caches warmed alike: every object filled once, then a non-zero Age.
    for (const p of [lane, node]) {
      const pool = proxyClient(p.url, 1);
      for (const name of Object.keys(OBJECTS)) assert.equal((await get(pool, `${origin.url}/${name}`)).status, 200);
      await pool.close();
    }
    clock.advance(7000);
  });
  after(async () => {
    await lane?.close();
    await node?.close();
    await origin?.close();
  });

  it(`${RUNS} random scripts on one connection each, lane on and off`, async () => {
    await fc.assert(
      fc.asyncProperty(script, async ({ steps, cuts, fin: finAsked }) => {
        const id = n++;
        const closeAt = steps.findIndex((s) => CLOSES.has(s.kind));
        const run = closeAt >= 0 ? steps.slice(0, closeAt + 1) : steps;
        // node:http aborts the requests it has not answered when the client's FIN comes (its
        // httpAllowHalfOpen is false) and ends the connection: a miss or a revalidation then gets no
        // answer, or one, as the FIN and the origin's answer race. The lane hands those requests to
        // node:http, so it races alike; the fuzz sends no FIN after them (not the lane's question).
        const fin = run.some(waitsUpstream) ? 'none' : finAsked;
        const reqs = run.map((s, i) => render(s, origin.url, `${id}-${i}`));
        let texts = reqs.map((r) => r.text);
        let methods = reqs.map((r) => r.method);
        let send: Send;
        if (fin === 'oneTurn') {
          const pad = padding(origin.url, 64 * 1024 - texts.join('').length);
          texts = [...pad, ...texts];
          methods = [...pad.map(() => 'GET'), ...methods];
          send = { how: 'oneTurn', bytes: Buffer.from(texts.join(''), 'latin1') };
          assert.equal(send.bytes.length, 64 * 1024);
        } else {
          const bytes = Buffer.from(texts.join(''), 'latin1');
          const at = [...new Set(cuts.map((c) => c % bytes.length))].filter((c) => c > 0 && c < bytes.length).sort((a, b) => a - b);
          send = { how: 'writes', parts: [0, ...at].map((from, i) => bytes.subarray(from, at[i] ?? bytes.length)), fin: fin === 'after' };
        }
        const [viaLane, viaNode] = await runBoth([lane, node], origin.url, send, methods, closeAt >= 0);
        assert.equal(viaNode!.fate, closeAt >= 0 || fin !== 'none' ? methods.length : 'open', 'node:http, the reference, behaves as the script expects');
        assert.equal(viaLane!.raw, viaNode!.raw, 'the same bytes on the wire');
        assert.equal(viaLane!.fate, viaNode!.fate, 'the same connection fate');
        assert.deepEqual(viaLane!.log, viaNode!.log, 'the same access-log fields per request');
        assert.deepEqual(viaLane!.counts, viaNode!.counts, 'the same upstream fetches and request counts');
      }),
      { numRuns: RUNS, seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined },
    );
    assert.ok(lane.proxy.counters.laneHits > 0, 'the lane answered some of them');
    assert.equal(node.proxy.counters.laneHits, 0);
  });
});
