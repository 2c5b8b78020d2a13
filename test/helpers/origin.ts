// A scripted loopback origin: routes with status, headers, body, first-byte latency, paced bodies,
// resets after N bytes, and per-path request counters (the "upstream fetches" every test asserts).
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Socket } from 'node:net';
import { setTimeout as sleepFor } from 'node:timers/promises';

/** A barrier the test opens: an origin response waits behind it (tests wait for states, not time). */
export interface Gate {
  readonly opened: Promise<void>;
  open(): void;
  /** Requests waiting at the gate. */
  waiting: number;
}

export function gate(): Gate {
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return { opened, open, waiting: 0 };
}

export interface Route {
  status?: number;
  /** An array value is sent as repeated header lines. */
  headers?: Record<string, string | string[]>;
  /** Interim (1xx) responses written before the gate and the final head. */
  interim?: { status: number; headers?: Record<string, string> }[];
  /** Hold the response head until the gate opens. */
  gate?: Gate;
  /** Send the head and this many body bytes, then hold the rest until the gate opens. */
  bodyGate?: { after: number; gate: Gate };
  body?: Buffer | string;
  /**
   * Delay before the response head. Timing only: never use it to make clients overlap or to outlast a
   * timeout (a gate does both by state); the abuse test uses it to hang up at moments in a response.
   */
  delayMs?: number;
  /** Pace the body: write chunkBytes every chunkDelayMs (timing only, as delayMs). */
  chunkBytes?: number;
  chunkDelayMs?: number;
  /** Send this many body bytes, then reset the connection. */
  resetAfter?: number;
  /** Omit Content-Length (chunked encoding). */
  chunked?: boolean;
}

export interface SeenRequest {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  body: string;
}

export interface Origin {
  url: string;
  host: string;
  port: number;
  /** Requests per path. */
  hits: Map<string, number>;
  seen: SeenRequest[];
  /** Called when a response body has been fully written. */
  onComplete: ((path: string) => void) | undefined;
  count(path: string): number;
  route(path: string, r: Route | ((req: SeenRequest) => Route)): void;
  close(): Promise<void>;
}

export async function startOrigin(routes: Record<string, Route | ((req: SeenRequest) => Route)> = {}): Promise<Origin> {
  const table = new Map(Object.entries(routes));
  const hits = new Map<string, number>();
  const seen: SeenRequest[] = [];
  const sockets = new Set<Socket>();
  // Pacing and delays end with the origin: a closed origin leaves no timer behind.
  const closing = new AbortController();
  const sleep = (ms: number) => sleepFor(ms, undefined, { signal: closing.signal }).then(() => !closing.signal.aborted, () => false);
  const origin: Origin = {
    url: '',
    host: '127.0.0.1',
    port: 0,
    hits,
    seen,
    onComplete: undefined,
    count: (p) => hits.get(p) ?? 0,
    route: (p, r) => table.set(p, r),
    close: async () => {
      closing.abort();
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  const server: Server = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    try {
      for await (const c of req) chunks.push(c as Buffer);
    } catch {
      return; // the client (the proxy) gave up on its request body
    }
    const path = req.url ?? '/';
    const r0 = table.get(path.split('?')[0]!) ?? table.get(path);
    const seenReq = { method: req.method ?? '', path, headers: req.headers, body: Buffer.concat(chunks).toString() };
    seen.push(seenReq);
    hits.set(path, (hits.get(path) ?? 0) + 1);
    const r = typeof r0 === 'function' ? r0(seenReq) : (r0 ?? { status: 404, body: 'not found' });
    if (r.delayMs && !(await sleep(r.delayMs))) return;
    for (const i of r.interim ?? []) res.writeInformation(i.status, i.headers ?? {});
    if (r.gate) {
      r.gate.waiting++;
      await r.gate.opened;
      r.gate.waiting--;
    }
    const body = typeof r.body === 'string' ? Buffer.from(r.body) : (r.body ?? Buffer.alloc(0));
    const headers: Record<string, string | string[]> = { ...r.headers };
    if (!r.chunked) headers['content-length'] = String(body.length);
    res.writeHead(r.status ?? 200, headers);
    if (req.method === 'HEAD') return res.end();
    const step = r.chunkBytes ?? body.length;
    let off = 0;
    let held = false;
    while (off < body.length) {
      if (r.bodyGate && !held && off >= r.bodyGate.after) {
        held = true;
        r.bodyGate.gate.waiting++;
        await r.bodyGate.gate.opened;
        r.bodyGate.gate.waiting--;
        if (res.destroyed) return;
      }
      const end = Math.min(body.length, off + Math.max(1, step), r.bodyGate && !held ? Math.max(r.bodyGate.after, off + 1) : Infinity);
      if (r.resetAfter !== undefined && end > r.resetAfter) {
        // Reset once the bytes before it are handed to the kernel (a destroy would drop them unsent).
        if (r.resetAfter > off) await new Promise<void>((done) => res.write(body.subarray(off, r.resetAfter), () => done()));
        res.socket?.destroy();
        return;
      }
      if (!res.write(body.subarray(off, end))) await once(res, 'drain');
      off = end;
      if (r.chunkDelayMs && off < body.length && !(await sleep(r.chunkDelayMs))) return;
    }
    res.end(() => origin.onComplete?.(path));
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const { port } = server.address() as AddressInfo;
  origin.port = port;
  origin.url = `http://127.0.0.1:${port}`;
  return origin;
}

/**
 * An origin that writes raw bytes: `onRequest` answers each read of a connection (a request) on its
 * socket as it likes (whole, cut, reset, held); requests counted, sockets destroyed at close.
 */
export async function rawOrigin(onRequest: (s: Socket, n: number, head: string) => void): Promise<{ url: string; requests: () => number; close: () => Promise<void> }> {
  let requests = 0;
  const sockets = new Set<Socket>();
  const srv = createNetServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    s.on('data', (d: Buffer) => onRequest(s, ++requests, d.toString('latin1')));
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return {
    url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`,
    requests: () => requests,
    close: async () => {
      for (const s of sockets) s.destroy();
      srv.close();
      await once(srv, 'close');
    },
  };
}
