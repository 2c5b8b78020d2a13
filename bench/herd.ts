// The herd benchmark: simulated CVMFS nodes against cuttle and against Squid (or any proxy), side by side.
//   npm run bench -- --scenario herd --compare squid --rounds 3
//   npm run bench -- --scenario herd --target http://proxy.example:3128
// Each target runs cold (fresh cache, fresh emulator) in A B A B order; the table shows medians and the
// ratio cuttle/other. Results go to bench/results/ (JSON, Markdown, SVG).
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { makeCatalog, startEmulator, type EmulatorOptions, type EmulatorStats } from './emulator.ts';
import { startWanEmulator, type WanOptions } from './wan.ts';
import type { NodesPlan, NodesReport } from './nodes.ts';
import { HOT_CONNECTIONS, markdownTable, svgChart, type RunResult } from './report.ts';
import { kernelTcpWarning, somaxconn, watchKernelTcp } from './kernel-tcp.ts';
import { externalTarget, hasTaskset, nginxBinary, procStats, squidBinary, startCuttle, startNginx, startNodeHttp, startSquid, startAts, startVarnish, atsBinary, varnishBinary, type Target } from './targets.ts';
import { runBulk } from './bulk.ts';
import { runWrk, wrkBinary } from './wrk.ts';
import { checkOwnership, entries, HostsEntries, PEERS_NAME, CLIENTS_NAME, roll, type Member, type RollStep } from './rolling.ts';
import { tmpdir } from 'node:os';

export type HotClient = 'wrk' | 'bulk';

export interface Scenario {
  name: string;
  kind: 'herd' | 'hot' | 'poll' | 'memory' | 'skip' | 'parent' | 'bank' | 'warm' | 'rolling';
  nodes: number;
  objects: number;
  order: 'same' | 'shuffle';
  latencyMs: number;
  chunkBytesPerSec?: number;
  hotObjectBytes?: number;
  hotSeconds?: number;
  /** hot: each count is measured in turn (wrk, one thread), after a warm-up at the first. */
  hotConnections?: readonly number[];
  hotWarmupSeconds?: number;
  /** hot: the load generator. wrk reads 8 KiB per call, so large objects use the bulk reader (bench/bulk.ts). */
  hotClient?: HotClient;
  poll?: { everyMs: number; forMs: number };
  /** memory: distinct small objects filled through the proxy, and their body size. */
  memoryObjects?: number;
  memoryObjectBytes?: number;
  /** mirror-kill: latencies of three mirrors; the first (nearest, the one nodes name) dies mid-run. */
  mirrorLatenciesMs?: number[];
  /** Kill the nearest mirror once it has sent this fraction of the catalogue's bytes. */
  killAtFraction?: number;
  /** Chunk sizes (MiB, min and max) and count; default 16-24 MiB, about 1% of the objects. */
  chunkMiB?: [number, number];
  chunks?: number;
  /** More arguments for cuttle in this scenario (overload: its connection limit). */
  cuttleArgs?: string[];
  /** parent and bank: the set-ups compared, run in place of --target/--compare (which may pick some). */
  variants?: readonly string[];
  why?: string;
}

/**
 * A herd of more than LARGE_HERD nodes fetches what the 10,000-node rig of issue 30 fetched: 11 objects
 * with one 2 MiB chunk (10,000 × 200 objects would be 550 GB through loopback). --objects overrides it.
 */
const LARGE_HERD = 2000;
const LARGE_HERD_OBJECTS = { objects: 11, chunkMiB: [2, 2] as [number, number], chunks: 1 };

/** parent: what the two parents are. */
const PARENT_VARIANTS = ['cuttle-parents', 'squid-parents'] as const;
/** bank: with or without --bank, nodes that shard or pick one member at random, a member killed or not. */
const BANK_VARIANTS = ['bank-shard', 'bank-random', 'nobank-random', 'bank-shard-kill', 'bank-random-kill'] as const;
/** The bank's members: one loopback address each (Linux answers on all of 127.0.0.0/8). */
export const BANK_HOSTS = ['127.0.0.1', '127.0.0.2', '127.0.0.3'] as const;

export const SCENARIOS: Record<string, Scenario> = {
  herd: { name: 'herd', kind: 'herd', nodes: 1000, objects: 200, order: 'same', latencyMs: 50 },
  'herd-shuffle': { name: 'herd-shuffle', kind: 'herd', nodes: 1000, objects: 200, order: 'shuffle', latencyMs: 50 },
  'herd-slow': { name: 'herd-slow', kind: 'herd', nodes: 1000, objects: 200, order: 'same', latencyMs: 200, chunkBytesPerSec: 2 * 2 ** 20 },
  'mirror-kill': { name: 'mirror-kill', kind: 'herd', nodes: 1000, objects: 100, order: 'same', latencyMs: 20, mirrorLatenciesMs: [20, 60, 100], chunkBytesPerSec: 8 * 2 ** 20, killAtFraction: 0.3 },
  'hot-small': { name: 'hot-small', kind: 'hot', nodes: 0, objects: 0, order: 'same', latencyMs: 0, hotObjectBytes: 4096, hotSeconds: 10, hotWarmupSeconds: 3, hotConnections: HOT_CONNECTIONS },
  'hot-large': { name: 'hot-large', kind: 'hot', nodes: 0, objects: 0, order: 'same', latencyMs: 0, hotObjectBytes: 2 ** 20, hotSeconds: 10, hotWarmupSeconds: 3, hotConnections: HOT_CONNECTIONS, hotClient: 'bulk' },
  'hot-chunk': { name: 'hot-chunk', kind: 'hot', nodes: 0, objects: 0, order: 'same', latencyMs: 0, hotObjectBytes: 4 * 2 ** 20, hotSeconds: 10, hotWarmupSeconds: 3, hotConnections: HOT_CONNECTIONS, hotClient: 'bulk' },
  // Does --memory-cache bound memory? Many distinct small objects through a small memory tier; RSS is
  // read before and after (the bench's --memory-cache sets cuttle's tier and Squid's cache_mem alike).
  memory: { name: 'memory', kind: 'memory', nodes: 0, objects: 0, order: 'same', latencyMs: 0, memoryObjects: 100_000, memoryObjectBytes: 512 },
  // Overload: twice the nodes cuttle admits (--max-client-connections 2000), as one herd. Each node either
  // completes or is refused at once (a labelled 503), and switches proxy: none may trickle into a burn.
  // The other targets run with their own limits (Squid and nginx have no refusal of this kind).
  overload: { name: 'overload', kind: 'herd', nodes: 4000, objects: 11, chunkMiB: [2, 2], chunks: 1, order: 'same', latencyMs: 50, cuttleArgs: ['--max-client-connections', '2000'] },
  // Issue 29. A herd through a cuttle child under two parents (first-up, --never-direct), the parents two
  // cuttles or two Squids; the first parent is killed (SIGKILL) once the Stratum 1 has sent 30% of the
  // catalogue. Chunks are capped at 8 MiB/s at the Stratum 1, as in mirror-kill, so fills are in flight.
  parent: { name: 'parent', kind: 'parent', nodes: 500, objects: 100, chunkMiB: [4, 8], order: 'same', latencyMs: 20, chunkBytesPerSec: 8 * 2 ** 20, killAtFraction: 0.3, variants: PARENT_VARIANTS },
  // Issue 29. Three cuttles on 127.0.0.1, .2 and .3, the nodes spread over them as one proxy group:
  // with --bank (and without, the comparison), nodes that shard as CVMFS_PROXY_SHARD=yes clients and
  // nodes that each use one member at random; the -kill variants SIGKILL member 2 at 30% of the catalogue.
  // --workers 2 against --workers 1 (issue 29 §3): hot 4 KiB hits, req/s per second of proxy CPU, and
  // each worker's share. Run the herd with --target workers-2 for its fetches per object.
  workers: { name: 'workers', kind: 'hot', nodes: 0, objects: 0, order: 'same', latencyMs: 0, hotObjectBytes: 4096, hotSeconds: 10, hotWarmupSeconds: 3, hotConnections: [64, 256], variants: ['workers-1', 'workers-2', 'workers-2-core0'] },
  bank: { name: 'bank', kind: 'bank', nodes: 600, objects: 100, chunkMiB: [4, 8], order: 'same', latencyMs: 20, chunkBytesPerSec: 8 * 2 ** 20, killAtFraction: 0.3, variants: BANK_VARIANTS },
  // Issue 31: `cuttle warm` against the emulator's repository in cvmfs's format (bench/warm-scenario.ts);
  // --objects sizes the repository, --nodes the herd that follows the warm.
  warm: { name: 'warm', kind: 'warm', nodes: 1000, objects: 1000, order: 'same', latencyMs: 50 },
  // Issue 32 §3. The bank of three with membership from DNS (/etc/hosts, bench/rolling.ts), 1,000 nodes
  // that shard and re-resolve the bank's name every second; once 10% of the catalogue has been sent, each
  // member in turn is drained (POST /drain), leaves the name, gets SIGTERM and starts again on its cache.
  rolling: { name: 'rolling', kind: 'rolling', nodes: 1000, objects: 200, chunkMiB: [2, 4], order: 'same', latencyMs: 20, chunkBytesPerSec: 4 * 2 ** 20, killAtFraction: 0.1, variants: ['bank-dns-shard'] },
  'manifest-poll': { name: 'manifest-poll', kind: 'poll', nodes: 1000, objects: 0, order: 'same', latencyMs: 50, poll: { everyMs: 5000, forMs: 60_000 } },
};

const REPO = 'atlas.cern.ch';

async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, host, () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
}

/** Whether `port` is free on `host`. */
function freePortIs(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, host, () => s.close(() => resolve(true)));
  });
}

function runNodes(plan: NodesPlan): Promise<NodesReport> {
  return new Promise((resolve, reject) => {
    const script = new URL('./nodes.ts', import.meta.url).pathname;
    const args = [script, JSON.stringify(plan)];
    // The generator shares core 1 with the Stratum 1 emulator. It runs at a lower priority, so the
    // emulator (a separate machine in real life) is not starved by the clients it serves.
    const pin = hasTaskset ? 'exec nice -n 10 taskset -c 1 "$0" "$@"' : 'exec nice -n 10 "$0" "$@"';
    const child = spawn('bash', ['-c', `ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; ${pin}`, process.execPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (c) => (out += c));
    child.stderr.on('data', (c) => {
      err += c;
      process.stderr.write(c);
    });
    child.on('exit', (code) => {
      try {
        resolve(JSON.parse(out.trim().split('\n').pop()!) as NodesReport);
      } catch {
        reject(new Error(`load generator failed (${code}): ${err.slice(-2000)}`));
      }
    });
  });
}

export interface RunOptions {
  scenario: Scenario;
  target: string; // 'cuttle' | 'squid' | URL
  round: number;
  seed: number;
  memoryCache: string;
  connectionsPerNode: number;
  /** More command-line arguments for cuttle (try a setting against the defaults). */
  cuttleArgs?: string[];
  /** Put the Stratum 1 emulator behind a WAN (bench/wan.ts): its RTT replaces the scenario's latency. */
  wan?: Omit<WanOptions, 'emulator'>;
}

/** A Stratum 1 emulator of a run, in this process or (WAN) in a child: its stats are read at the end. */
interface RunOrigin {
  url: string;
  /** In-process only: the live counters (mirror-kill watches them). */
  live?: EmulatorStats;
  snapshot(): Promise<EmulatorStats>;
  close(): Promise<void>;
}

/** The proxies of a parent or bank run: who the nodes talk to, and who is killed mid-herd. */
interface Topology {
  /** Every proxy process (the victim too): their CPU is the run's proxy CPU. */
  procs: Target[];
  /** parent: the child; the others are parents. */
  child?: Target;
  /** The nodes' proxy group (bank: the members as `http://IP:PORT`, the ring's URLs). */
  nodeProxies: string[];
  /** The nodes shard as CVMFS_PROXY_SHARD=yes clients (bank); else each uses one member at random. */
  shard: boolean;
  victim?: Target;
  victimName?: string;
}

/** Start the proxies of a parent or bank variant (all pinned to the proxy core): stopped again if one fails. */
async function startTopology(sc: Scenario, variant: string, memoryCache: string, cuttleArgs: string[]): Promise<Topology> {
  const procs: Target[] = [];
  try {
    if (sc.kind === 'parent') {
      if (!(PARENT_VARIANTS as readonly string[]).includes(variant)) throw new Error(`parent runs ${PARENT_VARIANTS.join(' or ')}, not ${variant}`);
      for (const i of [1, 2]) {
        const port = await freePort();
        // Each proxy its own name: a parent named like its child would take the child's Via for a loop.
        procs.push(variant === 'squid-parents' ? await startSquid(port, { memoryCacheMB: Math.round(parseSizeMB(memoryCache)), visibleHostname: `parent${i}`, name: `squid-parent${i}` }) : await startCuttle(port, { memoryCache, name: `cuttle-parent${i}`, extra: ['--visible-hostname', `parent${i}`] }));
      }
      const parents = [...procs];
      const child = await startCuttle(await freePort(), { memoryCache, name: 'child', extra: ['--visible-hostname', 'child', ...parents.flatMap((p) => ['--parent', p.url]), '--parent-policy', 'first-up', '--never-direct', ...cuttleArgs] });
      procs.unshift(child);
      return { procs, child, nodeProxies: [child.url], shard: false, victim: parents[0], victimName: 'parent 1' };
    }
    if (!(BANK_VARIANTS as readonly string[]).includes(variant)) throw new Error(`bank runs ${BANK_VARIANTS.join(', ')}, not ${variant}`);
    const ports: number[] = [];
    for (const h of BANK_HOSTS) ports.push(await freePort(h));
    const urls = BANK_HOSTS.map((h, i) => `http://${h}:${ports[i]}`);
    const bank = !variant.startsWith('nobank') ? urls.flatMap((u) => ['--bank', u]) : [];
    for (const [i, host] of BANK_HOSTS.entries()) procs.push(await startCuttle(ports[i]!, { memoryCache, host, name: `member${i + 1}`, extra: ['--visible-hostname', `member${i + 1}`, ...bank, ...cuttleArgs] }));
    return { procs, nodeProxies: urls, shard: variant.includes('shard'), victim: variant.endsWith('-kill') ? procs[1] : undefined, victimName: 'member 2 (127.0.0.2)' };
  } catch (e) {
    for (const p of procs) await p.stop();
    throw e;
  }
}

/** One cold run of one scenario against one target. */
export async function runOnce(o: RunOptions): Promise<RunResult> {
  const sc = o.scenario;
  const { specs, bodies } = makeCatalog({ repo: REPO, objects: sc.kind === 'hot' ? 0 : sc.objects, seed: o.seed, chunkMiB: sc.chunkMiB, chunks: sc.chunks });
  if (sc.kind === 'hot') {
    const b = Buffer.alloc(sc.hotObjectBytes!, 7);
    const hash = (await import('node:crypto')).createHash('sha1').update(b).digest('hex');
    const path = `/cvmfs/${REPO}/data/${hash.slice(0, 2)}/${hash.slice(2)}`;
    bodies.set(path, b);
    specs.push({ path, hash, size: b.length, kind: 'file' });
  }
  const result0: Partial<RunResult> = {};
  const emuOpts: EmulatorOptions = { repo: REPO, bodies, latencyMs: sc.latencyMs, chunkBytesPerSec: sc.chunkBytesPerSec, seed: o.seed };
  const local = async (opts: EmulatorOptions): Promise<RunOrigin> => {
    const e = await startEmulator(opts);
    return { url: e.url, live: e.stats, snapshot: async () => e.stats, close: () => e.close() };
  };
  let emu: RunOrigin;
  if (o.wan) {
    if (sc.kind !== 'herd' || sc.mirrorLatenciesMs) throw new Error(`--wan runs the herd scenarios with one Stratum 1, not ${sc.name}`);
    const w = await startWanEmulator({ ...o.wan, emulator: { catalog: { repo: REPO, objects: sc.objects, seed: o.seed, chunkMiB: sc.chunkMiB, chunks: sc.chunks }, chunkBytesPerSec: sc.chunkBytesPerSec, seed: o.seed } });
    result0.wan = `${w.mode}${w.why ? ` (${w.why})` : ''}, RTT ${o.wan.rttMs ?? 80} ms, ${o.wan.rateMbit ?? 1000} Mbit/s`;
    process.stderr.write(`  WAN: ${w.mode}${w.why ? ` (${w.why})` : ` ${w.netns} over ${w.veth}`}, RTT ${o.wan.rttMs ?? 80} ms, ${o.wan.rateMbit ?? 1000} Mbit/s, Stratum 1 at ${w.url}\n`);
    emu = { url: w.url, snapshot: () => w.stats(), close: () => w.close() };
  } else emu = await local(emuOpts);
  // mirror-kill: two more mirrors with the same content, farther away. cuttle is told they are one group;
  // Squid has no such notion, and its nodes fail over to the next Stratum 1 themselves.
  const others = await Promise.all((sc.mirrorLatenciesMs ?? []).slice(1).map((latencyMs) => local({ ...emuOpts, latencyMs })));
  const emus = [emu, ...others];
  const port = await freePort();
  let target: Target;
  let topo: Topology | undefined;
  let adminPort: number | undefined;
  /** Requests each worker has served (--workers), from /status. */
  const workerRequests = async (): Promise<number[] | undefined> => {
    if (adminPort === undefined) return undefined;
    const s = (await (await fetch(`http://127.0.0.1:${adminPort}/status`)).json()) as { workers?: { requests: number | null }[]; counters: { requests: number } };
    return s.workers ? s.workers.map((w) => w.requests ?? 0) : [s.counters.requests];
  };
  const mirrorArgs = others.length ? emus.flatMap((e) => ['--stratum1', e.url, '--probe-repo', REPO]) : [];
  let rolling: { members: Member[]; hosts: HostsEntries; restart: (m: Member) => Promise<Target>; dirs: string[] } | undefined;
  if (sc.kind === 'rolling') {
    if (process.getuid?.() !== 0) throw new Error('rolling edits /etc/hosts (the bank\'s DNS): run it as root');
    // One port free on all three addresses: --bank-dns gives every member the same port.
    let port0 = 0;
    for (let tries = 0; tries < 20 && !port0; tries++) {
      const p = await freePort(BANK_HOSTS[0]);
      if ((await Promise.all(BANK_HOSTS.slice(1).map((h) => freePortIs(h, p)))).every(Boolean)) port0 = p;
    }
    if (!port0) throw new Error('rolling: no port free on 127.0.0.1-3');
    const hosts = new HostsEntries();
    const dirs = BANK_HOSTS.map(() => mkdtempSync(join(tmpdir(), 'cuttle-rolling-')));
    const args = (i: number) => ['--visible-hostname', `member${i + 1}`, '--bank-dns', `${PEERS_NAME}:${port0}`, '--bank-dns-interval', '1s', '--probe-interval', '1s', '--shutdown-timeout', '20s', ...(sc.cuttleArgs ?? []), ...(o.cuttleArgs ?? [])];
    const admins: number[] = [];
    for (const _ of BANK_HOSTS) admins.push(await freePort());
    const restart = (m: Member) => startCuttle(m.port, { memoryCache: o.memoryCache, host: m.host, name: `member${m.index + 1}`, admin: m.admin, dir: m.dir, extra: args(m.index) });
    const members: Member[] = [];
    try {
      hosts.set(BANK_HOSTS.flatMap((h): [string, string][] => [[h, CLIENTS_NAME], [h, PEERS_NAME]]));
      for (const [i, host] of BANK_HOSTS.entries()) {
        const m: Member = { index: i, host, port: port0, admin: admins[i]!, dir: dirs[i]!, target: undefined as unknown as Target };
        m.target = await restart(m);
        members.push(m);
      }
    } catch (e) {
      for (const m of members) await m.target.stop();
      hosts.restore();
      for (const d of dirs) rmSync(d, { recursive: true, force: true });
      throw e;
    }
    rolling = { members, hosts, restart, dirs };
    // The members' CPU: each process of the run (a restarted one's read before its stop).
    topo = { procs: members.map((m) => m.target), nodeProxies: members.map((m) => `http://${m.host}:${m.port}`), shard: true };
    target = { name: o.target, url: topo.nodeProxies[0]!, pid: members[0]!.target.pid, stop: async () => { for (const m of members) await m.target.stop(); hosts.restore(); for (const d of dirs) rmSync(d, { recursive: true, force: true }); } };
  } else if (sc.kind === 'parent' || sc.kind === 'bank') {
    topo = await startTopology(sc, o.target, o.memoryCache, [...(sc.cuttleArgs ?? []), ...(o.cuttleArgs ?? [])]);
    const procs = topo.procs;
    target = { name: o.target, url: topo.nodeProxies[0]!, pid: procs[0]!.pid, stop: async () => { for (const p of procs) await p.stop(); } };
  } else if (o.target === 'cuttle') target = await startCuttle(port, { memoryCache: o.memoryCache, extra: [...mirrorArgs, ...(sc.cuttleArgs ?? []), ...(o.cuttleArgs ?? [])] });
  else if (/^workers-\d+(-core0)?$/.test(o.target)) {
    // cuttle with --workers N: every core when N > 1, or all on core 0 (-core0: the same CPU budget as one
    // worker, so what two event loops cost shows apart from the cores they share with the generator).
    // Its admin listener is read for each worker's requests.
    adminPort = await freePort();
    const [, n, core0] = /^workers-(\d+)(-core0)?$/.exec(o.target)!;
    target = await startCuttle(port, { memoryCache: o.memoryCache, name: o.target, admin: adminPort, core: core0 ? 0 : undefined, extra: [...mirrorArgs, ...(sc.cuttleArgs ?? []), ...(o.cuttleArgs ?? []), '--workers', n!] });
  }
  else if (o.target === 'squid') target = await startSquid(port, { memoryCacheMB: Math.round(parseSizeMB(o.memoryCache)) });
  else if (o.target === 'nginx') {
    if (others.length) throw new Error(`${sc.name} has several mirrors; nginx proxies one origin`);
    target = await startNginx(port, { origin: emu.url });
  } else if (o.target === 'varnish') {
    if (others.length) throw new Error(`${sc.name} has several mirrors; varnish proxies one origin here`);
    target = await startVarnish(port, { origin: emu.url, memoryCacheMB: Math.round(parseSizeMB(o.memoryCache)) });
  } else if (o.target === 'ats') target = await startAts(port, { memoryCacheMB: Math.round(parseSizeMB(o.memoryCache)) });
  else if (o.target === 'node-http') {
    if (sc.kind !== 'hot') throw new Error(`node-http is a reference for the hot scenarios only, not ${sc.name}`);
    target = await startNodeHttp(port, { bodyBytes: sc.hotObjectBytes! });
  } else target = externalTarget(o.target);
  const startedAt = new Date().toISOString();
  const t0 = Date.now();
  // A parent or bank run: every proxy's CPU and peak RSS, summed; a killed one's as read before its kill.
  const procs = topo?.procs ?? [target];
  const lastStats = new Map<Target, { cpuS: number; peakRssMiB: number }>();
  const statsOf = (t: Target) => lastStats.get(t) ?? procStats(t);
  const cpuStart = new Map(procs.map((t) => [t, procStats(t).cpuS]));
  const cpuOf = (ts: Target[]) => ts.reduce((a, t) => a + statsOf(t).cpuS - cpuStart.get(t)!, 0);
  const kernel = watchKernelTcp();
  // rolling: each member's turn, and each path's upstream fetch times (sampled every 50 ms).
  let steps: RollStep[] | undefined;
  let herdEndedAt = 0;
  const fetchTimes = new Map<string, number[]>();
  const result: RunResult = { scenario: sc.name, target: target.name, round: o.round, startedAt, uniqueObjects: 0, upstreamFetches: 0, emulatorRequests: 0, fetchesPerObjectMean: NaN, fetchesPerObjectMax: NaN, objectsFetchedMoreThanOnce: 0, proxyCpuS: NaN, proxyPeakRssMiB: NaN, goodputMiBs: NaN, wallS: NaN, ...result0 };
  try {
    if (sc.kind === 'memory') {
      const m = await fillMany(target.url, sc.memoryObjects!, sc.memoryObjectBytes!, target.pid);
      result.rssBeforeMiB = m.rssBeforeMiB;
      result.rssAfterMiB = m.rssAfterMiB;
      result.hotErrors = m.errors;
      result.wallS = (Date.now() - t0) / 1000;
    } else if (sc.kind === 'hot') {
      const url = `${emu.url}${specs[0]!.path}`;
      // Warm the cache (twice: a disk hit is promoted to memory on its second sighting), then the JIT.
      for (let i = 0; i < 3; i++) await fetchVia(target.url, url);
      const load = sc.hotClient === 'bulk' ? runBulk : runWrk;
      result.hotClient = sc.hotClient ?? 'wrk';
      await load({ proxy: target.url, url, connections: sc.hotConnections![0]!, seconds: sc.hotWarmupSeconds!, core: 1 });
      result.hot = [];
      for (const connections of sc.hotConnections!) {
        const c0 = procStats(target).cpuS;
        const r0 = await workerRequests();
        const w = await load({ proxy: target.url, url, connections, seconds: sc.hotSeconds!, core: 1 });
        const r1 = await workerRequests();
        const perWorker = r0 && r1 ? r1.map((n, i) => Math.round((n - (r0[i] ?? 0)) / sc.hotSeconds!)) : undefined;
        const proxyShare = (procStats(target).cpuS - c0) / sc.hotSeconds!;
        result.hot.push({ ...w, proxyShare, perWorkerReqPerSec: perWorker });
        process.stderr.write(`  ${connections} connections: ${w.reqPerSec.toFixed(0)} req/s (${(w.reqPerSec / proxyShare).toFixed(0)} per second of proxy CPU${perWorker ? `; per worker ${perWorker.join(' / ')}` : ''}), proxy at ${(100 * proxyShare).toFixed(0)}% of a core, generator at ${(100 * w.generatorShare).toFixed(0)}%\n`);
      }
      result.hotErrors = result.hot.reduce((a, h) => a + h.errors, 0);
      result.wallS = (Date.now() - t0) / 1000;
    } else {
      const paths = sc.kind === 'poll' ? [`/cvmfs/${REPO}/.cvmfspublished`] : [`/cvmfs/${REPO}/.cvmfspublished`, ...specs.map((s) => s.path)];
      let killer: NodeJS.Timeout | undefined;
      if (sc.killAtFraction && (!topo || topo.victim)) {
        const total = specs.reduce((a, x) => a + x.size, 0);
        // A proxy is killed while the Stratum 1 is sending a first fill (a path asked for and not yet
        // answered whole), so a fill through it is cut, not only its clients' hits.
        const filling = () => Object.keys(emu.live!.perPath).some((p) => emu.live!.firstComplete[p] === undefined);
        killer = setInterval(() => {
          if (emu.live!.bytes < total * sc.killAtFraction!) return;
          if (topo?.victim && !filling()) return;
          clearInterval(killer);
          const at = (Date.now() - t0) / 1000;
          if (topo?.victim) {
            // As a crash: SIGKILL, its connections cut by the kernel. Its CPU is read just before.
            const victim = topo.victim;
            lastStats.set(victim, procStats(victim));
            result.killedAtS = at;
            result.killed = topo.victimName;
            process.stderr.write(`  killing ${topo.victimName} at ${at.toFixed(1)} s\n`);
            if (victim.pid) process.kill(victim.pid, 'SIGKILL');
            return;
          }
          result.mirrorKilledAtS = at;
          process.stderr.write(`  killing the nearest mirror at ${at.toFixed(1)} s\n`);
          void emu.close();
        }, 50);
      }
      // rolling: once killAtFraction of the catalogue has been sent, each member in turn is drained and
      // restarted; every path's upstream count is sampled (50 ms) to place its fetches against the roll.
      let rolled: Promise<RollStep[]> | undefined;
      let sampler: NodeJS.Timeout | undefined;
      if (rolling) {
        const r = rolling;
        const total = specs.reduce((a, x) => a + x.size, 0);
        sampler = setInterval(() => {
          const now = Date.now();
          for (const [p, n] of Object.entries(emu.live!.perPath)) {
            const times = fetchTimes.get(p) ?? fetchTimes.set(p, []).get(p)!;
            while (times.length < n) times.push(now);
          }
        }, 50);
        rolled = (async () => {
          while (emu.live!.bytes < total * sc.killAtFraction!) await new Promise((res) => setTimeout(res, 50));
          process.stderr.write(`  rolling the bank at ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
          return roll({
            members: r.members,
            hosts: r.hosts,
            ttlMs: 1000,
            log: (line) => process.stderr.write(`${line}\n`),
            stop: async (m) => {
              lastStats.set(m.target, procStats(m.target));
              await m.target.stop();
            },
            restart: async (m) => {
              const t = await r.restart(m);
              procs.push(t);
              cpuStart.set(t, 0);
              return t;
            },
          });
        })();
      }
      const nodes = await runNodes({ proxy: target.url, proxies: topo?.nodeProxies, proxyShard: topo?.shard, proxyDns: rolling ? { name: CLIENTS_NAME, everyMs: 1000 } : undefined, origin: emu.url, origins: emus.map((e) => e.url), nodes: sc.nodes, connectionsPerNode: o.connectionsPerNode, paths, streamPaths: specs.filter((s) => s.kind === 'chunk').map((s) => s.path), backoffMs: 2000, order: sc.order, seed: o.seed, poll: sc.poll, emulatorStats: `${emu.url}/_emulator/stats` });
      clearInterval(killer);
      herdEndedAt = Date.now();
      steps = rolled ? await rolled : undefined;
      clearInterval(sampler);
      result.nodes = nodes;
      result.wallS = nodes.wallMs / 1000;
      result.goodputMiBs = nodes.bytes / 2 ** 20 / result.wallS;
    }
    // Data objects are immutable: more than one fetch is a coalescing failure. The manifest expires
    // after 61 s, so a run longer than that legitimately fetches it again: it is counted apart.
    const stats = await Promise.all(emus.map((e) => e.snapshot().catch(() => e.live)));
    const merged: Record<string, number> = {};
    for (const st of stats) for (const [p, n] of Object.entries(st?.perPath ?? {})) merged[p] = (merged[p] ?? 0) + n;
    const perPath = Object.entries(merged);
    const counts = perPath.filter(([p]) => p.includes('/data/')).map(([, n]) => n);
    result.manifestFetches = perPath.filter(([p]) => !p.includes('/data/')).reduce((a, [, n]) => a + n, 0);
    result.uniqueObjects = counts.length;
    result.upstreamFetches = perPath.reduce((a, [, n]) => a + n, 0);
    result.emulatorRequests = stats.reduce((a, st) => a + (st?.requests ?? 0), 0);
    if (o.wan) result.wanStalls = stats[0]?.stalls;
    result.fetchesPerObjectMean = counts.length ? counts.reduce((a, b) => a + b, 0) / counts.length : NaN;
    result.fetchesPerObjectMax = counts.length ? Math.max(...counts) : NaN;
    result.objectsFetchedMoreThanOnce = counts.filter((c) => c > 1).length;
    const ps = procs.map(statsOf);
    const rolledSteps = steps;
    if (rolling && rolledSteps) {
      // Read once the herd's fetches are counted above: the check's own fetches are not the herd's.
      const live = emu.live!;
      const before = live.requests;
      const data = specs.map((x) => x.path);
      const after = await checkOwnership(rolling.members, emu.url, data, (path, owner) => {
        // An object first fetched while its owner was down was never on the owner's disk: its miss there is not a lost hit.
        const first = fetchTimes.get(path)?.[0];
        return first !== undefined && rolledSteps.some((st) => st.member === owner && first >= st.stopAt && first <= st.backAt + 50);
      });
      const down = rolledSteps.map((st) => [st.stopAt, st.backAt + 50] as const);
      let objectsOverGoal = 0;
      let refetchedWhileDown = 0;
      for (const path of data) {
        const times = fetchTimes.get(path) ?? [];
        const first = times[0];
        if (first === undefined) continue;
        const complete = live.firstComplete[path] ?? Infinity;
        const inFill = down.filter(([a, b]) => a <= complete && b >= first - 50).length;
        if (times.length > 1 + inFill) objectsOverGoal++;
        refetchedWhileDown += times.slice(1).filter((t) => down.some(([a, b]) => t >= a && t <= b)).length;
      }
      result.rolling = { steps: rolledSteps, herdEndedAt, objectsOverGoal, refetchedWhileDown, after: { ...after, upstreamFetchesDuring: live.requests - before } };
      process.stderr.write(`  after the roll: peers all up ${after.allPeersUp}, ${after.hits}/${after.asked} hits at their owner (misses by member ${after.missesByMember.join('/')}, of which first fetched while the owner was down ${after.missesNeverStored}), ${live.requests - before} upstream fetches; objects over the goal ${objectsOverGoal}, refetched while a member was down ${refetchedWhileDown}\n`);
    }
    result.proxyCpuS = cpuOf(procs);
    result.proxyPeakRssMiB = ps.reduce((a, x) => a + x.peakRssMiB, 0);
    if (topo?.child) {
      result.childCpuS = cpuOf([topo.child]);
      result.parentsCpuS = cpuOf(procs.filter((t) => t !== topo!.child));
    }
  } finally {
    // Read once the load is over (a run that threw stops sampling here too).
    result.kernelTcp = kernel.stop();
    const warning = kernelTcpWarning(result.kernelTcp);
    if (warning) process.stderr.write(warning);
    await target.stop();
    for (const e of emus) await e.close().catch(() => {});
  }
  return result;
}

/** Current RSS of a process, MiB. */
function rssMiB(pid: number | undefined): number {
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN) / 1024;
  } catch {
    return NaN;
  }
}

/**
 * The memory scenario: `n` distinct cacheable objects of `bytes` each, from a local origin, through the
 * proxy with 32 connections. RSS is read after 1,000 warm-up objects and at the end.
 */
async function fillMany(proxy: string, n: number, bytes: number, pid: number | undefined): Promise<{ rssBeforeMiB: number; rssAfterMiB: number; errors: number }> {
  const { createServer: createHttp } = await import('node:http');
  const { Pool } = await import('undici');
  const body = Buffer.alloc(bytes, 'x');
  const origin = createHttp((req, res) => {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'cache-control': 'max-age=3600', 'last-modified': 'Thu, 01 Jan 2026 00:00:00 GMT', etag: `"${req.url}"`, 'content-length': bytes });
    res.end(body);
  });
  await new Promise<void>((r) => origin.listen(0, '127.0.0.1', () => r()));
  const base = `http://127.0.0.1:${(origin.address() as { port: number }).port}`;
  const pool = new Pool(proxy, { connections: 32 });
  let next = 0;
  let errors = 0;
  const worker = async (until: number) => {
    while (next < until) {
      const i = next++;
      try {
        const r = await pool.request({ path: `${base}/cvmfs/${REPO}/memory/${i}`, method: 'GET' });
        await r.body.dump();
        if (r.statusCode !== 200) errors++;
      } catch {
        errors++;
      }
    }
  };
  const warm = Math.min(1000, n);
  await Promise.all(Array.from({ length: 32 }, () => worker(warm)));
  const rssBeforeMiB = rssMiB(pid);
  await Promise.all(Array.from({ length: 32 }, () => worker(n)));
  const rssAfterMiB = rssMiB(pid);
  await pool.close();
  await new Promise<void>((r) => origin.close(() => r()));
  return { rssBeforeMiB, rssAfterMiB, errors };
}

async function fetchVia(proxy: string, url: string): Promise<void> {
  const { Pool } = await import('undici');
  const pool = new Pool(proxy);
  const r = await pool.request({ path: url, method: 'GET' });
  await r.body.arrayBuffer();
  await pool.close();
}

function parseSizeMB(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(KB|MB|GB)?$/i.exec(s);
  if (!m) return 256;
  const n = Number(m[1]);
  return (m[2] ?? 'MB').toUpperCase() === 'GB' ? n * 1024 : (m[2] ?? '').toUpperCase() === 'KB' ? n / 1024 : n;
}

async function main(): Promise<void> {
  // One table: the parser's options, and --help with each default.
  const OPTS = {
    scenario: { type: 'string', multiple: true, help: `scenario to run (repeatable): ${Object.keys(SCENARIOS).join(', ')}`, shown: 'herd' },
    target: { type: 'string', default: 'cuttle', help: 'cuttle (started here), squid, nginx, varnish or ats (Debian packages, started here), node-http (hot scenarios: a bare node:http server, the ceiling of a hit through node:http), or http://HOST:PORT of a running proxy' },
    compare: { type: 'string', multiple: true, help: 'another target (repeatable), run in the same rounds; the order alternates (A B C, then C B A)' },
    rounds: { type: 'string', default: '3', help: 'rounds per target; the table shows medians' },
    nodes: { type: 'string', help: 'emulated client nodes (herd scenarios)', shown: "the scenario's (herd: 1000)" },
    objects: { type: 'string', help: 'objects per mount; every mount has at least one 16-24 MiB chunk and one catalog from 2 objects on', shown: `the scenario's (herd: 200; above ${LARGE_HERD} nodes 11, with one 2 MiB chunk)` },
    connections: { type: 'string', default: '1', help: 'connections per node' },
    'latency-ms': { type: 'string', help: "Stratum 1 emulator latency", shown: "the scenario's (herd: 50)" },
    'memory-cache': { type: 'string', default: '256MB', help: "cuttle's --memory-cache and Squid's cache_mem alike" },
    'hot-client': { type: 'string', help: 'load generator of the hot scenarios: wrk (reads 8 KiB per call) or bulk (bench/bulk.ts, 64 KiB reads)', shown: 'wrk for hot-small, bulk for hot-large and hot-chunk' },
    'cuttle-args': { type: 'string', help: "more arguments for cuttle, e.g. '--fill-memory 64MB'", shown: 'none' },
    wan: { type: 'boolean', help: 'herd scenarios: the Stratum 1 emulator behind a WAN (bench/wan.ts): its own network namespace over a veth shaped with tc tbf when root with iproute2, else loopback with the same delays; its RTT replaces --latency-ms' },
    'wan-rtt-ms': { type: 'string', default: '80', help: 'WAN round-trip time: first byte after one RTT (two on a new connection), slow start in rounds of one RTT' },
    'wan-rate-mbit': { type: 'string', default: '1000', help: 'WAN link rate each way (tc tbf)' },
    'wan-loss': { type: 'string', default: '0.002', help: 'WAN loss, as the chance that a round stalls for a retransmission timeout of 200-1000 ms' },
    'wan-mode': { type: 'string', default: 'auto', help: 'auto, netns (fail if it cannot) or loopback' },
    seed: { type: 'string', default: '1', help: 'seed of the object sizes and node order' },
    out: { type: 'string', default: 'bench/results', help: 'where the JSON, Markdown and SVG results go' },
    help: { type: 'boolean', help: 'this text' },
  } as const;
  const parserOptions = Object.fromEntries(
    Object.entries(OPTS).map(([k, o]) => {
      const { help: _help, shown: _shown, ...rest } = o as { help: string; shown?: string };
      return [k, rest];
    }),
  ) as { [K in keyof typeof OPTS]: Omit<(typeof OPTS)[K], 'help' | 'shown'> };
  const { values } = parseArgs({ options: parserOptions });
  if (values.help) {
    const rows = Object.entries(OPTS).map(([k, o]) => {
      const def = 'default' in o ? o.default : 'shown' in o ? o.shown : undefined;
      return `  --${k.padEnd(14)} ${o.help}${def !== undefined ? ` (default: ${def})` : ''}`;
    });
    process.stdout.write(`usage: npm run bench -- [options]\n${rows.join('\n')}\n`);
    return;
  }
  // Keep the orchestrator (emulator, nodes, wrk) off the proxy's core.
  if (hasTaskset) spawnSync('taskset', ['-a', '-p', '-c', '1', String(process.pid)], { stdio: 'ignore' });
  const targets = [values.target!, ...(values.compare ?? [])];
  if (targets.includes('squid') && !squidBinary) throw new Error('--compare squid needs Debian squid: apt-get install squid');
  if (targets.includes('nginx') && !nginxBinary) throw new Error('--compare nginx needs Debian nginx: apt-get install nginx-light');
  if (targets.includes('varnish') && !varnishBinary) throw new Error('--compare varnish needs Debian varnish: apt-get install varnish');
  if (targets.includes('ats') && !atsBinary) throw new Error('--compare ats needs Debian trafficserver: apt-get install trafficserver');
  mkdirSync(values.out!, { recursive: true });
  const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim() || 'unknown';
  const tables: string[] = [];
  for (const name of values.scenario ?? ['herd']) {
    const base = SCENARIOS[name];
    if (!base) throw new Error(`unknown scenario ${name}; known: ${Object.keys(SCENARIOS).join(', ')}`);
    const hotClient = (values['hot-client'] ?? base.hotClient) as HotClient | undefined;
    if (hotClient !== undefined && hotClient !== 'wrk' && hotClient !== 'bulk') throw new Error(`--hot-client is wrk or bulk, not ${hotClient}`);
    if (base.kind === 'hot' && (hotClient ?? 'wrk') === 'wrk' && !wrkBinary) throw new Error(`${name} needs wrk: apt-get install wrk`);
    if (base.kind === 'skip') {
      process.stderr.write(`${name}: ${base.why}\n`);
      continue;
    }
    const nodes = Number(values.nodes ?? base.nodes);
    const scale = base.kind === 'herd' && nodes > LARGE_HERD && values.objects === undefined ? LARGE_HERD_OBJECTS : {};
    const sc: Scenario = { ...base, ...scale, nodes, objects: Number(values.objects ?? (scale as { objects?: number }).objects ?? base.objects), latencyMs: Number(values['latency-ms'] ?? base.latencyMs), hotClient };
    if ((sc.kind === 'herd' || sc.kind === 'parent' || sc.kind === 'bank' || sc.kind === 'rolling') && somaxconn() < sc.nodes) process.stderr.write(`${name}: net.core.somaxconn is ${somaxconn()}, below ${sc.nodes} nodes connecting at once: connections past every listen queue wait for SYN-ACK retries, whatever the proxy. For figures about the proxy: sysctl -w net.core.somaxconn=65535 (and undo afterwards)\n`);
    // parent and bank compare their own set-ups; --target/--compare may name some of them.
    const chosen = sc.variants ? (targets.every((t) => sc.variants!.includes(t)) ? targets : [...sc.variants]) : targets;
    if (sc.kind === 'parent' && chosen.includes('squid-parents') && !squidBinary) throw new Error('parent with squid-parents needs Debian squid: apt-get install squid');
    if (sc.kind === 'warm') {
      const { runWarmScenario, warmMarkdown } = await import('./warm-scenario.ts');
      const r = await runWarmScenario({ nodes: sc.nodes, objects: sc.objects, latencyMs: sc.latencyMs, memoryCache: values['memory-cache']!, seed: Number(values.seed), freePort, runNodes });
      const table = warmMarkdown(r);
      tables.push(table);
      const stamp = new Date().toISOString().replace(/[:.]/g, '-');
      writeFileSync(join(values.out!, `${name}-${stamp}.json`), JSON.stringify({ commit, scenario: sc, result: r }, null, 2));
      writeFileSync(join(values.out!, `${name}-${stamp}.md`), `${table}\n`);
      process.stdout.write(`\n${table}\n`);
      continue;
    }
    const runs: RunResult[] = [];
    for (let round = 1; round <= Number(values.rounds); round++) {
      // Alternate the order (A B, then B A): whatever the machine does over time falls on both targets.
      for (const t of round % 2 === 1 ? chosen : [...chosen].reverse()) {
        process.stderr.write(`${name} round ${round}: ${t} …\n`);
        const wan = values.wan ? { rttMs: Number(values['wan-rtt-ms']), rateMbit: Number(values['wan-rate-mbit']), lossStallProbability: Number(values['wan-loss']), mode: values['wan-mode'] as 'auto' | 'netns' | 'loopback' } : undefined;
        const r = await runOnce({ scenario: sc, target: t, round, seed: Number(values.seed), memoryCache: values['memory-cache']!, connectionsPerNode: Number(values.connections), cuttleArgs: values['cuttle-args']?.split(/\s+/).filter(Boolean), wan });
        runs.push(r);
        process.stderr.write(`  done: wall ${r.wallS.toFixed(1)} s, fetches/object ${r.fetchesPerObjectMean.toFixed(2)}, proxy CPU ${r.proxyCpuS.toFixed(1)} s\n`);
      }
    }
    const names = [...new Set(runs.map((r) => r.target))];
    const table = markdownTable(runs[0]?.wan ? `${name}, WAN: ${runs[0].wan}` : name, runs, names);
    tables.push(table);
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    writeFileSync(join(values.out!, `${name}-${stamp}.json`), JSON.stringify({ commit, scenario: sc, runs }, null, 2));
    writeFileSync(join(values.out!, `${name}-${stamp}.md`), `${table}\n`);
    writeFileSync(join(values.out!, `${name}-${stamp}.svg`), svgChart(name, runs, names));
    process.stdout.write(`\n${table}\n`);
  }
  process.stdout.write(`\n(${new Date().toISOString().slice(0, 10)}, commit ${commit}, ${Number(values.rounds)} rounds, medians; results in ${values.out})\n`);
}

if (import.meta.main) await main();
