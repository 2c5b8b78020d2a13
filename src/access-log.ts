// The access log, one line per transaction in Squid's native format, so existing Squid log tools parse it:
//   time.ms elapsed client result/status bytes method URL ident hierarchy/peer mime
// (squid logformat "squid": %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt)
// Written through SonicBoom (pino.destination) asynchronously, with reopen() for log rotation.
import { pino } from 'pino';

export type ResultTag =
  | 'TCP_HIT' | 'TCP_MEM_HIT' | 'TCP_MISS' | 'TCP_REFRESH_UNMODIFIED' | 'TCP_REFRESH_MODIFIED'
  | 'TCP_NEGATIVE_HIT' | 'TCP_CLIENT_REFRESH_MISS' | 'TCP_DENIED' | 'TCP_TUNNEL' | 'TCP_SWAPFAIL_MISS' | 'NONE';

export type HierarchyTag = 'HIER_NONE' | 'HIER_DIRECT';

/** One record per client request; the access log and the counters both read it. */
export interface Transaction {
  startedAt: number;
  client: string;
  method: string;
  url: string;
  status: number;
  bytesOut: number;
  result: ResultTag;
  /** Squid appends _ABORTED when the client went away before the response ended. */
  aborted: boolean;
  hierarchy: HierarchyTag;
  peer: string;
  mime: string;
  coalesced: boolean;
}

export function formatSquid(tx: Transaction, nowMs: number): string {
  const secs = Math.floor(tx.startedAt / 1000);
  const ms = String(tx.startedAt % 1000).padStart(3, '0');
  const elapsed = String(Math.max(0, nowMs - tx.startedAt)).padStart(6, ' ');
  // Squid marks collapsed-forwarding transactions TCP_CF_* and client aborts *_ABORTED.
  const tag = tx.coalesced && tx.result.startsWith('TCP_') ? `TCP_CF_${tx.result.slice(4)}` : tx.result;
  const result = tx.aborted ? `${tag}_ABORTED` : tag;
  const status = String(tx.status).padStart(3, '0');
  const url = tx.url.replace(/\s/g, '%20');
  return `${secs}.${ms} ${elapsed} ${tx.client} ${result}/${status} ${tx.bytesOut} ${tx.method} ${url} - ${tx.hierarchy}/${tx.peer || '-'} ${tx.mime || '-'}\n`;
}

export interface AccessLog {
  write(tx: Transaction, nowMs: number): void;
  reopen(): void;
  flush(): Promise<void>;
}

export function openAccessLog(target: string): AccessLog {
  if (target === 'none') return { write() {}, reopen() {}, flush: async () => {} };
  const dest = pino.destination({ dest: target === '-' ? 1 : target, sync: false, minLength: 4096, mkdir: true });
  // Lines are batched for throughput; a quiet proxy still gets its lines out within a second.
  const timer = setInterval(() => {
    try {
      dest.flush();
    } catch {
      /* a write is in flight; the next tick flushes */
    }
  }, 1000);
  timer.unref();
  return {
    write(tx, now) {
      dest.write(formatSquid(tx, now));
    },
    reopen() {
      if (target === '-') return;
      // What is buffered belongs to the old (renamed) file: flush it there, then reopen by name.
      try {
        dest.flush(() => dest.reopen());
      } catch {
        dest.reopen();
      }
    },
    flush() {
      return new Promise((resolve) => {
        try {
          dest.flush((_err?: Error) => resolve());
        } catch {
          resolve();
        }
      });
    },
  };
}
