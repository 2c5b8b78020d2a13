// Composition root: wires config, tiers, coalescer, upstream, logs and listeners into one proxy.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { openAccessLog, type AccessLog } from './access-log.ts';
import { compileAcl, type Acl } from './acl.ts';
import { BufferPool } from './buffer-pool.ts';
import { primaryKey } from './cache-key.ts';
import { systemClock, type Clock } from './clock.ts';
import { Coalescer } from './coalescer.ts';
import type { Config } from './config.ts';
import { Upstream } from './fetch.ts';
import { createFreshness } from './freshness.ts';
import { handleRequest, newCounters, type Counters, type Ctx } from './handle-request.ts';
import { createLogger, type Logger } from './log.ts';
import { TieredStore } from './store.ts';
import { DiskTier } from './store-disk.ts';
import { MemoryTier } from './store-memory.ts';
import { handleConnect } from './tunnel.ts';

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
  /** Bound addresses, in --listen order. */
  addresses(): AddressInfo[];
  listen(): Promise<void>;
  /** Stop accepting, let in-flight responses finish (up to timeoutMs), then close everything. */
  close(timeoutMs?: number): Promise<void>;
  /** Swap in a new configuration for the parts that can change live (ACLs). */
  setAcl(cfg: Config): void;
}

export async function createProxy(cfg: Config, opts: ProxyOptions = {}): Promise<Proxy> {
  const clock = opts.clock ?? systemClock;
  const log = opts.logger ?? createLogger(cfg.logLevel);
  const freshness = createFreshness(clock, cfg.negativeTtlMs);
  let acl: Acl = compileAcl(cfg);
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
  const coalescer = new Coalescer({ cfg, clock, store, upstream, freshness, log });
  coalescerRef.c = coalescer;
  const counters = newCounters();
  const accessLog = opts.accessLog ?? openAccessLog(cfg.accessLog);
  const ctx: Ctx = { cfg, acl: getAcl, clock, store, coalescer, upstream, accessLog, log, counters, buffers: new BufferPool(2048) };

  const servers: Server[] = cfg.listen.map(() => {
    const srv = createServer({
      requireHostHeader: false,
      keepAliveTimeout: cfg.clientIdleTimeoutMs,
      headersTimeout: 60_000,
      requestTimeout: 0, // uploads may be long; idle sockets are bounded by keepAliveTimeout
      highWaterMark: 64 * 1024,
    });
    srv.maxConnections = cfg.maxClientConnections;
    srv.on('request', (req, res) => void handleRequest(ctx, req, res));
    srv.on('connect', (req, socket, head) => handleConnect(ctx, req, socket, head));
    srv.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      if (socket.writable && err.code !== 'ECONNRESET') {
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
    addresses: () => servers.map((s) => s.address() as AddressInfo),
    async listen() {
      for (const [i, srv] of servers.entries()) {
        const { host, port } = cfg.listen[i]!;
        await new Promise<void>((resolve, reject) => {
          const onErr = (err: Error) => reject(new Error(`cannot listen on ${host}:${port}: ${err.message}`, { cause: err }));
          srv.once('error', onErr);
          srv.listen({ host, port, backlog: 4096 }, () => {
            srv.off('error', onErr);
            resolve();
          });
        });
      }
      log.info({ listen: servers.map((s) => s.address()), cacheDir: cfg.cacheDir }, 'cuttle listening');
    },
    async close(timeoutMs = 30_000) {
      const closing = servers.map((srv) => new Promise<void>((r) => (srv.listening ? srv.close(() => r()) : r())));
      for (const srv of servers) srv.closeIdleConnections();
      const timer = setTimeout(() => servers.forEach((s) => s.closeAllConnections()), timeoutMs);
      await Promise.all(closing);
      clearTimeout(timer);
      await upstream.close().catch(() => {});
      await accessLog.flush();
    },
    setAcl(next) {
      acl = compileAcl(next);
    },
  };
}
