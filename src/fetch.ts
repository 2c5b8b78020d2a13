// Upstream HTTP through one undici Agent: bounded pools per origin, connect/header/body timeouts, and a
// DNS hook that applies the destination ACL to every resolved address before connecting.
import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import type { Readable } from 'node:stream';
import { Agent, buildConnector } from 'undici';
import { localHint, type Acl } from './acl.ts';
import type { Config } from './config.ts';
import { ProxyError, upstreamError } from './errors.ts';
import type { Peer } from './peer.ts';

/**
 * Throw away an upstream body we will not read. undici reports a destroyed, unfinished body as an
 * 'error' event, which with no listener would take the whole process down.
 */
export function discard(body: Readable): void {
  body.on('error', () => {});
  body.destroy();
}

export interface UpstreamRequest {
  url: URL;
  method: string;
  headers: Record<string, string | string[]>;
  body?: Readable | null;
  signal?: AbortSignal;
  /** A parent or bank member to ask in absolute form, instead of the origin. */
  via?: Peer;
  /** Each interim (1xx) response before the final one. */
  onInfo?: Interim;
}

export type Interim = (status: number, headers: Record<string, string | string[]>) => void;

export interface UpstreamResponse {
  status: number;
  headers: Record<string, string | string[]>;
  body: Readable;
  /** Address the response came from, for the access log's hierarchy field. */
  peer: string;
}

/** Why a probe failed, as an admin needs it to fix it: the kind (RFC 9209 token: dns_error, connection_refused, ...) and the detail. */
function probeFailure(err: unknown, timeoutMs: number): string {
  if ((err as Error)?.name === 'TimeoutError') return `timeout: no answer in ${timeoutMs} ms`;
  const pe = upstreamError(err);
  return `${pe.token}: ${pe.detail ?? pe.message}`;
}

/**
 * undici ends a body delimited by the connection's close (no Content-Length, not chunked) as complete
 * when the connection is reset, not only when it is closed (a workaround for macOS), so a body cut short
 * by a crashing upstream was stored and served whole. A reset is an error of the connection (RFC 9112
 * §8: such a response is incomplete): renamed before undici's own listener reads it (this one is added
 * first), it fails the body as any broken connection does.
 */
function withResetBroken(c: buildConnector.connector): buildConnector.connector {
  return (opts, cb) =>
    c(opts, (err, socket) => {
      socket?.on('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'ECONNRESET') e.code = 'ERR_UPSTREAM_CONNRESET';
      });
      (cb as (e: Error | null, s: typeof socket) => void)(err, socket);
    });
}

/**
 * The codings a Transfer-Encoding may apply that transform the bytes (RFC 9112 §7: compress, deflate,
 * gzip and their x- aliases, and the br and zstd some servers send there). undici undoes only chunked,
 * and the coding goes with the framing cuttle replaces: the bytes under one are not the representation,
 * and served or stored as it they would be a corrupt object. A token that names no coding is framing
 * noise, passed as the bytes it frames (the caching conformance suite sends one and expects the 200).
 */
const TRANSFORMING_CODINGS: ReadonlySet<string> = new Set(['gzip', 'x-gzip', 'deflate', 'compress', 'x-compress', 'br', 'zstd']);

/** The transforming transfer coding a response names, if any. */
function transformingCoding(te: string | string[] | undefined): string | undefined {
  if (te === undefined) return undefined;
  const codings = (Array.isArray(te) ? te.join(',') : te).split(',').map((c) => c.trim().toLowerCase());
  return codings.find((c) => TRANSFORMING_CODINGS.has(c));
}

type LookupCb = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

export class Upstream {
  readonly #agent: Agent;
  /**
   * Peers (parents, bank members) are named by the admin: no destination check on their addresses, and
   * their own connect timeout (--peer-timeout), so a dead one costs a client little of its 5 s.
   */
  readonly #peers: Agent;
  /**
   * Relays to another worker of this process: the owner gives up on its upstream after --read-timeout
   * and answers; this side must not give up first and fetch the object a second time.
   */
  readonly #relays: Agent;
  readonly #acl: () => Acl;
  fetches = 0;
  /** Body bytes received from upstreams (counted by the consumers, which own the stream's flow). */
  bytes = 0;

  constructor(cfg: Config, acl: () => Acl) {
    this.#acl = acl;
    // The resolved-address check needs the port too (a mirror's exception is its exact host:port), and
    // net's lookup hook doesn't get it: one connector per destination port, each with its own lookup.
    const lookupFor = (port: number) => (hostname: string, options: { all?: boolean }, cb: LookupCb) => {
      dnsLookup(hostname, { ...options, all: true }, (err, addrs) => {
        if (err) return cb(err, []);
        const ok = addrs.filter((a) => this.#acl().allowsResolved(hostname, a.address, port));
        if (ok.length === 0) {
          const local = addrs.every((a) => this.#acl().isLocal(a.address));
          return cb(new ProxyError('ERR_DEST_DENIED', local ? localHint(hostname, port) : `${hostname} resolves to a denied address`) as never, []);
        }
        if (options.all) cb(null, ok);
        else cb(null, ok[0]!.address, ok[0]!.family);
      });
    };
    const connectors = new Map<number, buildConnector.connector>();
    const connect: buildConnector.connector = (opts, cb) => {
      const port = Number(opts.port) || (opts.protocol === 'https:' ? 443 : 80);
      let c = connectors.get(port);
      if (!c) {
        if (connectors.size >= 4096) connectors.clear(); // bounded: ports an admin allows are few in practice
        c = withResetBroken(buildConnector({ timeout: cfg.connectTimeoutMs, lookup: lookupFor(port) as never }));
        connectors.set(port, c);
      }
      return c(opts, cb);
    };
    this.#agent = new Agent({
      connections: cfg.upstreamConnections,
      pipelining: 1,
      keepAliveTimeout: 30_000,
      headersTimeout: cfg.readTimeoutMs,
      bodyTimeout: cfg.readTimeoutMs,
      connect,
      maxOrigins: 4096,
    });
    const peerAgent = (readTimeoutMs: number) =>
      new Agent({ connections: cfg.upstreamConnections, pipelining: 1, keepAliveTimeout: 30_000, headersTimeout: readTimeoutMs, bodyTimeout: readTimeoutMs, connect: withResetBroken(buildConnector({ timeout: cfg.peerTimeoutMs })) });
    this.#peers = peerAgent(cfg.readTimeoutMs);
    this.#relays = peerAgent(cfg.readTimeoutMs + 10_000);
  }

  async request(r: UpstreamRequest): Promise<UpstreamResponse> {
    // A relay to another worker of this process is not an upstream request: the owner counts its own.
    if (r.via?.role !== 'worker') this.fetches++;
    try {
      const via = r.via;
      const res = await (via ? (via.role === 'worker' ? this.#relays : this.#peers) : this.#agent).request({
        origin: via ? via.origin : r.url.origin,
        // A proxy is asked in absolute form (RFC 9112 §3.2.2), an origin in origin form.
        path: via ? r.url.href : `${r.url.pathname}${r.url.search}`,
        method: r.method as 'GET',
        headers: r.headers,
        body: r.body ?? null,
        signal: r.signal,
        blocking: false,
        onInfo: r.onInfo && ((i) => r.onInfo!(i.statusCode, i.headers)),
      });
      const coding = transformingCoding(res.headers['transfer-encoding']);
      if (coding) {
        discard(res.body);
        throw new ProxyError('ERR_INVALID_RESPONSE', `Transfer-Encoding ${coding}: cuttle decodes only chunked`);
      }
      // Through another worker of this process, the host is still the origin's (that worker asked it).
      return { status: res.statusCode, headers: res.headers as Record<string, string | string[]>, body: res.body, peer: via && via.role !== 'worker' ? via.spec.host : r.url.hostname };
    } catch (err) {
      throw upstreamError(err);
    }
  }

  /**
   * A health probe: GET with no-cache, timed to the response head. Not counted as a fetch. `wantOk`
   * asks for a 200 (a manifest); otherwise any answer below 500 shows the server is alive.
   */
  async probe(url: URL, timeoutMs: number, wantOk: boolean): Promise<{ ok: boolean; rttMs: number; why?: string; text?: string }> {
    const t0 = performance.now();
    try {
      const res = await this.#agent.request({
        origin: url.origin,
        path: `${url.pathname}${url.search}`,
        method: 'GET',
        headers: { host: url.host, 'cache-control': 'no-cache', pragma: 'no-cache', 'user-agent': 'cuttle-probe' },
        signal: AbortSignal.timeout(timeoutMs),
      });
      const rttMs = performance.now() - t0;
      // A manifest is a few hundred bytes of text, read for its revision; anything else is dropped.
      const text = wantOk && res.statusCode === 200 ? (await res.body.text().catch(() => '')).slice(0, 65536) : undefined;
      if (text === undefined) await res.body.dump({ limit: 1 << 20 }).catch(() => {});
      const ok = wantOk ? res.statusCode === 200 : res.statusCode < 500;
      return { ok, rttMs, why: ok ? undefined : `HTTP ${res.statusCode}`, text };
    } catch (err) {
      return { ok: false, rttMs: performance.now() - t0, why: probeFailure(err, timeoutMs) };
    }
  }

  /**
   * Is this peer serving? OPTIONS with Max-Forwards: 0, which a proxy answers itself (RFC 9110 §7.6.2):
   * any answer but a 503 (overloaded, or refusing) shows it serves.
   */
  async probePeer(peer: Peer, timeoutMs: number): Promise<{ ok: boolean; why?: string }> {
    try {
      const res = await this.#peers.request({
        origin: peer.origin,
        path: `${peer.origin}/`,
        method: 'OPTIONS',
        headers: { host: new URL(peer.origin).host, 'max-forwards': '0', 'user-agent': 'cuttle-probe' },
        signal: AbortSignal.timeout(timeoutMs),
      });
      await res.body.dump({ limit: 1 << 16 }).catch(() => {});
      return res.statusCode === 503 ? { ok: false, why: 'HTTP 503' } : { ok: true };
    } catch (err) {
      return { ok: false, why: probeFailure(err, timeoutMs) };
    }
  }

  close(): Promise<void> {
    return Promise.all([this.#agent.close(), this.#peers.close(), this.#relays.close()]).then(() => {});
  }

  /** Close now: requests still running fail (shutdown after its timeout). */
  destroy(): Promise<void> {
    return Promise.all([this.#agent.destroy(), this.#peers.destroy(), this.#relays.destroy()]).then(() => {});
  }
}
