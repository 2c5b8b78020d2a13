// Simulated CVMFS nodes: the load generator of the herd benchmark, run as its own process.
// Each node behaves like a cvmfs2 client (cvmfs-notes §1.4–§1.5): its own keep-alive connections
// (default 1, up to 16), absolute-form GETs through the proxy with `User-Agent: cvmfs Fuse 2.11.x`,
// a 5 s connect timeout, the "proxy too slow" watchdog (under 1 KiB/s for 5 s, first byte included),
// SHA-1 checks of the data objects (on every node up to 2,000 nodes, then a sample: hashEvery), and one
// retry after a failure (with no-cache after a bad hash).
// A node whose retry fails too has BURNED the proxy: a real client moves to its next proxy. A labelled 503
// (or a refused connection) is a refusal: the client switches proxy at once. With one proxy (the default)
// the node stops there. With a proxy group (plan `proxies`, CVMFS_HTTP_PROXY="A|B|C") it moves to the
// next member, as the client does: sharding (CVMFS_PROXY_SHARD=yes) sends each object to its owner on the
// client's ring and rebuilds the ring without a burned member; otherwise the node uses one member picked
// at random and moves to the next in the group. It leaves only when every member is burned.
// Each node connects from its own address in 127.0.0.0/8, so ACLs and per-client accounting see N clients.
// The generator runs on one core and must not be what is measured: its HTTP client is a lean one on raw
// `net` (Lane, below), reading every socket into one shared buffer.
// Input: JSON in argv[2]. Output: one JSON report on stdout; progress lines on stderr.
import { createHash } from 'node:crypto';
import { build, type Histogram } from 'hdr-histogram-js';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { connect, type Socket } from 'node:net';
import { lookup } from 'node:dns/promises';
import { prng } from './emulator.ts';
import { shardKey, ShardRing } from '../src/shard-ring.ts';

export interface NodesPlan {
  proxy: string;
  /** The node's proxy group (one `|` group of CVMFS_HTTP_PROXY), exactly `http://IP:PORT`; default [proxy]. */
  proxies?: string[];
  /** CVMFS_PROXY_SHARD=yes: each request to the owner of its key on the client's ring over `proxies`
   * (the manifest, key 0, to the ring's key-0 owner). Otherwise each node uses one member at random. */
  proxyShard?: boolean;
  /** The group is the members of `proxies` whose address `name` resolves to, resolved again every
   * `everyMs`, as a cvmfs client re-resolves its proxy names after their DNS TTL (rolling: a drained
   * member leaves the name, and the nodes stop asking it). */
  proxyDns?: { name: string; everyMs: number };
  origin: string;
  /** The node's Stratum 1 list (CVMFS_SERVER_URL), origin first: after a failed attempt the node moves
   * to the next host, as a cvmfs client does on a host failure (mirror-kill). */
  origins?: string[];
  nodes: number;
  connectionsPerNode: number;
  paths: string[];
  order: 'same' | 'shuffle';
  seed: number;
  /** manifest-poll mode: GET paths[0] every pollEveryMs for pollForMs. */
  poll?: { everyMs: number; forMs: number };
  /** Big objects (chunks), where streaming to waiters matters: the early-bytes figure counts these. */
  streamPaths: string[];
  /** Emulator stats endpoint, read at the end to count who streamed before the first fill completed. */
  emulatorStats: string;
  /** Connect each node from its own loopback address (127.10.0.1 on); false: the kernel's choice. */
  sourceAddresses?: boolean;
  /** Upper bound of the random pause before a same-proxy retry (CVMFS_BACKOFF_INIT, 2 s); 0 for none. */
  backoffMs?: number;
  /** Check the SHA-1 of every data object on every k-th node (a retry after a bad hash is always
   * checked). Default: every node up to 2,000 nodes, every 10th above. */
  hashEvery?: number;
}

export interface NodesReport {
  planned: number;
  requests: number;
  attempts: number;
  completed: number;
  bytes: number;
  wallMs: number;
  errors: Record<string, number>;
  firstAttemptErrors: Record<string, number>;
  watchdogTrips: number;
  hashFailures: number;
  /** Data objects whose SHA-1 was checked (hashEvery samples the nodes). */
  hashChecked: number;
  latencyMs: { p50: number; p90: number; p99: number; max: number; cdf: [number, number][] };
  ttfbMs: { p50: number; p99: number; max: number };
  /** Time to first byte by object kind (manifest, catalog, file, chunk): where a tail comes from. */
  ttfbByKindMs: Record<string, { p50: number; p99: number; max: number }>;
  streamedBeforeFirstFill: number;
  waitersDuringFirstFill: number;
  generatorCpuS: number;
  /** The generator's own event-loop delay: when it is seconds, watchdog trips are the generator's doing. */
  generatorLoopLagMs: { p99: number; max: number };
  /** Time the generator's loop was stalled; excluded from watchdog windows. */
  generatorStallS: number;
  /** Watchdog trips by object kind, and how many had received the response head. */
  tripsByKind: Record<string, number>;
  /** Nodes that moved to another Stratum 1 after a failure. */
  hostSwitches: number;
  /** Nodes whose retry failed too (too slow, no connect, cut short) on their last proxy: they burned the
   * site's proxies and left. */
  burnedNodes: number;
  /** Nodes their last proxy refused (a labelled 503, or a refused connection): they switched proxy at once. */
  refusedNodes: number;
  /** Proxy groups: a node burned one member (two failures, or a refusal) and went on with the others. */
  proxyBurns: number;
  /** Nodes that burned at least one member and went on with the others. */
  nodesSwitchedProxy: number;
  /** Time from sending the request to the refusal, ms. */
  refusalMs: { p50: number; p99: number; max: number };
  /** proxyDns: times the name resolved to another set of members. */
  dnsChanges?: number;
  /** Requests never made because their node had left the proxy (burned or refused). */
  abandoned: number;
}

/** Node n's source address: 127.10.0.1, 127.10.0.2, … (never .0 or .255 in the last octet). */
export function sourceAddress(n: number): string {
  const i = Math.floor(n / 254) * 256 + (n % 254) + 1;
  return `127.${10 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}`;
}

const WATCHDOG_MS = 5000;
const LOW_SPEED_BYTES = 1024 * 5; // 1 KiB/s over the 5 s window
const CONNECT_TIMEOUT_MS = 5000;
const READ_BUFFER_BYTES = 256 * 1024;
const HEAD_LIMIT = 64 * 1024;
/** A chunk-size line (size and extensions) and a trailer section are bounded like a head. */
const CHUNK_LINE_LIMIT = 4096;
const END_OF_HEAD = Buffer.from('\r\n\r\n');
const CR = 13;
const LF = 10;

// One read buffer for every socket: net calls `onread` synchronously and each read is consumed (hashed,
// counted, a head copied out) before the callback returns, so no Buffer is allocated per read.
const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);

/** One request on a lane, told what happens to it. */
export interface Exchange {
  /** The request is written on a connected socket: the low-speed window starts here. */
  written(): void;
  head(status: number, labelled: boolean): void;
  /** Body bytes (decoded), readBuffer[start, end): valid only during the call. */
  data(buf: Buffer, start: number, end: number): void;
  /** undefined: a whole response. Else 'refused', 'truncated' (body bytes came), 'reset' (none),
   * 'bad-response' (not HTTP/1.x as framed here), or 'other:CODE' (a connect error). */
  end(error: string | undefined): void;
}

// Parser phases.
const HEAD = 0;
const LENGTH = 1; // Content-Length body
const CLOSE = 2; // body up to the end of the connection
const CHUNK_SIZE = 3; // chunk-size [; extensions] CRLF
const CHUNK_DATA = 4;
const CHUNK_DATA_END = 5; // the CRLF after chunk data
const TRAILER = 6; // trailer fields, up to an empty line

/**
 * A node's connection to its proxy: a lean HTTP/1.1 client on raw `net`, one request at a time on one
 * keep-alive socket (reconnecting when the proxy closed it or after an error), reading into the shared
 * buffer. It frames Content-Length, chunked (extensions and trailers included) and close-delimited bodies.
 * Undici's wasm parser copies every body chunk in and out of wasm memory and allocates a Buffer per
 * chunk: at 10,000 nodes that made the generator, not the proxy, the bottleneck.
 */
export class Lane {
  readonly #port: number;
  readonly #host: string;
  readonly #localAddress: string | undefined;
  #socket: Socket | undefined;
  #connected = false;
  #x: Exchange | undefined;
  #phase = HEAD;
  #pending: Buffer | undefined; // a head split across reads, copied out of the shared buffer
  #left = 0; // body or chunk bytes still due
  #lineBytes = 0; // bytes of the current chunk-size line or trailer section
  #lineStart = true; // TRAILER: at the start of a field line
  #sawCR = false; // chunk framing and trailers: a CR was read, an LF must follow
  #inExt = false; // CHUNK_SIZE: past the size, in extensions
  #digits = 0;
  #keepAlive = false;
  #bodyBytes = 0;
  #error = '';

  constructor(proxy: URL, localAddress: string | undefined) {
    this.#host = proxy.hostname;
    this.#port = Number(proxy.port || 80);
    this.#localAddress = localAddress;
  }

  /** Send one request (its whole head, latin1); `x` hears how it goes. One at a time. */
  request(head: string, x: Exchange): void {
    if (this.#x) throw new Error('lane busy');
    this.#x = x;
    this.#phase = HEAD;
    this.#pending = undefined;
    this.#bodyBytes = 0;
    if (this.#socket && this.#connected) {
      this.#socket.write(head, 'latin1');
      x.written();
      return;
    }
    this.#connect(head);
  }

  /** End the request in flight with `reason` (the watchdog, a connect timeout): its socket is destroyed. */
  abort(reason: string): void {
    const x = this.#x;
    if (!x) return;
    this.#drop();
    this.#x = undefined;
    x.end(reason);
  }

  close(): void {
    this.#drop();
  }

  #drop(): void {
    this.#socket?.destroy();
    this.#socket = undefined;
    this.#connected = false;
  }

  #connect(head: string): void {
    const s: Socket = connect({ host: this.#host, port: this.#port, localAddress: this.#localAddress, onread: { buffer: readBuffer, callback: (n: number): boolean => s === this.#socket && this.#read(n) } });
    this.#socket = s;
    this.#connected = false;
    this.#error = '';
    s.setNoDelay(true);
    s.once('connect', () => {
      if (s !== this.#socket) return;
      this.#connected = true;
      s.write(head, 'latin1');
      this.#x?.written();
    });
    s.on('error', (err: NodeJS.ErrnoException) => {
      if (s === this.#socket) this.#error = err.code ?? err.message;
    });
    // The proxy's FIN: a close-delimited body is whole, anything else in flight is cut short.
    s.on('end', () => {
      if (s !== this.#socket) return;
      if (this.#x && this.#phase === CLOSE) return this.#complete();
      this.#fail();
    });
    s.on('close', () => {
      if (s === this.#socket) this.#fail();
    });
  }

  /** The connection is gone (FIN, reset, connect error): the request in flight, if any, failed. */
  #fail(): void {
    const connected = this.#connected;
    const code = this.#error;
    this.#drop();
    const x = this.#x;
    if (!x) return;
    this.#x = undefined;
    if (!connected) return x.end(code === 'ECONNREFUSED' ? 'refused' : `other:${code || 'closed'}`);
    x.end(this.#bodyBytes > 0 ? 'truncated' : 'reset');
  }

  #bad(): false {
    const x = this.#x;
    this.#drop();
    this.#x = undefined;
    x?.end('bad-response');
    return false;
  }

  #complete(): void {
    const x = this.#x!;
    this.#x = undefined;
    this.#phase = HEAD;
    if (!this.#keepAlive) this.#drop();
    x.end(undefined);
  }

  #body(buf: Buffer, start: number, end: number): void {
    this.#bodyBytes += end - start;
    this.#x!.data(buf, start, end);
  }

  /** Consume readBuffer[0, n). false: stop reading (the socket is gone). */
  #read(n: number): boolean {
    const buf = readBuffer;
    let off = 0;
    while (off < n) {
      // Bytes with no request in flight (or after a response, in the same read): not ours to frame.
      if (!this.#x) {
        this.#drop();
        return false;
      }
      switch (this.#phase) {
        case HEAD: {
          const used = this.#readHead(buf, off, n);
          if (used < 0) return this.#bad();
          off += used;
          break;
        }
        case LENGTH: {
          const take = Math.min(this.#left, n - off);
          this.#body(buf, off, off + take);
          off += take;
          this.#left -= take;
          if (this.#left === 0) this.#complete();
          break;
        }
        case CLOSE:
          this.#body(buf, off, n);
          off = n;
          break;
        case CHUNK_DATA: {
          const take = Math.min(this.#left, n - off);
          this.#body(buf, off, off + take);
          off += take;
          this.#left -= take;
          if (this.#left === 0) this.#phase = CHUNK_DATA_END;
          break;
        }
        default: {
          const used = this.#readChunkFraming(buf, off, n);
          if (used < 0) return this.#bad();
          off += used;
        }
      }
    }
    return this.#socket !== undefined;
  }

  /** A response head (it may span reads; 64 KiB at most). Returns the bytes used, -1 if malformed. */
  #readHead(buf: Buffer, off: number, n: number): number {
    let head: string;
    let used: number;
    if (this.#pending) {
      const joined = Buffer.concat([this.#pending, buf.subarray(off, n)]);
      const at = joined.indexOf(END_OF_HEAD);
      if (at < 0) {
        if (joined.length > HEAD_LIMIT) return -1;
        this.#pending = joined;
        return n - off;
      }
      if (at > HEAD_LIMIT) return -1;
      head = joined.toString('latin1', 0, at);
      used = at + 4 - this.#pending.length;
      this.#pending = undefined;
    } else {
      // The shared buffer holds old bytes past n: a match must end within the read.
      const at = buf.indexOf(END_OF_HEAD, off);
      if (at < 0 || at + 4 > n) {
        if (n - off > HEAD_LIMIT) return -1;
        this.#pending = Buffer.from(buf.subarray(off, n));
        return n - off;
      }
      if (at - off > HEAD_LIMIT) return -1;
      head = buf.toString('latin1', off, at);
      used = at + 4 - off;
    }
    return this.#parseHead(head) ? used : -1;
  }

  #parseHead(head: string): boolean {
    const lines = head.split('\r\n');
    const m = /^HTTP\/1\.([01]) (\d{3})(?: |$)/.exec(lines[0]!);
    if (!m) return false;
    const status = Number(m[2]);
    // An interim answer (100 Continue, 103 Early Hints): the real one follows.
    if (status < 200) return true;
    let length = -1;
    let te = '';
    let connection = '';
    let labelled = false;
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i]!;
      const colon = line.indexOf(':');
      if (colon <= 0) return false;
      const name = line.slice(0, colon).toLowerCase();
      const value = line.slice(colon + 1).trim();
      if (name === 'content-length') {
        if (!/^\d{1,15}$/.test(value) || (length >= 0 && Number(value) !== length)) return false;
        length = Number(value);
      } else if (name === 'transfer-encoding') te += `${te ? ',' : ''}${value.toLowerCase()}`;
      else if (name === 'connection') connection += `,${value.toLowerCase()}`;
      // A proxy's own failure carries X-Squid-Error or Proxy-Status error= (cvmfs-notes §1.5).
      else if (name === 'x-squid-error') labelled = true;
      else if (name === 'proxy-status' && value.includes('error=')) labelled = true;
    }
    const tokens = connection.split(',').map((t) => t.trim());
    this.#keepAlive = m[1] === '1' ? !tokens.includes('close') : tokens.includes('keep-alive');
    this.#x!.head(status, labelled);
    if (status === 204 || status === 304) {
      this.#complete();
    } else if (te) {
      // Chunked only as the final coding frames the body; any other coding runs to the close (RFC 9112 §6.3).
      if (te.split(',').at(-1)!.trim() === 'chunked') this.#startChunk();
      else this.#toClose();
    } else if (length >= 0) {
      this.#left = length;
      this.#phase = LENGTH;
      if (length === 0) this.#complete();
    } else this.#toClose();
    return true;
  }

  #toClose(): void {
    this.#keepAlive = false;
    this.#phase = CLOSE;
  }

  #startChunk(): void {
    this.#phase = CHUNK_SIZE;
    this.#left = 0;
    this.#digits = 0;
    this.#inExt = false;
    this.#sawCR = false;
    this.#lineBytes = 0;
  }

  /** Chunk-size lines, the CRLF after chunk data, and the trailer section, byte by byte (they are short). */
  #readChunkFraming(buf: Buffer, off: number, n: number): number {
    const from = off;
    while (off < n && this.#x) {
      const c = buf[off++]!;
      if (this.#phase === CHUNK_DATA_END) {
        if (this.#sawCR ? c !== LF : c !== CR) return -1;
        if (!this.#sawCR) {
          this.#sawCR = true;
          continue;
        }
        this.#startChunk();
        continue;
      }
      if (++this.#lineBytes > (this.#phase === TRAILER ? HEAD_LIMIT : CHUNK_LINE_LIMIT)) return -1;
      if (this.#sawCR) {
        if (c !== LF) return -1;
        this.#sawCR = false;
        if (this.#phase === CHUNK_SIZE) {
          if (this.#digits === 0) return -1;
          if (this.#left === 0) {
            this.#phase = TRAILER;
            this.#lineStart = true;
            this.#lineBytes = 0;
          } else {
            this.#phase = CHUNK_DATA;
            return off - from;
          }
        } else if (this.#lineStart) {
          this.#complete(); // the empty line that ends the trailer section
          return off - from;
        } else this.#lineStart = true;
        continue;
      }
      if (c === CR) {
        this.#sawCR = true;
        continue;
      }
      if (this.#phase === TRAILER) {
        this.#lineStart = false;
        continue;
      }
      // CHUNK_SIZE: hex digits, then optional whitespace and ;-extensions, skipped up to the CRLF.
      if (this.#inExt) continue;
      const d = hexDigit(c);
      if (d >= 0) {
        if (++this.#digits > 12) return -1;
        this.#left = this.#left * 16 + d;
      } else if ((c === 0x3b /* ; */ || c === 0x20 || c === 0x09) && this.#digits > 0) this.#inExt = true;
      else return -1;
    }
    return off - from;
  }
}

function hexDigit(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x57;
  if (c >= 0x41 && c <= 0x46) return c - 0x37;
  return -1;
}

interface Active {
  lane: Lane;
  /** Connecting: the connect timeout runs from windowStart; else the low-speed window does. */
  connecting: boolean;
  bytes: number;
  windowStart: number;
  windowBytes: number;
}

/** A simulated node: its lanes (connections, per proxy of its group), its current Stratum 1, its proxy
 * (without sharding) and the members it has burned, and whether it has left the proxies. */
interface SimNode {
  /** lanes[proxy][k]: connection k to that proxy (worker k uses only lanes[*][k], one request at a time). */
  lanes: Lane[][];
  host: number;
  proxy: number;
  burned: boolean[];
  switched: boolean;
  left: boolean;
  hashed: boolean;
}

async function main(): Promise<void> {
  const plan = JSON.parse(process.argv[2]!) as NodesPlan;
  const lag = monitorEventLoopDelay({ resolution: 20 });
  lag.enable();
  const tripsByKind: Record<string, number> = {};
  const big = new Set(plan.streamPaths);
  const kindOf = (p: string) => (p.endsWith('.cvmfspublished') ? 'manifest' : big.has(p) ? 'chunk' : p.endsWith('C') ? 'catalog' : 'file');
  const cpu0 = process.cpuUsage();
  const latency: Histogram = build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });
  const refusal: Histogram = build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });
  const hist = (): Histogram => build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });
  const ttfb: Histogram = hist();
  const ttfbByKind = new Map<string, Histogram>();
  const errors: Record<string, number> = {};
  const firstErrors: Record<string, number> = {};
  const firstBytes = new Map<string, number[]>(); // path -> epoch ms of first body byte, per request
  const asked = new Map<string, number[]>(); // path -> epoch ms the request was sent
  const active = new Set<Active>();
  let requests = 0;
  let attempts = 0;
  let completed = 0;
  let bytes = 0;
  let watchdogTrips = 0;
  let generatorStallMs = 0;
  let hashFailures = 0;
  let hashChecked = 0;
  let nodesDone = 0;
  const planned = plan.poll ? 0 : plan.nodes * plan.paths.length;

  // The watchdog: libcurl's CURLOPT_LOW_SPEED_LIMIT/TIME. It must judge the proxy, not this process:
  // when the generator's own event loop stalls (thousands of busy sockets on one core, libuv reading
  // MiBs per socket per loop turn), the stall is added to every window instead of counted against
  // the proxy; so are the connect timeouts' windows. Real nodes each have their own CPU.
  let lastTick = Date.now();
  const TICK_MS = 250;
  const ticker = setInterval(() => {
    const now = Date.now();
    const stall = now - lastTick - TICK_MS;
    lastTick = now;
    if (stall > 100) {
      generatorStallMs += stall;
      for (const a of active) a.windowStart += stall;
    }
    for (const a of active) {
      if (a.connecting) {
        if (now - a.windowStart >= CONNECT_TIMEOUT_MS) a.lane.abort('connect-timeout');
        continue;
      }
      if (now - a.windowStart < WATCHDOG_MS) continue;
      if (a.bytes - a.windowBytes < LOW_SPEED_BYTES) {
        a.lane.abort('watchdog-too-slow');
      } else {
        a.windowStart = now;
        a.windowBytes = a.bytes;
      }
    }
  }, TICK_MS);
  const progress = setInterval(() => {
    const errs = Object.values(errors).reduce((a, b) => a + b, 0);
    const kinds = Object.entries({ ...firstErrors }).map(([k, v]) => `${k}=${v}`).join(' ');
    const trips = Object.entries(tripsByKind).map(([k, v]) => `${k}=${v}`).join(' ');
    process.stderr.write(`  nodes done ${nodesDone}/${plan.nodes}, requests ${requests}, burned ${burnedNodes}, refused ${refusedNodes}, errors ${errs}${kinds ? ` (first attempts: ${kinds})` : ''}${trips ? ` [trips: ${trips}]` : ''}, generator loop lag max ${(lag.max / 1e6).toFixed(0)} ms\n`);
  }, 2000);

  const count = (m: Record<string, number>, k: string) => (m[k] = (m[k] ?? 0) + 1);

  const us = (t0: number) => Math.max(1, Math.round((performance.now() - t0) * 1000)); // histograms hold µs
  // One request on a node's lane: the body's bytes are counted and hashed as they are read, no copy.
  function fetchOnce(lane: Lane, path: string, noCache: boolean, hashed: boolean, host: string): Promise<string | undefined> {
    attempts++;
    const startedAt = Date.now();
    const a: Active = { lane, connecting: true, bytes: 0, windowStart: startedAt, windowBytes: 0 };
    active.add(a);
    const t0 = performance.now();
    (asked.get(path) ?? asked.set(path, []).get(path)!).push(startedAt);
    const hash = hashed && path.includes('/data/') ? createHash('sha1') : undefined;
    let status = 0;
    let labelled = false;
    const u = new URL(path, host);
    const head = `GET ${u.href} HTTP/1.1\r\nHost: ${u.host}\r\nConnection: keep-alive\r\nUser-Agent: cvmfs Fuse 2.11.5\r\n${noCache ? 'Pragma: no-cache\r\nCache-Control: no-cache' : 'Pragma: '}\r\n\r\n`;
    return new Promise((resolve) => {
      lane.request(head, {
        written() {
          // The low-speed window runs from the request on its socket; connecting has its own 5 s.
          a.connecting = false;
          a.windowStart = Date.now();
        },
        head(s, l) {
          status = s;
          labelled = l;
        },
        data(buf, start, end) {
          if (a.bytes === 0) {
            ttfb.recordValue(us(t0));
            (ttfbByKind.get(kindOf(path)) ?? ttfbByKind.set(kindOf(path), hist()).get(kindOf(path))!).recordValue(us(t0));
            (firstBytes.get(path) ?? firstBytes.set(path, []).get(path)!).push(Date.now());
          }
          a.bytes += end - start;
          hash?.update(buf.subarray(start, end));
        },
        end(error) {
          active.delete(a);
          bytes += a.bytes;
          resolve(outcome(error));
        },
      });
    });

    function outcome(error: string | undefined): string | undefined {
      if (error === 'watchdog-too-slow') {
        watchdogTrips++;
        count(tripsByKind, `${kindOf(path)}${a.bytes > 0 ? '+bytes' : ''}`);
        return error;
      }
      if (error === 'refused' || (!error && status >= 500 && labelled)) {
        refusal.recordValue(us(t0));
        return 'refused';
      }
      if (error) return error;
      if (status !== 200) return `http-${status}`;
      if (hash) {
        hashChecked++;
        const name = path.split('/').pop()!.replace(/[A-Z]$/, '');
        const want = path.split('/').at(-2)! + name;
        if (hash.digest('hex') !== want) {
          hashFailures++;
          return 'bad-hash';
        }
      }
      latency.recordValue(us(t0));
      return undefined;
    }
  }

  const hosts = plan.origins ?? [plan.origin];
  const backoff = prng(plan.seed ^ 0x5bd1e995);
  let hostSwitches = 0;
  let burnedNodes = 0;
  let refusedNodes = 0;
  let abandoned = 0;
  const proxies = plan.proxies ?? [plan.proxy];
  const ring = plan.proxyShard ? new ShardRing(proxies) : undefined;
  let proxyBurns = 0;
  let nodesSwitchedProxy = 0;
  // proxyDns: which members the name lists now (all, until it is first resolved).
  const listed = proxies.map(() => true);
  let dnsChanges = 0;
  const resolveGroup = async () => {
    const hosts = new Set((await lookup(plan.proxyDns!.name, { all: true, family: 4 }).catch(() => [])).map((a) => a.address));
    if (hosts.size === 0) return; // a failed lookup keeps the last answer, as the client's cache does
    let changed = false;
    for (const [i, p] of proxies.entries()) {
      const now = hosts.has(new URL(p).hostname);
      if (now !== listed[i]) changed = true;
      listed[i] = now;
    }
    if (changed) dnsChanges++;
  };
  if (plan.proxyDns) await resolveGroup();
  const resolver = plan.proxyDns ? setInterval(() => void resolveGroup(), plan.proxyDns.everyMs) : undefined;
  /** The member a request goes to: its owner on the ring of the members listed and not burned, or the node's own. */
  function proxyOf(node: SimNode, path: string): number {
    if (ring) return ring.owner(shardKey(path), (i) => listed[i]! && !node.burned[i]);
    if (!listed[node.proxy]) {
      const next = proxies.findIndex((_, i) => listed[i] && !node.burned[i]);
      if (next >= 0) node.proxy = next;
    }
    return node.burned[node.proxy] ? -1 : node.proxy;
  }
  /** Burn member p (once): true if another member is left to go on with. The last member burned is not
   * counted in proxyBurns: the node leaves (burnedNodes, refusedNodes), as with a single proxy. */
  function burnProxy(node: SimNode, p: number): boolean {
    if (proxies.length === 1) return false;
    if (!node.burned[p]) {
      node.burned[p] = true;
      if (node.burned.every((b) => b)) return false;
      proxyBurns++;
      if (!node.switched) nodesSwitchedProxy++;
      node.switched = true;
      // Without sharding: the next member of the group that is left (the client's SwitchProxy).
      if (!ring && node.proxy === p) {
        for (let i = 1; i < proxies.length; i++) {
          const q = (p + i) % proxies.length;
          if (!node.burned[q]) {
            node.proxy = q;
            break;
          }
        }
      }
    }
    return node.burned.some((b) => !b);
  }
  // Failures the client blames on the proxy and retries once on it, after a backoff (cvmfs-notes §1.4, §1.5).
  const proxyFailure = (e: string) => e === 'watchdog-too-slow' || e === 'connect-timeout' || e === 'reset' || e === 'truncated';
  async function fetchWithRetry(node: SimNode, k: number, path: string): Promise<void> {
    if (node.left) {
      abandoned++;
      return;
    }
    requests++;
    let first = true;
    // One turn per member of the group: an attempt and a retry on it. A member burned by its second
    // failure (or a refusal) ends its turn, and the request goes on with the members left.
    for (;;) {
      const p = proxyOf(node, path);
      if (p < 0) {
        // The node's other lanes burned the last member while this request was failing: nowhere to go.
        count(errors, 'no-proxy-left');
        return;
      }
      const lane = node.lanes[p]![k]!;
      const h = node.host;
      const e1 = await fetchOnce(lane, path, false, node.hashed, hosts[h]!);
      if (!e1) {
        completed++;
        return;
      }
      if (first) count(firstErrors, e1);
      first = false;
      if (e1 === 'refused' && hosts.length === 1) {
        // A labelled 503 or a refused connection: the client switches proxy at once, without a retry.
        // (With several Stratum 1s and this one proxy, it tries the next Stratum 1 through it instead.)
        if (burnProxy(node, p)) continue;
        refusedNodes++;
        node.left = true;
        return;
      }
      // A node with several Stratum 1s moves on after a failure (only if no other lane already did).
      if (hosts.length > 1 && e1 !== 'bad-hash' && node.host === h) {
        node.host = (h + 1) % hosts.length;
        hostSwitches++;
      }
      if (proxyFailure(e1) && plan.backoffMs) await new Promise((r) => setTimeout(r, backoff() * plan.backoffMs!));
      // A retry after a bad hash is checked on every node, sampled or not.
      const e2 = await fetchOnce(lane, path, e1 === 'bad-hash', node.hashed || e1 === 'bad-hash', hosts[node.host]!);
      if (!e2) {
        completed++;
        return;
      }
      const refused = e2 === 'refused' && hosts.length === 1;
      // The second failure on one member: the client burns it and goes on with the rest of its group.
      if ((refused || proxyFailure(e2)) && burnProxy(node, p)) continue;
      count(errors, e2);
      if (refused) {
        refusedNodes++;
        node.left = true;
      } else if (proxyFailure(e2) && !node.left) {
        burnedNodes++;
        node.left = true;
      }
      return;
    }
  }

  const own = plan.sourceAddresses ?? true;
  const hashEvery = Math.max(1, Math.floor(plan.hashEvery ?? (plan.nodes <= 2000 ? 1 : 10)));
  const proxyUrls = proxies.map((p) => new URL(p));
  const pick = prng(plan.seed ^ 0x2545f491);
  const nodes: SimNode[] = Array.from({ length: plan.nodes }, (_, n) => ({
    lanes: proxyUrls.map((proxy) => Array.from({ length: plan.connectionsPerNode }, () => new Lane(proxy, own ? sourceAddress(n) : undefined))),
    host: 0,
    // Without sharding the client starts on one member of the group, at random.
    proxy: proxies.length > 1 ? Math.floor(pick() * proxies.length) : 0,
    burned: proxies.map(() => false),
    switched: false,
    left: false,
    hashed: n % hashEvery === 0,
  }));
  const started = Date.now();
  await Promise.all(
    nodes.map(async (node, n) => {
      if (plan.poll) {
        const end = started + plan.poll.forMs;
        // Spread the nodes' phases over one period, as real mounts are.
        await new Promise((r) => setTimeout(r, (n / plan.nodes) * plan.poll!.everyMs));
        while (Date.now() < end) {
          const t = Date.now();
          await fetchWithRetry(node, 0, plan.paths[0]!);
          await new Promise((r) => setTimeout(r, Math.max(0, plan.poll!.everyMs - (Date.now() - t))));
        }
      } else {
        let list = plan.paths;
        if (plan.order === 'shuffle') {
          const rnd = prng(plan.seed + n);
          list = [...list];
          for (let i = list.length - 1; i > 0; i--) {
            const j = Math.floor(rnd() * (i + 1));
            [list[i], list[j]] = [list[j]!, list[i]!];
          }
        }
        let next = 0;
        await Promise.all(
          node.lanes[0]!.map(async (_, k) => {
            while (next < list.length) await fetchWithRetry(node, k, list[next++]!);
          }),
        );
      }
      nodesDone++;
    }),
  );
  const wallMs = Date.now() - started;
  clearInterval(ticker);
  clearInterval(progress);
  clearInterval(resolver);
  for (const node of nodes) for (const lanes of node.lanes) for (const lane of lanes) lane.close();

  // Who got bytes before the first fill of that object completed at the origin?
  let streamedEarly = 0;
  let waitersDuring = 0;
  try {
    const st = (await (await fetch(plan.emulatorStats)).json()) as { firstComplete: Record<string, number> };
    for (const [path, times] of asked) {
      if (!big.has(path)) continue;
      const done = st.firstComplete[path];
      if (done === undefined) continue;
      const fb = (firstBytes.get(path) ?? []).slice().sort((a, b) => a - b);
      const early = times.filter((t) => t < done).length;
      waitersDuring += early;
      streamedEarly += Math.min(early, fb.filter((t) => t < done).length);
    }
  } catch {
    /* the emulator may not be reachable for external targets */
  }
  const cdf: [number, number][] = [];
  for (const q of [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100]) cdf.push([latency.getValueAtPercentile(q) / 1000, q]);
  const cpu = process.cpuUsage(cpu0);
  const report: NodesReport = {
    planned,
    requests,
    attempts,
    completed,
    bytes,
    wallMs,
    errors,
    firstAttemptErrors: firstErrors,
    watchdogTrips,
    hashFailures,
    hashChecked,
    latencyMs: { p50: latency.getValueAtPercentile(50) / 1000, p90: latency.getValueAtPercentile(90) / 1000, p99: latency.getValueAtPercentile(99) / 1000, max: latency.maxValue / 1000, cdf },
    ttfbMs: { p50: ttfb.getValueAtPercentile(50) / 1000, p99: ttfb.getValueAtPercentile(99) / 1000, max: ttfb.maxValue / 1000 },
    ttfbByKindMs: Object.fromEntries([...ttfbByKind].map(([k, h]) => [k, { p50: h.getValueAtPercentile(50) / 1000, p99: h.getValueAtPercentile(99) / 1000, max: h.maxValue / 1000 }])),
    streamedBeforeFirstFill: streamedEarly,
    waitersDuringFirstFill: waitersDuring,
    generatorCpuS: (cpu.user + cpu.system) / 1e6,
    generatorLoopLagMs: { p99: lag.percentile(99) / 1e6, max: lag.max / 1e6 },
    generatorStallS: generatorStallMs / 1000,
    tripsByKind,
    hostSwitches,
    burnedNodes,
    refusedNodes,
    proxyBurns,
    nodesSwitchedProxy,
    refusalMs: { p50: refusal.getValueAtPercentile(50) / 1000, p99: refusal.getValueAtPercentile(99) / 1000, max: refusal.maxValue / 1000 },
    abandoned,
    dnsChanges: plan.proxyDns ? dnsChanges : undefined,
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

if (import.meta.main) await main();
