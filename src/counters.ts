// Every number cuttle reports, declared once in METRICS: its Prometheus name, help, kind (a counter only
// ever grows; a gauge is a level now), where it shows in /status, and where its value lives. Prometheus
// (metrics.ts), /status and through it the dashboard, and SNMP all read this table, so no view can define
// a number differently. The values live where they are counted (the request counters here, fills in the
// coalescer, upstream in fetch.ts, tiers in the stores, mirrors in mirrors.ts): the table only reads them.
//
// Every finished request (a response, a refusal, a tunnel) goes through countRequest, once, from its
// Transaction.
import type { Transaction } from './access-log.ts';
import type { FetchStats } from './fill-fetch.ts';
import type { MirrorSnapshot } from './mirrors.ts';
import type { PeerSnapshot } from './peer.ts';
import { isBackground } from './background.ts';
import { newRefusals, readListenQueue, type RefusalReason } from './overload.ts';
import type { TierStats } from './store.ts';

/**
 * Squid's LogTags::isTcpHit(): the result codes that count as hits (a revalidated 304 is one, as is a
 * stale copy served while the upstream is down).
 */
const HIT_RESULTS: ReadonlySet<string> = new Set(['TCP_HIT', 'TCP_MEM_HIT', 'TCP_IMS_HIT', 'TCP_INM_HIT', 'TCP_REFRESH_UNMODIFIED', 'TCP_REFRESH_FAIL_OLD', 'TCP_NEGATIVE_HIT', 'TCP_OFFLINE_HIT', 'TCP_STALE_HIT']);

const isHit = (tx: Transaction) => HIT_RESULTS.has(tx.result);

/** Each request counter: what it means, and which finished requests it counts. */
export const REQUEST_COUNTERS = {
  requests: { help: 'client requests (SNMP cacheProtoClientHttpRequests)', counts: () => true },
  hits: { help: "requests answered from the cache, by Squid's isTcpHit (SNMP cacheHttpHits)", counts: (tx: Transaction) => isHit(tx) },
  memHits: { help: 'hits from the memory tier', counts: (tx: Transaction) => tx.result === 'TCP_MEM_HIT' },
  laneHits: { help: 'memory hits answered by the hit lane, without node:http (--hit-lane)', counts: (tx: Transaction) => tx.lane === 'hit' },
  laneJoins: { help: 'requests the hit lane answered from a fill in flight, without node:http (--hit-lane)', counts: (tx: Transaction) => tx.lane === 'join' },
  misses: { help: 'requests that started an upstream fill of their own', counts: (tx: Transaction) => !isHit(tx) && tx.served === 'miss' },
  coalesced: { help: 'requests that joined a running fill', counts: (tx: Transaction) => !isHit(tx) && tx.served === 'coalesced' },
  passes: { help: 'requests forwarded uncached (a method other than GET and HEAD, or a URL remembered as uncacheable, hit-for-miss)', counts: (tx: Transaction) => tx.served === 'pass' },
  background: { help: 'requests marked background with Priority: u=7 (cuttle warm): a new fill of theirs waits while the loop is busy with other clients (--background-load)', counts: (tx: Transaction) => isBackground(tx.headers) },
  denied: { help: 'requests refused by an access rule (403)', counts: (tx: Transaction) => tx.result === 'TCP_DENIED' },
  errors: { help: "cuttle's own failures other than refusals (SNMP cacheHttpErrors with denied)", counts: (tx: Transaction, error?: string) => error !== undefined && tx.result !== 'TCP_DENIED' },
} as const;

export type RequestCounter = keyof typeof REQUEST_COUNTERS;

/** Where a response's body bytes came from; cuttle: its own answers (a failure or a refusal). */
export type ServedFrom = 'memory' | 'disk' | 'upstream' | 'cuttle';

/** The request counters, plus the few event counters the request path keeps on the side. */
export type Counters = Record<RequestCounter, number> & {
  /** Responses cut short by a broken upstream. */
  truncated: number;
  /** Uncached requests and tunnels in flight (bounded by --max-passes). */
  passesInFlight: number;
  /** Disk records dropped for a bad checksum while serving. */
  corruptRecords: number;
  /** Stale copies served because the upstream could not be reached (TCP_REFRESH_FAIL_OLD). */
  staleServed: number;
  /** Body bytes sent to clients by where they came from. Their sum is bytes out: there is no other count of it. */
  readonly servedBytes: Record<ServedFrom, number>;
  /** Requests by result group, then by method (two lookups of interned strings, no key built per request). */
  readonly byResult: Map<string, Map<string, { labels: { result: string; method: string }; n: number }>>;
  /** cuttle's own failures by Proxy-Status error token (the catalog's few). */
  readonly byError: Map<string, number>;
  /** Connections and requests refused with 503 ERR_OVERLOADED, by why (overload.ts). */
  readonly refused: Record<RefusalReason, number>;
};

export function newCounters(): Counters {
  const c = Object.fromEntries(Object.keys(REQUEST_COUNTERS).map((k) => [k, 0])) as Record<RequestCounter, number>;
  return { ...c, truncated: 0, passesInFlight: 0, corruptRecords: 0, staleServed: 0, servedBytes: { memory: 0, disk: 0, upstream: 0, cuttle: 0 }, byResult: new Map(), byError: new Map(), refused: newRefusals() };
}

const RESULT_GROUP: Record<string, string> = {
  TCP_HIT: 'HIT',
  TCP_MEM_HIT: 'MEM_HIT',
  TCP_NEGATIVE_HIT: 'HIT',
  // A stale copy served within stale-while-revalidate while a background fill refreshes it.
  TCP_STALE_HIT: 'HIT',
  TCP_MISS: 'MISS',
  TCP_CLIENT_REFRESH_MISS: 'MISS',
  TCP_SWAPFAIL_MISS: 'MISS',
  TCP_REFRESH_MODIFIED: 'REFRESH_MODIFIED',
  TCP_REFRESH_UNMODIFIED: 'REFRESH_UNMODIFIED',
  // A stale copy served because the upstream could not be reached (RFC 9111 §4.2.4).
  TCP_REFRESH_FAIL_OLD: 'STALE',
  TCP_DENIED: 'DENIED',
  TCP_TUNNEL: 'TUNNEL',
  NONE: 'ERROR',
};

const KNOWN_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'OPTIONS', 'TRACE', 'PATCH', 'CONNECT', 'PURGE', 'NONE']);

const DISK_RESULTS: ReadonlySet<string> = new Set(['TCP_HIT', 'TCP_REFRESH_UNMODIFIED', 'TCP_REFRESH_FAIL_OLD', 'TCP_STALE_HIT']);

/**
 * Count one finished request (`error`: the Proxy-Status token of cuttle's own failure, if any); returns
 * its result group (HIT, MEM_HIT, MISS, …, ERROR).
 */
export function countRequest(c: Counters, tx: Transaction, error: string | undefined): string {
  for (const k in REQUEST_COUNTERS) {
    if (REQUEST_COUNTERS[k as RequestCounter].counts(tx, error)) c[k as RequestCounter]++;
  }
  const group = error && tx.result !== 'TCP_DENIED' ? 'ERROR' : (RESULT_GROUP[tx.result] ?? 'ERROR');
  // Methods are whatever clients send: an unknown one is counted as OTHER, so they can't grow the map.
  const method = KNOWN_METHODS.has(tx.method) ? tx.method : 'OTHER';
  let byMethod = c.byResult.get(group);
  if (!byMethod) c.byResult.set(group, (byMethod = new Map()));
  const rc = byMethod.get(method);
  if (rc) rc.n++;
  else byMethod.set(method, { labels: { result: group, method }, n: 1 });
  const from: ServedFrom = error ? 'cuttle' : tx.result === 'TCP_MEM_HIT' ? 'memory' : DISK_RESULTS.has(tx.result) ? 'disk' : 'upstream';
  c.servedBytes[from] += tx.bytesOut;
  if (error) c.byError.set(error, (c.byError.get(error) ?? 0) + 1);
  return group;
}

/** Where the numbers live, read when a view asks (a scrape, /status, an SNMP packet). */
export interface CounterSources {
  readonly counters: Counters;
  fills(): FetchStats & { inFlight: number; memoryBytes: number };
  upstream(): { fetches: number; bytes: number };
  tiers(): Record<'memory' | 'disk', TierStats>;
  diskIndex(): { entries: number; maxEntries: number; heapBytes: number };
  bufferPoolBytes(): number;
  clientConnections(): number;
  /** 1 while the refuser thread holds the client ports (refuser.ts). */
  acceptHandedOver(): number;
  /** Background requests whose new fill waits for the loop to have room (background.ts). */
  backgroundWaiting(): number;
  mirrors(): readonly MirrorSnapshot[];
  peers(): readonly PeerSnapshot[];
  accessLogDroppedLines(): number;
}

export type Labels = Readonly<Record<string, string>>;
/** A value, or one value per label set. */
export type Reading = number | readonly (readonly [Labels, number])[];

export interface Metric {
  /** The Prometheus name. */
  readonly name: string;
  readonly help: string;
  /** counter: only ever grows (a Prometheus counter); gauge: a level now. */
  readonly kind: 'counter' | 'gauge';
  readonly labelNames?: readonly string[];
  /**
   * Where /status shows it: dotted paths; a `{label}` part stands for that label's value, and the label
   * sets that meet on one path are summed there. (Mirrors show in /status as their snapshots, which these
   * read: no path.)
   */
  readonly status: readonly string[];
  read(s: CounterSources): Reading;
}

const counter = (name: string, help: string, status: string[], read: Metric['read'], labelNames?: string[]): Metric => ({ name, help, kind: 'counter', status, read, labelNames });
const gauge = (name: string, help: string, status: string[], read: Metric['read'], labelNames?: string[]): Metric => ({ name, help, kind: 'gauge', status, read, labelNames });
const byTier = (pick: (t: TierStats) => number) => (s: CounterSources) => Object.entries(s.tiers()).map(([tier, t]) => [{ tier }, pick(t)] as const);
const byMirror = (pick: (m: MirrorSnapshot) => number | null) => (s: CounterSources) =>
  s.mirrors().flatMap((m) => {
    const v = pick(m);
    return v === null ? [] : [[{ group: m.group, mirror: m.mirror }, v] as const];
  });
const MIRROR = ['group', 'mirror'];
const byPeer = (pick: (p: PeerSnapshot) => number) => (s: CounterSources) => s.peers().filter((p) => !p.self).map((p) => [{ role: p.role, peer: p.url }, pick(p)] as const);
const PEER = ['role', 'peer'];
/** A kernel counter, read from procfs when a view asks: no value where it can't be read (not Linux). */
const kernel = (v: number | undefined): Reading => (v === undefined ? [] : v);

/** Every counter and gauge, in the order /metrics lists them. */
export const METRICS: readonly Metric[] = [
  counter('cuttle_requests_total', 'Client requests by result group (HIT, MEM_HIT, MISS, REFRESH_*, STALE, DENIED, TUNNEL, ERROR) and method', ['results.{result}'], (s) => [...s.counters.byResult.values()].flatMap((byMethod) => [...byMethod.values()].map(({ labels, n }) => [labels, n] as const)), ['result', 'method']),
  counter('cuttle_requests_counted_total', `The request counters that /status and SNMP show, by name: ${Object.entries(REQUEST_COUNTERS).map(([k, v]) => `${k} = ${v.help}`).join('; ')}`, ['counters.{counter}'], (s) => Object.keys(REQUEST_COUNTERS).map((counter) => [{ counter }, s.counters[counter as RequestCounter]] as const), ['counter']),
  counter('cuttle_served_bytes_total', "Body bytes sent to clients, by where they came from (memory, disk, upstream; cuttle: its own failures and refusals). Their sum is bytes out (/status counters.bytesOut, SNMP cacheHttpOutKb)", ['servedBytes.{tier}', 'counters.bytesOut'], (s) => Object.entries(s.counters.servedBytes).map(([tier, n]) => [{ tier }, n] as const), ['tier']),
  counter('cuttle_errors_total', "cuttle's own failures by Proxy-Status error token", ['errors.{error}'], (s) => [...s.counters.byError].map(([error, n]) => [{ error }, n] as const), ['error']),
  counter('cuttle_truncated_responses_total', 'Responses cut short by a broken upstream', ['counters.truncated'], (s) => s.counters.truncated),
  counter('cuttle_corrupt_records_total', 'Disk records dropped for a bad checksum while serving', ['counters.corruptRecords'], (s) => s.counters.corruptRecords),
  counter('cuttle_stale_served_total', 'Stale copies served because the upstream could not be reached (TCP_REFRESH_FAIL_OLD)', ['counters.staleServed'], (s) => s.counters.staleServed),
  counter('cuttle_refused_total', 'Connections and requests refused with 503 ERR_OVERLOADED, by reason: connections (--max-client-connections), fills (--max-fills), passes (--max-passes), fill_memory (--fill-memory spent), loop_lag (the event loop lags past --max-loop-lag), background (a Priority: u=7 request waited --background-wait for the loop to have room)', ['refused.{reason}'], (s) => Object.entries(s.counters.refused).map(([reason, n]) => [{ reason }, n] as const), ['reason']),
  counter('cuttle_listen_overflows_total', "Connections the kernel dropped because a listener's accept queue was full (TcpExt ListenOverflows in /proc/net/netstat): counts every listener of the network namespace, not only cuttle's", ['listenQueue.overflows'], () => kernel(readListenQueue()?.overflows)),
  counter('cuttle_listen_drops_total', 'Connections the kernel dropped at a listener for any reason, overflows included (TcpExt ListenDrops in /proc/net/netstat): counts every listener of the network namespace, not only cuttle\'s', ['listenQueue.drops'], () => kernel(readListenQueue()?.drops)),
  gauge('cuttle_passes_in_flight', 'Uncached requests and tunnels in flight (bounded by --max-passes)', ['counters.passesInFlight'], (s) => s.counters.passesInFlight),
  gauge('cuttle_background_waiting', 'Background requests (Priority: u=7) whose new fill waits for the event loop to have room (--background-load)', ['backgroundWaiting'], (s) => s.backgroundWaiting()),
  gauge('cuttle_client_connections', 'Open client connections', ['clientConnections'], (s) => s.clientConnections()),
  gauge('cuttle_accept_handed_over', 'Event loops whose client ports the refuser thread holds (at --max-client-connections, or while the loop lags past --max-loop-lag): it answers each new connection with 503 at once', ['acceptHandedOver'], (s) => s.acceptHandedOver()),
  gauge('cuttle_fills_in_flight', 'Upstream fills running now', ['fills.inFlight'], (s) => s.fills().inFlight),
  gauge('cuttle_fill_memory_bytes', 'Memory held by in-flight fills (bounded by --fill-memory)', ['fills.memoryBytes'], (s) => s.fills().memoryBytes),
  counter('cuttle_fills_started_total', 'Upstream fills started', ['fills.fillsStarted'], (s) => s.fills().fillsStarted),
  counter('cuttle_fills_committed_total', 'Fills whose body was stored', ['fills.fillsCommitted'], (s) => s.fills().fillsCommitted),
  counter('cuttle_fills_failed_total', 'Fills that failed: no usable answer, or a body that broke off (SNMP cacheServerErrors)', ['fills.fillsFailed'], (s) => s.fills().fillsFailed),
  counter('cuttle_fills_released_total', 'Fills handed to their readers unshared (the answer may not be stored or shared)', ['fills.fillsReleased'], (s) => s.fills().fillsReleased),
  counter('cuttle_fills_abandoned_total', 'Fills given up: nobody left to serve and the body could not be stored, or no progress', ['fills.fillsAbandoned'], (s) => s.fills().fillsAbandoned),
  counter('cuttle_fill_internal_errors_total', 'Exceptions inside a fetch (bugs): the fill failed with ERR_INTERNAL', ['fills.internalErrors'], (s) => s.fills().internalErrors),
  counter('cuttle_mirror_failovers_total', 'Upstream answers skipped for the next mirror (error, 5xx, or 404 of a content-addressed object)', ['fills.failovers'], (s) => s.fills().failovers),
  counter('cuttle_fill_resumes_total', 'Broken bodies continued with Range from another mirror', ['fills.resumes'], (s) => s.fills().resumes),
  counter('cuttle_hash_mismatches_total', 'Content-addressed bodies that failed their hash (cut short, never stored)', ['fills.hashMismatches'], (s) => s.fills().hashMismatches),
  counter('cuttle_upstream_fetches_total', 'Requests sent upstream (fills and passes; SNMP cacheServerRequests)', ['upstream.fetches'], (s) => s.upstream().fetches),
  counter('cuttle_upstream_bytes_total', 'Body bytes received from upstreams (SNMP cacheServerInKb)', ['upstream.bytes'], (s) => s.upstream().bytes),
  gauge('cuttle_cache_objects', 'Objects stored, by tier', ['tiers.{tier}.objects'], byTier((t) => t.objects), ['tier']),
  gauge('cuttle_cache_bytes', 'Bytes stored, by tier', ['tiers.{tier}.bytes'], byTier((t) => t.bytes), ['tier']),
  gauge('cuttle_cache_max_bytes', 'Configured bound, by tier', ['tiers.{tier}.maxBytes'], byTier((t) => t.maxBytes), ['tier']),
  counter('cuttle_cache_evictions', 'Objects evicted since start, by tier', ['tiers.{tier}.evictions'], byTier((t) => t.evictions), ['tier']),
  gauge('cuttle_disk_index_entries', 'Records in the disk index (one per object on disk)', ['tiers.disk.index.entries'], (s) => s.diskIndex().entries),
  gauge('cuttle_disk_index_max_entries', 'Bound of the disk index: --disk-cache / 4 KiB (each record is charged whole 4 KiB blocks)', ['tiers.disk.index.maxEntries'], (s) => s.diskIndex().maxEntries),
  gauge('cuttle_disk_index_heap_bytes', 'Heap held by the disk index (its entries at their measured cost)', ['tiers.disk.index.heapBytes'], (s) => s.diskIndex().heapBytes),
  gauge('cuttle_buffer_pool_bytes', 'Read-back buffers kept for reuse, at what they cost (bounded at 32 MiB)', ['bufferPoolBytes'], (s) => s.bufferPoolBytes()),
  counter('cuttle_access_log_dropped_lines_total', 'Access-log lines dropped: the file could not take them (a full disk, a write error, 16 MiB behind)', ['accessLog.droppedLines'], (s) => s.accessLogDroppedLines()),
  gauge('cuttle_mirror_healthy', 'Stratum 1 mirror health (1 healthy, 0 down)', [], byMirror((m) => (m.healthy ? 1 : 0)), MIRROR),
  gauge('cuttle_mirror_rtt_seconds', 'Smoothed RTT of a mirror (EWMA of probes and time to first byte)', [], byMirror((m) => (m.rttMs === null ? null : m.rttMs / 1000)), MIRROR),
  gauge('cuttle_mirror_stale', "1 when the mirror's probed manifest lags the group's newest by more than --mirror-max-lag", [], byMirror((m) => (m.stale ? 1 : 0)), MIRROR),
  gauge('cuttle_mirror_manifest_revision', "Revision (S) of the probed repository's manifest on the mirror", [], byMirror((m) => m.revision), MIRROR),
  counter('cuttle_mirror_fetches', 'Fetches sent to a mirror since start', [], byMirror((m) => m.fetches), MIRROR),
  counter('cuttle_mirror_failures', 'Failed fetches of a mirror since start: connect, timeout, 5xx, broken body, bad hash', [], byMirror((m) => m.failures), MIRROR),
  counter('cuttle_mirror_bytes', 'Body bytes received from a mirror since start', [], byMirror((m) => m.bytes), MIRROR),
  counter('cuttle_mirror_probe_failures', 'Failed health probes of a mirror since start', [], byMirror((m) => m.probeFailures), MIRROR),
  gauge('cuttle_peer_up', 'A parent (--parent) or another bank member (--bank): 1 up, 0 down (marked by failures until a probe finds it serving)', [], byPeer((p) => (p.up ? 1 : 0)), PEER),
  counter('cuttle_peer_requests', 'Requests sent to a parent or bank member since start', [], byPeer((p) => p.requests), PEER),
  counter('cuttle_peer_failures', 'Requests to a parent or bank member that failed since start: no connection, no answer in time, a reset, a denial', [], byPeer((p) => p.failures), PEER),
];

/** A reading as label sets (an unlabelled value has the empty one). */
export function labelled(r: Reading): readonly (readonly [Labels, number])[] {
  return typeof r === 'number' ? [[{}, r]] : r;
}

export type Figures = Record<string, unknown>;

/** The object at a dotted path of `tree`, made (with the objects on the way) if it is not there. */
function objectAt(tree: Figures, path: string): Figures {
  let o = tree;
  for (const p of path.split('.')) o = (o[p] ??= {}) as Figures;
  return o;
}

/** Put `v` at a dotted path of `tree`. */
export function setAt(tree: Figures, path: string, v: unknown): void {
  const at = path.lastIndexOf('.');
  (at < 0 ? tree : objectAt(tree, path.slice(0, at)))[path.slice(at + 1)] = v;
}

/** Every table figure where /status shows it (the dashboard and SNMP read these same paths). */
export function figures(s: CounterSources): Figures {
  const tree: Figures = {};
  for (const m of METRICS) {
    if (m.status.length === 0) continue;
    const values = labelled(m.read(s));
    for (const path of m.status) {
      const at = path.indexOf('.{');
      if (at >= 0) objectAt(tree, path.slice(0, at)); // a labelled figure is an object, empty until counted
      for (const [labels, v] of values) {
        const p = path.replace(/\{(\w+)\}/g, (_m, k: string) => labels[k] ?? '');
        setAt(tree, p, ((figureAt(tree, p) as number | undefined) ?? 0) + v);
      }
    }
  }
  return tree;
}

/** The figure at a dotted path (undefined when there is none). */
export function figureAt(tree: Figures, path: string): unknown {
  let o: unknown = tree;
  for (const p of path.split('.')) o = (o as Figures | undefined)?.[p];
  return o;
}

const share = (part: number, whole: number) => (whole > 0 ? part / whole : null);
const num = (f: Figures, path: string) => (figureAt(f, path) as number | undefined) ?? 0;

/**
 * What the cache spared the origin, derived from the figures (under --workers from their sums, never
 * summed themselves): each ratio, what it means, and how. null while there is nothing to divide.
 */
export const RATIOS = {
  hitRatio: { help: "Squid's request hit ratio: hits / client requests (a request that joined a running fill is a miss, as in Squid)", read: (f: Figures) => share(num(f, 'counters.hits'), num(f, 'counters.requests')) },
  offloadRequests: { help: 'origin offload by requests: the share of client requests that cost no upstream fetch, 1 − upstream fetches / client requests', read: (f: Figures) => share(num(f, 'counters.requests') - num(f, 'upstream.fetches'), num(f, 'counters.requests')) },
  offloadBytes: { help: 'origin offload by bytes: the share of body bytes sent to clients that did not come from upstream, 1 − upstream bytes / bytes out', read: (f: Figures) => share(num(f, 'counters.bytesOut') - num(f, 'upstream.bytes'), num(f, 'counters.bytesOut')) },
} as const;

/** The ratios of RATIOS, for /status. */
export function ratios(f: Figures): Record<keyof typeof RATIOS, number | null> {
  return Object.fromEntries(Object.entries(RATIOS).map(([k, r]) => [k, r.read(f)])) as Record<keyof typeof RATIOS, number | null>;
}
