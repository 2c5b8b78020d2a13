// CONNECT: denied unless the port is listed in --allow-connect-port; then a plain TCP tunnel with an
// idle timeout, subject to the same client and destination rules as every other request.
import type { IncomingMessage } from 'node:http';
import { connect, isIP, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { localHint, plainAddress } from './acl.ts';
import { newTransaction, recordTransaction } from './access-log.ts';
import { ProxyError, upstreamError } from './errors.ts';
import { refuse } from './overload.ts';
import type { Ctx } from './context.ts';
import { endWithError } from './forward.ts';

export function handleConnect(ctx: Ctx, req: IncomingMessage, socket: Duplex, head: Buffer): void {
  const tx = newTransaction({ startedAt: ctx.clock.now(), client: plainAddress(req.socket.remoteAddress ?? '-'), method: 'CONNECT', url: req.url ?? '-', result: 'TCP_TUNNEL', headers: req.headers, httpVersion: req.httpVersion });
  // Node removes its own 'error' listener before 'connect': without ours, a client reset during the
  // 403 would take the process down.
  socket.on('error', () => socket.destroy());
  const name = ctx.cfg.visibleHostname;
  const deny = (err: ProxyError) => {
    tx.status = err.status;
    tx.result = err.status === 403 ? 'TCP_DENIED' : 'TCP_TUNNEL';
    const sent = endWithError(socket, err, name);
    tx.headBytes = sent.headBytes;
    tx.bytesOut = sent.bodyBytes;
    recordTransaction(ctx, tx, err.token);
  };
  if (!ctx.acl().allowsClient(tx.client)) return deny(new ProxyError('ERR_CLIENT_DENIED', tx.client));
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(req.url ?? '');
  if (!m) return deny(new ProxyError('ERR_BAD_REQUEST', 'CONNECT needs host:port'));
  const host = m[1]!;
  const port = Number(m[2]);
  const verdict = ctx.acl().allowsConnect(host, port);
  if (verdict !== 'allow') return deny(new ProxyError(verdict === 'deny-port' ? 'ERR_CONNECT_DENIED' : 'ERR_DEST_DENIED', verdict === 'deny-local' ? localHint(host, port) : `${host}:${port}`));
  if (ctx.counters.passesInFlight >= ctx.cfg.maxPasses) return deny(refuse(ctx.counters, 'passes'));
  ctx.counters.passesInFlight++;
  const lookup = isIP(host)
    ? undefined
    : (hostname: string, opts: object, cb: (e: Error | null, a?: string, f?: number) => void) =>
        import('node:dns').then((dns) =>
          dns.lookup(hostname, { ...opts, all: false }, (err, address, family) => {
            if (err) return cb(err);
            if (!ctx.acl().allowsResolved(hostname, address, port)) return cb(new ProxyError('ERR_DEST_DENIED', ctx.acl().isLocal(address) ? localHint(hostname, port) : hostname));
            cb(null, address, family);
          }),
        );
  const upstream: Socket = connect({ host, port, lookup: lookup as never, timeout: ctx.cfg.connectTimeoutMs });
  let established = false;
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    ctx.tunnels.delete(end);
    ctx.counters.passesInFlight--;
    upstream.destroy();
    socket.destroy();
    recordTransaction(ctx, tx, undefined);
  };
  ctx.tunnels.add(end);
  upstream.once('timeout', () => {
    if (!established) upstream.destroy(Object.assign(new Error('connect timeout'), { code: 'ETIMEDOUT' }));
    else end(); // idle
  });
  upstream.once('connect', () => {
    established = true;
    upstream.setTimeout(ctx.cfg.tunnelIdleTimeoutMs);
    tx.status = 200;
    tx.hierarchy = 'HIER_DIRECT';
    tx.peer = upstream.remoteAddress ?? host;
    const answer = 'HTTP/1.1 200 Connection Established\r\n\r\n';
    tx.headBytes = answer.length;
    socket.write(answer);
    if (head.length) upstream.write(head);
    upstream.on('data', (c: Buffer) => {
      tx.bytesOut += c.length;
    });
    upstream.pipe(socket);
    socket.pipe(upstream);
  });
  // `on`, not `once`: a second 'error' without a listener would take the process down.
  upstream.on('error', (err) => {
    if (established || ended) return end();
    ended = true;
    ctx.tunnels.delete(end);
    ctx.counters.passesInFlight--;
    deny(err instanceof ProxyError ? err : upstreamError(err));
  });
  upstream.once('close', end);
  socket.on('error', end);
  socket.once('close', end);
}
