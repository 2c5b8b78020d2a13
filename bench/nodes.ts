// Simulated CVMFS nodes: the load generator of the herd benchmark, run as its own process.
// Each node behaves like a cvmfs2 client (cvmfs-notes §1.4–§1.5): its own keep-alive connections
// (default 1, up to 16), absolute-form GETs through the proxy with `User-Agent: cvmfs Fuse 2.11.x`,
// a 5 s connect timeout, the "proxy too slow" watchdog (under 1 KiB/s for 5 s, first byte included),
// SHA-1 checks of every data object, and one retry after a failure (with no-cache after a bad hash).
// A node whose retry fails too has BURNED the proxy: a real client moves to its next proxy, so the node
// stops here. A labelled 503 (or a refused connection) is a refusal: the client switches proxy at once.
// Each node connects from its own address in 127.0.0.0/8, so ACLs and per-client accounting see N clients.
// Input: JSON in argv[2]. Output: one JSON report on stdout; progress lines on stderr.
import { createHash } from 'node:crypto';
import { build, type Histogram } from 'hdr-histogram-js';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Pool } from 'undici';
import { prng } from './emulator.ts';

export interface NodesPlan {
  proxy: string;
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
  latencyMs: { p50: number; p90: number; p99: number; max: number; cdf: [number, number][] };
  ttfbMs: { p50: number; p99: number; max: number };
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
  /** Nodes whose retry failed too (too slow, no connect, cut short): they burned the proxy and left. */
  burnedNodes: number;
  /** Nodes the proxy refused (a labelled 503, or a refused connection): they switched proxy at once. */
  refusedNodes: number;
  /** Time from sending the request to the refusal, ms. */
  refusalMs: { p50: number; p99: number; max: number };
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

interface Active {
  startedAt: number;
  bytes: number;
  windowStart: number;
  windowBytes: number;
  abort: AbortController;
  tripped: boolean;
}

class TooSlow extends Error {}

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
  const ttfb: Histogram = build({ lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: 3 });
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
  let nodesDone = 0;
  const planned = plan.poll ? 0 : plan.nodes * plan.paths.length;

  // The watchdog: libcurl's CURLOPT_LOW_SPEED_LIMIT/TIME. It must judge the proxy, not this process:
  // when the generator's own event loop stalls (1,000 busy sockets on one core, libuv reading up to
  // 2 MiB per socket per loop turn), the stall is added to every window instead of counted against
  // the proxy. Real nodes each have their own CPU.
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
      if (now - a.windowStart < WATCHDOG_MS) continue;
      if (a.bytes - a.windowBytes < LOW_SPEED_BYTES) {
        a.tripped = true;
        a.abort.abort(new TooSlow('proxy too slow'));
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

  // One request through undici's dispatch API: callbacks per chunk, no stream or promise per chunk,
  // so that 1,000 simulated nodes cost the generator as little CPU as possible.
  function fetchOnce(pool: Pool, path: string, noCache: boolean, host = plan.origin): Promise<string | undefined> {
    attempts++;
    const a: Active = { startedAt: Date.now(), bytes: 0, windowStart: Date.now(), windowBytes: 0, abort: new AbortController(), tripped: false };
    active.add(a);
    const t0 = performance.now();
    const headers: Record<string, string> = { 'user-agent': 'cvmfs Fuse 2.11.5', pragma: '' };
    if (noCache) Object.assign(headers, { pragma: 'no-cache', 'cache-control': 'no-cache' });
    (asked.get(path) ?? asked.set(path, []).get(path)!).push(a.startedAt);
    const isData = path.includes('/data/');
    const hash = isData ? createHash('sha1') : undefined;
    let status = 0;
    let contentLength = -1;
    let labelled = false;
    let first = true;
    return new Promise((resolve) => {
      const done = (outcome: string | undefined) => {
        active.delete(a);
        resolve(outcome);
      };
      pool.dispatch(
        { path: `${host}${path}`, method: 'GET', headers },
        {
          onRequestStart(controller) {
            // The low-speed window runs from the request on its socket; connecting has its own 5 s.
            a.windowStart = Date.now();
            a.abort.signal.addEventListener('abort', () => controller.abort(new TooSlow('proxy too slow')), { once: true });
          },
          onResponseStart(_c, statusCode, h) {
            status = statusCode;
            const cl = h['content-length'];
            if (typeof cl === 'string') contentLength = Number(cl);
            // A proxy's own failure carries X-Squid-Error or Proxy-Status error= (cvmfs-notes §1.5).
            labelled = h['x-squid-error'] !== undefined || /error=/.test(String(h['proxy-status'] ?? ''));
          },
          onResponseData(_c, chunk) {
            if (first) {
              first = false;
              ttfb.recordValue(Math.max(1, Math.round((performance.now() - t0) * 1000)));
              (firstBytes.get(path) ?? firstBytes.set(path, []).get(path)!).push(Date.now());
            }
            a.bytes += chunk.length;
            hash?.update(chunk);
          },
          onResponseEnd() {
            bytes += a.bytes;
            if (status >= 500 && labelled) {
              refusal.recordValue(Math.max(1, Math.round((performance.now() - t0) * 1000)));
              return done('refused');
            }
            if (status !== 200) return done(`http-${status}`);
            if (contentLength >= 0 && a.bytes !== contentLength) return done('truncated');
            if (hash) {
              const name = path.split('/').pop()!.replace(/[A-Z]$/, '');
              const want = path.split('/').at(-2)! + name;
              if (hash.digest('hex') !== want) {
                hashFailures++;
                return done('bad-hash');
              }
            }
            latency.recordValue(Math.max(1, Math.round((performance.now() - t0) * 1000)));
            done(undefined);
          },
          onResponseError(_c, err) {
            bytes += a.bytes;
            if (a.tripped) {
              watchdogTrips++;
              count(tripsByKind, `${kindOf(path)}${a.bytes > 0 ? '+bytes' : ''}`);
              return done('watchdog-too-slow');
            }
            const code = (err as { code?: string }).code ?? '';
            if (code === 'UND_ERR_CONNECT_TIMEOUT') return done('connect-timeout');
            if (code === 'ECONNREFUSED') {
              refusal.recordValue(Math.max(1, Math.round((performance.now() - t0) * 1000)));
              return done('refused');
            }
            if (code === 'UND_ERR_SOCKET' || code === 'ECONNRESET') return done(a.bytes > 0 ? 'truncated' : 'reset');
            done(`other:${code || err.message}`);
          },
        },
      );
    });
  }

  const hosts = plan.origins ?? [plan.origin];
  const hostOf = new Map<Pool, number>();
  const left = new Set<Pool>();
  const backoff = prng(plan.seed ^ 0x5bd1e995);
  let hostSwitches = 0;
  let burnedNodes = 0;
  let refusedNodes = 0;
  let abandoned = 0;
  // Failures the client blames on the proxy and retries once on it, after a backoff (cvmfs-notes §1.4, §1.5).
  const proxyFailure = (e: string) => e === 'watchdog-too-slow' || e === 'connect-timeout' || e === 'reset' || e === 'truncated';
  async function fetchWithRetry(pool: Pool, path: string): Promise<void> {
    if (left.has(pool)) {
      abandoned++;
      return;
    }
    requests++;
    const h = hostOf.get(pool) ?? 0;
    const e1 = await fetchOnce(pool, path, false, hosts[h]);
    if (!e1) {
      completed++;
      return;
    }
    count(firstErrors, e1);
    if (e1 === 'refused' && hosts.length === 1) {
      // A labelled 503 or a refused connection: the client switches proxy at once, without a retry.
      // (With several Stratum 1s and this one proxy, it tries the next Stratum 1 through it instead.)
      refusedNodes++;
      left.add(pool);
      return;
    }
    // A node with several Stratum 1s moves on after a failure (only if no other lane already did).
    if (hosts.length > 1 && e1 !== 'bad-hash' && (hostOf.get(pool) ?? 0) === h) {
      hostOf.set(pool, (h + 1) % hosts.length);
      hostSwitches++;
    }
    if (proxyFailure(e1) && plan.backoffMs) await new Promise((r) => setTimeout(r, backoff() * plan.backoffMs!));
    const e2 = await fetchOnce(pool, path, e1 === 'bad-hash', hosts[hostOf.get(pool) ?? 0]);
    if (!e2) {
      completed++;
      return;
    }
    count(errors, e2);
    if (e2 === 'refused' && hosts.length === 1) {
      refusedNodes++;
      left.add(pool);
    } else if (proxyFailure(e2) && !left.has(pool)) {
      burnedNodes++;
      left.add(pool);
    }
  }

  const own = plan.sourceAddresses ?? true;
  const pools = Array.from({ length: plan.nodes }, (_, n) => new Pool(plan.proxy, { connections: plan.connectionsPerNode, pipelining: 1, connect: { timeout: 5000 }, ...(own ? { localAddress: sourceAddress(n) } : {}), headersTimeout: 0, bodyTimeout: 0, keepAliveTimeout: 60_000 }));
  const started = Date.now();
  await Promise.all(
    pools.map(async (pool, n) => {
      if (plan.poll) {
        const end = started + plan.poll.forMs;
        // Spread the nodes' phases over one period, as real mounts are.
        await new Promise((r) => setTimeout(r, (n / plan.nodes) * plan.poll!.everyMs));
        while (Date.now() < end) {
          const t = Date.now();
          await fetchWithRetry(pool, plan.paths[0]!);
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
        const lane = async () => {
          while (next < list.length) await fetchWithRetry(pool, list[next++]!);
        };
        await Promise.all(Array.from({ length: plan.connectionsPerNode }, lane));
      }
      nodesDone++;
    }),
  );
  const wallMs = Date.now() - started;
  clearInterval(ticker);
  clearInterval(progress);
  await Promise.all(pools.map((p) => p.close()));

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
    latencyMs: { p50: latency.getValueAtPercentile(50) / 1000, p90: latency.getValueAtPercentile(90) / 1000, p99: latency.getValueAtPercentile(99) / 1000, max: latency.maxValue / 1000, cdf },
    ttfbMs: { p50: ttfb.getValueAtPercentile(50) / 1000, p99: ttfb.getValueAtPercentile(99) / 1000, max: ttfb.maxValue / 1000 },
    streamedBeforeFirstFill: streamedEarly,
    waitersDuringFirstFill: waitersDuring,
    generatorCpuS: (cpu.user + cpu.system) / 1e6,
    generatorLoopLagMs: { p99: lag.percentile(99) / 1e6, max: lag.max / 1e6 },
    generatorStallS: generatorStallMs / 1000,
    tripsByKind,
    hostSwitches,
    burnedNodes,
    refusedNodes,
    refusalMs: { p50: refusal.getValueAtPercentile(50) / 1000, p99: refusal.getValueAtPercentile(99) / 1000, max: refusal.maxValue / 1000 },
    abandoned,
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

if (import.meta.main) await main();
