// --workers N: N event loops in one process, each a whole proxy in a worker thread (worker-main.ts) on
// the same ports (SO_REUSEPORT: the kernel spreads connections over every worker's sockets). Each key
// has one owner worker (worker-ring.ts): it runs the key's fills and is the only writer and evictor of
// its disk record, in the one shared cache directory. A worker that takes a request for another's key
// serves it from memory or straight from the owner's disk record when it is stored, and otherwise relays
// the miss to the owner over loopback and streams the answer to all its waiters: one upstream fetch per
// object, whichever worker the clients reach. (Threads, not processes: one address space for the
// supervisor's bookkeeping, and a relay costs a loopback hop either way; bench/ measures it.)
//
// This main thread owns the process: the cache directory's lock, the ports (taken alone first, so
// another program on them still fails the start), the admin listener and SNMP agent (every figure is
// the sum over the workers), the pid file and the signals, which it passes on. A worker that dies is
// restarted; only its fills in flight are lost, and its keys go to the others meanwhile.
import { randomBytes } from 'node:crypto';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import { Worker } from 'node:worker_threads';
import { compileAcl } from './acl.ts';
import { listenEitherFamily, listenOn } from './listeners.ts';
import { createAdminServer } from './admin.ts';
import { Drain } from './drain.ts';
import { buildConfig, type Config, type ListenAddr } from './config.ts';
import type { Logger } from './log.ts';
import { startSnmpAgent, type SnmpAgent } from './snmp.ts';
import { ratios, type Figures } from './counters.ts';
import { RateHistory } from './rate-history.ts';
import { lockCacheDir, lockPath, recordPath } from './store-disk.ts';
import { VERSION } from './version.ts';
import { rm } from 'node:fs/promises';

export interface WorkerData {
  index: number;
  count: number;
  /** The process's options (file and command line), with every port made concrete. */
  raw: Record<string, unknown>;
  /** The relay secret: a request carrying it comes from another worker (hierarchy.ts). */
  token: string;
}

export type ToWorker =
  | { type: 'workers'; relays: (string | undefined)[] }
  | { type: 'forget'; key: string; id: number }
  | { type: 'forgot'; id: number; found: boolean }
  | { type: 'reload'; raw: Record<string, unknown> }
  | { type: 'reopen' }
  | { type: 'drain'; on: boolean }
  | { type: 'report'; id: number }
  | { type: 'close'; timeoutMs: number };

export type ToMain =
  | { type: 'ready'; relay: string }
  | { type: 'failed'; message: string }
  | { type: 'forget'; key: string; id: number }
  | { type: 'forgot'; id: number; found: boolean }
  | { type: 'report'; id: number; status: Record<string, unknown>; metrics: string }
  | { type: 'closed' };

/**
 * One worker's options: the process's bounds shared out (memory, disk, fills, connections), the ports
 * as the process took them, and no admin, SNMP or pid file of its own.
 */
export function workerShare(raw: Record<string, unknown>, _index: number, count: number): Record<string, unknown> {
  const cfg = buildConfig(raw);
  const share = (n: number) => Math.max(1, Math.floor(n / count));
  const upShare = (n: number) => Math.max(1, Math.ceil(n / count));
  const disk = share(cfg.diskCacheBytes);
  const mem = share(cfg.memoryCacheBytes);
  return {
    ...raw,
    workers: 1,
    'disk-cache': `${disk}B`,
    'memory-cache': `${mem}B`,
    'max-object-size': `${Math.min(cfg.maxObjectBytes, disk)}B`,
    'max-memory-object-size': `${Math.min(cfg.maxMemoryObjectBytes, mem)}B`,
    'fill-memory': `${share(cfg.fillMemoryBytes)}B`,
    'max-fills': upShare(cfg.maxFills),
    'max-passes': upShare(cfg.maxPasses),
    'max-client-connections': upShare(cfg.maxClientConnections),
    'upstream-connections': upShare(cfg.upstreamConnections),
    'admin-listen': 'none',
    'snmp-listen': 'none',
    'pid-file': 'none',
  };
}

const addrText = (a: ListenAddr) => (a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`);

/** Take each port alone (another program on it fails the start here), learn port 0's, and let go. */
async function takePorts(addrs: ListenAddr[]): Promise<ListenAddr[]> {
  const out: ListenAddr[] = [];
  for (const a of addrs) {
    const srv = createTcpServer();
    const host = await listenEitherFamily(a.host, (h) => listenOn(srv, h, a.port, 1));
    out.push({ host, port: (srv.address() as AddressInfo).port });
    await new Promise<void>((r) => srv.close(() => r()));
  }
  return out;
}

/** An invalidation one worker asked for, waiting for the others to have forgotten the key. */
interface Forget {
  waiting: Set<Slot>;
  found: boolean;
  done(): void;
}

interface Slot {
  worker: Worker | undefined;
  relay: string | undefined;
  ready: boolean;
  startedAt: number;
  restarts: number;
  /** Restart delay after a crash: doubles while it keeps crashing early, up to 30 s. */
  backoffMs: number;
}

export interface WorkerSet {
  readonly count: number;
  /** Bound client addresses, as the process took them. */
  readonly addresses: ListenAddr[];
  reload(raw: Record<string, unknown>): void;
  reopenLogs(): void;
  close(timeoutMs: number): Promise<void>;
  /** The admin listener's address, if any. */
  adminAddress(): AddressInfo | undefined;
  /** Worker i's thread while it runs (what a crash would end: tests stop one). */
  thread(i: number): Worker | undefined;
  /** Times worker i was restarted. */
  restarts(i: number): number;
}

/** Sum two /status trees: numbers add up, objects merge, the rest is the first's. */
function addTrees(a: unknown, b: unknown, path = ''): unknown {
  if (NOT_SUMMED.has(path)) return a;
  if (typeof a === 'number' && typeof b === 'number') return a + b;
  if (typeof a === 'boolean' && typeof b === 'boolean') return a && b;
  if (a && b && typeof a === 'object' && typeof b === 'object' && !Array.isArray(a) && !Array.isArray(b)) {
    const out: Record<string, unknown> = { ...(a as Record<string, unknown>) };
    for (const [k, v] of Object.entries(b as Record<string, unknown>)) out[k] = k in out ? addTrees(out[k], v, path ? `${path}.${k}` : k) : v;
    return out;
  }
  return a ?? b;
}

/** /status figures that are the same in every worker (the kernel's, the process's), not shares. */
const NOT_SUMMED = new Set(['uptimeS', 'version', 'listenQueue', 'mirrors', 'peers', 'topFills', 'drain']);

/** Prometheus series that every worker reads from the same place (the kernel, the process): one copy. */
const SAME_IN_EVERY_WORKER = /^cuttle_(process_|listen_|mirror_healthy|mirror_rtt_seconds|mirror_stale|mirror_manifest_revision|peer_up)/;

/** Sum the workers' Prometheus texts series by series (histograms add up bucket by bucket). */
export function sumMetrics(texts: string[]): string {
  const meta: string[] = [];
  const seenMeta = new Set<string>();
  const series = new Map<string, number>();
  const order: string[] = [];
  for (const [w, text] of texts.entries()) {
    for (const line of text.split('\n')) {
      if (!line) continue;
      if (line.startsWith('#')) {
        if (!seenMeta.has(line)) {
          seenMeta.add(line);
          meta.push(line);
          order.push(`#${meta.length - 1}`);
        }
        continue;
      }
      const at = line.lastIndexOf(' ');
      const key = line.slice(0, at);
      const v = Number(line.slice(at + 1));
      const prev = series.get(key);
      if (prev === undefined) {
        series.set(key, v);
        order.push(key);
      } else if (w > 0 && !SAME_IN_EVERY_WORKER.test(key)) series.set(key, prev + v);
    }
  }
  return `${order.map((k) => (k.startsWith('#') && !series.has(k) ? meta[Number(k.slice(1))] : `${k} ${series.get(k)}`)).join('\n')}\n`;
}

export async function startWorkers(cfg: Config, raw: Record<string, unknown>, log: Logger): Promise<WorkerSet> {
  const count = cfg.workers;
  await lockCacheDir(cfg.cacheDir, true).catch((err: Error) => {
    throw new Error(`cache-dir ${cfg.cacheDir} is not usable: ${err.message}`, { cause: err });
  });
  const unlock = () => rm(lockPath(cfg.cacheDir), { force: true });
  let listen: ListenAddr[];
  let accel: ListenAddr | undefined;
  try {
    listen = await takePorts(cfg.listen as ListenAddr[]);
    accel = cfg.accelListen === 'none' ? undefined : (await takePorts([cfg.accelListen]))[0];
  } catch (err) {
    await unlock();
    throw err;
  }
  let options: Record<string, unknown> = { ...raw, listen: listen.map(addrText), ...(accel ? { 'accel-listen': addrText(accel) } : {}) };
  const token = randomBytes(16).toString('hex');
  const slots: Slot[] = Array.from({ length: count }, () => ({ worker: undefined, relay: undefined, ready: false, startedAt: 0, restarts: 0, backoffMs: 1000 }));
  let closing = false;
  // The process's drain: POST /drain and SIGTERM here reach every worker (and one restarted meanwhile).
  const drain = new Drain();
  let reportId = 0;
  let forgetId = 0;
  const forgets = new Map<number, Forget>();
  const waiting = new Map<number, { left: number; got: { status: Record<string, unknown>; metrics: string }[]; done: () => void }>();

  const broadcast = (m: ToWorker) => {
    for (const s of slots) if (s.ready) s.worker?.postMessage(m);
  };
  drain.watch((on) => broadcast({ type: 'drain', on }));
  const announce = () => broadcast({ type: 'workers', relays: slots.map((s) => (s.ready ? s.relay : undefined)) });

  const spawn = (index: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const slot = slots[index]!;
      const data: WorkerData = { index, count, raw: options, token };
      const worker = new Worker(new URL('./worker-main.ts', import.meta.url), { workerData: data });
      slot.worker = worker;
      slot.startedAt = Date.now();
      worker.on('message', (m: ToMain) => {
        switch (m.type) {
          case 'ready':
            slot.relay = m.relay;
            slot.ready = true;
            if (drain.draining) worker.postMessage({ type: 'drain', on: true } satisfies ToWorker);
            announce();
            resolve();
            break;
          case 'failed':
            reject(new Error(m.message));
            break;
          case 'forget': {
            // Every other worker forgets the key (its owner drops the record) before the one that asked
            // answers its client: a PURGE's 200 means the key is gone everywhere.
            const others = slots.filter((s) => s !== slot && s.ready);
            const id = ++forgetId;
            const requester = slot.worker;
            // A worker that is not running (restarting) can't drop its record: it goes here, so that the
            // owner's start-up scan does not find it again.
            const unlinked = slots.some((s) => !s.ready) ? rm(recordPath(cfg.cacheDir, m.key), { force: true }).catch(() => {}) : Promise.resolve();
            const entry: Forget = {
              waiting: new Set(others),
              found: false,
              done: () => {
                forgets.delete(id);
                // Only the thread that asked: a restarted one numbers its requests afresh.
                void unlinked.then(() => {
                  if (slot.worker === requester) requester?.postMessage({ type: 'forgot', id: m.id, found: entry.found } satisfies ToWorker);
                });
              },
            };
            if (others.length === 0) return entry.done();
            forgets.set(id, entry);
            for (const s of others) s.worker?.postMessage({ type: 'forget', key: m.key, id } satisfies ToWorker);
            break;
          }
          case 'forgot': {
            // Each running worker answers once it has forgotten; one that dies meanwhile is let go at its exit.
            const f = forgets.get(m.id);
            if (!f) break;
            if (m.found) f.found = true;
            f.waiting.delete(slot);
            if (f.waiting.size === 0) f.done();
            break;
          }
          case 'report': {
            const w = waiting.get(m.id);
            if (w) {
              w.got.push({ status: m.status, metrics: m.metrics });
              if (--w.left === 0) w.done();
            }
            break;
          }
          case 'closed':
            break;
        }
      });
      worker.on('error', (err) => log.error({ worker: index, err, internal: true }, 'worker failed'));
      worker.on('exit', (code) => {
        for (const f of [...forgets.values()]) if (f.waiting.delete(slot) && f.waiting.size === 0) f.done();
        const wasReady = slot.ready;
        slot.ready = false;
        slot.worker = undefined;
        slot.relay = undefined;
        if (closing) return;
        if (!wasReady) return reject(new Error(`worker ${index} exited (${code}) before it listened`));
        // Its keys go to the others until it is back; its fills in flight are lost.
        announce();
        slot.restarts++;
        slot.backoffMs = Date.now() - slot.startedAt > 60_000 ? 1000 : Math.min(30_000, slot.backoffMs * 2);
        log.error({ worker: index, code, restartInMs: slot.backoffMs }, 'worker exited; restarting it');
        setTimeout(() => {
          if (!closing) spawn(index).catch((err: Error) => log.error({ worker: index, err: err.message }, 'worker restart failed'));
        }, slot.backoffMs).unref();
      });
    });

  const closeWorkers = async (timeoutMs: number) => {
    closing = true;
    await Promise.all(
      slots.map(
        (s) =>
          new Promise<void>((resolve) => {
            const w = s.worker;
            if (!w) return resolve();
            w.once('exit', () => resolve());
            if (s.ready) w.postMessage({ type: 'close', timeoutMs } satisfies ToWorker);
            else void w.terminate();
          }),
      ),
    );
  };

  try {
    await Promise.all(slots.map((_, i) => spawn(i)));
  } catch (err) {
    await closeWorkers(0);
    await unlock();
    throw err;
  }

  /** Every running worker's report, gathered (a worker that does not answer in 2 s is left out). */
  const reports = () =>
    new Promise<{ status: Record<string, unknown>; metrics: string }[]>((resolve) => {
      const id = ++reportId;
      const running = slots.filter((s) => s.ready);
      const entry = { left: running.length, got: [] as { status: Record<string, unknown>; metrics: string }[], done: () => finish() };
      const timer = setTimeout(() => finish(), 2000);
      const finish = () => {
        clearTimeout(timer);
        waiting.delete(id);
        resolve(entry.got);
      };
      waiting.set(id, entry);
      if (running.length === 0) return finish();
      for (const s of running) s.worker!.postMessage({ type: 'report', id } satisfies ToWorker);
    });
  // The history of the sum: each worker's figures, as a source that starts again when it restarts.
  const history = new RateHistory(Date.now());
  const bySource = (got: { status: Record<string, unknown> }[]) => new Map<string, Figures>(got.map((r) => [`${String(r.status.worker)}/${slots[Number(r.status.worker)]?.restarts ?? 0}`, r.status]));
  history.start(() => Date.now(), async () => bySource(await reports()), (err) => log.error({ err, internal: true }, 'rate history sample failed'));
  const status = async () => {
    // Worker 0 first: what is not summed (mirror health, peers) is its view, whichever answers first.
    const got = (await reports()).sort((a, b) => Number(a.status.worker) - Number(b.status.worker));
    const merged = got.reduce<unknown>((a, r) => (a === undefined ? r.status : addTrees(a, r.status)), undefined) as Record<string, unknown>;
    const topFills = got.flatMap((r) => (r.status.topFills as { readers: number }[] | undefined) ?? []).sort((a, b) => b.readers - a.readers).slice(0, 10);
    const workers = slots.map((s, index) => {
      const mine = got.find((r) => (r.status.worker as number | undefined) === index)?.status;
      return { index, running: s.ready, restarts: s.restarts, requests: (mine?.counters as { requests?: number } | undefined)?.requests ?? null, clientConnections: (mine?.clientConnections as number | undefined) ?? null };
    });
    return { ...merged, version: VERSION, draining: drain.draining, drain: drain.snapshot(), ratios: ratios(merged), history: history.snapshot(Date.now(), bySource(got)), topFills, worker: undefined, workers };
  };
  let figuresCache: Record<string, unknown> = {};
  let acl = compileAcl(cfg);
  const admin: Server | undefined =
    cfg.adminListen === 'none'
      ? undefined
      : createAdminServer(
          { contentType: 'text/plain; version=0.0.4; charset=utf-8', text: async () => sumMetrics((await reports()).map((r) => r.metrics)) + `# HELP cuttle_workers Worker threads running (--workers)\n# TYPE cuttle_workers gauge\ncuttle_workers ${slots.filter((s) => s.ready).length}\n` },
          {
            allows: (addr) => acl.allowsAdmin(addr),
            ready: () => (drain.draining ? { ready: false, why: drain.state === 'stopping' ? 'draining: shutting down' : 'draining' } : slots.every((s) => s.ready) ? { ready: true, why: 'ready' } : { ready: false, why: `${slots.filter((s) => !s.ready).length} of ${count} workers not running` }),
            status,
            drain: (cancel) => ({ done: cancel ? drain.cancel() : (drain.start(), true), drain: drain.snapshot() }),
          },
        );
  if (admin && cfg.adminListen !== 'none') {
    const { host, port } = cfg.adminListen;
    await new Promise<void>((resolve, reject) => {
      admin.once('error', (err) => reject(new Error(`cannot listen on admin ${host}:${port}: ${err.message}`, { cause: err })));
      admin.listen({ host, port }, () => resolve());
    }).catch(async (err) => {
      history.stop();
      await closeWorkers(0);
      await unlock();
      throw err;
    });
  }
  let snmp: SnmpAgent | undefined;
  let snmpTimer: NodeJS.Timeout | undefined;
  if (cfg.snmpListen !== 'none') {
    // The agent reads figures synchronously: the workers' sums, gathered every second.
    const refresh = async () => {
      figuresCache = await status();
    };
    await refresh();
    snmpTimer = setInterval(() => void refresh(), 1000);
    snmpTimer.unref();
    const startedAt = Date.now();
    snmp = await startSnmpAgent({ listen: cfg.snmpListen, community: cfg.snmpCommunity, allow: cfg.allowSnmp, log, sources: { version: VERSION, uptimeMs: () => Date.now() - startedAt, figures: () => figuresCache } });
  }
  log.info({ workers: count, listen: listen.map((a) => ({ address: a.host, port: a.port })), admin: admin?.address(), cacheDir: cfg.cacheDir }, 'cuttle listening');

  return {
    count,
    addresses: listen,
    reload(next) {
      acl = compileAcl(buildConfig(next)); // --allow-admin of the admin listener here
      options = { ...next, listen: listen.map(addrText), ...(accel ? { 'accel-listen': addrText(accel) } : {}) };
      broadcast({ type: 'reload', raw: options });
    },
    reopenLogs() {
      broadcast({ type: 'reopen' });
    },
    adminAddress: () => admin?.address() as AddressInfo | undefined,
    thread: (i) => (slots[i]?.ready ? slots[i].worker : undefined),
    restarts: (i) => slots[i]?.restarts ?? 0,
    async close(timeoutMs) {
      history.stop();
      drain.stop(timeoutMs);
      // The workers drain (drain.ts, shutdown.ts) while the admin listener still says so.
      await closeWorkers(timeoutMs);
      if (snmpTimer) clearInterval(snmpTimer);
      admin?.close();
      admin?.closeAllConnections();
      await snmp?.close();
      await unlock();
    },
  };
}
