// One catalog of cuttle's own failures. Each code has a status, an RFC 9209 Proxy-Status error token,
// an X-Squid-Error value (so CVMFS clients blame the proxy, not the Stratum 1) and a Squid log tag.
// Codes are public (README "Error codes") and are never reused.

export const ERRORS = {
  ERR_CLIENT_DENIED: { status: 403, token: 'http_request_denied', squid: 'ERR_ACCESS_DENIED 0', text: 'client address is not allowed to use this proxy' },
  ERR_DEST_DENIED: { status: 403, token: 'destination_ip_prohibited', squid: 'ERR_ACCESS_DENIED 0', text: 'destination is not allowed' },
  ERR_PORT_DENIED: { status: 403, token: 'destination_ip_prohibited', squid: 'ERR_ACCESS_DENIED 0', text: 'destination port is not allowed' },
  ERR_CONNECT_DENIED: { status: 403, token: 'http_request_denied', squid: 'ERR_ACCESS_DENIED 0', text: 'CONNECT is not allowed to this port' },
  ERR_PURGE_DENIED: { status: 403, token: 'http_request_denied', squid: 'ERR_ACCESS_DENIED 0', text: 'PURGE is not allowed from this address' },
  ERR_ORIGIN_FORM: { status: 400, token: 'http_request_error', squid: 'ERR_INVALID_URL 0', text: 'this is a forward proxy: the request target must be an absolute http:// URL' },
  ERR_BAD_REQUEST: { status: 400, token: 'http_request_error', squid: 'ERR_INVALID_REQ 0', text: 'malformed request' },
  ERR_UNSUPPORTED_SCHEME: { status: 400, token: 'http_request_error', squid: 'ERR_UNSUP_REQ 0', text: 'only http:// URLs are proxied (use CONNECT for TLS)' },
  ERR_LOOP: { status: 508, token: 'proxy_loop_detected', squid: 'ERR_ACCESS_DENIED 0', text: 'forwarding loop detected (this proxy is already in Via)' },
  ERR_DNS_FAIL: { status: 502, token: 'dns_error', squid: 'ERR_DNS_FAIL 0', text: 'upstream host name could not be resolved' },
  ERR_CONNECT_REFUSED: { status: 502, token: 'connection_refused', squid: 'ERR_CONNECT_FAIL 111', text: 'upstream refused the connection' },
  ERR_CONNECT_TIMEOUT: { status: 504, token: 'connection_timeout', squid: 'ERR_CONNECT_FAIL 110', text: 'upstream connect timed out' },
  ERR_READ_TIMEOUT: { status: 504, token: 'http_response_timeout', squid: 'ERR_READ_TIMEOUT 0', text: 'upstream did not answer in time' },
  ERR_PARENTS_DOWN: { status: 502, token: 'destination_unavailable', squid: 'ERR_CANNOT_FORWARD 0', text: 'every parent is down, and --never-direct forbids fetching directly' },
  ERR_PEER_FAILED: { status: 502, token: 'destination_unavailable', squid: 'ERR_CANNOT_FORWARD 0', text: 'the parent or bank member answered with its own failure, and no route was left' },
  ERR_UPSTREAM_RESET: { status: 502, token: 'connection_terminated', squid: 'ERR_READ_ERROR 104', text: 'upstream closed the connection' },
  ERR_INVALID_RESPONSE: { status: 502, token: 'http_protocol_error', squid: 'ERR_INVALID_RESP 0', text: 'upstream sent an invalid response' },
  ERR_CONTENT_HASH: { status: 502, token: 'http_protocol_error', squid: 'ERR_INVALID_RESP 0', text: 'upstream bytes do not match the content hash the URL names' },
  ERR_FILL_ABANDONED: { status: 503, token: 'proxy_internal_response', squid: 'ERR_READ_ERROR 0', text: 'the fill was given up: nobody was left to serve and its body could not be stored' },
  ERR_STORE_UNAVAILABLE: { status: 503, token: 'proxy_internal_error', squid: 'ERR_READ_ERROR 0', text: 'the stored copy cannot be read now (file descriptors or disk I/O); it stays stored' },
  ERR_ONLY_IF_CACHED_MISS: { status: 504, token: 'proxy_internal_response', squid: 'ERR_ONLY_IF_CACHED_MISS 0', text: 'the request said only-if-cached, and no stored response satisfies it' },
  ERR_OVERLOADED: { status: 503, token: 'connection_limit_reached', squid: 'ERR_ONLY_IF_CACHED_MISS 0', text: 'proxy is overloaded, try another proxy' },
  ERR_INTERNAL: { status: 500, token: 'proxy_internal_error', squid: 'ERR_CANNOT_FORWARD 0', text: 'internal proxy error' },
} as const;

export type ErrorCode = keyof typeof ERRORS;

export class ProxyError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly token: string;
  readonly squid: string;
  readonly detail: string | undefined;
  constructor(code: ErrorCode, detail?: string, options?: { cause?: unknown }) {
    const entry = ERRORS[code];
    super(detail ? `${entry.text}: ${detail}` : entry.text, options);
    this.name = 'ProxyError';
    this.code = code;
    this.status = entry.status;
    this.token = entry.token;
    this.squid = entry.squid;
    this.detail = detail;
  }
}

/** Thrown for invalid configuration: every problem, each with the key it concerns. */
export class ConfigError extends Error {
  readonly problems: readonly string[];
  constructor(problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

/**
 * Map an error that the upstream exchange raised (undici, its socket, the DNS hook) to our catalog.
 * Whatever the upstream raised is the upstream's fault, whether its code is known here or not: cuttle's
 * own failures are labelled where they happen (internalError, or a ProxyError thrown on purpose) and
 * pass through unchanged. So the next unknown upstream error is a 502, never a 500 blamed on cuttle.
 */
export function upstreamError(err: unknown): ProxyError {
  if (err instanceof ProxyError) return err;
  const e = err as { code?: unknown; message?: string; name?: string; cause?: { code?: unknown } };
  // Not every error's code is a string (a DOMException's is a number; undici's HTTPParserError has none).
  const code = String(typeof e?.code === 'string' ? e.code : (e?.cause?.code ?? e?.code ?? ''));
  const msg = e?.message ?? String(err);
  const as = (c: ErrorCode) => new ProxyError(c, msg || code, { cause: err });
  switch (code) {
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'EAI_FAIL':
    case 'EAI_NONAME':
      return as('ERR_DNS_FAIL');
    case 'ECONNREFUSED':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return as('ERR_CONNECT_REFUSED');
    case 'UND_ERR_CONNECT_TIMEOUT':
    case 'ETIMEDOUT':
      return as('ERR_CONNECT_TIMEOUT');
    case 'UND_ERR_HEADERS_TIMEOUT':
    case 'UND_ERR_BODY_TIMEOUT':
      return as('ERR_READ_TIMEOUT');
    case 'UND_ERR_INFO':
    case 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH':
    case 'UND_ERR_RES_EXCEEDED_MAX_SIZE':
    case 'UND_ERR_HEADERS_OVERFLOW':
      return as('ERR_INVALID_RESPONSE');
  }
  // What the parser refused (HPE_* codes, or an HTTPParserError with no code at all) is a broken response.
  if (code.startsWith('HPE_') || e?.name === 'HTTPParserError') return as('ERR_INVALID_RESPONSE');
  // A programming error surfacing through the exchange (a TypeError in cuttle's DNS hook, a bad argument
  // to undici) is cuttle's, not the mirror's: it must not fail a mirror over or hide as a 502.
  if (isProgrammingError(err, code)) return internalError(err);
  // Everything else the exchange raised (resets, aborts, closed sockets, other errno codes, an undici
  // error this list does not know) ended the exchange before a valid answer: the connection's failure.
  return as('ERR_UPSTREAM_RESET');
}

const PROGRAMMING_ERRORS = new Set(['TypeError', 'RangeError', 'ReferenceError', 'SyntaxError']);

function isProgrammingError(err: unknown, code: string): boolean {
  if (code === 'UND_ERR_INVALID_ARG' || code.startsWith('ERR_INVALID_ARG')) return true;
  return code === '' && err instanceof Error && PROGRAMMING_ERRORS.has(err.name);
}

/** A failure that is cuttle's own bug: answered 500 ERR_INTERNAL, logged with `internal: true`. */
export function internalError(err: unknown): ProxyError {
  if (err instanceof ProxyError && err.code === 'ERR_INTERNAL') return err;
  return new ProxyError('ERR_INTERNAL', (err as Error)?.message ?? String(err), { cause: err });
}
