// What the request path, delivery and tunnels share of one proxy: its configuration, tiers, fills,
// upstream, logs and counters. Built once by createProxy (server.ts).
import type { Acl } from './acl.ts';
import type { BackgroundGate } from './background.ts';
import type { AccessLog, Transaction } from './access-log.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { Clock } from './clock.ts';
import type { Coalescer } from './coalescer.ts';
import type { Config } from './config.ts';
import type { Counters } from './counters.ts';
import type { Upstream } from './fetch.ts';
import type { Logger } from './log.ts';
import type { Metrics } from './metrics.ts';
import type { Mirrors } from './mirrors.ts';
import type { Hierarchy } from './hierarchy.ts';
import type { Pacer } from './pacer.ts';
import type { ResponseSink } from './response-sink.ts';
import type { LoopLag } from './overload.ts';
import type { TieredStore } from './store.ts';

export interface Ctx {
  cfg: Config;
  acl: () => Acl;
  clock: Clock;
  store: TieredStore;
  coalescer: Coalescer;
  upstream: Upstream;
  accessLog: AccessLog;
  log: Logger;
  counters: Counters;
  buffers: BufferPool;
  /** The per-turn budget every response body is written under (fair delivery). */
  pacer: Pacer;
  metrics: Metrics;
  mirrors: Mirrors;
  /** Where misses and passes go: bank owner, parents, direct. */
  hierarchy: Hierarchy;
  /** The event-loop lag monitor: while it lags, new connections and new fills are refused. */
  loopLag: LoopLag;
  /** Holds a background request's new fill while the loop is busy with clients (background.ts). */
  background: BackgroundGate;
  /** This proxy forgot a key (PURGE, an unsafe method): the other workers are told (--workers). */
  forgotten?: (key: string) => Promise<boolean>;
  /** Open CONNECT tunnels, each by the function that ends it (shutdown cuts them). */
  tunnels: Set<() => void>;
  /**
   * Requests not yet logged, with their responses (none for a lane hit still in its socket's buffers):
   * a shutdown logs those it cut.
   */
  open: Map<Transaction, ResponseSink | undefined>;
}
