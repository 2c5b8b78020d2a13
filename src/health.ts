// `cuttle health [--pid PID]`: is the running cuttle alive? Asks its admin listener's /healthz where the
// running cuttle's own command line and config file put it, so a container's HEALTHCHECK (which never
// sees `docker run`'s arguments) follows --admin-listen instead of assuming 127.0.0.1:3129. Exit 0
// healthy, 1 not. Without --pid it asks the container's init (pid 1) when that is cuttle, else the
// one cuttle running on this host.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { basename } from 'node:path';
import { loadConfig, parseCli, type ListenAddr } from './config.ts';

/** How long the answer may take: Docker's HEALTHCHECK --timeout is 3 s in the image. */
const ASK_MS = 2000;

/** The cuttle options of process `pid` (what follows src/main.ts or src/cuttle.js), if it is a running cuttle proxy. */
function cuttleArgs(pid: number): string[] | undefined {
  let argv: string[];
  try {
    argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').slice(0, -1);
  } catch {
    return undefined; // gone, or not ours to read
  }
  if (!/^node/.test(basename(argv[0] ?? ''))) return undefined;
  const i = argv.findIndex((a) => /(^|\/)src\/(main\.ts|cuttle\.js)$/.test(a));
  if (i < 0) return undefined;
  const args = argv.slice(i + 1);
  // Commands that run and exit are not the proxy (this very check among them).
  if (['health', 'import-squid'].includes(args[0]!) || args.some((a) => ['--check-config', '--version', '--help'].includes(a))) return undefined;
  return args;
}

/** The running cuttle to ask: pid 1 in a container, or the only one on the host. */
function findCuttle(): { pid: number } | { error: string } {
  if (cuttleArgs(1)) return { pid: 1 };
  const pids = readdirSync('/proc').filter((n) => /^\d+$/.test(n)).map(Number).filter((p) => p !== process.pid && cuttleArgs(p));
  if (pids.length === 1) return { pid: pids[0]! };
  return { error: pids.length === 0 ? 'no running cuttle found' : `${pids.length} cuttles are running (pids ${pids.join(', ')}): name one with --pid` };
}

/** A wildcard listener is asked on loopback. */
function local(a: ListenAddr): string {
  const host = a.host === '::' || a.host === '0.0.0.0' ? '127.0.0.1' : a.host;
  return host.includes(':') ? `[${host}]` : host;
}

/** Can a TCP connection be made? (A cuttle without an admin listener: its proxy port answers.) */
function connects(a: ListenAddr): Promise<boolean> {
  return new Promise((done) => {
    const s = connect({ host: local(a).replace(/^\[|\]$/g, ''), port: a.port, timeout: ASK_MS });
    s.once('connect', () => (s.destroy(), done(true)));
    s.once('error', () => done(false));
    s.once('timeout', () => (s.destroy(), done(false)));
  });
}

/** The health of the running cuttle: a line to print and the exit status. */
export async function health(argv: string[]): Promise<{ line: string; status: number }> {
  const usage = { line: 'usage: cuttle health [--pid PID]', status: 2 };
  if (argv.length !== 0 && !(argv.length === 2 && argv[0] === '--pid' && /^\d+$/.test(argv[1]!))) return usage;
  const found = argv.length ? { pid: Number(argv[1]) } : findCuttle();
  if ('error' in found) return { line: `unhealthy: ${found.error}`, status: 1 };
  const args = cuttleArgs(found.pid);
  if (!args) return { line: `unhealthy: pid ${found.pid} is not a running cuttle`, status: 1 };
  let cfg;
  try {
    // Its config file, as it read it: a relative --config is relative to its working directory.
    process.chdir(readlinkSync(`/proc/${found.pid}/cwd`));
    cfg = loadConfig(parseCli(args));
  } catch (err) {
    return { line: `unhealthy: the configuration of cuttle pid ${found.pid} can't be read: ${(err as Error).message}`, status: 1 };
  }
  if (cfg.adminListen === 'none') {
    const a = cfg.listen[0]!;
    const ok = await connects(a);
    return { line: `${ok ? 'healthy' : 'unhealthy'}: no admin listener; the proxy port ${local(a)}:${a.port} ${ok ? 'accepts' : 'refuses'} connections`, status: ok ? 0 : 1 };
  }
  const url = `http://${local(cfg.adminListen)}:${cfg.adminListen.port}/healthz`;
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(ASK_MS) });
    await r.body?.cancel();
    const hint = r.status === 403 ? ' (allow-admin must include 127.0.0.1 for this check)' : '';
    return { line: `${r.ok ? 'healthy' : 'unhealthy'}: ${url} answered ${r.status}${hint}`, status: r.ok ? 0 : 1 };
  } catch (err) {
    return { line: `unhealthy: ${url}: ${(err as Error).cause instanceof Error ? ((err as Error).cause as Error).message : (err as Error).message}`, status: 1 };
  }
}
