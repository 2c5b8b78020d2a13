// A Stratum 1 emulator: a CVMFS-shaped URL space for the herd benchmark and the compose demo.
//   /cvmfs/<repo>/.cvmfspublished      max-age=61, text manifest with a revision
//   /cvmfs/<repo>/data/XX/<sha1>[C|P]  bytes whose SHA-1 is the name, max-age=259200
// With `repository`, the repository is in cvmfs's real format (bench/cvmfs-repository.ts): the manifest
// names a root catalog, the catalogs are zlib-compressed SQLite with nested catalogs and a chunked file,
// and POST /_emulator/publish builds the next revision, which changes one sub-tree (`cuttle warm`).
// Knobs: first-byte latency, per-response and total bandwidth caps, faults (reset after N bytes, a 5xx
// rate, corrupt bytes), and the delays of a WAN (below). It counts requests per path and reports them on
// GET /_emulator/stats.
//
// The WAN model (option wan, default off), kept simple on purpose:
//   - first byte one RTT after the request, plus one more RTT for the first request on a connection (the
//     TCP handshake the emulator cannot see);
//   - a response goes out in rounds of one RTT, as TCP slow start: the window starts at 10 segments
//     (14,600 bytes) and doubles each round up to maxWindowBytes (4 MiB), so one connection peaks near
//     maxWindowBytes per RTT. Every response starts from the initial window (Linux restarts slow start on
//     a connection idle longer than its RTO, which a keep-alive connection between objects usually is);
//   - loss as stalls: with stallProbability per round, that round waits a retransmission timeout drawn
//     from stallMs first. The draws are seeded per path and per request of that path, so a run repeats
//     them whatever the interleaving.
// Bandwidth and queueing are the link's: bench/wan.ts puts the emulator behind a shaped veth.
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildRepository, type RepositoryOptions } from './cvmfs-repository.ts';

export interface ObjectSpec {
  path: string; // /cvmfs/<repo>/data/XX/<hash><suffix>
  hash: string;
  size: number;
  kind: 'file' | 'catalog' | 'chunk';
}

/** Deterministic PRNG (mulberry32), so every run and every target sees the same object set. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function bytesFor(seed: number, size: number): Buffer {
  const rnd = prng(seed);
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i + 4 <= size; i += 4) b.writeUInt32LE((rnd() * 4294967296) >>> 0, i);
  for (let i = size - (size % 4); i < size; i++) b[i] = (rnd() * 256) | 0;
  return b;
}

export interface CatalogOptions {
  repo: string;
  objects: number;
  seed: number;
  /** Counts of catalogs (1 MiB) and chunks; the rest are 4–64 KiB files. */
  catalogs?: number;
  chunks?: number;
  /** Chunk sizes, whole MiB from lo to below hi ([n, n]: exactly n MiB). Default [16, 24]. */
  chunkMiB?: [number, number];
}

/** The object list, and the bytes behind it. ~55 MiB for 200 objects with the default mix. */
export function makeCatalog(o: CatalogOptions): { specs: ObjectSpec[]; bodies: Map<string, Buffer> } {
  const rnd = prng(o.seed);
  // At least one chunk and one catalog from 2 objects on, so a small --objects still has big objects.
  const nChunks = o.chunks ?? (o.objects >= 50 ? Math.max(2, Math.round(o.objects * 0.01)) : o.objects >= 2 ? 1 : 0);
  const nCatalogs = o.catalogs ?? (o.objects >= 3 ? Math.max(1, Math.round(o.objects * 0.04)) : 0);
  const [lo, hi] = o.chunkMiB ?? [16, 24];
  const specs: ObjectSpec[] = [];
  const bodies = new Map<string, Buffer>();
  for (let i = 0; i < o.objects; i++) {
    const kind: ObjectSpec['kind'] = i < nChunks ? 'chunk' : i < nChunks + nCatalogs ? 'catalog' : 'file';
    const size = kind === 'chunk' ? (lo + Math.floor(rnd() * (hi - lo))) * 2 ** 20 : kind === 'catalog' ? 2 ** 20 : 4096 + Math.floor(rnd() * 60 * 1024);
    const body = bytesFor(o.seed * 100_003 + i, size);
    const hash = createHash('sha1').update(body).digest('hex');
    const suffix = kind === 'chunk' ? 'P' : kind === 'catalog' ? 'C' : '';
    const path = `/cvmfs/${o.repo}/data/${hash.slice(0, 2)}/${hash.slice(2)}${suffix}`;
    specs.push({ path, hash, size, kind });
    bodies.set(path, body);
  }
  // The order a mount reads them in: catalogs first, then files and chunks interleaved.
  const catalogs = specs.filter((s) => s.kind === 'catalog');
  const rest = specs.filter((s) => s.kind !== 'catalog');
  for (let i = rest.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [rest[i], rest[j]] = [rest[j]!, rest[i]!];
  }
  return { specs: [...catalogs, ...rest], bodies };
}

export interface EmulatorOptions {
  repo: string;
  bodies: Map<string, Buffer>;
  latencyMs?: number;
  /** Per-response cap for every response, bytes/s. */
  responseBytesPerSec?: number;
  /** Per-response cap for chunks (the big objects) only, bytes/s (herd-slow). */
  chunkBytesPerSec?: number;
  /** Total bandwidth cap across responses, bytes/s. */
  totalBytesPerSec?: number;
  /** Fault injection. */
  resetAfterBytes?: number;
  errorRate?: number;
  corrupt?: boolean;
  /** Flip a byte in these paths only. */
  corruptPaths?: Set<string>;
  seed?: number;
  /** The delays of a WAN between the proxy and this Stratum 1 (see the top of this file). */
  wan?: WanDelays;
  /** Serve a repository in cvmfs's format, from this revision on (its bodies join `bodies`). */
  repository?: Omit<RepositoryOptions, 'repo'>;
}

/** Add revision `revision` of the repository to `bodies` (a Stratum 1 keeps the objects of earlier revisions). */
export function publishRepository(bodies: Map<string, Buffer>, repo: string, o: Omit<RepositoryOptions, 'repo'>): void {
  for (const [rel, b] of buildRepository({ ...o, repo }).bodies) bodies.set(`/cvmfs/${repo}/${rel}`, b);
}

export interface WanDelays {
  rttMs: number;
  /** The window of a response's first round, bytes. Default 14,600 (10 segments of 1,460). */
  initialWindowBytes?: number;
  /** The largest window, bytes. Default 4 MiB. */
  maxWindowBytes?: number;
  /** Chance that a round stalls for a retransmission timeout. Default 0.002. */
  stallProbability?: number;
  /** The retransmission timeout's range, ms. Default [200, 1000]. */
  stallMs?: [number, number];
}

export const WAN_DEFAULTS = { initialWindowBytes: 14_600, maxWindowBytes: 4 * 2 ** 20, stallProbability: 0.002, stallMs: [200, 1000] as [number, number] };

export interface EmulatorStats {
  requests: number;
  bytes: number;
  perPath: Record<string, number>;
  /** Epoch ms at which the first complete response of each path was written. */
  firstComplete: Record<string, number>;
  /** Range requests seen, as "path bytes=N-". */
  ranges: string[];
  /** Health probes of a proxy (User-Agent cuttle-probe), not in requests or perPath. */
  probes: number;
  /** WAN rounds that stalled for a retransmission timeout. */
  stalls: number;
}

export interface Emulator {
  url: string;
  port: number;
  stats: EmulatorStats;
  revision: number;
  /** Publish time (T) of the manifest, epoch seconds; default: now. */
  publishedAtS: number | undefined;
  close(): Promise<void>;
}

const SLICE = 64 * 1024;

/** A number for a string (FNV-1a), to seed a path's own stall draws. */
function fnv(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

export async function startEmulator(o: EmulatorOptions, port = 0, host = '127.0.0.1'): Promise<Emulator> {
  const stats: EmulatorStats = { requests: 0, bytes: 0, perPath: {}, firstComplete: {}, ranges: [], probes: 0, stalls: 0 };
  const rnd = prng(o.seed ?? 7);
  const sockets = new Set<Socket>();
  const wan = o.wan && { ...WAN_DEFAULTS, ...o.wan };
  // Connections that have had their first request (its handshake RTT).
  const warm = new WeakSet<Socket>();
  // Requests per path, probes included, so every request draws its own stalls.
  const draws = new Map<string, number>();
  let totalBudgetAt = Date.now();
  const emu: Emulator = { url: '', port: 0, stats, revision: o.repository?.revision ?? 1, publishedAtS: undefined, close: async () => {} };
  if (o.repository) publishRepository(o.bodies, o.repo, { ...o.repository, revision: emu.revision });

  // A token bucket shared by all responses for the total cap.
  async function takeTotal(n: number): Promise<void> {
    if (!o.totalBytesPerSec) return;
    const now = Date.now();
    totalBudgetAt = Math.max(totalBudgetAt, now) + (n / o.totalBytesPerSec) * 1000;
    const wait = totalBudgetAt - now - 50;
    if (wait > 0) await sleep(wait);
  }

  async function send(res: ServerResponse, path: string, whole: Buffer, headers: Record<string, string>, perSec: number | undefined, head: boolean, range?: string): Promise<void> {
    // A Stratum 1 (Apache) honours single open-ended ranges, which is what a resuming proxy sends.
    const from = range ? /^bytes=(\d+)-$/.exec(range) : null;
    const start = from && Number(from[1]) < whole.length ? Number(from[1]) : 0;
    const body = whole.subarray(start);
    if (start > 0) res.writeHead(206, { 'content-length': String(body.length), 'content-range': `bytes ${start}-${whole.length - 1}/${whole.length}`, ...headers });
    else res.writeHead(200, { 'content-length': String(body.length), ...headers });
    if (head) return void res.end();
    const started = Date.now();
    const n = (draws.get(path) ?? 0) + 1;
    draws.set(path, n);
    const stallRnd = prng(((o.seed ?? 7) * 1_000_003 + fnv(path) + n * 7919) >>> 0);
    let window = wan?.initialWindowBytes ?? Infinity;
    let roundLeft = 0; // bytes left in this round; a round starts when they are spent
    let roundAt = started; // when this round started
    let first = true;
    for (let off = 0; off < body.length; ) {
      if (res.destroyed) return; // the client left: no drain will come
      if (wan && roundLeft === 0) {
        // The next round leaves one RTT after this one; a lost segment of it first waits an RTO.
        const due = first ? started : roundAt + wan.rttMs;
        if (!first) window = Math.min(window * 2, wan.maxWindowBytes);
        first = false;
        let wait = due - Date.now();
        if (stallRnd() < wan.stallProbability) {
          stats.stalls++;
          wait += wan.stallMs[0] + stallRnd() * (wan.stallMs[1] - wan.stallMs[0]);
        }
        if (wait > 0) await sleep(wait);
        roundAt = Date.now();
        roundLeft = window;
      }
      let slice = body.subarray(off, Math.min(body.length, off + SLICE, off + (wan ? roundLeft : SLICE)));
      if (o.resetAfterBytes !== undefined && off + slice.length > o.resetAfterBytes) {
        res.write(slice.subarray(0, Math.max(0, o.resetAfterBytes - off)));
        res.socket?.destroy();
        return;
      }
      if ((o.corrupt || o.corruptPaths?.has(path)) && off === 0) {
        slice = Buffer.from(slice);
        slice[0]! ^= 0xff;
      }
      await takeTotal(slice.length);
      if (perSec) {
        const due = started + ((off + slice.length) / perSec) * 1000;
        const wait = due - Date.now();
        if (wait > 0) await sleep(wait);
      }
      stats.bytes += slice.length;
      off += slice.length;
      if (wan) roundLeft -= slice.length;
      if (!res.write(slice)) await once(res, 'drain');
    }
    res.end(() => {
      stats.firstComplete[path] ??= Date.now();
    });
  }

  const server: Server = createServer(async (req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    if (path === '/_emulator/stats') {
      res.writeHead(200, { 'content-type': 'application/json' });
      return void res.end(JSON.stringify(stats));
    }
    if (path === '/_emulator/publish' && req.method === 'POST') {
      emu.revision++;
      if (o.repository) publishRepository(o.bodies, o.repo, { ...o.repository, revision: emu.revision });
      return void res.end(String(emu.revision));
    }
    // A proxy's health probes are not client traffic: counted apart.
    if (req.headers['user-agent'] === 'cuttle-probe') stats.probes++;
    else {
      stats.requests++;
      stats.perPath[path] = (stats.perPath[path] ?? 0) + 1;
    }
    if (req.headers.range) stats.ranges.push(`${path} ${req.headers.range}`);
    if (o.latencyMs) await sleep(o.latencyMs);
    if (wan) {
      const handshake = !warm.has(req.socket);
      warm.add(req.socket);
      await sleep(wan.rttMs * (handshake ? 2 : 1));
    }
    if (o.errorRate && rnd() < o.errorRate) {
      res.writeHead(503, { 'content-type': 'text/plain' });
      return void res.end('emulated failure\n');
    }
    const head = req.method === 'HEAD';
    if (path === `/cvmfs/${o.repo}/.cvmfspublished` && !o.bodies.has(path)) {
      const body = Buffer.from(`C0000000000000000000000000000000000000000\nN${o.repo}\nS${emu.revision}\nT${emu.publishedAtS ?? Math.floor(Date.now() / 1000)}\n--\n`);
      return void send(res, path, body, { 'content-type': 'application/x-cvmfs', 'cache-control': 'max-age=61' }, undefined, head);
    }
    const body = o.bodies.get(path);
    if (!body) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      return void res.end('not found\n');
    }
    const isChunk = path.endsWith('P');
    // Apache's expiry on a Stratum 1: 61 s for the .cvmfs* files, 3 days for the rest.
    await send(res, path, body, { 'content-type': 'application/x-cvmfs', 'cache-control': path.includes('/.cvmfs') ? 'max-age=61' : 'max-age=259200' }, (isChunk ? o.chunkBytesPerSec : undefined) ?? o.responseBytesPerSec, head, req.headers.range);
  });
  server.keepAliveTimeout = 120_000;
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen({ port, host, backlog: 4096 }, () => r()));
  emu.port = (server.address() as AddressInfo).port;
  emu.url = `http://${host}:${emu.port}`;
  emu.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  };
  return emu;
}

// Standalone: `node bench/emulator.ts [--port 8000] [--repo atlas.cern.ch] [--objects 200] [--latency-ms 50]`
//   [--revision N [--files N]]: the repository in cvmfs's format (catalogs), from revision N on.
if (import.meta.main) {
  const { parseArgs } = await import('node:util');
  const { values } = parseArgs({ options: { port: { type: 'string', default: '8000' }, host: { type: 'string', default: '0.0.0.0' }, repo: { type: 'string', default: 'atlas.cern.ch' }, objects: { type: 'string', default: '200' }, 'latency-ms': { type: 'string', default: '50' }, seed: { type: 'string', default: '1' }, revision: { type: 'string' }, files: { type: 'string', default: '6' } } });
  const repository = values.revision === undefined ? undefined : { revision: Number(values.revision), files: Number(values.files), seed: Number(values.seed) };
  const { bodies } = repository ? { bodies: new Map<string, Buffer>() } : makeCatalog({ repo: values.repo!, objects: Number(values.objects), seed: Number(values.seed) });
  const emu = await startEmulator({ repo: values.repo!, bodies, latencyMs: Number(values['latency-ms']), repository }, Number(values.port), values.host);
  process.stdout.write(`stratum1 emulator on ${emu.url} serving /cvmfs/${values.repo}/ (${bodies.size} objects)\n`);
}
