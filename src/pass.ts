// The uncached path: a request forwarded upstream for its client alone (not GET or HEAD, a HEAD with
// credentials, no-store, a range far into an object, a response that was not shared), its answer streamed back with
// backpressure and never stored. (Not stream.pipeline: after a pass it left ~10 KB of heap per idle
// keep-alive connection reachable until that connection's next request; bench/waiting.ts shows it.)
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Transaction } from './access-log.ts';
import type { Ctx } from './context.ts';
import { ProxyError, upstreamError } from './errors.ts';
import { discard } from './fetch.ts';
import { clientResponseHeaders, forwardInterim, upstreamRequestHeaders } from './forward.ts';
import { peersOwnFailure, RELAY_HEADER, type Route } from './hierarchy.ts';
import { framingOf } from './response-sink.ts';

const SAFE = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE']);

/**
 * Forward `req` to `url` over `routes` (the first that answers) and stream the answer to `res`. Resolves with the upstream's failure when no
 * answer came (the request path labels it), else undefined once the answer is over, whole or cut short.
 * `invalidate` runs when a successful unsafe method changed the URL (RFC 9111 §4.4).
 */
export async function passUpstream(ctx: Pick<Ctx, 'upstream' | 'cfg' | 'counters' | 'hierarchy'>, req: IncomingMessage, res: ServerResponse, tx: Transaction, url: URL, routes: Route[], invalidate: () => Promise<void>): Promise<ProxyError | undefined> {
  const hasBody = req.headers['content-length'] !== undefined ? req.headers['content-length'] !== '0' : req.headers['transfer-encoding'] !== undefined;
  const ac = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) ac.abort();
  };
  res.once('close', onClose);
  try {
    let up;
    // A request with a body can be sent once only: it takes the first route. Without one, a peer that
    // fails is followed by the next route, as a fill's request is.
    if (routes.length === 0) return new ProxyError('ERR_PARENTS_DOWN', url.host);
    let route = routes[0]!;
    for (let i = 0; ; i++) {
      route = routes[i]!;
      const last = i === routes.length - 1;
      try {
        const headers = upstreamRequestHeaders(req.headers, url, tx.client, ctx.cfg.visibleHostname);
        if (route.peer?.role === 'worker') headers[RELAY_HEADER] = ctx.hierarchy.relayToken!;
        up = await ctx.upstream.request({
          url,
          method: tx.method,
          headers,
          body: hasBody ? req : null,
          signal: ac.signal,
          via: route.peer,
          onInfo: (status, headers) => forwardInterim(res, req.httpVersion, status, headers),
        });
        route.peer?.answered();
        // A peer's own failure (it could not reach the origin, it is overloaded) with a route left, and
        // no body spent on it: the next route.
        if (!route.peer || hasBody || last || !peersOwnFailure(up)) break;
        discard(up.body);
      } catch (err) {
        const e = upstreamError(err);
        if (route.peer && e.code !== 'ERR_INTERNAL') ctx.hierarchy.peerFailed(route.peer, e);
        if (hasBody || last || ac.signal.aborted) return e;
      }
    }
    tx.hierarchy = route.tag;
    tx.peer = up.peer;
    tx.status = up.status;
    tx.mime = String(up.headers['content-type'] ?? '');
    if (!SAFE.has(tx.method) && up.status < 400) await invalidate();
    if (res.destroyed) {
      discard(up.body);
      return undefined;
    }
    res.writeHead(up.status, clientResponseHeaders(up.status, up.headers, ctx.cfg.visibleHostname, 'MISS'));
    if (tx.method === 'HEAD' || up.status === 204 || up.status === 304) {
      // No body, whatever Content-Length came with it.
      discard(up.body);
      res.end();
      return undefined;
    }
    const ok = await new Promise<boolean>((resolve) => {
      up.body.on('data', (c: Buffer) => {
        tx.bytesOut += c.length;
        tx.frameBytes += framingOf(res, c.length);
        ctx.upstream.bytes += c.length;
        if (!res.write(c)) {
          up.body.pause();
          res.once('drain', () => up.body.resume());
        }
      });
      up.body.once('end', () => resolve(true));
      up.body.once('error', () => resolve(false));
      res.once('close', () => resolve(res.writableFinished));
    });
    if (ok) {
      tx.frameBytes += framingOf(res, 'end');
      res.end();
    } else {
      if (!res.destroyed) ctx.counters.truncated++;
      tx.aborted = true;
      discard(up.body);
      res.destroy();
    }
    return undefined;
  } finally {
    res.off('close', onClose);
  }
}
