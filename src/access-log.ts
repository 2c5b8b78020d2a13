// The access log, one line per transaction, in one of two Squid formats that existing tools parse:
//   squid    Squid's native format (logformat squid):
//            %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt
//   frontier frontier-squid's awstats format, which WLCG's awstats and failover monitors parse:
//            %>a %ui %un [%{%d/%b/%Y:%H:%M:%S.}tl%03tu%{ %z}tl] "%rm %ru HTTP/%rv" %Hs %<st %Ss:%Sh %tr "%{X-Frontier-Id}>h %{cvmfs-info}>h" "%{Referer}>h" "%{User-Agent}>h"
// As Squid 5.7 writes them: the time is when the transaction ended (the frontier format's in local
// time), and %<st counts every byte sent to the client, the response head included.
// Written asynchronously through a LineSink, which drops and counts what the file can't take (a full
// disk never stops the proxy), with reopen() for log rotation.
import type { IncomingHttpHeaders } from 'node:http';
import { LineSink } from './line-sink.ts';

export type ResultTag =
  | 'TCP_HIT' | 'TCP_MEM_HIT' | 'TCP_MISS' | 'TCP_REFRESH_UNMODIFIED' | 'TCP_REFRESH_MODIFIED'
  | 'TCP_NEGATIVE_HIT' | 'TCP_CLIENT_REFRESH_MISS' | 'TCP_DENIED' | 'TCP_TUNNEL' | 'TCP_SWAPFAIL_MISS' | 'TCP_REFRESH_FAIL_OLD' | 'TCP_STALE_HIT' | 'NONE';

/** Squid's hierarchy codes: how the next hop was chosen (a parent by its policy, a bank owner as CARP). */
export type HierarchyTag = 'HIER_NONE' | 'HIER_DIRECT' | 'FIRSTUP_PARENT' | 'ROUNDROBIN_PARENT' | 'CARP';

/** One record per client request; the access log and the counters both read it. */
export interface Transaction {
  startedAt: number;
  client: string;
  method: string;
  url: string;
  status: number;
  /** Body bytes sent to the client (the counters' bytes out). */
  bytesOut: number;
  /** Bytes of the response head sent (the log's bytes field is head and body, as Squid's %<st). */
  headBytes: number;
  /** Bytes of chunked framing sent (chunk sizes and CRLFs, the last chunk), also in the log's bytes. */
  frameBytes: number;
  result: ResultTag;
  /** _ABORTED: the answer did not reach its end (the client left, as Squid marks it; the upstream broke off, a shutdown cut it). */
  aborted: boolean;
  hierarchy: HierarchyTag;
  peer: string;
  mime: string;
  coalesced: boolean;
  /** How it was answered when not from the cache: its own fill, a joined fill, or passed uncached. */
  served?: 'miss' | 'coalesced' | 'pass';
  /** Answered by the hit lane (hit-lane.ts), not node:http: a memory hit, or a join of a fill in flight. */
  lane?: 'hit' | 'join';
  /** The client's request headers and HTTP version (the frontier format logs a few of them). */
  headers?: IncomingHttpHeaders;
  httpVersion?: string;
  /** A relay from another worker of this process (--workers): that worker logs and counts the request. */
  relay?: boolean;
  /** Its line is written (a transaction is recorded once, whichever end comes first). */
  recorded: boolean;
}

/** A transaction as it starts: what is known on arrival; the request path fills in the rest. */
export function newTransaction(known: Pick<Transaction, 'startedAt' | 'client' | 'method' | 'url'> & Partial<Transaction>): Transaction {
  return { status: 0, bytesOut: 0, headBytes: 0, frameBytes: 0, recorded: false, result: 'NONE', aborted: false, hierarchy: 'HIER_NONE', peer: '', mime: '', coalesced: false, ...known };
}

export type AccessLogFormat = 'squid' | 'frontier';

/** The result tag as Squid writes it: TCP_CF_* for collapsed requests, *_ABORTED for hang-ups. */
function resultTag(tx: Transaction): string {
  const tag = tx.coalesced && tx.result.startsWith('TCP_') ? `TCP_CF_${tx.result.slice(4)}` : tx.result;
  return tx.aborted ? `${tag}_ABORTED` : tag;
}

/** Squid's %<st: every byte sent to the client, head, body and chunked framing. */
const sentBytes = (tx: Transaction) => tx.bytesOut + tx.headBytes + tx.frameBytes;

/** A line in Squid's format, stamped `nowMs`: when the transaction ended. */
export function formatSquid(tx: Transaction, nowMs: number): string {
  const secs = Math.floor(nowMs / 1000);
  const ms = String(nowMs % 1000).padStart(3, '0');
  const elapsed = String(Math.max(0, nowMs - tx.startedAt)).padStart(6, ' ');
  const result = resultTag(tx);
  const status = String(tx.status).padStart(3, '0');
  const url = tx.url.replace(/\s/g, '%20');
  return `${secs}.${ms} ${elapsed} ${tx.client} ${result}/${status} ${sentBytes(tx)} ${tx.method} ${url} - ${tx.hierarchy}/${tx.peer || '-'} ${tx.mime || '-'}\n`;
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const p2 = (n: number) => String(n).padStart(2, '0');

/** A request header as the frontier format quotes it: '-' when absent, no quotes or line breaks inside. */
function hdr(tx: Transaction, name: string): string {
  const v = tx.headers?.[name];
  const s = Array.isArray(v) ? v.join(', ') : v;
  return s ? s.replace(/["\\\r\n]/g, (c) => (c === '"' ? '%22' : c === '\\' ? '%5C' : ' ')) : '-';
}

/** strftime's %z: the local zone's offset from UTC at `d`, as +hhmm. */
function zoneOffset(d: Date): string {
  const east = -d.getTimezoneOffset();
  const a = Math.abs(east);
  return `${east < 0 ? '-' : '+'}${p2(Math.floor(a / 60))}${p2(a % 60)}`;
}

/** A line in frontier-squid's format, stamped `nowMs` (the end) in local time, as strftime writes %tl. */
export function formatFrontier(tx: Transaction, nowMs: number): string {
  const d = new Date(nowMs);
  const when = `${p2(d.getDate())}/${MONTHS[d.getMonth()]}/${d.getFullYear()}:${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')} ${zoneOffset(d)}`;
  const url = tx.url.replace(/\s/g, '%20');
  const elapsed = Math.max(0, nowMs - tx.startedAt);
  return `${tx.client} - - [${when}] "${tx.method} ${url} HTTP/${tx.httpVersion ?? '1.1'}" ${tx.status} ${sentBytes(tx)} ${resultTag(tx)}:${tx.hierarchy} ${elapsed} "${hdr(tx, 'x-frontier-id')} ${hdr(tx, 'cvmfs-info')}" "${hdr(tx, 'referer')}" "${hdr(tx, 'user-agent')}"\n`;
}

/**
 * A finished transaction goes to the access log and to the counters and metrics, at one instant (every
 * path that ends one, the request path, the hit lane, tunnels and refused connections, calls this):
 * as ended now, or at `endedAt` (a refusal the refuser thread made, reported later).
 */
export function recordTransaction(to: { accessLog: AccessLog; metrics: { observe(tx: Transaction, errorToken: string | undefined, nowMs: number): void }; clock: { now(): number } }, tx: Transaction, errorToken: string | undefined, endedAt?: number): void {
  if (tx.relay || tx.recorded) return;
  tx.recorded = true;
  const now = endedAt ?? to.clock.now();
  to.accessLog.write(tx, now);
  to.metrics.observe(tx, errorToken, now);
}

export interface AccessLog {
  write(tx: Transaction, nowMs: number): void;
  reopen(): void;
  /** Resolves once every line written before it is in the file or dropped. */
  flush(): Promise<void>;
  /** Write what is held for at most `timeoutMs`, then close; what could not be written is dropped. */
  close(timeoutMs: number): Promise<void>;
  /** Lines dropped since start: the file could not take them (an error, or too far behind). */
  readonly droppedLines: number;
}

/** Lines are handed to the file in batches of about this many characters. */
const BATCH_CHARS = 16 * 1024;
/** Bytes the file may fall behind by (a stalled disk) before lines are dropped, and counted. */
export const MAX_BEHIND_BYTES = 16 * 2 ** 20;

/** Lines dropped, and why: the error that lost them, 'behind' (a stalled file), or 'closed'. */
export type DropReport = (lines: number, why: Error | 'behind' | 'closed') => void;

/** `shared`: other workers of this process write to the same stdout (--workers): writes stay within PIPE_BUF. */
/** A pipe write of up to this many bytes is never interleaved with another writer's (POSIX). */
const PIPE_BUF = 4096;

export function openAccessLog(target: string, format: AccessLogFormat = 'squid', onDrop?: DropReport, shared = false): AccessLog {
  const line = format === 'frontier' ? formatFrontier : formatSquid;
  if (target === 'none') return { write() {}, reopen() {}, flush: async () => {}, close: async () => {}, droppedLines: 0 };
  const atomic = shared && target === '-' ? PIPE_BUF : undefined;
  const sink = new LineSink(target === '-' ? 1 : target, { maxBehindBytes: MAX_BEHIND_BYTES, onDrop, atomicBytes: atomic });
  // Lines are joined here and written a batch at a time: one write per request would cost a system
  // call (and a promise of the thread pool) each.
  let batch: string[] = [];
  let chars = 0;
  const hand = () => {
    if (batch.length === 0) return;
    const lines = batch;
    batch = [];
    chars = 0;
    sink.write(lines.join(''));
  };
  // A quiet proxy still gets its lines out within a second.
  const timer = setInterval(hand, 1000);
  timer.unref();
  return {
    write(tx, now) {
      const l = line(tx, now);
      const size = atomic === undefined ? l.length : Buffer.byteLength(l);
      if (atomic !== undefined && chars + size > atomic) hand();
      batch.push(l);
      chars += size;
      if (chars >= BATCH_CHARS) hand();
    },
    reopen() {
      hand();
      sink.reopen();
    },
    flush() {
      hand();
      return sink.flush();
    },
    async close(timeoutMs) {
      clearInterval(timer);
      hand();
      await sink.close(timeoutMs);
    },
    get droppedLines() {
      return sink.droppedLines;
    },
  };
}
