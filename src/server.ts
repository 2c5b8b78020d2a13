// Composition root: wires config, tiers, coalescer, upstream, logs and listeners into one proxy.
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { MAX_BEHIND_BYTES, newTransaction, openAccessLog, recordTransaction, type AccessLog } from './access-log.ts';
import { compileAcl, plainAddress, type Acl } from './acl.ts';
import { BufferPool } from './buffer-pool.ts';
import { primaryKey } from './cache-key.ts';
import { systemClock, type Clock } from './clock.ts';
import { Coalescer } from './coalescer.ts';
import { reloaded, type Config } from './config.ts';
import { VERSION } from './version.ts';
import { createAdminServer } from './admin.ts';
import { Metrics } from './metrics.ts';
import { Upstream } from './fetch.ts';
import { createFreshness } from './freshness.ts';
import type { Ctx } from './context.ts';
import { hasBody, hitAge, storedHitHead } from './deliver.ts';
import { handleRequest, plainLaneRequest } from './handle-request.ts';
import { HitLane } from './hit-lane.ts';
import { figures, newCounters, setAt, type CounterSources, type Counters } from './counters.ts';
import { createLogger, type Logger } from './log.ts';
import { Mirrors, Prober } from './mirrors.ts';
import { startSnmpAgent, type SnmpAgent } from './snmp.ts';
import { TieredStore } from './store.ts';
import { DiskTier } from './store-disk.ts';
import { MemoryTier } from './store-memory.ts';
import { handleConnect } from './tunnel.ts';
import { ProxyError } from './errors.ts';
import { endWithError } from './forward.ts';

export interface ProxyOptions {
  clock?: Clock;
  logger?: Logger;
  accessLog?: AccessLog;
}

export interface Proxy {
  readonly config: Config;
  readonly counters: Counters;
  readonly upstream: Upstream;
  readonly store: TieredStore;
  readonly disk: DiskTier;
  readonly coalescer: Coalescer;
  readonly log: Logger;
  /** The mirror groups in force (replaced by a reload that changes them). */
  readonly mirrors: Mirrors;
  /** Bound addresses, in --listen order, then the --accel-listen one. */
  addresses(): AddressInfo[];
  /** Client connections open now. */
  clientConnections(): number;
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

/** The least time the access log gets to write its last lines at shutdown, after the drain. */
export const LOG_CLOSE_MIN_MS = 1000;

/** How long a client may take to send a request's head. */
const HEADERS_TIMEOUT_MS = 60_000;

/**
 * node:http's own 'connection' listener (it registers exactly one), taken off `srv`: node reads a
 * connection from the moment this is called for it.
 */
function takeNodeConnection(srv: Server): (sock: Socket) => void {
  const [listener, ...others] = srv.listeners('connection') as ((sock: Socket) => void)[];
  if (!listener || others.length) throw new Error('node:http no longer has exactly one connection listener: run with --no-hit-lane');
  srv.off('connection', listener);
  return (sock) => listener.call(srv, sock);
}

function listenOn(srv: Server, host: string, port: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onErr = (err: Error) => reject(new Error(`cannot listen on ${host.includes(':') ? `[${host}]` : host}:${port}: ${err.message}`, { cause: err }));
    srv.once('error', onErr);
    srv.listen({ host, port, backlog: 4096 }, () => {
      srv.off('error', onErr);
      resolve();
    });
  });
}

export async function createProxy(cfg: Config, opts: ProxyOptions = {}): Promise<Proxy> {
  const clock = opts.clock ?? systemClock;
  const log = opts.logger ?? createLogger(cfg.logLevel);
  const freshness = createFreshness(clock, cfg.negativeTtlMs);
  let acl: Acl = compileAcl(cfg);
  /** What is in force: the start configuration, with what reloads changed live. */
  let current: Config = cfg;
  const getAcl = () => acl;
  const coalescerRef: { c?: Coalescer } = {};
  const disk = new DiskTier({
    dir: cfg.cacheDir,
    maxBytes: cfg.diskCacheBytes,
    maxEntryBytes: cfg.maxObjectBytes,
    freshness,
    onRecord: (meta) => {
      if (meta.vary?.length) coalescerRef.c?.varySpecs.set(primaryKey(new URL(meta.url)), meta.vary);
    },
    onError: (msg, err) => log.error({ err }, msg),
  });
  try {
    await disk.open();
  } catch (err) {
    throw new Error(`cache-dir ${cfg.cacheDir} is not usable: ${(err as Error).message}`, { cause: err });
  }
  const memory = new MemoryTier({ maxBytes: cfg.memoryCacheBytes, maxEntryBytes: cfg.maxMemoryObjectBytes });
  const store = new TieredStore(memory, disk, cfg.maxMemoryObjectBytes);
  const upstream = new Upstream(cfg, getAcl);
  let mirrors = new Mirrors(cfg.mirrorGroups, cfg.probe, log);
  const probeFn = (url: URL, timeoutMs: number, wantOk: boolean) => upstream.probe(url, timeoutMs, wantOk);
  let prober = new Prober(mirrors, probeFn);
  const coalescer = new Coalescer({ cfg, clock, store, upstream, freshness, log, mirrors });
  coalescerRef.c = coalescer;
  const counters = newCounters();
  // A log file that can't take lines (a full or stalled disk) drops them rather than stop the proxy or
  // grow memory: the count is in /status and /metrics, and a warning says so at most once a minute.
  let droppedSaidAt = -Infinity;
  const accessLog: AccessLog =
    opts.accessLog ??
    openAccessLog(cfg.accessLog, cfg.accessLogFormat, (_lines, why) => {
      if (clock.now() - droppedSaidAt < 60_000) return;
      droppedSaidAt = clock.now();
      const what = why === 'behind' ? `more than ${MAX_BEHIND_BYTES / 2 ** 20} MiB behind its file` : why === 'closed' ? 'not written before shutdown' : 'its file cannot be written';
      log.warn({ droppedLines: accessLog.droppedLines, file: cfg.accessLog, err: why instanceof Error ? why.message : undefined }, `access log lines dropped: ${what}`);
    });
  let connections = 0;
  const buffers = new BufferPool();
  const sources: CounterSources = {
    counters,
    fills: () => ({ ...coalescer.stats, inFlight: coalescer.inFlight, memoryBytes: coalescer.budget.usedBytes }),
    upstream: () => ({ fetches: upstream.fetches, bytes: upstream.bytes }),
    tiers: () => ({ memory: memory.stats(), disk: disk.stats() }),
    diskIndex: () => disk.indexStats(),
    bufferPoolBytes: () => buffers.bytes,
    clientConnections: () => connections,
    mirrors: () => mirrors.snapshot(),
    accessLogDroppedLines: () => accessLog.droppedLines,
  };
  const metrics = new Metrics(sources);
  coalescer.onFillDone = (readers) => metrics.fillDone(readers);
  const ctx: Ctx = { cfg, acl: getAcl, clock, store, coalescer, upstream, accessLog, log, counters, buffers, metrics, mirrors, tunnels: new Set() };
  const lane = cfg.hitLane
    ? new HitLane({
        answer: (method, target, headers, client) => plainLaneRequest(ctx, method, target, headers, client),
        age: hitAge,
        head: (st, age) => storedHitHead(ctx, st, age),
        hasBody,
        record: (tx) => recordTransaction(ctx, tx, undefined),
        failed: (err) => log.error({ err, internal: true }, 'hit lane failed'),
        idleTimeoutMs: cfg.clientIdleTimeoutMs,
        firstRequestTimeoutMs: HEADERS_TIMEOUT_MS,
      })
    : undefined;
  let draining = false;
  let snmpAgent: SnmpAgent | undefined;
  let listening = false;
  const startedAt = clock.now();
  const admin =
    cfg.adminListen === 'none'
      ? undefined
      : createAdminServer(metrics, {
          allows: (addr) => getAcl().allowsAdmin(addr),
          ready: () =>
            draining ? { ready: false, why: 'draining' } : !listening ? { ready: false, why: 'not listening yet' } : !disk.isLoaded ? { ready: false, why: 'loading the disk index' } : { ready: true, why: 'ready' },
          status: () => {
            // The table's figures, and what is not a number: state, the top fills and each mirror.
            const f = figures(sources);
            setAt(f, 'tiers.disk.loaded', disk.isLoaded);
            return { version: VERSION, uptimeS: Math.round((clock.now() - startedAt) / 1000), draining, ...f, topFills: coalescer.topFills(10, clock.now()), mirrors: mirrors.snapshot() };
          },
        });

  const listeners = [...cfg.listen.map((addr) => ({ addr, accel: cfg.accel })), ...(cfg.accelListen === 'none' ? [] : [{ addr: cfg.accelListen, accel: true }])];
  const servers: Server[] = listeners.map(({ accel }) => {
    const srv = createServer({
      requireHostHeader: false,
      keepAliveTimeout: cfg.clientIdleTimeoutMs,
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: 0, // uploads may be long; idle sockets are bounded by keepAliveTimeout
      highWaterMark: 64 * 1024,
    });
    // Past --max-client-connections a connection gets a labelled 503 (a CVMFS client then tries its
    // next proxy at once), where net.Server's maxConnections would drop it without a word. A hard cap
    // at twice the limit still drops, so a flood can't make us write answers without bound.
    srv.maxConnections = cfg.maxClientConnections * 2;
    // With the hit lane, node:http reads a connection only when the lane hands it over.
    const toNode = lane ? takeNodeConnection(srv) : undefined;
    srv.on('connection', (sock: Socket) => {
      connections++;
      sock.once('close', () => connections--);
      // A peer that reset before the connection was taken has no address left: nothing can be checked
      // against the client ACL or answered, so it is dropped, not logged as a denied client '-'.
      if (sock.remoteAddress === undefined) {
        sock.destroy();
        return;
      }
      const client = plainAddress(sock.remoteAddress);
      if (connections > cfg.maxClientConnections) {
        // Answered before any request is read: counted (and logged) as a request-less NONE/503.
        const err = new ProxyError('ERR_OVERLOADED', 'too many client connections');
        endWithError(sock, err, cfg.visibleHostname);
        recordTransaction(ctx, newTransaction({ startedAt: clock.now(), client, method: 'NONE', url: '-', status: err.status }), err.token);
        toNode?.(sock); // as without the lane: node:http still reads what the client sends
        return;
      }
      if (lane && toNode) lane.attach(sock, client, toNode);
    });
    /** Each connection's latest response (clientError must not write into one that has begun). */
    const responding = new WeakMap<object, ServerResponse>();
    const handlerFailed = (res: ServerResponse) => (err: unknown) => {
      log.error({ err, internal: true }, 'request handler failed');
      res.destroy();
    };
    srv.on('request', (req, res) => {
      responding.set(req.socket, res);
      // A memory hit is answered synchronously (no promise); anything that waits returns one.
      try {
        handleRequest(ctx, req, res, accel)?.catch(handlerFailed(res));
      } catch (err) {
        handlerFailed(res)(err);
      }
    });
    srv.on('connect', (req, socket, head) => handleConnect(ctx, req, socket, head));
    srv.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      // A 400 may only go where a response could begin: written into one that has begun, it would land
      // in the middle of its body. Then the connection is closed instead (as node's own handler does).
      const res = responding.get(socket);
      const midResponse = res !== undefined && res.headersSent && !res.writableFinished;
      if (socket.writable && err.code !== 'ECONNRESET' && !midResponse) {
        socket.end('HTTP/1.1 400 Bad Request\r\nProxy-Status: cuttle; error=http_request_error\r\nX-Squid-Error: ERR_INVALID_REQ 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      } else socket.destroy();
    });
    return srv;
  });

  return {
    config: cfg,
    counters,
    upstream,
    store,
    disk,
    coalescer,
    log,
    get mirrors() {
      return mirrors;
    },
    addresses: () => servers.map((s) => s.address() as AddressInfo),
    clientConnections: () => connections,
    async listen() {
      for (const [i, srv] of servers.entries()) {
        const { host, port } = listeners[i]!.addr;
        try {
          await listenOn(srv, host, port);
        } catch (err) {
          // A host without IPv6 can't bind '::': every IPv4 address is the next best thing.
          const code = (err as { cause?: NodeJS.ErrnoException }).cause?.code;
          if (host !== '::' || (code !== 'EAFNOSUPPORT' && code !== 'EADDRNOTAVAIL')) throw err;
          log.warn({ port }, 'no IPv6 on this host: listening on IPv4 only');
          await listenOn(srv, '0.0.0.0', port);
        }
      }
      if (admin && cfg.adminListen !== 'none') {
        const { host, port } = cfg.adminListen;
        await new Promise<void>((resolve, reject) => {
          admin.once('error', (err) => reject(new Error(`cannot listen on admin ${host}:${port}: ${err.message}`, { cause: err })));
          admin.listen({ host, port }, () => resolve());
        });
      }
      if (cfg.snmpListen !== 'none') {
        snmpAgent = await startSnmpAgent({
          listen: cfg.snmpListen,
          community: cfg.snmpCommunity,
          allow: cfg.allowSnmp,
          log,
          sources: { version: VERSION, uptimeMs: () => clock.now() - startedAt, figures: () => figures(sources) },
        });
      }
      listening = true;
      prober.start();
      log.info({ listen: servers.map((s) => s.address()), admin: admin?.address(), cacheDir: cfg.cacheDir }, 'cuttle listening');
    },
    adminAddress: () => admin?.address() as AddressInfo | undefined,
    snmpPort: () => snmpAgent?.port,
    async close(timeoutMs = cfg.shutdownTimeoutMs) {
      // Drain: stop accepting, report not ready, let in-flight responses finish, then close the rest.
      draining = true;
      prober.stop();
      const drainStarted = performance.now();
      const closing = servers.map((srv) => new Promise<void>((r) => (srv.listening ? srv.close(() => r()) : r())));
      // Keep-alive connections become idle as their last response ends: close them as they do.
      // (A connection in the hit lane is idle whenever its answers have left and it answers no join.)
      const closeIdle = () => {
        servers.forEach((srv) => srv.closeIdleConnections());
        for (const sock of lane?.sockets ?? []) if (sock.writableLength === 0 && !lane?.joining.has(sock)) sock.destroy();
      };
      const sweep = setInterval(closeIdle, 100);
      closeIdle();
      // Past the timeout, whatever is still open is cut: client connections, tunnels, then fills.
      const cutAll = () => {
        servers.forEach((s) => s.closeAllConnections());
        for (const sock of lane?.sockets ?? []) sock.destroy();
        for (const end of ctx.tunnels) end();
      };
      const timer = setTimeout(cutAll, timeoutMs);
      await Promise.all([...closing, lane?.joinsOver()]);
      clearTimeout(timer);
      clearInterval(sweep);
      cutAll(); // tunnels are not the servers' connections: close() does not wait for them
      // Fills still running or being written to disk: let them land, within what is left of the timeout.
      const left = Math.max(0, timeoutMs - (performance.now() - drainStarted));
      let wait: NodeJS.Timeout | undefined;
      const settled = await Promise.race([coalescer.settle().then(() => true), new Promise<boolean>((r) => (wait = setTimeout(() => r(false), left)))]);
      clearTimeout(wait);
      if (!settled) {
        log.warn({ fills: coalescer.running }, 'shutdown timeout: giving up the fills still running');
        coalescer.abortAll('shutting down');
      }
      coalescer.close();
      // undici's close() would wait for every running request: after the timeout nothing waits.
      await upstream.destroy().catch(() => {});
      // The log gets what is left of the timeout (at least LOG_CLOSE_MIN_MS): a full or hung disk
      // costs its lines, never the shutdown.
      await accessLog.close(Math.max(LOG_CLOSE_MIN_MS, timeoutMs - (performance.now() - drainStarted)));
      await disk.unlock();
      await new Promise<void>((r) => (admin?.listening ? admin.close(() => r()) : r()));
      await snmpAgent?.close();
    },
    reload(next) {
      // What changes live: the access rules and the mirror groups (with their probe settings). The rest
      // (listeners, tiers, sizes) needs a restart.
      acl = compileAcl(next);
      if (JSON.stringify(next.mirrorGroups) !== JSON.stringify(current.mirrorGroups) || JSON.stringify(next.probe) !== JSON.stringify(current.probe)) {
        const fresh = new Mirrors(next.mirrorGroups, next.probe, log);
        fresh.carryOver(mirrors); // a mirror that stays keeps its health, RTT and sticky repositories
        prober.stop();
        mirrors = fresh;
        ctx.mirrors = fresh;
        coalescer.useMirrors(fresh);
        prober = new Prober(fresh, probeFn);
        if (listening && !draining) prober.start();
        log.info({ groups: next.mirrorGroups }, 'reload: mirror groups replaced');
      }
      const r = reloaded(current, next);
      if (r.needRestart.length) log.warn({ options: r.needRestart }, `reload: ${r.needRestart.join(', ')} take${r.needRestart.length === 1 ? 's' : ''} effect only after a restart`);
      current = r.config;
      log.info('configuration reloaded');
    },
    reopenLogs() {
      accessLog.reopen();
    },
  };
}
