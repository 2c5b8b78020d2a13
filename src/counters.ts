// The per-request counters, declared once. Every finished request (a response, a refusal, a tunnel)
// goes through Metrics.observe, which counts it here by its Transaction: /status (and so the dashboard),
// SNMP and Prometheus all read these same numbers, so no view can define a hit differently.
import type { Transaction } from './access-log.ts';

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
  passes: { help: 'requests forwarded uncached (not GET/HEAD, credentials, no-store)', counts: (tx: Transaction) => tx.served === 'pass' },
  denied: { help: 'requests refused by an access rule (403)', counts: (tx: Transaction) => tx.result === 'TCP_DENIED' },
  errors: { help: "cuttle's own failures other than refusals (SNMP cacheHttpErrors with denied)", counts: (tx: Transaction, error?: string) => error !== undefined && tx.result !== 'TCP_DENIED' },
} as const;

export type RequestCounter = keyof typeof REQUEST_COUNTERS;

/** The request counters, plus the few event counters the request path keeps on the side. */
export type Counters = Record<RequestCounter, number> & {
  /** Body bytes sent to clients. */
  bytesOut: number;
  /** Responses cut short by a broken upstream. */
  truncated: number;
  /** Uncached requests and tunnels in flight (bounded by --max-passes). */
  passesInFlight: number;
  /** Disk records dropped for a bad checksum while serving. */
  corruptRecords: number;
  /** Stale copies served because the upstream could not be reached (TCP_REFRESH_FAIL_OLD). */
  staleServed: number;
};

export function newCounters(): Counters {
  const c = Object.fromEntries(Object.keys(REQUEST_COUNTERS).map((k) => [k, 0])) as Record<RequestCounter, number>;
  return { ...c, bytesOut: 0, truncated: 0, passesInFlight: 0, corruptRecords: 0, staleServed: 0 };
}

/** Count one finished request (`error`: the Proxy-Status token of cuttle's own failure, if any). */
export function countRequest(c: Counters, tx: Transaction, error: string | undefined): void {
  for (const k in REQUEST_COUNTERS) {
    if (REQUEST_COUNTERS[k as RequestCounter].counts(tx, error)) c[k as RequestCounter]++;
  }
  c.bytesOut += tx.bytesOut;
}
