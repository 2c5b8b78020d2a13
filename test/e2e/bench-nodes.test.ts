// The herd's load generator (bench/nodes.ts) run as herd.ts runs it, a child process given a JSON plan,
// against a scripted "proxy" on raw sockets: each answer is exact bytes, written in pieces, so the
// generator's own HTTP/1.1 client meets Content-Length, chunked bodies (extensions, trailers, hex in
// either case), Connection: close, an HTTP/1.0 body ending with the connection, a labelled 503, answers
// cut short after some bytes or before any, and a wrong body. The report's counts are asserted, and the
// server's own counts (requests, connections per node address, request headers) say what the client did.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { sourceAddress, type NodesPlan, type NodesReport } from '../../bench/nodes.ts';
import { shardKey, ShardRing } from '../../src/shard-ring.ts';

const ORIGIN = 'http://stratum1.test:8000';
const REPO = '/cvmfs/t.cern.ch';

interface Seen {
  node: number;
  path: string;
  attempt: number;
  headers: Record<string, string>;
}

/** What the scripted server does for one request: write these pieces (a turn of the loop between), then
 * keep the connection or end it (FIN after the bytes: a reset could discard them unread). */
interface Answer {
  pieces: (Buffer | string)[];
  then?: 'keep' | 'end';
}

interface Scripted {
  server: Server;
  url: string;
  seen: Seen[];
  connections: Map<string, number>;
  close(): Promise<void>;
}

async function scriptedProxy(script: (s: Seen) => Answer): Promise<Scripted> {
  const seen: Seen[] = [];
  const connections = new Map<string, number>();
  const attempts = new Map<string, number>();
  const sockets = new Set<Socket>();
  const server = createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => {});
    const from = sock.remoteAddress!.replace(/^::ffff:/, '');
    connections.set(from, (connections.get(from) ?? 0) + 1);
    let buf = '';
    let busy = false;
    const serve = async (): Promise<void> => {
      const at = buf.indexOf('\r\n\r\n');
      if (busy || at < 0) return;
      busy = true;
      const [line, ...fields] = buf.slice(0, at).split('\r\n');
      buf = buf.slice(at + 4);
      const target = line!.split(' ')[1]!;
      const headers: Record<string, string> = {};
      for (const f of fields) headers[f.slice(0, f.indexOf(':')).toLowerCase()] = f.slice(f.indexOf(':') + 1).trim();
      if (target === '/_stats') {
        sock.end('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{"firstComplete":{}}');
        return;
      }
      const url = new URL(target);
      const node = nodeOf(from);
      const key = `${node} ${url.pathname}`;
      const attempt = (attempts.get(key) ?? 0) + 1;
      attempts.set(key, attempt);
      const s: Seen = { node, path: url.pathname, attempt, headers };
      seen.push(s);
      const a = script(s);
      for (const p of a.pieces) {
        if (sock.destroyed) return;
        sock.write(p);
        await new Promise((r) => setImmediate(r));
      }
      if (a.then === 'end') return void sock.end();
      busy = false;
      void serve();
    };
    sock.on('data', (d) => {
      buf += d.toString('latin1');
      void serve();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    server,
    url,
    seen,
    connections,
    close: async () => {
      for (const s of sockets) s.destroy();
      server.close();
      await once(server, 'close');
    },
  };
}

/** The node whose source address this is (sourceAddress's inverse, for the few nodes a test runs). */
function nodeOf(addr: string): number {
  for (let n = 0; n < 1000; n++) if (sourceAddress(n) === addr) return n;
  throw new Error(`not a node address: ${addr}`);
}

function runNodes(plan: NodesPlan): Promise<NodesReport> {
  const script = new URL('../../bench/nodes.ts', import.meta.url).pathname;
  const child = spawn(process.execPath, [script, JSON.stringify(plan)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (c) => (out += c));
  child.stderr.on('data', (c) => (err += c));
  return new Promise((resolve, reject) => {
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`nodes.ts exited ${code}: ${err}`));
      resolve(JSON.parse(out.trim().split('\n').pop()!) as NodesReport);
    });
  });
}

/** A data object: its path names its SHA-1, as CVMFS's content-addressed store does. */
function object(size: number): { path: string; body: Buffer } {
  const body = randomBytes(size);
  const h = createHash('sha1').update(body).digest('hex');
  return { path: `${REPO}/data/${h.slice(0, 2)}/${h.slice(2)}`, body };
}

const head = (status: string, fields: string[]) => `HTTP/1.1 ${status}\r\n${fields.map((f) => `${f}\r\n`).join('')}\r\n`;
const lengthAnswer = (body: Buffer, extra: string[] = []): Answer => ({ pieces: [head('200 OK', [`Content-Length: ${body.length}`, ...extra]), body] });

/** Split a buffer at the given offsets. */
function cut(b: Buffer, at: number[]): Buffer[] {
  const out: Buffer[] = [];
  let from = 0;
  for (const a of [...at, b.length]) {
    out.push(b.subarray(from, a));
    from = a;
  }
  return out.filter((p) => p.length > 0);
}

describe('bench nodes: the generator\'s HTTP client and report', () => {
  const manifest = `${REPO}/.cvmfspublished`;
  const len = object(64 * 1024);
  const chunked = object(100_000);
  const closing = object(3000);
  const eof = object(70_000);
  const cutShort = object(20_000);
  const bad = object(5000);
  const refuse = object(100);
  const last = object(300 * 1024);
  const paths = [manifest, len.path, chunked.path, closing.path, eof.path, cutShort.path, bad.path, refuse.path, last.path];
  let proxy: Scripted;
  let report: NodesReport;

  // The chunked framing: sizes in lower and upper case hex, a chunk extension (quoted, with a ';'), one
  // bare extension with whitespace, data cut across writes mid-chunk and mid-CRLF, and two trailer fields.
  const b = chunked.body;
  const framed = Buffer.concat([
    Buffer.from(`${(40_000).toString(16)};name="a;b"\r\n`),
    b.subarray(0, 40_000),
    Buffer.from(`\r\n${(60_000 - 1).toString(16).toUpperCase()} ;ext\r\n`),
    b.subarray(40_000, 99_999),
    Buffer.from('\r\n1\r\n'),
    b.subarray(99_999),
    Buffer.from('\r\n0;last\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n'),
  ]);

  before(async () => {
    proxy = await scriptedProxy((s) => {
      if (s.path === manifest) return { pieces: [head('200 OK', ['Transfer-Encoding: chunked']), '5;x=y\r\nhello\r\n0\r\n\r\n'] };
      if (s.path === len.path) {
        const whole = Buffer.concat([Buffer.from(head('200 OK', [`Content-Length: ${len.body.length}`, 'X-Cache: MISS'])), len.body]);
        return { pieces: cut(whole, [10, 30, 1000]) }; // the head is split across writes
      }
      if (s.path === chunked.path) {
        const whole = Buffer.concat([Buffer.from(head('200 OK', ['Transfer-Encoding: chunked'])), framed]);
        return { pieces: cut(whole, [5, 40, 43, 50, 1000, 40_060, 40_061, 40_062, 40_066, 99_000, whole.length - 20, whole.length - 3, whole.length - 1]) };
      }
      if (s.path === closing.path) return { ...lengthAnswer(closing.body, ['Connection: close']), then: 'end' };
      if (s.path === eof.path) return { pieces: ['HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n', eof.body.subarray(0, 1000), eof.body.subarray(1000)], then: 'end' };
      if (s.path === cutShort.path) {
        // Node 1: cut after some bytes, then whole. Node 2: closed before any byte, then whole. Node 3: cut twice.
        if (s.node === 1 && s.attempt === 1) return { pieces: [head('200 OK', [`Content-Length: ${cutShort.body.length}`]), cutShort.body.subarray(0, 7000)], then: 'end' };
        if (s.node === 2 && s.attempt === 1) return { pieces: [], then: 'end' };
        if (s.node === 3) return { pieces: [head('200 OK', [`Content-Length: ${cutShort.body.length}`]), cutShort.body.subarray(0, 100)], then: 'end' };
        return lengthAnswer(cutShort.body);
      }
      if (s.path === bad.path) {
        // Node 0's first copy is corrupt; the retry must say no-cache.
        if (s.node === 0 && s.attempt === 1) return lengthAnswer(Buffer.alloc(bad.body.length, 1));
        return lengthAnswer(bad.body);
      }
      if (s.path === refuse.path && s.node === 2) {
        const page = 'the proxy is busy';
        return { pieces: [head('503 Service Unavailable', [`Content-Length: ${page.length}`, 'X-Squid-Error: ERR_OVERLOADED 0', 'Proxy-Status: cuttle; error=connection_limit_reached']), page] };
      }
      if (s.path === refuse.path) return lengthAnswer(refuse.body);
      if (s.path === last.path) return lengthAnswer(last.body);
      return { pieces: [head('404 Not Found', ['Content-Length: 0'])] };
    });
    report = await runNodes({ proxy: proxy.url, origin: ORIGIN, nodes: 4, connectionsPerNode: 1, paths, streamPaths: [], order: 'same', seed: 1, emulatorStats: `${proxy.url}/_stats`, backoffMs: 0 });
  });
  after(() => proxy.close());

  it('counts what completed, what failed first and after the retry, and who left', () => {
    assert.equal(report.planned, 4 * 9);
    // Node 2 was refused at the 8th path and node 3 burned the proxy at the 6th: their later paths are abandoned.
    assert.equal(report.abandoned, 1 + 3);
    assert.equal(report.requests, 36 - 4);
    assert.equal(report.completed, 9 + 9 + 7 + 5);
    assert.equal(report.attempts, report.requests + 4, 'one retry each for the cut, the reset, the bad hash and the twice cut');
    assert.deepEqual(report.firstAttemptErrors, { truncated: 2, reset: 1, 'bad-hash': 1, refused: 1 });
    assert.deepEqual(report.errors, { truncated: 1 });
    assert.equal(report.refusedNodes, 1);
    assert.equal(report.burnedNodes, 1);
    assert.equal(report.hashFailures, 1);
    // Every data object a node received whole was checked (4 nodes, up to 2,000: no sampling): node 0
    // all 8 and the bad copy, node 1 8, node 2 6 (its 503 is not checked), node 3 the 4 before it left.
    assert.equal(report.hashChecked, 9 + 8 + 6 + 4);
    assert.equal(report.watchdogTrips, 0);
    assert.ok(report.refusalMs.max > 0);
    const bodies = [5, len, chunked, closing, eof, cutShort, bad, refuse, last].map((o) => (typeof o === 'number' ? o : o.body.length));
    const whole = (n: number) => bodies.slice(0, n).reduce((x, y) => x + y, 0);
    // Bytes are body bytes, decoded (no chunk framing), cut and refused ones included.
    const expected = whole(9) /* node 0 */ + bad.body.length + whole(9) + 7000 + whole(7) + 'the proxy is busy'.length + whole(5) + 200;
    assert.equal(report.bytes, expected);
  });

  it('keeps one connection per node alive, reconnecting only after a close or a cut, from the node\'s own address', () => {
    // Each node: a new connection after the Connection: close answer and after the HTTP/1.0 one ended by
    // the connection; nodes 1, 2 and 3 also after their first cut (node 3 then leaves).
    const byNode = Object.fromEntries([...proxy.connections].filter(([a]) => a !== '127.0.0.1')); // 127.0.0.1: the stats read
    assert.deepEqual(byNode, { [sourceAddress(0)]: 3, [sourceAddress(1)]: 4, [sourceAddress(2)]: 4, [sourceAddress(3)]: 4 });
    assert.equal(proxy.seen.length, report.attempts, 'the server saw every attempt');
    for (const s of proxy.seen) {
      assert.equal(s.headers.host, 'stratum1.test:8000');
      assert.equal(s.headers['user-agent'], 'cvmfs Fuse 2.11.5');
      const retryAfterBadHash = s.path === bad.path && s.attempt === 2 && s.node === 0;
      assert.equal(s.headers.pragma, retryAfterBadHash ? 'no-cache' : '');
      assert.equal(s.headers['cache-control'], retryAfterBadHash ? 'no-cache' : undefined);
    }
  });
});

describe('bench nodes: sampling and refused connections', () => {
  it('checks the hash on every k-th node only (hashEvery), and says how many it checked', async () => {
    const objs = [object(1000), object(50_000), object(2000)];
    const proxy = await scriptedProxy((s) => {
      const o = objs.find((x) => x.path === s.path)!;
      // Node 1 is not sampled: its corrupt copies go unnoticed, as a sample allows.
      return lengthAnswer(s.node === 1 ? Buffer.alloc(o.body.length) : o.body);
    });
    try {
      const r = await runNodes({ proxy: proxy.url, origin: ORIGIN, nodes: 4, connectionsPerNode: 2, paths: objs.map((o) => o.path), streamPaths: [], order: 'shuffle', seed: 2, emulatorStats: `${proxy.url}/_stats`, backoffMs: 0, hashEvery: 2 });
      assert.equal(r.completed, 12);
      assert.equal(r.hashChecked, 2 * 3, 'nodes 0 and 2, three objects each');
      assert.equal(r.hashFailures, 0);
      assert.deepEqual(r.firstAttemptErrors, {});
      assert.equal(proxy.seen.length, 12);
      // Two lanes per node, each one connection, kept alive.
      for (let n = 0; n < 4; n++) assert.equal(proxy.connections.get(sourceAddress(n)), 2);
    } finally {
      await proxy.close();
    }
  });

  it('frames a response written a byte at a time (head, chunk sizes, extensions, CRLFs, trailers) and skips a 100 Continue', async () => {
    const a = object(700);
    const b = object(300);
    const bytes = (x: Buffer | string) => [...Buffer.from(x)].map((c) => Buffer.of(c));
    const chunkedA = Buffer.concat([
      Buffer.from(head('200 OK', ['Transfer-Encoding: chunked', 'X-Long: '.padEnd(2000, 'x')])),
      Buffer.from('12c;a=1;b="q"\r\n'),
      a.body.subarray(0, 300),
      Buffer.from('\r\n190\r\n'),
      a.body.subarray(300),
      Buffer.from('\r\n0\r\nX-Sum: 1\r\n\r\n'),
    ]);
    const proxy = await scriptedProxy((s) => {
      if (s.path === a.path) return { pieces: bytes(chunkedA) };
      return { pieces: [...bytes('HTTP/1.1 100 Continue\r\n\r\n'), ...bytes(head('200 OK', [`Content-Length: ${b.body.length}`])), b.body] };
    });
    try {
      const r = await runNodes({ proxy: proxy.url, origin: ORIGIN, nodes: 1, connectionsPerNode: 1, paths: [a.path, b.path], streamPaths: [], order: 'same', seed: 1, emulatorStats: `${proxy.url}/_stats`, backoffMs: 0 });
      assert.equal(r.completed, 2);
      assert.deepEqual(r.firstAttemptErrors, {});
      assert.equal(r.hashChecked, 2);
      assert.equal(r.bytes, 1000);
      assert.equal(proxy.seen.length, 2);
      assert.equal(proxy.connections.get(sourceAddress(0)), 1, 'one keep-alive connection for both');
    } finally {
      await proxy.close();
    }
  });

  it('a refused connection is a refusal: the node switches proxy at once, without a retry', async () => {
    const closed = createServer();
    closed.listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const url = `http://127.0.0.1:${(closed.address() as AddressInfo).port}`;
    closed.close();
    await once(closed, 'close');
    const r = await runNodes({ proxy: url, origin: ORIGIN, nodes: 3, connectionsPerNode: 1, paths: [`${REPO}/a`, `${REPO}/b`], streamPaths: [], order: 'same', seed: 1, emulatorStats: `${url}/_stats`, backoffMs: 0 });
    assert.equal(r.refusedNodes, 3);
    assert.deepEqual(r.firstAttemptErrors, { refused: 3 });
    assert.deepEqual(r.errors, {});
    assert.equal(r.attempts, 3);
    assert.equal(r.abandoned, 3);
    assert.equal(r.completed, 0);
  });
});

// A proxy group (CVMFS_HTTP_PROXY="A|B|C"): a node that fails twice on one member, or is refused by it,
// burns that member and goes on with the others, as the client does; it leaves only when all are burned.
describe('bench nodes: a proxy group', () => {
  it('sharding: each object goes to its owner on the client ring; a member that cuts twice is burned and the ring is rebuilt from the rest', async () => {
    const objs: { path: string; body: Buffer }[] = [];
    const cutter = 1;
    const proxies: Scripted[] = [];
    for (let i = 0; i < 3; i++) {
      proxies.push(
        await scriptedProxy((s) => {
          if (s.path.endsWith('.cvmfspublished')) return lengthAnswer(Buffer.from('manifest'));
          const o = objs.find((x) => x.path === s.path)!;
          // Member B cuts every data object after 100 bytes.
          if (i === cutter) return { pieces: [head('200 OK', [`Content-Length: ${o.body.length}`]), o.body.subarray(0, 100)], then: 'end' };
          return lengthAnswer(o.body);
        }),
      );
    }
    try {
      const urls = proxies.map((p) => p.url);
      const ring = new ShardRing(urls);
      // Objects until every member owns at least two (their names are random): the test covers all three.
      const owned = [0, 0, 0];
      while (owned.some((n) => n < 2)) {
        const o = object(1000 + objs.length);
        objs.push(o);
        owned[ring.owner(shardKey(o.path))]!++;
      }
      const manifest = `${REPO}/.cvmfspublished`;
      const r = await runNodes({ proxy: urls[0]!, proxies: urls, proxyShard: true, origin: ORIGIN, nodes: 3, connectionsPerNode: 1, paths: [manifest, ...objs.map((o) => o.path)], streamPaths: [], order: 'same', seed: 1, emulatorStats: `${urls[0]}/_stats`, backoffMs: 0 });
      const planned = 3 * (objs.length + 1);
      assert.equal(r.completed, planned, 'every request completed, on another member if need be');
      assert.deepEqual(r.errors, {});
      assert.equal(r.burnedNodes, 0);
      assert.equal(r.refusedNodes, 0);
      assert.equal(r.proxyBurns, 3, 'each node burned member B once');
      assert.equal(r.nodesSwitchedProxy, 3);
      // Only B's first object (per node) was tried on B: an attempt and its retry, then B was burned.
      assert.deepEqual(r.firstAttemptErrors, { truncated: 3 });
      assert.equal(proxies[cutter]!.seen.filter((s) => s.path.includes('/data/')).length, 3 * 2);
      const alive = (i: number) => i !== cutter;
      for (const [i, p] of proxies.entries()) {
        for (const s of p.seen) {
          const key = shardKey(s.path);
          // Before the burn its owner on the whole ring, after it (B's keys) its owner on the ring without B.
          assert.ok(ring.owner(key) === i || (ring.owner(key) === cutter && ring.owner(key, alive) === i), `${s.path} at member ${i}`);
        }
      }
      assert.equal(ring.owner(shardKey(manifest)), ring.owner(0), 'the manifest is key 0');
      // The manifest comes first, before any burn: its key-0 owner on the whole ring (B serves manifests).
      const manifestAt = proxies.map((p) => p.seen.filter((s) => s.path === manifest).length);
      assert.deepEqual(manifestAt, [0, 1, 2].map((i) => (i === ring.owner(0) ? 3 : 0)));
    } finally {
      for (const p of proxies) await p.close();
    }
  });

  it('one member at random: a refusing member is left at once for the next, and a node leaves only when every member refused', async () => {
    const a = object(2000);
    const b = object(3000);
    const page = 'busy';
    const refusal: Answer = { pieces: [head('503 Service Unavailable', [`Content-Length: ${page.length}`, 'X-Squid-Error: ERR_OVERLOADED 0']), page] };
    let refuseAll = false;
    const proxies: Scripted[] = [];
    for (let i = 0; i < 3; i++) proxies.push(await scriptedProxy((s) => (refuseAll || i === 1 ? refusal : lengthAnswer(s.path === a.path ? a.body : b.body))));
    try {
      const urls = proxies.map((p) => p.url);
      const plan: NodesPlan = { proxy: urls[0]!, proxies: urls, origin: ORIGIN, nodes: 12, connectionsPerNode: 1, paths: [a.path, b.path], streamPaths: [], order: 'same', seed: 5, emulatorStats: `${urls[0]}/_stats`, backoffMs: 0 };
      const r = await runNodes(plan);
      const onB = new Set(proxies[1]!.seen.map((s) => s.node));
      assert.ok(onB.size > 0 && onB.size < 12, `${onB.size} of 12 nodes picked member B`);
      assert.equal(r.completed, 24);
      assert.deepEqual(r.errors, {});
      assert.equal(r.refusedNodes, 0);
      assert.equal(r.proxyBurns, onB.size, 'each node that picked B burned it');
      assert.deepEqual(r.firstAttemptErrors, { refused: onB.size });
      assert.equal(proxies[1]!.seen.length, onB.size, 'a refusal is not retried on the same member');
      // A node stays on its member, and a node that left B went on to the next member, C.
      for (const n of onB) assert.ok(proxies[2]!.seen.filter((s) => s.node === n).length === 2 && !proxies[0]!.seen.some((s) => s.node === n));
      for (const [i, p] of proxies.entries()) for (const n of new Set(p.seen.map((s) => s.node))) if (!onB.has(n)) assert.equal(p.seen.filter((s) => s.node === n).length, 2, `node ${n} on member ${i} only`);
      for (const p of proxies) p.seen.length = 0;
      refuseAll = true;
      const all = await runNodes(plan);
      assert.equal(all.refusedNodes, 12, 'every member refused: the node leaves, as one with a single proxy does');
      assert.equal(all.proxyBurns, 12 * 2, 'two members burned per node before the last refused');
      assert.deepEqual(all.errors, {});
      assert.equal(all.completed, 0);
      assert.equal(all.abandoned, 12);
    } finally {
      for (const p of proxies) await p.close();
    }
  });
});
