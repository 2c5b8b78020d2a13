// Composition root: builds the proxy's parts (config in force, tiers, upstream, fills, logs, counters,
// listeners, admin, SNMP), wires them, and returns the Proxy that starts, reloads and stops them.
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { MAX_BEHIND_BYTES, openAccessLog, type AccessLog } from './access-log.ts';
import { createAdminServer, type AdminState } from './admin.ts';
import { BufferPool } from './buffer-pool.ts';
import { primaryKey } from './cache-key.ts';
import { Pacer } from './pacer.ts';
import { systemClock, type Clock } from './clock.ts';
import { Coalescer } from './coalescer.ts';
import type { Config, ListenAddr } from './config.ts';
import type { Ctx } from './context.ts';
import { figures, newCounters, ratios, setAt, type CounterSources, type Counters } from './counters.ts';
import { Upstream } from './fetch.ts';
import { createFreshness, type Freshness } from './freshness.ts';
import { Listeners } from './listeners.ts';
import { LiveConfig } from './live-config.ts';
import { createLogger, type Logger } from './log.ts';
import { Metrics } from './metrics.ts';
import type { Mirrors } from './mirrors.ts';
import { Bank } from './bank.ts';
import { Drain } from './drain.ts';
import { Hierarchy } from './hierarchy.ts';
import { logCutRequests } from './handle-request.ts';
import { primaryOfKey, workerOf } from './worker-ring.ts';
import { RateHistory } from './rate-history.ts';
import { LoopLag, type AcceptHand } from './overload.ts';
import { BackgroundGate } from './background.ts';
import { shutdown } from './shutdown.ts';
import { startSnmpAgent, type SnmpAgent } from './snmp.ts';
import { TieredStore } from './store.ts';
import { DiskTier, type DiskTierOptions } from './store-disk.ts';
import { MemoryTier } from './store-memory.ts';
import { VERSION } from './version.ts';

export interface ProxyOptions {
  clock?: Clock;
  logger?: Logger;
  accessLog?: AccessLog;
  /** One worker of several (--workers, src/workers.ts): its index and their number. */
  worker?: { index: number; count: number };
}

export interface Proxy {
  readonly config: Config;
  readonly counters: Counters;
  readonly upstream: Upstream;
  readonly store: TieredStore;
  readonly disk: DiskTier;
  readonly coalescer: Coalescer;
  /** The per-turn budget response bodies leave under (fair delivery). */
  readonly pacer: Pacer;
  readonly log: Logger;
  /** The mirror groups in force (replaced by a reload that changes them). */
  readonly mirrors: Mirrors;
  /** The event-loop lag monitor (--max-loop-lag). */
  readonly loopLag: LoopLag;
  /** Holds background requests' new fills while clients keep the loop busy (--background-load). */
  readonly background: BackgroundGate;
  /** Parents and the bank: where misses go. */
  readonly hierarchy: Hierarchy;
  /** The request and byte rates of the last hour (/status history); a worker keeps none. */
  readonly history: RateHistory | undefined;
  /** The drain state (POST /drain, SIGTERM; with --workers the main thread sets each worker's). */
  readonly drain: Drain;
  /** Forget a key everywhere in this proxy (an invalidation another worker made); true when it held a copy. */
  forget(key: string): Promise<boolean>;
  /** Called when this proxy forgets a key of its own accord (PURGE, an unsafe method): workers pass it on; true when another held a copy. */
  onForget: ((key: string) => Promise<boolean>) | undefined;
  /** What /status shows of this proxy, and its Prometheus text (a worker's share of the process's). */
  report(): Promise<{ status: Record<string, unknown>; metrics: string }>;
  /** Bound addresses, in --listen order, then the --accel-listen one. */
  addresses(): AddressInfo[];
  /** Client connections open now. */
  clientConnections(): number;
  /** Who accepts new client connections: this proxy, the refuser thread (past the cap, or while the loop lags), or 'moving' between them. */
  acceptHand(): AcceptHand | 'moving';
  listen(): Promise<void>;
  /** Stop accepting, let in-flight responses finish (up to timeoutMs), then close everything. */
  close(timeoutMs?: number): Promise<void>;
  /** Apply a new, already validated configuration: the access rules change live. */
  reload(cfg: Config): void;
  /** Reopen the access log file (log rotation). */
  reopenLogs(): void;
  adminAddress(): AddressInfo | undefined;
  /** The SNMP agent's UDP port, when --snmp-listen is set. */
  snmpPort(): number | undefined;
}

/** Where the proxy is in its life: /readyz and a reload's prober read it (and the drain state). */
interface Phase {
  listening: boolean;
}

/** The store: the memory tier over the disk tier, whose index loads from --cache-dir. */
async function openTiers(cfg: Config, freshness: Freshness, log: Logger, onRecord: DiskTierOptions['onRecord'], worker: ProxyOptions['worker']): Promise<{ memory: MemoryTier; disk: DiskTier; store: TieredStore }> {
  const disk = new DiskTier({
    dir: cfg.cacheDir,
    maxBytes: cfg.diskCacheBytes,
    maxEntryBytes: cfg.maxObjectBytes,
    freshness,
    onRecord,
    shared: worker && { worker: worker.index, owns: (key) => workerOf(primaryOfKey(key), worker.count) === worker.index },
    onError: (msg, err) => log.error({ err }, msg),
  });
  try {
    await disk.open();
  } catch (err) {
    throw new Error(`cache-dir ${cfg.cacheDir} is not usable: ${(err as Error).message}`, { cause: err });
  }
  const memory = new MemoryTier({ maxBytes: cfg.memoryCacheBytes, maxEntryBytes: cfg.maxMemoryObjectBytes });
  return { memory, disk, store: new TieredStore(memory, disk, cfg.maxMemoryObjectBytes) };
}

/**
 * The access log (--access-log). A log file that can't take lines (a full or stalled disk) drops them
 * rather than stop the proxy or grow memory: the count is in /status and /metrics, and a warning says
 * so at most once a minute.
 */
function openWarnedAccessLog(cfg: Config, clock: Clock, log: Logger, shared: boolean): AccessLog {
  let droppedSaidAt = -Infinity;
  const accessLog: AccessLog = openAccessLog(cfg.accessLog, cfg.accessLogFormat, (_lines, why) => {
    if (clock.now() - droppedSaidAt < 60_000) return;
    droppedSaidAt = clock.now();
    const what = why === 'behind' ? `more than ${MAX_BEHIND_BYTES / 2 ** 20} MiB behind its file` : why === 'closed' ? 'not written before shutdown' : 'its file cannot be written';
    log.warn({ droppedLines: accessLog.droppedLines, file: cfg.accessLog, err: why instanceof Error ? why.message : undefined }, `access log lines dropped: ${what}`);
  }, shared);
  return accessLog;
}

/** What the admin listener shows: who may use it, readiness (/readyz) and /status. */
function adminState(p: { live: LiveConfig; phase: Phase; drain: Drain; disk: DiskTier; coalescer: Coalescer; sources: CounterSources; clock: Clock; startedAt: number; hierarchy: Hierarchy; history: RateHistory | undefined }): AdminState {
  const { live, phase, drain, disk, clock } = p;
  return {
    allows: (addr) => live.acl().allowsAdmin(addr),
    // Ready: listening, the disk index loaded, not draining. Never a mirror's health: a proxy with
    // every Stratum 1 out of reach still serves its cache (stale if need be), and a readiness that
    // asked a remote site would take a whole bank out of service in a WAN cut.
    ready: () =>
      drain.draining ? { ready: false, why: drain.state === 'stopping' ? 'draining: shutting down' : 'draining' } : !phase.listening ? { ready: false, why: 'not listening yet' } : !disk.isLoaded ? { ready: false, why: 'loading the disk index' } : { ready: true, why: 'ready' },
    drain: (cancel) => ({ done: cancel ? drain.cancel() : (drain.start(), true), drain: drain.snapshot() }),
    status: () => {
      // The table's figures, and what is not a number: state, the top fills and each mirror.
      const f = figures(p.sources);
      setAt(f, 'tiers.disk.loaded', disk.isLoaded);
      const now = clock.now();
      return { version: VERSION, uptimeS: Math.round((now - p.startedAt) / 1000), draining: drain.draining, drain: drain.snapshot(), ...f, ratios: ratios(f), history: p.history?.snapshot(now, new Map([['proxy', f]])), topFills: p.coalescer.topFills(10, clock.now()), mirrors: live.mirrors.snapshot(), peers: p.hierarchy.snapshot() };
    },
  };
}

function listenAdmin(admin: Server, { host, port }: ListenAddr): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    admin.once('error', (err) => reject(new Error(`cannot listen on admin ${host}:${port}: ${err.message}`, { cause: err })));
    admin.listen({ host, port }, () => resolve());
  });
}

export async function createProxy(cfg: Config, opts: ProxyOptions = {}): Promise<Proxy> {
  const clock = opts.clock ?? systemClock;
  const log = opts.logger ?? createLogger(cfg.logLevel);
  const freshness = createFreshness(clock, cfg.negativeTtlMs);
  const coalescerRef: { c?: Coalescer } = {};
  const { memory, disk, store } = await openTiers(cfg, freshness, log, (meta) => {
    if (meta.vary?.length) coalescerRef.c?.varySpecs.set(primaryKey(new URL(meta.url)), meta.vary);
  }, opts.worker);
  // The prober probes through the upstream, which checks the access rules in force.
  const live = new LiveConfig(cfg, log, (url, timeoutMs, wantOk) => upstream.probe(url, timeoutMs, wantOk));
  const upstream = new Upstream(cfg, live.acl);
  const hierarchy = new Hierarchy(cfg, (peer) => upstream.probePeer(peer, cfg.probe.timeoutMs), log, cfg.bank.length || cfg.bankDns !== 'none' ? (prober) => new Bank(cfg, prober, log) : undefined);
  const coalescer = new Coalescer({ cfg, clock, store, upstream, freshness, log, mirrors: live.mirrors, hierarchy });
  coalescerRef.c = coalescer;
  const counters = newCounters();
  const accessLog = opts.accessLog ?? openWarnedAccessLog(cfg, clock, log, opts.worker !== undefined);
  const buffers = new BufferPool();
  const sources: CounterSources = {
    counters,
    fills: () => ({ ...coalescer.stats, inFlight: coalescer.inFlight, memoryBytes: coalescer.budget.usedBytes }),
    upstream: () => ({ fetches: upstream.fetches, bytes: upstream.bytes }),
    tiers: () => ({ memory: memory.stats(), disk: disk.stats() }),
    diskIndex: () => disk.indexStats(),
    bufferPoolBytes: () => buffers.bytes,
    clientConnections: () => listeners.connections,
    acceptHandedOver: () => (listeners.handedOver ? 1 : 0),
    backgroundWaiting: () => background.waiting,
    mirrors: () => live.mirrors.snapshot(),
    peers: () => hierarchy.snapshot(),
    accessLogDroppedLines: () => accessLog.droppedLines,
  };
  const metrics = new Metrics(sources);
  coalescer.onFillDone = (readers) => metrics.fillDone(readers);
  const pacer = new Pacer();
  const loopLag = new LoopLag(cfg.maxLoopLagMs);
  const background = new BackgroundGate(cfg.backgroundLoad, cfg.backgroundWaitMs);
  loopLag.onChange = (lagging, lateMs) => {
    if (lagging) log.warn({ lateMs: Math.round(lateMs) }, 'the event loop lags past --max-loop-lag: new connections and new fills get 503 until it catches up');
    else log.info({ lateMs: Math.round(lateMs) }, 'the event loop caught up: new connections and fills are served again');
    listeners.steer();
  };
  const ctx: Ctx = { cfg, acl: live.acl, clock, store, coalescer, upstream, accessLog, log, counters, buffers, pacer, metrics, mirrors: live.mirrors, hierarchy, loopLag, background, tunnels: new Set(), open: new Map() };
  live.onMirrors = (fresh) => {
    ctx.mirrors = fresh;
    coalescer.useMirrors(fresh);
  };
  const drain = new Drain(() => clock.now());
  drain.watch((on) => log.info({ drain: drain.state }, on ? 'draining: /readyz answers 503, every response closes its connection, new connections are still served' : 'drain cancelled: back in service'));
  const listeners = new Listeners(ctx, opts.worker, drain);
  const phase: Phase = { listening: false };
  const startedAt = clock.now();
  // A worker keeps none: the main thread keeps the history of the workers' sum (workers.ts).
  const history = opts.worker ? undefined : new RateHistory(startedAt);
  const state = adminState({ live, phase, drain, disk, coalescer, sources, clock, startedAt, hierarchy, history });
  const admin = cfg.adminListen === 'none' ? undefined : createAdminServer(metrics, state);
  let snmpAgent: SnmpAgent | undefined;

  const proxy: Proxy = {
    config: cfg,
    counters,
    onForget: undefined,
    async forget(key) {
      const held = coalescer.storing(key) || (await store.get(key).then((st) => {
        if (st?.body.kind === 'file') st.body.close();
        return st !== undefined;
      }, () => true));
      coalescer.invalidate(key);
      // A fill's record still landing is removed by that fill; this answer waits for it.
      await coalescer.commitsLanded(key);
      await store.delete(key);
      return held;
    },
    async report() {
      return { status: await state.status(), metrics: await metrics.text() };
    },
    upstream,
    store,
    disk,
    coalescer,
    pacer,
    log,
    loopLag,
    background,
    get mirrors() {
      return live.mirrors;
    },
    addresses: () => listeners.addresses(),
    clientConnections: () => listeners.connections,
    acceptHand: () => listeners.acceptHand,
    hierarchy,
    history,
    drain,
    async listen() {
      await hierarchy.bank?.start();
      await listeners.listen();
      if (admin && cfg.adminListen !== 'none') await listenAdmin(admin, cfg.adminListen);
      if (cfg.snmpListen !== 'none') {
        snmpAgent = await startSnmpAgent({
          listen: cfg.snmpListen,
          community: cfg.snmpCommunity,
          allow: cfg.allowSnmp,
          log,
          sources: { version: VERSION, uptimeMs: () => clock.now() - startedAt, figures: () => figures(sources) },
        });
      }
      phase.listening = true;
      history?.start(() => clock.now(), () => new Map([['proxy', figures(sources)]]), (err) => log.error({ err, internal: true }, 'rate history sample failed'));
      loopLag.start();
      background.start(() => ({ finished: counters.requests - counters.background, inFlight: ctx.open.size - background.inFlight.size }));
      live.startProbing();
      log.info({ listen: listeners.addresses(), admin: admin?.address(), cacheDir: cfg.cacheDir }, opts.worker ? 'worker listening' : 'cuttle listening');
    },
    adminAddress: () => admin?.address() as AddressInfo | undefined,
    snmpPort: () => snmpAgent?.port,
    async close(timeoutMs = cfg.shutdownTimeoutMs) {
      // Drain (report not ready, close each connection after its response, still serve new ones) until
      // no client is left, then stop accepting, let in-flight fills finish, and close the rest.
      drain.stop(timeoutMs);
      history?.stop();
      loopLag.stop();
      // Not lagging any more: a hand-over for the lag ends (the drain serves new connections).
      listeners.steer();
      background.stop();
      // The requests the shutdown cut get their lines just before the log closes (shutdown only closes it).
      const cutLogged: AccessLog = { ...accessLog, close: (ms) => (logCutRequests(ctx), accessLog.close(ms)) };
      await shutdown({ listeners, tunnels: ctx.tunnels, coalescer, upstream, accessLog: cutLogged, disk, admin, snmpAgent: () => snmpAgent, log, stopProbing: () => (live.stopProbing(), hierarchy.stop()) }, timeoutMs);
    },
    reload(next) {
      live.reload(next, phase.listening && drain.state !== 'stopping');
    },
    reopenLogs() {
      accessLog.reopen();
    },
  };
  ctx.forgotten = (key) => proxy.onForget?.(key) ?? Promise.resolve(false);
  return proxy;
}
