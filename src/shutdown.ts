// Shutdown within --shutdown-timeout. First the drain (drain.ts): new connections are still served
// and every response closes its connection, until no client connection is left; then stop accepting,
// let in-flight responses finish, and close the rest in order (fills, upstream, access log, the disk's
// lock, admin, SNMP); past the timeout, cut.
import type { Server } from 'node:http';
import type { AccessLog } from './access-log.ts';
import { within } from './clock.ts';
import type { Coalescer } from './coalescer.ts';
import type { Upstream } from './fetch.ts';
import { stopListening, type Listeners } from './listeners.ts';
import type { Logger } from './log.ts';
import type { SnmpAgent } from './snmp.ts';
import type { DiskTier } from './store-disk.ts';

/** A stop closes the port once no client came for this long (each connection closes after its answer, so none may be open between two). */
export const QUIET_MS = 1000;

/** The least time the access log gets to write its last lines at shutdown, after the drain. */
export const LOG_CLOSE_MIN_MS = 1000;

/** What a shutdown closes, in the order it closes them. */
export interface ShutdownParts {
  listeners: Listeners;
  /** Open CONNECT tunnels, each by the function that ends it. */
  tunnels: Set<() => void>;
  coalescer: Coalescer;
  upstream: Upstream;
  accessLog: AccessLog;
  disk: DiskTier;
  admin: Server | undefined;
  /** The SNMP agent, if one has started by the time the rest is closed. */
  snmpAgent: () => SnmpAgent | undefined;
  log: Logger;
  /** Stop the mirror and bank probes: called once the clients are gone (until then misses still need them). */
  stopProbing: () => void;
}

export async function shutdown(p: ShutdownParts, timeoutMs: number): Promise<void> {
  const { listeners, coalescer, log } = p;
  const drainStarted = performance.now();
  // Keep-alive connections become idle as their last response ends: close them as they do (a
  // connection that has not sent its first request yet is not idle: it is served).
  const sweep = setInterval(() => listeners.closeIdle(), 100);
  listeners.closeIdle();
  // Past the timeout, whatever is still open is cut: client connections, tunnels, then fills.
  let cut = false;
  const cutAll = () => {
    cut = true;
    listeners.cutAll();
    for (const end of p.tunnels) end();
  };
  const timer = setTimeout(cutAll, timeoutMs);
  // While clients come (a tunnel aside), a new connection is served too: a client that has not
  // re-resolved the bank's name yet is not refused. The port closes once none is connected and none
  // came for QUIET_MS (at once when none came since the stop began), or after half the timeout under
  // steady traffic: the other half is for the responses under way.
  let deadline: NodeJS.Timeout | undefined;
  const over = new AbortController();
  await Promise.race([listeners.quiet(p.tunnels, drainStarted, QUIET_MS, over.signal), new Promise<void>((r) => (deadline = setTimeout(r, timeoutMs / 2)))]);
  over.abort();
  clearTimeout(deadline);
  if (cut) listeners.cutAll(); // connections taken between the cut and now
  p.stopProbing();
  const closing = listeners.close();
  listeners.closeIdle();
  await closing;
  clearTimeout(timer);
  clearInterval(sweep);
  cutAll(); // tunnels are not the servers' connections: close() does not wait for them
  // Fills still running or being written to disk: let them land, within what is left of the timeout.
  const left = Math.max(0, timeoutMs - (performance.now() - drainStarted));
  if (!(await within(coalescer.settle(), left))) {
    log.warn({ fills: coalescer.running }, 'shutdown timeout: giving up the fills still running');
    coalescer.abortAll('shutting down');
  }
  coalescer.close();
  // undici's close() would wait for every running request: after the timeout nothing waits.
  await p.upstream.destroy().catch(() => {});
  // The log gets what is left of the timeout (at least LOG_CLOSE_MIN_MS): a full or hung disk
  // costs its lines, never the shutdown.
  await p.accessLog.close(Math.max(LOG_CLOSE_MIN_MS, timeoutMs - (performance.now() - drainStarted)));
  await p.disk.unlock();
  await stopListening(p.admin);
  await p.snmpAgent()?.close();
}
