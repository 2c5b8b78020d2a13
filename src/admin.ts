// The admin listener (--admin-listen, loopback by default; never the proxy port; clients in --allow-admin): the live dashboard at /,
// Prometheus /metrics,
// /healthz (liveness), /readyz (listening, disk index loaded, not draining), /status (the same
// figures as JSON, for scripts without Prometheus), and POST /drain (drain.ts; ?cancel leaves it).
import { createServer, type Server } from 'node:http';
import { DASHBOARD_CSP, DASHBOARD_HTML } from './dashboard.ts';
import type { DrainSnapshot } from './drain.ts';

/** The Prometheus text: one proxy's (metrics.ts), or the sum of its workers' (workers.ts). */
export interface MetricsText {
  text(): Promise<string>;
  readonly contentType: string;
}

export interface AdminState {
  /** --allow-admin: may this client address use the admin listener? */
  allows(addr: string): boolean;
  ready(): { ready: boolean; why: string };
  status(): Record<string, unknown> | Promise<Record<string, unknown>>;
  /** POST /drain: start draining, or with `cancel` go back in service (false: a stop can't be undone). */
  drain(cancel: boolean): { done: boolean; drain: DrainSnapshot };
}

export function createAdminServer(metrics: MetricsText, state: AdminState): Server {
  return createServer(async (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    const from = req.socket.remoteAddress ?? '';
    if (!state.allows(from)) {
      res.writeHead(403, { 'content-type': 'text/plain', connection: 'close' }).end(`403 the admin listener is not open to ${from}: see --allow-admin\n`);
      return;
    }
    if (path === '/drain') {
      if (req.method !== 'POST') {
        res.writeHead(405, { allow: 'POST' }).end();
        return;
      }
      // A browser's cross-site form may POST to a loopback port without a preflight: it always sends
      // Origin, curl and probes never do.
      if (req.headers.origin !== undefined) {
        res.writeHead(403, { 'content-type': 'text/plain', connection: 'close' }).end('403 POST /drain is not taken from a web page\n');
        return;
      }
      const cancel = new URLSearchParams((req.url ?? '').split('?')[1] ?? '').has('cancel');
      const r = state.drain(cancel);
      const why = r.done ? (cancel ? 'back in service' : 'draining') : 'shutting down (SIGTERM): a stop cannot be cancelled';
      res.writeHead(r.done ? 200 : 409, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(`${JSON.stringify({ result: why, ...r.drain })}\n`);
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    try {
      switch (path) {
        case '/':
          res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'content-security-policy': DASHBOARD_CSP, 'cache-control': 'no-store' }).end(DASHBOARD_HTML);
          return;
        case '/metrics': {
          const text = await metrics.text();
          res.writeHead(200, { 'content-type': metrics.contentType }).end(text);
          return;
        }
        case '/healthz':
          res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
          return;
        case '/readyz': {
          const r = state.ready();
          res.writeHead(r.ready ? 200 : 503, { 'content-type': 'text/plain' }).end(`${r.why}\n`);
          return;
        }
        case '/status':
          res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(`${JSON.stringify(await state.status(), null, 2)}\n`);
          return;
        default:
          res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /, /metrics, /healthz, /readyz, /status, POST /drain\n');
      }
    } catch (err) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error).message}\n`);
    }
  });
}
