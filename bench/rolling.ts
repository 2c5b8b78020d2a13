// The rolling scenario (issue 32 §3): a bank of three cuttles on 127.0.0.1-3 whose membership is DNS,
// emulated by /etc/hosts entries this bench adds and removes (and restores on every exit path). Two
// names, as a Kubernetes bank has two Services: the clients' name lists the members in service (the
// ready ones), the peers' name (--bank-dns) lists every member, ready or not, so a drained member keeps
// its keys while it drains and takes them back when it returns. During the herd each member in turn is
// drained (POST /drain), leaves the clients' name, is stopped (SIGTERM) and started again on the same
// cache, and comes back into the name once /readyz says so and the other members see it up.
import { readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { shardKey, ShardRing } from '../src/shard-ring.ts';
import type { Target } from './targets.ts';

export const CLIENTS_NAME = 'cuttle-rolling-clients';
export const PEERS_NAME = 'cuttle-rolling-peers';
const HOSTS = '/etc/hosts';
const MARK = '# cuttle bench rolling';

/**
 * /etc/hosts entries of this bench, each line marked: set() rewrites them, restore() puts the file back
 * as it was (also at exit, on SIGINT and SIGTERM, and after a crash of an earlier run: its marked lines
 * are dropped first).
 */
export class HostsEntries {
  readonly #original: string;
  #restored = false;
  readonly #onSignal = (sig: NodeJS.Signals) => {
    this.restore();
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  readonly #onExit = () => this.restore();

  constructor() {
    const text = readFileSync(HOSTS, 'utf8');
    this.#original = text
      .split('\n')
      .filter((l) => !l.endsWith(MARK))
      .join('\n')
      .replace(/\n*$/, '\n');
    process.on('exit', this.#onExit);
    process.once('SIGINT', this.#onSignal);
    process.once('SIGTERM', this.#onSignal);
  }

  /** The names now: each [ip, name] one marked line. In place (a container's /etc/hosts is a bind mount). */
  set(entries: [string, string][]): void {
    writeFileSync(HOSTS, this.#original + entries.map(([ip, name]) => `${ip} ${name} ${MARK}\n`).join(''));
  }

  restore(): void {
    if (this.#restored) return;
    this.#restored = true;
    writeFileSync(HOSTS, this.#original);
    process.off('exit', this.#onExit);
    process.off('SIGINT', this.#onSignal);
    process.off('SIGTERM', this.#onSignal);
  }
}

export interface Member {
  index: number;
  host: string;
  port: number;
  admin: number;
  /** The member's own directory (its cache), kept across its restart. */
  dir: string;
  target: Target;
}

/** One member's turn: epoch ms of each step, and what its drain and stop showed. */
export interface RollStep {
  member: number;
  drainAt: number;
  /** /readyz right after POST /drain. */
  readyzAfterDrain: number;
  leftDnsAt: number;
  stopAt: number;
  stoppedAt: number;
  upAt: number;
  readyAt: number;
  /** Every other member sees it up again. */
  backAt: number;
  /** Requests it served between its drain and its stop (the nodes' last ones, the peers' relays). */
  requestsWhileDraining: number;
}

async function admin(m: Member, path: string, method = 'GET'): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${m.admin}${path}`, { method, signal: AbortSignal.timeout(5000) });
  return { status: res.status, body: await res.text() };
}

async function until(what: string, cond: () => Promise<boolean>, limitMs: number): Promise<void> {
  const end = Date.now() + limitMs;
  for (;;) {
    if (await cond().catch(() => false)) return;
    if (Date.now() > end) throw new Error(`rolling: ${what} not within ${limitMs} ms`);
    await sleep(100);
  }
}

const requestsOf = async (m: Member) => (JSON.parse((await admin(m, '/status')).body) as { counters: { requests: number } }).counters.requests;

/** The clients' and the peers' names: every member for the peers, those in service for the clients. */
export function entries(members: Member[], inService: (m: Member) => boolean): [string, string][] {
  return [...members.filter(inService).map((m): [string, string] => [m.host, CLIENTS_NAME]), ...members.map((m): [string, string] => [m.host, PEERS_NAME])];
}

/**
 * Drain, stop and restart each member in turn, keeping its cache. `ttlMs` is the nodes' DNS TTL: a
 * member stops 2 TTLs after it left the clients' name (the preStop hook's wait), and the next member's
 * turn starts 2 TTLs after this one came back.
 */
export async function roll(o: { members: Member[]; hosts: HostsEntries; ttlMs: number; stop: (m: Member) => Promise<void>; restart: (m: Member) => Promise<Target>; log: (line: string) => void }): Promise<RollStep[]> {
  const steps: RollStep[] = [];
  const out = new Set<Member>();
  for (const m of o.members) {
    const drainAt = Date.now();
    const before = await requestsOf(m);
    const d = await admin(m, '/drain', 'POST');
    if (d.status !== 200) throw new Error(`rolling: POST /drain on member ${m.index + 1} answered ${d.status}: ${d.body}`);
    const readyz = (await admin(m, '/readyz')).status;
    // Unready: the endpoints controller takes it out of the clients' Service.
    out.add(m);
    o.hosts.set(entries(o.members, (x) => !out.has(x)));
    const leftDnsAt = Date.now();
    await sleep(2 * o.ttlMs);
    const requestsWhileDraining = (await requestsOf(m)) - before;
    const stopAt = Date.now();
    o.log(`  member ${m.index + 1}: drained at +${((stopAt - drainAt) / 1000).toFixed(1)} s (${requestsWhileDraining} requests meanwhile), SIGTERM`);
    await o.stop(m);
    const stoppedAt = Date.now();
    m.target = await o.restart(m);
    const upAt = Date.now();
    await until(`member ${m.index + 1} ready after its restart`, async () => (await admin(m, '/readyz')).status === 200, 30_000);
    const readyAt = Date.now();
    out.delete(m);
    o.hosts.set(entries(o.members, (x) => !out.has(x)));
    const url = `http://${m.host}:${m.port}`;
    await until(
      `the other members to see member ${m.index + 1} up`,
      async () => {
        for (const x of o.members) {
          if (x === m) continue;
          const peers = (JSON.parse((await admin(x, '/status')).body) as { peers: { url: string; up: boolean }[] }).peers;
          if (!peers.some((p) => p.url === url && p.up)) return false;
        }
        return true;
      },
      30_000,
    );
    const backAt = Date.now();
    o.log(`  member ${m.index + 1}: stopped in ${((stoppedAt - stopAt) / 1000).toFixed(2)} s, listening ${((upAt - stoppedAt) / 1000).toFixed(2)} s later, ready ${((readyAt - upAt) / 1000).toFixed(2)} s after, seen up by the others ${((backAt - readyAt) / 1000).toFixed(2)} s after`);
    steps.push({ member: m.index, drainAt, readyzAfterDrain: readyz, leftDnsAt, stopAt, stoppedAt, upAt, readyAt, backAt, requestsWhileDraining });
    await sleep(2 * o.ttlMs);
  }
  return steps;
}

/** One GET through `proxy` (absolute form): the status and X-Cache. */
function getVia(proxy: string, url: string): Promise<{ status: number; xCache: string }> {
  const p = new URL(proxy);
  return new Promise((resolve, reject) => {
    const req = request({ host: p.hostname, port: p.port, path: url, headers: { host: new URL(url).host, 'user-agent': 'cvmfs Fuse 2.11.5' }, agent: false, timeout: 10_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode ?? 0, xCache: String(res.headers['x-cache'] ?? '') }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

/** After the roll: every member sees every member up, and each data object asked at its owner is a hit there. */
export async function checkOwnership(members: Member[], origin: string, dataPaths: string[], neverStored: (path: string, owner: number) => boolean): Promise<{ allPeersUp: boolean; asked: number; hits: number; missesByMember: number[]; missesNeverStored: number; errors: number }> {
  let allPeersUp = true;
  for (const m of members) {
    const peers = (JSON.parse((await admin(m, '/status')).body) as { peers: { up: boolean }[] }).peers;
    if (peers.length !== members.length || !peers.every((p) => p.up)) allPeersUp = false;
  }
  const urls = members.map((m) => `http://${m.host}:${m.port}`);
  const ring = new ShardRing(urls);
  let hits = 0;
  let errors = 0;
  let missesNeverStored = 0;
  const missesByMember = members.map(() => 0);
  for (const path of dataPaths) {
    const owner = ring.owner(shardKey(path));
    const r = await getVia(urls[owner]!, `${origin}${path}`).catch(() => ({ status: 0, xCache: '' }));
    if (r.status !== 200) errors++;
    else if (/^HIT from member/.test(r.xCache)) hits++;
    else {
      missesByMember[owner]!++;
      if (neverStored(path, owner)) missesNeverStored++;
    }
  }
  return { allPeersUp, asked: dataPaths.length, hits, missesByMember, missesNeverStored, errors };
}
