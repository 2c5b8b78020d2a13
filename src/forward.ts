// HTTP/1.1 forwarding rules (RFC 9110 §7.6): hop-by-hop headers go, Via is added, X-Forwarded-For is
// appended, Max-Forwards is honoured for TRACE/OPTIONS, and our own Via entry means a loop.
import { STATUS_CODES, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { LRUCache } from 'lru-cache';
import { VERSION } from './version.ts';
import type { ProxyError } from './errors.ts';
import type { ResponseSink } from './response-sink.ts';

export type Headers = Record<string, string | string[]>;

// x-cuttle-relay: a worker's relay secret (hierarchy.ts), never passed on.
const HOP_BY_HOP = new Set(['x-cuttle-relay', 'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer', 'trailers', 'transfer-encoding', 'upgrade', 'http2-settings']);

/** Copy headers without hop-by-hop fields, including those that Connection names. */
export function endToEnd(h: IncomingHttpHeaders | Headers): Headers {
  const named = new Set<string>();
  const conn = h.connection;
  for (const v of Array.isArray(conn) ? conn : conn ? [conn] : []) for (const t of v.split(',')) named.add(t.trim().toLowerCase());
  const out: Headers = {};
  for (const [k, v] of Object.entries(h)) {
    if (v === undefined || HOP_BY_HOP.has(k) || named.has(k)) continue;
    out[k] = v;
  }
  return out;
}

export function viaEntry(name: string): string {
  return `1.1 ${name} (cuttle/${VERSION})`;
}

function join(v: string | string[] | undefined): string {
  return Array.isArray(v) ? v.join(', ') : (v ?? '');
}

/** Has this request already passed through a proxy with our name? */
export function isLoop(h: IncomingHttpHeaders, name: string): boolean {
  const via = join(h.via);
  if (!via) return false;
  const me = name.toLowerCase();
  return via.split(',').some((e) => e.trim().split(/\s+/)[1]?.toLowerCase() === me);
}

export function appendVia(existing: string | string[] | undefined, name: string): string {
  const prev = join(existing);
  return prev ? `${prev}, ${viaEntry(name)}` : viaEntry(name);
}

/**
 * Pass an upstream's interim response on to the client whose request it answers, while that client's
 * head is not written yet (RFC 9110 §15.2: a proxy MUST forward 1xx responses): 102 Processing, 103
 * Early Hints. Never to an HTTP/1.0 client (§15.2), and never a 100 Continue: cuttle answers Expect
 * itself and asks for no 100 upstream.
 */
export function forwardInterim(res: ServerResponse, httpVersion: string, status: number, headers: Headers): void {
  if (status <= 101 || status > 199 || httpVersion === '1.0' || res.headersSent || !res.writable) return;
  try {
    res.writeInformation(status, endToEnd(headers));
  } catch {
    // A header node:http will not write: the interim response is advice, and goes no further.
  }
}

/** Headers for the upstream request. */
export function upstreamRequestHeaders(h: IncomingHttpHeaders, url: URL, client: string, name: string): Headers {
  const out = endToEnd(h);
  // Expect: 100-continue is answered by cuttle itself (Node's server sends the 100 before the request
  // is handled): the upstream request carries the body at once, as undici requires.
  delete out.expect;
  out.host = url.host;
  out.via = appendVia(h.via, name);
  const xff = join(h['x-forwarded-for']);
  out['x-forwarded-for'] = xff ? `${xff}, ${client}` : client;
  return out;
}

/** Headers for the upstream request of a relay from another worker: it added Via and X-Forwarded-For. */
export function relayedHeaders(h: IncomingHttpHeaders, url: URL): Headers {
  const out = endToEnd(h);
  delete out.expect;
  out.host = url.host;
  return out;
}

/** Headers for the client, from an upstream or stored response. */
export function clientResponseHeaders(status: number, h: Headers, name: string, cache: 'HIT' | 'MISS', ageS?: number): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = endToEnd(h);
  // RFC 9110 §8.6: no Content-Length on a 1xx or 204; on a 304 it would describe a body never sent,
  // and an origin that sends one anyway must not make the client wait for it.
  if (status === 204 || status === 304 || status < 200) delete out['content-length'];
  out.via = appendVia(h.via, name);
  out['x-cache'] = `${cache} from ${name}`;
  if (ageS !== undefined) out.age = String(ageS);
  return out;
}

/** The head fields of an answer to one of cuttle's own failures: RFC 9209 Proxy-Status and Squid's X-Squid-Error. */
function errorHead(err: ProxyError, name: string, body: string): Record<string, string> {
  const details = err.detail ? `; details=${JSON.stringify(err.detail.replace(/[^\x20-\x7e]/g, '?').slice(0, 200))}` : '';
  return {
    'content-type': 'text/plain; charset=utf-8',
    'content-length': String(Buffer.byteLength(body)),
    'proxy-status': `cuttle; error=${err.token}${details}`,
    'x-squid-error': err.squid,
    'x-cache': `MISS from ${name}`,
    via: viaEntry(name),
    'cache-control': 'no-store',
  };
}

/** Answer one of cuttle's own failures (never an upstream's) on a response. Returns the body bytes. */
export function sendError(res: ResponseSink, err: ProxyError, name: string): number {
  if (res.headersSent) {
    res.destroy();
    return 0;
  }
  const body = `${err.status} ${err.message}\n`;
  res.writeHead(err.status, errorHead(err, name, body));
  res.end(body);
  return Buffer.byteLength(body);
}

/**
 * The same answer written raw on a socket that no HTTP response object owns (a refused CONNECT, a
 * connection past --max-client-connections), then closed both ways once it is out: a client that
 * never closes its side can't hold the socket. Returns the bytes of its head and its body (the access log's).
 */
export function endWithError(socket: Duplex, err: ProxyError, name: string): { headBytes: number; bodyBytes: number } {
  const answer = errorAnswer(err, name);
  socket.on('error', () => socket.destroy());
  socket.once('finish', () => socket.destroy());
  socket.end(answer.bytes);
  return answer;
}

/** Each raw error answer's bytes, made once (they hold no date): a burst of refusals writes thousands. */
const RAW_ANSWERS = new LRUCache<string, { bytes: Buffer; headBytes: number; bodyBytes: number }>({ max: 64 });

/** The raw bytes of `err`'s answer, head and body, that closes its connection. */
export function errorAnswer(err: ProxyError, name: string): { bytes: Buffer; headBytes: number; bodyBytes: number } {
  const key = `${err.code}\0${err.detail ?? ''}\0${name}`;
  const had = RAW_ANSWERS.get(key);
  if (had) return had;
  const body = `${err.status} ${err.message}\n`;
  // Written by hand, so in the usual capitalisation (Proxy-Status, X-Squid-Error) that tools grep for.
  const title = (k: string) => k.replace(/(^|-)([a-z])/g, (_m, sep: string, c: string) => sep + c.toUpperCase());
  const fields = Object.entries({ ...errorHead(err, name, body), connection: 'close' }).map(([k, v]) => `${title(k)}: ${v}\r\n`);
  const head = `HTTP/1.1 ${err.status} ${STATUS_CODES[err.status] ?? 'Error'}\r\n${fields.join('')}\r\n`;
  const made = { bytes: Buffer.from(head + body), headBytes: Buffer.byteLength(head), bodyBytes: Buffer.byteLength(body) };
  RAW_ANSWERS.set(key, made);
  return made;
}

/**
 * RFC 9110 §13.1.2 and §13.1.3: a GET or HEAD whose If-None-Match (weak comparison) or, without one,
 * If-Modified-Since matches the 200 response it would get, is answered 304 instead.
 */
export function conditionMatches(req: IncomingHttpHeaders, status: number, h: Headers): boolean {
  if (status !== 200) return false;
  const inm = req['if-none-match'];
  if (inm !== undefined) {
    const etag = join(h.etag).trim();
    const tags = join(inm).split(',').map((t) => t.trim());
    if (tags.includes('*')) return true;
    const opaque = (t: string) => t.replace(/^W\//, '');
    return etag !== '' && tags.some((t) => opaque(t) === opaque(etag));
  }
  const ims = req['if-modified-since'];
  if (ims === undefined) return false;
  const since = Date.parse(join(ims));
  const modified = Date.parse(join(h['last-modified']));
  return !Number.isNaN(since) && !Number.isNaN(modified) && modified <= since;
}

/** A 304's headers: the stored ones without the fields that describe a body (RFC 9110 §15.4.5). */
export function notModifiedHeaders(h: OutgoingHttpHeaders): OutgoingHttpHeaders {
  const out = { ...h };
  for (const k of ['content-length', 'content-type', 'content-encoding', 'content-language', 'content-range', 'transfer-encoding']) delete out[k];
  return out;
}
