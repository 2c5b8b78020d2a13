// What --check-config checks on this host beyond the file itself, without changing anything: that the
// directories cuttle would create or write are usable, and that every listen address exists here. A
// config that passes here fails at start only for what can't be known beforehand (a port in use).
import { listensOn, resolveAll } from './bank.ts';
import { accessSync, constants, statSync } from 'node:fs';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { dirname, resolve } from 'node:path';
import type { Config, ListenAddr } from './config.ts';
import { lockHolder } from './store-disk.ts';

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

/** Every problem, each prefixed by the option it concerns, plus notes that are not problems. */
export async function checkHost(cfg: Config): Promise<{ problems: string[]; notes: string[] }> {
  const problems: string[] = [];
  const notes: string[] = [];
  const dir = dirProblem(cfg.cacheDir);
  if (dir) problems.push(`cache-dir: ${cfg.cacheDir} can't be used: ${dir}`);
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
