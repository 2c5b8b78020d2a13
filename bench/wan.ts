// The Stratum 1 emulator behind a WAN, for the herd benchmark (issue 30 §1).
//   netns:    the emulator runs in a network namespace of its own (cuttle-wan-<pid>-<n>), reached from the
//             host over a veth pair on a private /30 in 10.201.0.0/16. Both ends are shaped with tbf to
//             the link rate (this kernel has no netem); the RTT, slow start and loss stalls are the
//             emulator's own (its wan option), so the proxy's sockets meet a real, rate-limited link.
//   loopback: the same emulator child on 127.0.0.1 with the same delays, the rate as its total cap; used
//             when netns cannot be (not root, no `ip`, `ip netns add` refused), `why` says which.
// Teardown always happens: close(), and on exit/SIGINT/SIGTERM; a start removes the namespaces and veths
// of cuttle-wan processes that are gone. Traffic goes only to loopback and to namespaces made here.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { request } from 'node:http';
import { fileURLToPath } from 'node:url';
import type { EmulatorChildSpec } from './emulator-main.ts';
import { WAN_DEFAULTS, type CatalogOptions, type EmulatorOptions, type EmulatorStats } from './emulator.ts';

export interface WanOptions {
  /** The emulator's catalog (rebuilt in the child from its seed) and its other knobs. */
  emulator: Omit<EmulatorOptions, 'repo' | 'bodies' | 'corruptPaths' | 'wan'> & { catalog: CatalogOptions; corruptPaths?: string[]; port?: number };
  /** Round-trip time, ms. Default 80. */
  rttMs?: number;
  /** Link rate each way, Mbit/s. Default 1000. */
  rateMbit?: number;
  /** Chance that a round of one RTT stalls for a retransmission timeout. Default 0.002. */
  lossStallProbability?: number;
  /** The retransmission timeout's range, ms. Default [200, 1000]. */
  stallMs?: [number, number];
  /** The TCP window's cap, bytes: one connection peaks near it per RTT. Default 4 MiB. */
  maxWindowBytes?: number;
  mode?: 'auto' | 'netns' | 'loopback';
}

export interface WanEmulator {
  url: string;
  host: string;
  port: number;
  mode: 'netns' | 'loopback';
  /** Why netns was not used (loopback mode). */
  why?: string;
  /** The namespace and the host end of its veth (netns mode). */
  netns?: string;
  veth?: string;
  stats(): Promise<EmulatorStats>;
  close(): Promise<void>;
}

const PREFIX = 'cuttle-wan-';
const MAIN = fileURLToPath(new URL('./emulator-main.ts', import.meta.url));
let made = 0;

/** What close() and the exit handlers undo: the child, then the veth and the namespace. */
interface Live {
  child: ChildProcess;
  netns?: string;
  veth?: string;
}
const live = new Set<Live>();

function ip(args: string[]): { ok: boolean; out: string; err: string } {
  const r = spawnSync('ip', args, { encoding: 'utf8', timeout: 10_000 });
  return { ok: r.status === 0, out: r.stdout ?? '', err: (r.error?.message ?? r.stderr ?? '').trim() };
}

function tc(netns: string | undefined, args: string[]): { ok: boolean; err: string } {
  const r = netns ? spawnSync('ip', ['netns', 'exec', netns, 'tc', ...args], { encoding: 'utf8', timeout: 10_000 }) : spawnSync('tc', args, { encoding: 'utf8', timeout: 10_000 });
  return { ok: r.status === 0, err: (r.error?.message ?? r.stderr ?? '').trim() };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Whatever still runs in a namespace of ours. */
function killAll(netns: string): void {
  for (const pid of ip(['netns', 'pids', netns]).out.split(/\s+/).filter(Boolean)) {
    try {
      process.kill(Number(pid), 'SIGKILL');
    } catch {
      /* gone meanwhile */
    }
  }
}

/** Synchronous, so that the exit handlers can run it. Deleting the host end deletes the pair at once
 * (deleting a namespace frees its veth end only later, in the kernel's own time). */
function undo(l: Live): void {
  live.delete(l);
  if (l.child.exitCode === null && l.child.signalCode === null) l.child.kill('SIGKILL');
  if (l.veth) ip(['link', 'del', l.veth]);
  if (l.netns) {
    killAll(l.netns);
    ip(['netns', 'del', l.netns]);
  }
  if (live.size === 0) unhook();
}

/** Namespaces and host veths of cuttle-wan processes that died without their teardown. */
function removeStale(): void {
  for (const line of ip(['netns', 'list']).out.split('\n')) {
    const m = new RegExp(`^(${PREFIX}(\\d+)-\\d+)`).exec(line);
    if (!m || alive(Number(m[2]))) continue;
    killAll(m[1]!);
    ip(['netns', 'del', m[1]!]);
  }
  for (const line of ip(['-o', 'link', 'show']).out.split('\n')) {
    const m = /^\d+: (cw(\d+)-\d+h)[@:]/.exec(line);
    if (m && !alive(Number(m[2]))) ip(['link', 'del', m[1]!]);
  }
}

const onExit = () => {
  for (const l of [...live]) undo(l);
};
const onSignal = (sig: NodeJS.Signals) => {
  onExit();
  // Ours was the only handler: the signal's default (ending the process) is due.
  if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
};
let hooked = false;
function hook(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', onExit);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
}
function unhook(): void {
  if (!hooked) return;
  hooked = false;
  process.off('exit', onExit);
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
}

/** A free /30 in 10.201.0.0/16 for this process's n-th link: [host address, namespace address]. */
function subnet(n: number): [string, string] {
  const used = ip(['-o', '-4', 'addr', 'show']).out + ip(['-4', 'route', 'show']).out;
  for (let k = 0; k < 16384; k++) {
    const i = (process.pid * 8 + n + k) % 16384;
    const base = `10.201.${i >> 6}.${(i & 63) * 4}`;
    const [a, b, c] = base.split('.');
    const host = `${a}.${b}.${c}.${(i & 63) * 4 + 1}`;
    if (!used.includes(` ${base}/`) && !used.includes(` ${host}/`) && !used.includes(`${base}/30`)) return [host, `${a}.${b}.${c}.${(i & 63) * 4 + 2}`];
  }
  throw new Error('no free /30 in 10.201.0.0/16');
}

/** The namespace, veth and shaping, or why not. On failure nothing of it is left. */
function makeLink(rateMbit: number, rttMs: number): { netns: string; veth: string; host: string; peer: string } | { why: string } {
  if (process.getuid?.() !== 0) return { why: 'not root: network namespaces need CAP_NET_ADMIN' };
  const probe = spawnSync('ip', ['-V'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) return { why: '`ip` (iproute2) is not installed' };
  if (spawnSync('tc', ['-V']).error) return { why: '`tc` (iproute2) is not installed' };
  removeStale();
  const n = made++;
  const netns = `${PREFIX}${process.pid}-${n}`;
  const veth = `cw${process.pid}-${n}h`;
  const inner = `cw${process.pid}-${n}n`;
  const add = ip(['netns', 'add', netns]);
  if (!add.ok) return { why: `ip netns add failed: ${add.err}` };
  const fail = (what: string, err: string) => {
    ip(['link', 'del', veth]);
    ip(['netns', 'del', netns]);
    return { why: `${what} failed: ${err}` };
  };
  let r = ip(['link', 'add', veth, 'type', 'veth', 'peer', 'name', inner, 'netns', netns]);
  if (!r.ok) return fail('ip link add veth', r.err);
  const [host, peer] = subnet(n);
  for (const args of [
    ['addr', 'add', `${host}/30`, 'dev', veth],
    ['link', 'set', veth, 'up'],
    ['-n', netns, 'addr', 'add', `${peer}/30`, 'dev', inner],
    ['-n', netns, 'link', 'set', inner, 'up'],
    ['-n', netns, 'link', 'set', 'lo', 'up'],
  ]) {
    r = ip(args);
    if (!r.ok) return fail(`ip ${args.join(' ')}`, r.err);
  }
  // The link's rate, each way. The bucket holds 2 ms at the rate (64 KiB at least, a GSO packet); the
  // queue holds an RTT's worth (50 ms at least) before it drops.
  const burst = Math.max(64 * 1024, Math.ceil((rateMbit * 125_000 * 2) / 1000));
  const tbf = ['root', 'tbf', 'rate', `${rateMbit}mbit`, 'burst', String(burst), 'latency', `${Math.max(50, rttMs)}ms`];
  for (const [ns, dev] of [[undefined, veth], [netns, inner]] as const) {
    const t = tc(ns, ['qdisc', 'add', 'dev', dev, ...tbf]);
    if (!t.ok) return fail(`tc qdisc add dev ${dev} tbf`, t.err);
  }
  return { netns, veth, host, peer };
}

/** Starts the child and waits for its ready line. */
async function startChild(cmd: string, args: string[], l: Omit<Live, 'child'>): Promise<{ port: number; l: Live }> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const me: Live = { ...l, child };
  live.add(me);
  hook();
  let errTail = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    errTail = (errTail + d).slice(-4000);
    process.stderr.write(d);
  });
  child.stdin!.on('error', () => {}); // the child gone before us: close() notices by its exit
  let out = '';
  try {
    const port = await new Promise<number>((resolve, reject) => {
      const onData = (d: string) => {
        out += d;
        const nl = out.indexOf('\n');
        if (nl < 0) return;
        child.stdout!.off('data', onData).resume();
        child.off('exit', onExit);
        resolve((JSON.parse(out.slice(0, nl)) as { port: number }).port);
      };
      const onExit = (code: number | null) => reject(new Error(`the emulator child exited (${code}) before listening: ${errTail}`));
      child.stdout!.setEncoding('utf8').on('data', onData);
      child.once('exit', onExit);
      child.once('error', reject);
    });
    return { port, l: me };
  } catch (e) {
    undo(me);
    throw e;
  }
}

function getJson<T>(url: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent: false, timeout: 30_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => (res.statusCode === 200 ? resolve(JSON.parse(body) as T) : reject(new Error(`${url}: ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${url}: no answer in 30 s`)));
    req.on('error', reject).end();
  });
}

export async function startWanEmulator(o: WanOptions): Promise<WanEmulator> {
  const rttMs = o.rttMs ?? 80;
  const rateMbit = o.rateMbit ?? 1000;
  const mode = o.mode ?? 'auto';
  const { port: wantPort, ...knobs } = o.emulator;
  const wan = { rttMs, stallProbability: o.lossStallProbability ?? WAN_DEFAULTS.stallProbability, stallMs: o.stallMs ?? WAN_DEFAULTS.stallMs, maxWindowBytes: o.maxWindowBytes ?? WAN_DEFAULTS.maxWindowBytes };
  let link: ReturnType<typeof makeLink> = { why: 'mode loopback requested' };
  if (mode !== 'loopback') {
    link = makeLink(rateMbit, rttMs);
    if ('why' in link && mode === 'netns') throw new Error(`netns mode: ${link.why}`);
  }
  let spec: EmulatorChildSpec;
  let started: { port: number; l: Live };
  if ('netns' in link) {
    spec = { ...knobs, wan, host: link.peer, port: wantPort };
    try {
      started = await startChild('ip', ['netns', 'exec', link.netns, process.execPath, MAIN, JSON.stringify(spec)], { netns: link.netns, veth: link.veth });
    } catch (e) {
      if (mode === 'netns') throw e;
      link = { why: `the emulator did not start in the namespace: ${(e as Error).message}` };
    }
  }
  if ('why' in link) {
    // On loopback the link's rate is the emulator's total cap.
    spec = { totalBytesPerSec: rateMbit * 125_000, ...knobs, wan, host: '127.0.0.1', port: wantPort };
    started = await startChild(process.execPath, [MAIN, JSON.stringify(spec)], {});
  }
  const { port, l } = started!;
  const host = spec!.host;
  const url = `http://${host}:${port}`;
  let closing: Promise<void> | undefined;
  return {
    url,
    host,
    port,
    mode: 'why' in link ? 'loopback' : 'netns',
    ...('why' in link ? { why: link.why } : { netns: link.netns, veth: link.veth }),
    stats: () => getJson<EmulatorStats>(`${url}/_emulator/stats`),
    close: () =>
      (closing ??= (async () => {
        const c = l.child;
        if (c.exitCode === null && c.signalCode === null) {
          const exited = once(c, 'exit');
          c.kill('SIGTERM');
          // Bounded: a child that does not stop within 5 s is killed.
          const timer = setTimeout(() => c.kill('SIGKILL'), 5000);
          await exited;
          clearTimeout(timer);
        }
        undo(l);
      })()),
  };
}
