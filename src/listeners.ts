// The client listeners: one node:http server per --listen address (and the --accel-listen one), with
// the connection accounting, --max-client-connections, the hit lane and its hand-over to node:http,
// and the request, CONNECT and client-error handlers; listening in order, and draining at shutdown.
import { createServer, type Server, type ServerResponse } from 'node:http';
import { Server as NetServer, type AddressInfo, type Socket } from 'node:net';
import { newTransaction, recordTransaction, type Transaction } from './access-log.ts';
import { plainAddress } from './acl.ts';
import type { ListenAddr } from './config.ts';
import type { Ctx } from './context.ts';
import type { Drain } from './drain.ts';
import { ERRORS } from './errors.ts';
import { endWithError, errorAnswer } from './forward.ts';
import { hasBody, hitAge, storedHitHead } from './deliver.ts';
import { handleRequest, plainLaneRequest } from './handle-request.ts';
import { HitLane } from './hit-lane.ts';
import { acceptHand, connectionCap, openFilesLimit, readMigrateReq, readSomaxconn, refusal, refuse, type AcceptHand, type RefusalReason } from './overload.ts';
import { Refuser, REFUSER_MIN_OPEN_FILES, refuserDescriptors } from './refuser.ts';
import { handleConnect } from './tunnel.ts';

/** How long a client may take to send a request's head. */
const HEADERS_TIMEOUT_MS = 60_000;

/** A connection cuttle answered without a request it could read: one request-less NONE line in the access log. */
function requestless(startedAt: number, client: string, url: string, status: number, answer: { headBytes: number; bodyBytes: number }): Transaction {
  return newTransaction({ startedAt, client, method: 'NONE', url, status, headBytes: answer.headBytes, bytesOut: answer.bodyBytes });
}

/** A connection refused before its request was read (NONE/503). */
function refusedConnection(startedAt: number, client: string, answer: { headBytes: number; bodyBytes: number }): Transaction {
  return requestless(startedAt, client, '-', 503, answer);
}

/**
 * node:http's parser refused the request (clientError): ERR_BAD_REQUEST's labelled 400, head only, which
 * closes the connection (logged NONE/400 error:invalid-request, as Squid logs it).
 */
const BAD_REQUEST = ERRORS.ERR_BAD_REQUEST;
const BAD_REQUEST_HEAD = `HTTP/1.1 400 Bad Request\r\nProxy-Status: cuttle; error=${BAD_REQUEST.token}\r\nX-Squid-Error: ${BAD_REQUEST.squid}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`;

/** After a failed attempt to listen again (EMFILE, near overload), the next one waits this long. */
const RELISTEN_BACKOFF_MS = 1000;
/**
 * Requests one connection may have in flight through node:http (answered in order, each waiting for the
 * one before it). node:http reads a whole read's requests at once, ~1,000 pipelined GETs in 64 KiB, and
 * holds every one until the client reads its answer: 20 clients that pipelined without reading held
 * 30 MB (1 MB with this bound). Past this depth the client loses its connection. CVMFS clients send one
 * request at a time, apt pipelines 10; the lane's own answers are bounded apart (hit-lane.ts QUEUE_BYTES).
 */
export const PIPELINE_DEPTH = 128;

/**
 * node:http's own 'connection' listener (it registers exactly one), taken off `srv`: node reads a
 * connection from the moment this is called for it.
 */
function takeNodeConnection(srv: Server): (sock: Socket) => void {
  const [listener, ...others] = srv.listeners('connection') as ((sock: Socket) => void)[];
  if (!listener || others.length) throw new Error('node:http no longer has exactly one connection listener: run with --no-hit-lane');
  srv.off('connection', listener);
  return (sock) => listener.call(srv, sock);
}

/**
 * Listening sockets per client address. libuv (since 1.45) takes one connection off a listening socket
 * per turn of the event loop, so under load (turns of tens of ms) a burst waits in the accept queue and
 * its 503s go out late. Sockets sharing the port (SO_REUSEPORT, Linux) each take one per turn: the
 * kernel spreads new connections over them. In the overload bench (4,000 connects at once, 2,000
 * admitted) the refusals' p99 was 2.0–2.3 s with 8 sockets and 1.0–1.15 s with 78 (the bench's
 * open-files limit of 20,000 allowed 78) in alternating runs; single runs gave 1.1–1.5 s with 64 and
 * 0.75–0.84 s with 256; at 1,024 the burst was accepted faster than the refused connections closed,
 * and the hard cap dropped some. Each is a descriptor, a libuv handle and a node:http server (whose timeouts and connection list
 * are its own, so they stay node's).
 */
const ACCEPT_SOCKETS = 256;

/** Listening sockets per address: ACCEPT_SOCKETS, but at most one per 256 descriptors of the open-files limit, so that a low limit (ulimit -n 1024) keeps its descriptors for clients. */
function acceptSockets(openFiles: number | undefined): number {
  if (process.platform !== 'linux') return 1;
  return Math.max(1, Math.min(ACCEPT_SOCKETS, Math.floor((openFiles ?? Infinity) / 256)));
}

export function listenOn(srv: NetServer, host: string, port: number, backlog: number, reusePort = false): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    // Each listener goes once either way: a server that fails is listened on again (#takeBack).
    const onListening = () => {
      srv.off('error', onErr);
      resolve();
    };
    const onErr = (err: Error) => {
      srv.off('listening', onListening);
      reject(new Error(`cannot listen on ${host.includes(':') ? `[${host}]` : host}:${port}: ${err.message}`, { cause: err }));
    };
    srv.once('error', onErr);
    srv.once('listening', onListening);
    srv.listen({ host, port, backlog, reusePort });
  });
}

/**
 * Listen with `listen(host)`. A host without IPv6 can't bind '::': every IPv4 address is the next best
 * thing (`onIpv4Only` says so). Resolves with the host it listens on.
 */
export async function listenEitherFamily(host: string, listen: (host: string) => Promise<void>, onIpv4Only?: () => void): Promise<string> {
  try {
    await listen(host);
    return host;
  } catch (err) {
    const code = (err as { cause?: NodeJS.ErrnoException }).cause?.code;
    if (host !== '::' || (code !== 'EAFNOSUPPORT' && code !== 'EADDRNOTAVAIL')) throw err;
    onIpv4Only?.();
    await listen('0.0.0.0');
    return '0.0.0.0';
  }
}

/** The hit lane (--hit-lane): it reads each connection first and answers the plain memory hits itself. */
function hitLane(ctx: Ctx, drain: Drain | undefined): HitLane | undefined {
  const { cfg, log } = ctx;
  return cfg.hitLane
    ? new HitLane({
        answer: (method, target, headers, client) => plainLaneRequest(ctx, method, target, headers, client),
        age: hitAge,
        head: (st, age) => storedHitHead(ctx, st, age),
        hasBody,
        record: (tx) => recordTransaction(ctx, tx, undefined),
        open: ctx.open,
        failed: (err) => log.error({ err, internal: true }, 'hit lane failed'),
        // Draining: node:http answers, with Connection: close.
        draining: () => drain?.draining === true,
        idleTimeoutMs: cfg.clientIdleTimeoutMs,
        firstRequestTimeoutMs: HEADERS_TIMEOUT_MS,
      })
    : undefined;
}

/** Stop `srv` accepting; resolves once its connections are gone (at once if it never listened). */
export function stopListening(srv: Server | undefined): Promise<void> {
  return new Promise<void>((r) => (srv?.listening ? srv.close(() => r()) : r()));
}

export class Listeners {
  readonly #ctx: Ctx;
  readonly #lane: HitLane | undefined;
  readonly #addrs: ListenAddr[];
  /** Per listen address, its listening sockets (ACCEPT_SOCKETS sharing one port). */
  readonly #groups: Server[][];
  #connections = 0;
  /** Waiting for the client connections to be gone (quiet()). */
  #quietWaiters: (() => void)[] = [];
  /** When the latest client connection was taken (performance.now()). */
  #lastAccept = -Infinity;
  readonly #drain: Drain | undefined;
  /** Each connection's latest response (clientError must not write into one that has begun; a drain closes the connection of one not begun). */
  readonly #responding = new Map<object, ServerResponse>();
  /** Open client connections past which a new one gets 503 (overload.ts connectionCap). */
  readonly #cap: ReturnType<typeof connectionCap>;
  readonly #openFiles: number | undefined;
  /** --workers: the ports are shared with the other workers (the process took each alone first). */
  readonly #sharedPorts: boolean;
  /** Host warnings are said once per process (by the only proxy, or worker 0). */
  readonly #warn: boolean;
  /** The client addresses' groups (not a worker's relay listener): these are handed to the refuser. */
  readonly #public: number;
  /** Each group's bound address (a socket handed over has none). */
  #bound: AddressInfo[] = [];
  /** The thread that holds the client ports while this proxy is full; undefined where they can't be shared (one socket per address) or it failed. */
  #refuser: Refuser | undefined;
  /** Who accepts new client connections now, and what the refuser answers (and why). */
  #hand: AcceptHand = 'proxy';
  #refusing: { reason: RefusalReason; headBytes: number; bodyBytes: number } | undefined;
  /** A hand-over or take-back under way. */
  #moving: Promise<void> | undefined;
  /** A take-back failed: the next waits for this timer. */
  #relistenTimer: NodeJS.Timeout | undefined;
  #listening = false;
  #closing = false;

  /**
   * `worker`: this is one worker of several (--workers). Its sockets join ports the process has taken,
   * and a last listener on 127.0.0.1 takes the other workers' relays.
   */
  constructor(ctx: Ctx, worker?: { index: number; count: number }, drain?: Drain) {
    const { cfg } = ctx;
    this.#ctx = ctx;
    this.#drain = drain;
    // Draining: a response not yet begun is its connection's next, and closes it.
    drain?.watch((on) => {
      if (on) for (const res of this.#responding.values()) if (!res.headersSent) res.shouldKeepAlive = false;
    });
    const soft = openFilesLimit()?.soft;
    // The process's descriptors are every worker's: each counts on its share.
    this.#openFiles = soft === Infinity || soft === undefined ? undefined : Math.floor(soft / (worker?.count ?? 1));
    this.#warn = !worker || worker.index === 0;
    this.#lane = hitLane(ctx, drain);
    this.#sharedPorts = worker !== undefined;
    const listeners = [...cfg.listen.map((addr) => ({ addr, accel: cfg.accel })), ...(cfg.accelListen === 'none' ? [] : [{ addr: cfg.accelListen, accel: true }])];
    if (worker) listeners.push({ addr: { host: '127.0.0.1', port: 0 }, accel: false });
    this.#addrs = listeners.map((l) => l.addr);
    this.#public = listeners.length - (worker ? 1 : 0);
    // The relay listener of a worker takes only its own workers' connections: one socket.
    const sizes = listeners.map(({ addr }) => (worker && addr.port === 0 ? 1 : acceptSockets(this.#openFiles)));
    // The refuser joins a port's sockets (SO_REUSEPORT): it needs a group of them (Linux), and
    // descriptors to spare for its own.
    const handOver = sizes.slice(0, this.#public).every((n) => n > 1) && (this.#openFiles === undefined || this.#openFiles >= REFUSER_MIN_OPEN_FILES);
    if (handOver) this.#refuser = new Refuser((count, records) => this.#refused(count, records), (err) => this.#refuserFailed(err));
    this.#cap = connectionCap(cfg, this.#openFiles, sizes.reduce((a, b) => a + b, 0) + (handOver ? refuserDescriptors(this.#public) : 0));
    this.#groups = listeners.map(({ accel }, i) => Array.from({ length: sizes[i]! }, () => this.#server(accel)));
  }

  /** Client connections open now. */
  get connections(): number {
    return this.#connections;
  }

  /** Bound addresses, in --listen order, then the --accel-listen one. */
  addresses(): AddressInfo[] {
    return this.#bound;
  }

  /** Whether the refuser thread holds the client ports now. */
  get handedOver(): boolean {
    return this.#hand === 'refuser';
  }

  /** Who accepts new connections, or 'moving' while the ports change hands. */
  get acceptHand(): AcceptHand | 'moving' {
    return this.#moving ? 'moving' : this.#hand;
  }

  async listen(): Promise<void> {
    const { cfg, log } = this.#ctx;
    // The kernel silently caps each backlog at net.core.somaxconn: a burst beyond it is dropped (the
    // client retries its SYN after a second, or times out), so say so once.
    const somaxconn = readSomaxconn();
    if (this.#warn && somaxconn !== undefined && somaxconn < cfg.listenBacklog) {
      log.warn({ listenBacklog: cfg.listenBacklog, somaxconn }, `net.core.somaxconn is ${somaxconn}: each listener's backlog is ${somaxconn}, not --listen-backlog ${cfg.listenBacklog} (raise the sysctl, and net.ipv4.tcp_max_syn_backlog with it)`);
    }
    if (this.#warn && this.#refuser && readMigrateReq() === 0) {
      log.warn('net.ipv4.tcp_migrate_req is 0: when cuttle is full and hands its ports to the refuser, the connections still waiting to be accepted are reset instead of answered 503 (set it to 1)');
    }
    if (this.#warn && this.#cap.byDescriptors) {
      log.warn({ openFiles: this.#openFiles, maxClientConnections: cfg.maxClientConnections, cap: this.#cap.cap }, `the open-files limit is ${this.#openFiles}: at most ${this.#cap.cap} client connections, not --max-client-connections ${cfg.maxClientConnections} (${this.#cap.reserve} descriptors are kept for upstream connections, fills and logs); raise LimitNOFILE or ulimit -n`);
    }
    for (const [i, [first, ...more]] of this.#groups.entries()) {
      let { host, port } = this.#addrs[i]!;
      const shared = more.length > 0;
      // A given port must be free of any other program's sockets: it is first taken alone (a second
      // cuttle on the same port fails here, as it would without SO_REUSEPORT), then let go for the
      // group. Port 0 is a fresh one from the kernel: the first socket takes it and the others join.
      const probe = port === 0 || !shared || this.#sharedPorts ? first! : createServer();
      const backlog = probe === first ? cfg.listenBacklog : 1;
      const reuse = probe === first && shared; // the probe alone, never: it must find the port free
      host = await listenEitherFamily(host, (h) => listenOn(probe, h, port, backlog, reuse), () => log.warn({ port }, 'no IPv6 on this host: listening on IPv4 only'));
      port = (probe.address() as AddressInfo).port;
      if (probe !== first) {
        await stopListening(probe);
        await listenOn(first!, host, port, cfg.listenBacklog, true);
      }
      for (const srv of more) await listenOn(srv, host, port, cfg.listenBacklog, true);
      this.#bound.push(first!.address() as AddressInfo);
    }
    this.#listening = true;
  }

  /**
   * Decide again who accepts new connections (overload.ts acceptHand): called as connections come and
   * go past the cap, and when the loop's lag changes. One move at a time; each decides again when done.
   */
  steer(): void {
    if (this.#moving || this.#closing || !this.#listening || this.#relistenTimer) return;
    const refuser = this.#refuser;
    // Without a refuser (its thread failed), this proxy takes its ports back and refuses at accept.
    const next = refuser ? this.#wanted(this.#hand) : 'proxy';
    if (next === this.#hand) {
      // Handed over for a lag that is over, at the cap: the thread's 503 now says why.
      if (refuser && next === 'refuser' && this.#refusing?.reason === 'loop_lag' && !this.#ctx.loopLag.lagging) refuser.answer(this.#refuseFor('connections'));
      return;
    }
    const move = next === 'refuser' ? this.#handOver(refuser!) : this.#takeBack(refuser);
    this.#moving = move.catch((err: unknown) => this.#ctx.log.error({ err, internal: true }, 'handing the client ports over failed')).finally(() => {
      this.#moving = undefined;
      this.steer();
    });
  }

  /** Who should accept now (overload.ts acceptHand), if `hand` does. */
  #wanted(hand: AcceptHand): AcceptHand {
    return acceptHand({ hand, connections: this.#connections, cap: this.#cap.cap, lagging: this.#ctx.loopLag.lagging, handedFor: this.#refusing?.reason });
  }

  /** The refuser's answer from now on, for `reason` (its reports are counted and logged as such). */
  #refuseFor(reason: RefusalReason): Buffer {
    const answer = errorAnswer(refusal(reason), this.#ctx.cfg.visibleHostname);
    this.#refusing = { reason, headBytes: answer.headBytes, bodyBytes: answer.bodyBytes };
    return answer.bytes;
  }

  /** The refuser listens on the client ports, then this proxy stops: from then on each new connection is refused at once. */
  async #handOver(refuser: Refuser): Promise<void> {
    const { cfg, log } = this.#ctx;
    const reason: RefusalReason = this.#ctx.loopLag.lagging ? 'loop_lag' : 'connections';
    // Set before it listens: what it refuses before a call-off below is counted too.
    const answer = this.#refuseFor(reason);
    try {
      await refuser.open(this.#bound.slice(0, this.#public).map(({ address, port }) => ({ host: address, port })), cfg.listenBacklog, answer);
    } catch (err) {
      // This proxy refuses at accept, as it does where there is no refuser.
      this.#refuser = undefined;
      void refuser.stop().catch(() => {});
      log.error({ err }, 'the refuser could not take the client ports: refusing at accept from now on');
      return;
    }
    // Its reason may have gone while the thread got ready (a lag of two ticks), or the proxy is stopping.
    if (this.#closing || this.#wanted('proxy') === 'proxy') {
      await refuser.close();
      return;
    }
    // net's close, not node:http's: node:http's close() is closeIdleConnections() and the end of its
    // timeout checks, then net's. Here the sockets stop listening, every connection stays, and the
    // checks go on (listening again starts them anew). Connections still in the accept queues are
    // reset, or, with net.ipv4.tcp_migrate_req=1, moved to the refuser's sockets.
    for (const srv of this.#groups.slice(0, this.#public).flat()) NetServer.prototype.close.call(srv);
    this.#hand = 'refuser';
    log.warn({ reason, connections: this.#connections, cap: this.#cap.cap }, reason === 'connections' ? 'at --max-client-connections: the refuser thread answers new connections with 503 until there is room' : 'the event loop lags past --max-loop-lag: the refuser thread answers new connections with 503 until it catches up');
  }

  /** This proxy listens again, then the refuser lets go (its queued connections move to ours with net.ipv4.tcp_migrate_req=1). */
  async #takeBack(refuser: Refuser | undefined): Promise<void> {
    const { cfg, log } = this.#ctx;
    const listened: Server[] = [];
    try {
      for (const [i, group] of this.#groups.slice(0, this.#public).entries()) {
        const { address, port } = this.#bound[i]!;
        for (const srv of group) if (!srv.listening) await listenOn(srv, address, port, cfg.listenBacklog, true).then(() => listened.push(srv));
      }
    } catch (err) {
      // A running refuser still holds the ports: the sockets that did listen stop again (taking a share
      // of the connections, they would let this proxy fill up and refuse at accept). Without one, they
      // are all there is. Trying again at once would spin: the error comes back within the same turn
      // (EMFILE, near overload).
      if (refuser) for (const srv of listened) NetServer.prototype.close.call(srv);
      if (this.#closing) return;
      log.error({ err }, `could not listen again on the client ports: trying again in ${RELISTEN_BACKOFF_MS} ms`);
      this.#relistenTimer = setTimeout(() => {
        this.#relistenTimer = undefined;
        this.steer();
      }, RELISTEN_BACKOFF_MS).unref();
      return;
    }
    // #refusing stays: the thread's last report comes as it lets go.
    this.#hand = 'proxy';
    await refuser?.close().catch((err: unknown) => log.error({ err, internal: true }, 'the refuser could not let go of the client ports'));
    log.info({ connections: this.#connections, cap: this.#cap.cap }, 'accepting new connections again');
  }

  /** A report from the refuser: its refusals are counted and logged as this proxy's own (a request-less NONE/503). */
  #refused(count: number, records: [string, number][]): void {
    const ctx = this.#ctx;
    const r = this.#refusing;
    if (!r) return;
    ctx.counters.refused[r.reason] += count;
    const { token } = refusal(r.reason);
    const now = ctx.clock.now();
    const wall = Date.now();
    for (const [addr, at] of records) {
      // Refused at once, when the thread took it: logged as ended then.
      const when = now - (wall - at);
      recordTransaction(ctx, refusedConnection(when, plainAddress(addr), r), token, when);
    }
    // Past the records a report holds: counted as the others are, not logged.
    for (let i = records.length; i < count; i++) ctx.metrics.observe(refusedConnection(now, '-', r), token, now);
  }

  /** The refuser thread died: this proxy listens again (steer), and refuses at accept from now on. */
  #refuserFailed(err: Error): void {
    this.#refuser = undefined;
    this.#ctx.log.error({ err, internal: true }, 'the refuser thread failed: refusing at accept from now on');
    this.steer();
  }

  /**
   * Resolves once no client connection is open but `tunnels`', and none was taken for `lingerMs` after
   * `since` (performance.now()): clients that still come (they have not re-resolved) are served, and
   * a stop with nobody arriving ends at once. Never resolves once `signal` aborts.
   */
  quiet(tunnels: Set<unknown>, since: number, lingerMs: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      signal.addEventListener('abort', () => clearTimeout(timer), { once: true });
      const check = (): void => {
        if (signal.aborted) return;
        if (this.#connections > tunnels.size) return void this.#quietWaiters.push(check);
        const left = this.#lastAccept > since ? this.#lastAccept + lingerMs - performance.now() : 0;
        if (left > 0) timer = setTimeout(check, left);
        else resolve();
      };
      check();
    });
  }

  #connectionClosed(): void {
    this.#connections--;
    if (this.#hand === 'refuser') this.steer();
    if (this.#quietWaiters.length) for (const w of this.#quietWaiters.splice(0)) w();
  }

  /** Stop accepting; resolves once every connection has closed and the lane answers no join. */
  async close(): Promise<void> {
    this.#closing = true;
    clearTimeout(this.#relistenTimer);
    await this.#moving;
    await this.#refuser?.stop();
    // A socket handed over listens no more but may still have connections: its close() waits for them too.
    await Promise.all([...this.#groups.flat().map((srv) => new Promise((r) => srv.close(r))), this.#lane?.joinsOver()]);
  }

  /** Close the keep-alive connections that are idle now (their last response has ended). */
  closeIdle(): void {
    // Not node's closeIdleConnections(): it takes a response whose end() was called for done, and
    // destroyed its connection with the body's last bytes still queued (a slow reader's cut short).
    for (const [sock, res] of this.#responding) if (res.writableFinished && (sock as Socket).writableLength === 0) (sock as Socket).destroy();
    // A connection in the hit lane is idle whenever it has been answered, its answers have left and it
    // answers no join (one that has not sent its first request is being served).
    const lane = this.#lane;
    for (const sock of lane?.sockets ?? []) if (sock.writableLength === 0 && !lane?.joining.has(sock) && lane?.answered.has(sock)) sock.destroy();
  }

  /** Cut every client connection, busy or not. */
  cutAll(): void {
    this.#groups.flat().forEach((s) => s.closeAllConnections());
    for (const sock of this.#lane?.sockets ?? []) sock.destroy();
  }

  #server(accel: boolean): Server {
    const { cfg, clock, log } = this.#ctx;
    const ctx = this.#ctx;
    const lane = this.#lane;
    const srv = createServer({
      requireHostHeader: false,
      keepAliveTimeout: cfg.clientIdleTimeoutMs,
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: 0, // uploads may be long; idle sockets are bounded by keepAliveTimeout
      highWaterMark: 64 * 1024,
    });
    // Past --max-client-connections a connection gets a labelled 503 (a CVMFS client then tries its
    // next proxy at once), where net.Server's maxConnections would drop it without a word. A hard cap
    // still drops, so a flood can't make us write answers without bound: counted over all the sockets
    // of all listeners (a server's own maxConnections would count one socket's).
    const hardCap = Math.min(cfg.maxClientConnections * 2, this.#cap.cap + Math.floor(this.#cap.reserve / 2));
    // With the hit lane, node:http reads a connection only when the lane hands it over.
    const toNode = lane ? takeNodeConnection(srv) : undefined;
    srv.on('connection', (sock: Socket) => {
      if (this.#connections >= hardCap) {
        sock.destroy();
        return;
      }
      this.#connections++;
      this.#lastAccept = performance.now();
      if (this.#connections >= this.#cap.cap) this.steer();
      sock.once('close', () => {
        this.#connectionClosed();
        this.#responding.delete(sock);
      });
      // A peer that reset before the connection was taken has no address left: nothing can be checked
      // against the client ACL or answered, so it is dropped, not logged as a denied client '-'.
      if (sock.remoteAddress === undefined) {
        sock.destroy();
        return;
      }
      const client = plainAddress(sock.remoteAddress);
      // Past --max-client-connections, or while the event loop lags (its requests would wait behind the
      // backlog), a new connection is refused at once, before any request is read: counted (and logged)
      // as a request-less NONE/503.
      const overloaded = this.#connections > this.#cap.cap ? 'connections' : ctx.loopLag.lagging ? 'loop_lag' : undefined;
      if (overloaded) {
        const err = refuse(ctx.counters, overloaded);
        const sent = endWithError(sock, err, cfg.visibleHostname);
        recordTransaction(ctx, refusedConnection(clock.now(), client, sent), err.token);
        // What the client sends is read and dropped (unread, its bytes could turn the close into a reset
        // that beats the 503); without the lane node:http has the socket already.
        sock.resume();
        return;
      }
      if (lane && toNode) lane.attach(sock, client, toNode);
    });
    const responding = this.#responding;
    const handlerFailed = (res: ServerResponse) => (err: unknown) => {
      log.error({ err, internal: true }, 'request handler failed');
      res.destroy();
    };
    const inFlight = new WeakMap<Socket, number>();
    srv.on('request', (req, res) => {
      const sock = req.socket;
      const n = (inFlight.get(sock) ?? 0) + 1;
      if (n > PIPELINE_DEPTH) {
        if (!sock.destroyed) log.warn({ client: sock.remoteAddress, depth: PIPELINE_DEPTH }, 'a client pipelined more requests than it read answers: its connection is closed');
        sock.destroy();
        return;
      }
      inFlight.set(sock, n);
      res.once('close', () => inFlight.set(sock, inFlight.get(sock)! - 1));
      responding.set(sock, res);
      // Draining: this response closes its connection (node:http writes Connection: close).
      if (this.#drain?.draining) res.shouldKeepAlive = false;
      // A memory hit is answered synchronously (no promise); anything that waits returns one.
      try {
        handleRequest(ctx, req, res, accel)?.catch(handlerFailed(res));
      } catch (err) {
        handlerFailed(res)(err);
      }
    });
    srv.on('connect', (req, socket, head) => handleConnect(ctx, req, socket, head));
    srv.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      // The latest response is unfinished while any is: responses to pipelined requests go out in order.
      const res = responding.get(socket);
      const inFlight = res !== undefined && !res.writableFinished;
      // Bytes after a request that closes the connection are not requests (RFC 9112 §9.6): the closing
      // request's answer still goes out whole, and node ends the connection after it.
      if (err.code === 'HPE_CLOSED_CONNECTION' && inFlight) return;
      // A 400 goes out only where no answer is under way: written while one streams (or one waits behind
      // it), it would land inside or before that answer. Then the connection is closed instead.
      if (socket.writable && err.code !== 'ECONNRESET' && !inFlight) {
        socket.end(BAD_REQUEST_HEAD);
        // Logged and counted as Squid logs it (NONE/400 error:invalid-request): garbage leaves a trace.
        const tx = requestless(clock.now(), plainAddress((socket as Socket).remoteAddress ?? '-'), 'error:invalid-request', BAD_REQUEST.status, { headBytes: BAD_REQUEST_HEAD.length, bodyBytes: 0 });
        recordTransaction(ctx, tx, BAD_REQUEST.token);
      } else socket.destroy();
    });
    return srv;
  }
}
