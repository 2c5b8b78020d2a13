// The proxies under test: cuttle (started here), Squid from Debian with a frontier-squid-like config
// (started here), or any running forward proxy given by URL. Each proxy is pinned to core 0 where
// `taskset` exists, and its CPU time and peak RSS are read from /proc.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface Target {
  name: string;
  url: string;
  pid: number | undefined;
  stop(): Promise<void>;
}

export const hasTaskset = spawnSync('taskset', ['-V']).status === 0;
/** Clock ticks per second of /proc's CPU times. */
export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
export const squidBinary = ['/usr/sbin/squid', '/usr/local/sbin/squid'].find((p) => existsSync(p));
export const nginxBinary = ['/usr/sbin/nginx', '/usr/local/sbin/nginx'].find((p) => existsSync(p));

/** Run `cmd args` with a raised open-files limit, pinned to `core` if possible. */
function launch(cmd: string, args: string[], core: number | undefined, env: NodeJS.ProcessEnv = process.env): ChildProcess {
  const pin = hasTaskset && core !== undefined ? `exec taskset -c ${core} "$0" "$@"` : 'exec "$0" "$@"';
  return spawn('bash', ['-c', `ulimit -n 65536 2>/dev/null || ulimit -n 4096; ${pin}`, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env });
}

async function waitForPort(port: number, child: ChildProcess, stderr: () => string, ms = 20_000): Promise<void> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    if (child.exitCode !== null) throw new Error(`proxy exited (${child.exitCode}): ${stderr().slice(-2000)}`);
    const ok = await new Promise<boolean>((r) => {
      const s = connect({ port, host: '127.0.0.1' }, () => {
        s.destroy();
        r(true);
      });
      s.on('error', () => r(false));
    });
    if (ok) return;
    await sleep(100);
  }
  throw new Error(`proxy did not listen on ${port}: ${stderr().slice(-2000)}`);
}

/** A launched proxy once it listens: its stderr (and `log`, if given) explain a failed start. */
async function running(name: string, port: number, child: ChildProcess, log?: string): Promise<Target> {
  let err = '';
  child.stderr!.on('data', (c) => (err += c));
  await waitForPort(port, child, () => err + (log ? readSafe(log) : ''));
  return { name, url: `http://127.0.0.1:${port}`, pid: child.pid, stop: () => stopChild(child) };
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode) return;
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await new Promise((r) => child.once('exit', r));
  clearTimeout(t);
}

/**
 * Node's compile cache, warmed before cuttle starts, as docker/cuttle.service and the Dockerfile do: the
 * measured process never loads the TypeScript stripper (production RSS, not a first run's).
 */
function warmCompileCache(): NodeJS.ProcessEnv {
  const env = { ...process.env, NODE_COMPILE_CACHE: join(tmpdir(), 'cuttle-bench-compile-cache') };
  const r = spawnSync(process.execPath, ['src/main.ts', '--version'], { env, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`node src/main.ts --version failed: ${r.stderr}`);
  return env;
}

export async function startCuttle(port: number, opts: { memoryCache: string; extra?: string[]; core?: number }): Promise<Target> {
  const dir = mkdtempSync(join(tmpdir(), 'cuttle-bench-'));
  const env = warmCompileCache();
  const args = ['--max-semi-space-size=8', 'src/main.ts', '--listen', `127.0.0.1:${port}`, '--cache-dir', join(dir, 'cache'), '--allow-local-dest', '127.0.0.1', '--access-log', join(dir, 'access.log'), '--memory-cache', opts.memoryCache, '--log-level', 'warn', '--admin-listen', 'none', ...(opts.extra ?? [])];
  return running('cuttle', port, launch(process.execPath, args, opts.core ?? 0, env));
}

/**
 * The ceiling of a hit in Node: a bare node:http server on the same Node as cuttle, answering every
 * request with the hot object from memory and a hit's head fields. It caches, checks and logs nothing:
 * cuttle's distance from it is cuttle's own work per request, the rest is Node's. Hot scenarios only.
 */
export async function startNodeHttp(port: number, opts: { bodyBytes: number; core?: number }): Promise<Target> {
  const script = `const b = Buffer.alloc(${opts.bodyBytes}, 7);
require('node:http').createServer({ keepAliveTimeout: 60000 }, (req, res) => {
  req.resume();
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'cache-control': 'max-age=3600', 'content-length': String(b.length), via: '1.1 bench (cuttle/0.1.0)', 'x-cache': 'HIT from bench', age: '1' });
  res.end(b);
}).listen(${port}, '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));`;
  return running('node-http', port, launch(process.execPath, ['-e', script], opts.core ?? 0));
}

/** frontier-squid-like settings (cpt-squid.rst): collapsed forwarding, no minimum expiry, 1 GB objects. */
export function squidConfig(port: number, dir: string, memoryCacheMB: number): string {
  return [
    `http_port 127.0.0.1:${port}`,
    'acl localnet src 127.0.0.0/8',
    'acl Safe_ports port 80 8000 8080 1025-65535',
    'http_access deny !Safe_ports',
    'http_access allow localnet',
    'http_access deny all',
    'collapsed_forwarding on',
    'minimum_expiry_time 0',
    `cache_mem ${memoryCacheMB} MB`,
    'maximum_object_size_in_memory 1 MB',
    'maximum_object_size 1 GB',
    `cache_dir ufs ${join(dir, 'cache')} 10000 16 256`,
    'quick_abort_min 0 KB',
    'quick_abort_max 0 KB',
    'negative_ttl 1 minute',
    'max_filedescriptors 65536',
    'shutdown_lifetime 1 seconds',
    'client_persistent_connections on',
    'server_persistent_connections on',
    `pid_filename ${join(dir, 'squid.pid')}`,
    `cache_log ${join(dir, 'cache.log')}`,
    `access_log ${join(dir, 'access.log')} squid`,
    `coredump_dir ${dir}`,
    'cache_effective_user proxy',
    'via on',
    'forwarded_for on',
    '',
  ].join('\n');
}

export async function startSquid(port: number, opts: { memoryCacheMB: number; core?: number }): Promise<Target> {
  if (!squidBinary) throw new Error('squid is not installed (apt-get install squid)');
  const dir = mkdtempSync(join(tmpdir(), 'squid-bench-'));
  mkdirSync(join(dir, 'cache'));
  const conf = join(dir, 'squid.conf');
  writeFileSync(conf, squidConfig(port, dir, opts.memoryCacheMB));
  for (const p of [dir, join(dir, 'cache')]) {
    try {
      chownSync(p, uidOf('proxy'), gidOf('proxy'));
    } catch {
      /* not root: squid runs as ourselves */
    }
  }
  const z = spawnSync(squidBinary, ['-N', '-z', '-f', conf], { encoding: 'utf8' });
  if (z.status !== 0) throw new Error(`squid -z failed: ${z.stderr}${readSafe(join(dir, 'cache.log'))}`);
  return running('squid', port, launch(squidBinary, ['-N', '-f', conf], opts.core ?? 0), join(dir, 'cache.log'));
}

/**
 * nginx as a caching proxy in front of one origin: the reference for per-core efficiency (issue 13).
 * One process (no master), so its CPU and RSS are one pid's. proxy_cache_lock is nginx's coalescing;
 * the access log is on, as cuttle's and Squid's are. nginx is a reverse proxy: it takes the absolute-
 * form request line and serves the path from `origin`, so it fits scenarios with a single origin.
 */
export function nginxConfig(port: number, dir: string, origin: string): string {
  const up = new URL(origin).host;
  return `daemon off;
master_process off;
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log ${join(dir, 'error.log')} warn;
worker_rlimit_nofile 65536;
events { worker_connections 65536; }
http {
  access_log ${join(dir, 'access.log')};
  client_body_temp_path ${join(dir, 'body')};
  proxy_temp_path ${join(dir, 'proxy')};
  fastcgi_temp_path ${join(dir, 'fastcgi')};
  uwsgi_temp_path ${join(dir, 'uwsgi')};
  scgi_temp_path ${join(dir, 'scgi')};
  proxy_cache_path ${join(dir, 'cache')} levels=1:2 keys_zone=cuttle_bench:64m max_size=10g inactive=1d use_temp_path=off;
  upstream origin { server ${up}; keepalive 64; }
  server {
    listen 127.0.0.1:${port} backlog=65535;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache cuttle_bench;
      proxy_cache_key $uri$is_args$args;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 600s;
      proxy_cache_lock_age 600s;
      proxy_max_temp_file_size 0;
    }
  }
}
`;
}

export async function startNginx(port: number, opts: { origin: string; core?: number }): Promise<Target> {
  if (!nginxBinary) throw new Error('nginx is not installed (apt-get install nginx-light)');
  const dir = mkdtempSync(join(tmpdir(), 'nginx-bench-'));
  const conf = join(dir, 'nginx.conf');
  writeFileSync(conf, nginxConfig(port, dir, opts.origin));
  return running('nginx', port, launch(nginxBinary, ['-c', conf, '-p', dir, '-e', join(dir, 'error.log')], opts.core ?? 0), join(dir, 'error.log'));
}

function readSafe(p: string): string {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return '';
  }
}

function idOf(file: string, name: string): number {
  const line = readFileSync(file, 'utf8').split('\n').find((l) => l.startsWith(`${name}:`));
  return line ? Number(line.split(':')[2]) : process.getuid?.() ?? 0;
}
const uidOf = (n: string) => idOf('/etc/passwd', n);
const gidOf = (n: string) => idOf('/etc/group', n);

export function externalTarget(url: string): Target {
  return { name: url, url, pid: undefined, stop: async () => {} };
}

/** The real process behind a launcher shell (bash execs, so it is the same pid). */
export function procStats(pid: number | undefined): { cpuS: number; peakRssMiB: number } {
  if (!pid) return { cpuS: NaN, peakRssMiB: NaN };
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const hwm = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? NaN);
    return { cpuS: ticks / CLK_TCK, peakRssMiB: hwm / 1024 };
  } catch {
    return { cpuS: NaN, peakRssMiB: NaN };
  }
}
