// A scripted loopback origin: routes with status, headers, body, first-byte latency, paced bodies,
// resets after N bytes, and per-path request counters (the "upstream fetches" every test asserts).
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface Route {
  status?: number;
  headers?: Record<string, string>;
  body?: Buffer | string;
  /** Delay before the response head. */
  delayMs?: number;
  /** Pace the body: write chunkBytes every chunkDelayMs. */
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
    if (r.delayMs) await sleep(r.delayMs);
    const body = typeof r.body === 'string' ? Buffer.from(r.body) : (r.body ?? Buffer.alloc(0));
    const headers: Record<string, string> = { ...r.headers };
    if (!r.chunked) headers['content-length'] = String(body.length);
    res.writeHead(r.status ?? 200, headers);
    if (req.method === 'HEAD') return res.end();
    const step = r.chunkBytes ?? body.length;
    let off = 0;
    while (off < body.length) {
      const end = Math.min(body.length, off + Math.max(1, step));
      if (r.resetAfter !== undefined && end > r.resetAfter) {
        if (r.resetAfter > off) res.write(body.subarray(off, r.resetAfter));
        await sleep(20);
        res.socket?.destroy();
        return;
      }
      if (!res.write(body.subarray(off, end))) await once(res, 'drain');
      off = end;
      if (r.chunkDelayMs && off < body.length) await sleep(r.chunkDelayMs);
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
