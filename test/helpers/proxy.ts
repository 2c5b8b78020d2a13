// Start a real cuttle on 127.0.0.1:0 with a fresh cache dir, in this process (for injected clocks and
// counters) or as a child process (for restarts, kill -9 and peak RSS).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { after, before } from 'node:test';
import { startOrigin, type Origin } from './origin.ts';
import { Pool, type Dispatcher } from 'undici';
import { pino } from 'pino';
import type { Clock } from '../../src/clock.ts';
import { buildConfig } from '../../src/config.ts';
import { createProxy, type Proxy } from '../../src/server.ts';
import type { AccessLog, Transaction } from '../../src/access-log.ts';
import type { Logger } from '../../src/log.ts';
import { formatSquid } from '../../src/access-log.ts';

// Every temporary directory of a test file lives under one root, removed when the file's process exits:
// a full run used to leave ~190 directories (caches, logs, browser profiles) in /tmp each time.
let root: string | undefined;

export function tmpDir(prefix = 'cuttle-test-'): string {
  if (!root) {
    const r = mkdtempSync(join(tmpdir(), 'cuttle-run-'));
    process.on('exit', () => rmSync(r, { recursive: true, force: true }));
    root = r;
  }
  return mkdtempSync(join(root, prefix));
}

export interface TestProxy {
  proxy: Proxy;
  url: string;
  port: number;
  cacheDir: string;
  logLines: string[];
  /** The proxy's own log at warn and above, parsed. */
  logs: Record<string, unknown>[];
  /** Closes the proxy, then fails if it logged an internal error (a bug) while the test ran. */
  close(): Promise<void>;
}

/** A pino logger kept in memory (warn and up): tests read it, and fail on internal errors. */
export function memoryLogger(): { logger: Logger; logs: Record<string, unknown>[] } {
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'warn' }, { write: (line: string) => void logs.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, logs };
}

export function assertNoInternalErrors(logs: Record<string, unknown>[]): void {
  const bad = logs.filter((l) => l.internal === true || (l.level as number) >= 60);
  if (bad.length) throw new Error(`the proxy logged internal errors:\n${bad.map((l) => JSON.stringify(l)).join('\n')}`);
}

export async function startProxy(overrides: Record<string, unknown> = {}, opts: { clock?: Clock } = {}): Promise<TestProxy> {
  const cacheDir = (overrides['cache-dir'] as string) ?? join(tmpDir(), 'cache');
  // An in-process proxy shares its event loop with the test: a test that stalls it (a 2-core machine
  // running other work) must not turn it into refusals, so the lag monitor is off unless a test asks.
  const cfg = buildConfig({ listen: ['127.0.0.1:0'], 'cache-dir': cacheDir, 'allow-local-dest': ['127.0.0.1'], 'access-log': 'none', 'visible-hostname': 'cuttle-test', 'admin-listen': '127.0.0.1:0', 'max-loop-lag': 0, ...overrides });
  const logLines: string[] = [];
  const accessLog: AccessLog = {
    write: (tx: Transaction, now: number) => void logLines.push(formatSquid(tx, now)),
    reopen() {},
    flush: async () => {},
    close: async () => {},
    droppedLines: 0,
  };
  const { logger, logs } = memoryLogger();
  const proxy = await createProxy(cfg, { clock: opts.clock, logger, accessLog });
  await proxy.listen();
  const port = proxy.addresses()[0]!.port;
  return {
    proxy,
    url: `http://127.0.0.1:${port}`,
    port,
    cacheDir,
    logLines,
    logs,
    close: async () => {
      await proxy.close(1000);
      assertNoInternalErrors(logs);
    },
  };
}

export interface ChildProxy {
  child: ChildProcess;
  url: string;
  port: number;
  stderr: () => string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Run `node src/main.ts` (in `cwd`, the repository by default) with the given arguments; resolves once it listens. */
export async function startChildProxy(args: string[], cwd?: string, opts: { openFiles?: number; env?: Record<string, string> } = {}): Promise<ChildProxy> {
  const withAdmin = args.includes('--admin-listen') ? args : ['--admin-listen', '127.0.0.1:0', ...args];
  // One event loop unless the test asks for workers (test/e2e/workers.test.ts).
  if (!withAdmin.includes('--workers')) withAdmin.unshift('--workers', '1');
  const argv = ['--max-semi-space-size=8', 'src/main.ts', '--access-log', 'none', ...withAdmin];
  // A lower open-files limit: the shell sets it, then becomes the proxy (exec), so the pid is the proxy's.
  const env = opts.env ? { ...process.env, ...opts.env } : undefined;
  const child =
    opts.openFiles === undefined
      ? spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'], cwd, env })
      : spawn('bash', ['-c', `ulimit -n ${opts.openFiles} && exec "$0" "$@"`, process.execPath, ...argv], { stdio: ['ignore', 'pipe', 'pipe'], cwd, env });
  let err = '';
  child.stderr!.on('data', (c) => (err += c));
  child.stdout!.resume();
  const port = await new Promise<number>((resolve, reject) => {
    const onData = () => {
      // The line that says the proxy (the process, with --workers) listens; a worker's comes before it.
      const m = /"port":(\d+).*"msg":"cuttle listening"/.exec(err);
      if (m) {
        child.stderr!.off('data', onData);
        resolve(Number(m[1]));
      }
    };
    child.stderr!.on('data', onData);
    child.once('exit', (code) => reject(new Error(`proxy exited ${code}: ${err}`)));
  });
  // A proxy that dies by itself (an uncaught error: a sink's 'error' event with no handler, a rejection)
  // fails the test at stop(), as does an internal error in its log.
  let stopping = false;
  let died: string | undefined;
  child.once('exit', (code, sig) => {
    if (!stopping && code !== 0 && code !== null) died = `the proxy exited by itself (code ${code}, signal ${sig}):\n${err.slice(-4000)}`;
  });
  return {
    child,
    port,
    url: `http://127.0.0.1:${port}`,
    stderr: () => err,
    async stop(signal = 'SIGTERM') {
      stopping = true;
      if (died) throw new Error(died);
      if (child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
        await once(child, 'exit');
      }
      assertNoInternalErrors(err.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>));
      return child.exitCode;
    },
  };
}

/** A client pool that speaks absolute-form requests to the proxy. */
export function proxyClient(proxyUrl: string, connections = 16): Pool {
  return new Pool(proxyUrl, { connections, pipelining: 1, keepAliveTimeout: 10_000 });
}

export async function get(pool: Dispatcher, url: string, headers: Record<string, string> = {}, method = 'GET', body?: string) {
  const res = await pool.request({ path: url, method: method as 'GET', headers, body });
  const buf = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, headers: res.headers, body: buf };
}

export interface Rig {
  origin: Origin;
  p: TestProxy;
  pool: Pool;
}

/** Run `body` against a fresh scripted origin, in-process proxy and client pool; close all after. */
export async function withProxy(overrides: Record<string, unknown>, body: (rig: Rig) => Promise<void>, connections = 4): Promise<void> {
  const origin = await startOrigin();
  const p = await startProxy(overrides);
  const pool = proxyClient(p.url, connections);
  try {
    await body({ origin, p, pool });
  } finally {
    await pool.close();
    await p.close();
    await origin.close();
  }
}

/** The same rig for a whole describe block: set up in before(), closed in after(). */
export function useProxy(overrides: Record<string, unknown> = {}, connections = 4): Rig {
  const rig = {} as Rig;
  before(async () => {
    rig.origin = await startOrigin();
    rig.p = await startProxy(overrides);
    rig.pool = proxyClient(rig.p.url, connections);
  });
  after(async () => {
    await rig.pool?.close();
    await rig.p?.close();
    await rig.origin?.close();
  });
  return rig;
}

/** cuttle_refused_total{reason} of an in-process proxy, as its metrics say it. */
export async function refusedFor(p: TestProxy, reason: string): Promise<number> {
  const m = new RegExp(`^cuttle_refused_total\\{reason="${reason}"\\} (\\d+)$`, 'm').exec((await p.proxy.report()).metrics);
  return Number(m?.[1]);
}

/** A raw client connection to the proxy, and what it has received so far. */
export function rawClient(port: number): { c: Socket; got: () => string } {
  const c = connect(port, '127.0.0.1');
  c.on('error', () => {});
  let got = '';
  c.on('data', (d: Buffer) => (got += d.toString('latin1')));
  return { c, got: () => got };
}
