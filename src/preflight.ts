// What --check-config checks on this host beyond the file itself, without changing anything: that the
// directories cuttle would create or write are usable, that every listen address exists here, and that
// its port is free (bound and released at once). A port held by the running cuttle on the same cache
// dir is what a check before a reload finds, so that is a note, not a problem.
import { listensOn, resolveAll } from './bank.ts';
import { createSocket } from 'node:dgram';
import { accessSync, constants, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { lookup } from 'node:dns/promises';
import { createServer, isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { dirname, resolve } from 'node:path';
import type { Config, ListenAddr } from './config.ts';
import { foreignFiles, lockHolder } from './store-disk.ts';

/** Would `mkdir -p path` and writing inside it work? Names the first obstacle. */
function dirProblem(path: string): string | undefined {
  let p = resolve(path);
  for (;;) {
    let st;
    try {
      st = statSync(p);
    } catch {
      const up = dirname(p);
      if (up === p) return `no existing parent directory`;
      p = up;
      continue;
    }
    if (!st.isDirectory()) return `${p} is not a directory`;
    try {
      accessSync(p, constants.W_OK | constants.X_OK);
    } catch {
      return `${p} is not writable by this user (uid ${process.getuid?.() ?? '?'})`;
    }
    return undefined;
  }
}

/** A file cuttle appends to or creates (access log, pid file). */
function fileProblem(path: string): string | undefined {
  try {
    const st = statSync(path);
    if (!st.isFile()) return `${path} is not a regular file`;
    accessSync(path, constants.W_OK);
    return undefined;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENOTDIR') return `${path} is not writable by this user`;
  }
  return dirProblem(dirname(path));
}

const WILDCARDS = new Set(['::', '0.0.0.0']);

async function addressProblem(a: ListenAddr, local: Set<string>): Promise<string | undefined> {
  if (WILDCARDS.has(a.host)) return undefined;
  let addrs: string[];
  try {
    addrs = isIP(a.host) ? [a.host] : (await lookup(a.host, { all: true })).map((r) => r.address);
  } catch (err) {
    return `${a.host} does not resolve (${(err as Error).message})`;
  }
  // Any 127.0.0.0/8 address can be bound: the loopback interface owns the whole range (a bank on one host).
  return addrs.some((x) => local.has(x) || x.startsWith('127.')) ? undefined : `${a.host} is not an address of this host (${[...local].join(', ')})`;
}

/** Is the address taken now? Bound and released at once, as start would bind it (other errors are start's to report). */
async function taken(a: ListenAddr, udp: boolean): Promise<boolean> {
  return new Promise((done) => {
    const failed = (err: NodeJS.ErrnoException) => done(err.code === 'EADDRINUSE');
    if (udp) {
      const s = createSocket(a.host.includes(':') ? 'udp6' : 'udp4');
      s.once('error', (err) => {
        s.close();
        failed(err);
      });
      s.bind({ address: a.host, port: a.port, exclusive: true }, () => s.close(() => done(false)));
    } else {
      const s = createServer();
      s.once('error', failed);
      s.listen({ host: a.host, port: a.port, exclusive: true }, () => s.close(() => done(false)));
    }
  });
}

/**
 * Does process `pid` hold a socket bound to `port` (listening, for TCP)? From /proc: the socket
 * inodes on the port, then the process's descriptors. undefined when /proc can't tell (not Linux, or
 * another user's process).
 */
function holdsPort(pid: number, port: number, udp: boolean): boolean | undefined {
  const inodes = new Set<string>();
  try {
    for (const table of udp ? ['udp', 'udp6'] : ['tcp', 'tcp6']) {
      for (const line of readFileSync(`/proc/net/${table}`, 'utf8').split('\n').slice(1)) {
        const f = line.trim().split(/\s+/);
        if (f.length < 10 || Number.parseInt(f[1]!.split(':').pop()!, 16) !== port) continue;
        if (udp || f[3] === '0A') inodes.add(f[9]!); // 0A: LISTEN
      }
    }
    return readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try {
        return inodes.has(/^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1] ?? '');
      } catch {
        return false; // closed meanwhile
      }
    });
  } catch {
    return undefined;
  }
}

/** Every problem, each prefixed by the option it concerns, plus notes that are not problems. */
export async function checkHost(cfg: Config): Promise<{ problems: string[]; notes: string[] }> {
  const problems: string[] = [];
  const notes: string[] = [];
  const dir = dirProblem(cfg.cacheDir);
  if (dir) problems.push(`cache-dir: ${cfg.cacheDir} can't be used: ${dir}`);
  const foreign = foreignFiles(cfg.cacheDir);
  if (foreign) problems.push(`cache-dir: ${cfg.cacheDir} can't be used: ${foreign}`);
  // A stale lock (its process gone) is taken over at start, so only a live holder is worth a note.
  const holder = lockHolder(cfg.cacheDir);
  if (holder !== undefined && holder !== process.pid) notes.push(`cache-dir: in use by the running cuttle pid ${holder} (fine before a reload; a second instance on it would be refused)`);
  for (const [key, path] of [['access-log', cfg.accessLog], ['pid-file', cfg.pidFile]] as const) {
    if (path === '-' || path === 'none') continue;
    const f = fileProblem(path);
    if (f) problems.push(`${key}: ${path} can't be written: ${f}`);
  }
  const local = new Set(Object.values(networkInterfaces()).flatMap((l) => (l ?? []).map((i) => i.address)));
  const listeners: [string, ListenAddr | 'none'][] = [...cfg.listen.map((l) => ['listen', l] as [string, ListenAddr]), ['admin-listen', cfg.adminListen], ['accel-listen', cfg.accelListen], ['snmp-listen', cfg.snmpListen]];
  for (const [key, a] of listeners) {
    if (a === 'none') continue;
    const p = await addressProblem(a, local);
    if (p) problems.push(`${key}: ${p}`);
    else if (a.port !== 0 && (await taken(a, key === 'snmp-listen'))) {
      const where = `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}${key === 'snmp-listen' ? ' (UDP)' : ''}`;
      const ours = holder === undefined ? false : holdsPort(holder, a.port, key === 'snmp-listen');
      if (holder !== undefined && ours !== false) notes.push(`${key}: ${where} is taken by the running cuttle pid ${holder} on this cache-dir${ours ? '' : ' (presumably: its sockets are not readable by this user)'} (fine before a reload)`);
      else problems.push(`${key}: ${where} is already in use by another process${holder === undefined ? '' : ` (not the cuttle pid ${holder} on this cache-dir)`}`);
    }
  }
  notes.push(...(await bankNotes(cfg)));
  return { problems, notes };
}

/** Which --bank member this cuttle is (by its listen addresses), as it will be formed at start. */
async function bankNotes(cfg: Config): Promise<string[]> {
  if (cfg.bank.length === 0) return [];
  const self: string[] = [];
  const unresolved: string[] = [];
  for (const m of cfg.bank) {
    const ips = await resolveAll(m.host).catch(() => undefined);
    if (!ips) unresolved.push(m.url);
    else if (ips.some((ip) => listensOn(cfg.listen, ip, m.port))) self.push(m.url);
  }
  const out = unresolved.map((u) => `bank: ${u} does not resolve now; it is left out until it does`);
  if (self.length === 0) out.push(`bank: no member is this cuttle (none matches a --listen address): it would send every routed key to its owner and own none`);
  else if (self.length > 1) out.push(`bank: several members are this cuttle (${self.join(', ')}): each key they own is fetched here`);
  else out.push(`bank: this cuttle is ${self[0]}, one of ${cfg.bank.length} members (--bank-hash ${cfg.bankHash})`);
  return out;
}
