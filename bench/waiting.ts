// Heap held per request that waits on a fill: what a herd parks in cuttle's heap while one upstream
// fetch is on its way. Every scavenge copies it, and what outlives two is promoted, so it is what a
// herd's GC costs grow with (README, "Herd GC"). Deterministic: a heap measure after forced GCs, no timing.
//   node --expose-gc bench/waiting.ts [--nodes 1000]
// N client connections each ask for one object whose origin holds its head back; the heap is measured
// with the connections idle and again once all N requests wait. Twice: connections node:http reads (each
// handed over by a first miss), and fresh ones, whose requests join the fill in the hit lane.
import { once } from 'node:events';
import { createServer } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { buildConfig } from '../src/config.ts';
import { createProxy } from '../src/server.ts';

const { values } = parseArgs({ options: { nodes: { type: 'string', default: '1000' } } });
const n = Number(values.nodes);
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error('run with node --expose-gc');
const heapUsed = () => {
  for (let i = 0; i < 4; i++) gc();
  return process.memoryUsage().heapUsed;
};
const turn = () => new Promise((r) => setImmediate(r));

// Each object's origin response waits for the test's release (a herd's requests wait on it).
const releases: (() => void)[] = [];
const origin = createServer((req, res) => {
  if (req.url === '/warm') return res.writeHead(200, { 'cache-control': 'no-store', 'content-length': '1' }).end('w');
  releases.push(() => res.writeHead(200, { 'cache-control': 'max-age=3600', 'content-length': '30000' }).end(Buffer.alloc(30000, 1)));
});
origin.listen(0, '127.0.0.1');
await once(origin, 'listening');
const up = `127.0.0.1:${(origin.address() as AddressInfo).port}`;

const dir = mkdtempSync(join(tmpdir(), 'cuttle-waiting-'));
const cfg = buildConfig({ listen: ['127.0.0.1:0'], 'cache-dir': join(dir, 'cache'), 'allow-local-dest': ['127.0.0.1'], 'access-log': 'none', 'admin-listen': 'none', 'max-client-connections': n + 10 });
const proxy = await createProxy(cfg, { logger: pino({ level: 'warn' }) });
await proxy.listen();
const port = proxy.addresses()[0]!.port;
const attached = () => proxy.coalescer.topFills(1, 0)[0]?.readers ?? 0;

/**
 * Bytes of heap per request waiting on one fill. `handedOver`: each connection first gets an answered
 * miss, so node:http reads it from then on; else the connections are fresh, and every request but the
 * fill's first joins it in the hit lane.
 */
async function perWaiting(handedOver: boolean, path: string): Promise<number> {
  const socks: Socket[] = [];
  for (let i = 0; i < n; i++) {
    const s = connect(port, '127.0.0.1');
    s.on('data', () => {});
    socks.push(s);
    await once(s, 'connect');
  }
  if (handedOver) {
    let answered = 0;
    for (const s of socks) {
      s.once('data', () => answered++);
      s.write(`GET http://${up}/warm HTTP/1.1\r\nHost: ${up}\r\n\r\n`);
    }
    while (answered < n) await turn();
  }
  const idle = heapUsed();
  const ask = (s: Socket) => s.write(`GET http://${up}${path} HTTP/1.1\r\nHost: ${up}\r\nUser-Agent: cvmfs Fuse 2.11.5\r\nPragma: \r\n\r\n`);
  ask(socks[0]!); // the fill's first request: a miss, which node:http answers
  while (attached() < 1) await turn();
  for (const s of socks.slice(1)) ask(s);
  while (attached() < n) await turn();
  const waiting = heapUsed();
  for (const r of releases.splice(0)) r();
  for (const s of socks) s.destroy();
  while (proxy.clientConnections() > 0) await turn();
  return Math.round((waiting - idle) / n);
}

// Each is measured twice and the second counts: the first also holds the code compiled for it.
await perWaiting(true, '/a1');
const viaNode = await perWaiting(true, '/a2');
await perWaiting(false, '/b1');
const viaLane = await perWaiting(false, '/b2');
console.log(`| requests waiting on one fill | ${n} |\n| heap held per waiting request, node:http (bytes) | ${viaNode} |\n| heap held per waiting request, hit lane joins (bytes) | ${viaLane} |`);
await proxy.close();
origin.close();
rmSync(dir, { recursive: true, force: true });
