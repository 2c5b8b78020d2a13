// The proxies under test: cuttle (started here), Squid from Debian with a frontier-squid-like config
// (started here), or any running forward proxy given by URL. Each proxy is pinned to core 0 where
// `taskset` exists, and its CPU time and peak RSS are read from /proc.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chownSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface Target {
  name: string;
  url: string;
  pid: number | undefined;
  /** Processes outside `pid`'s tree whose work is the proxy's too (Varnish's log writer). */
  extraPids?: () => number[];
  stop(): Promise<void>;
}

export const hasTaskset = spawnSync('taskset', ['-V']).status === 0;
/** Clock ticks per second of /proc's CPU times. */
export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
export const squidBinary = ['/usr/sbin/squid', '/usr/local/sbin/squid'].find((p) => existsSync(p));
export const nginxBinary = ['/usr/sbin/nginx', '/usr/local/sbin/nginx'].find((p) => existsSync(p));
export const varnishBinary = ['/usr/sbin/varnishd', '/usr/local/sbin/varnishd'].find((p) => existsSync(p));
export const atsBinary = ['/usr/bin/traffic_server', '/usr/local/bin/traffic_server'].find((p) => existsSync(p));
const atsConfigDir = '/etc/trafficserver';
const varnishncsaBinary = ['/usr/bin/varnishncsa', '/usr/local/bin/varnishncsa'].find((p) => existsSync(p));

/** Run `cmd args` with a raised open-files limit, pinned to `core` if possible. */
function launch(cmd: string, args: string[], core: number | string | undefined, env: NodeJS.ProcessEnv = process.env): ChildProcess {
  const pin = hasTaskset && core !== undefined ? `exec taskset -c ${core} "$0" "$@"` : 'exec "$0" "$@"';
  return spawn('bash', ['-c', `ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; ${pin}`, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env });
}

async function waitForPort(port: number, child: ChildProcess, stderr: () => string, ms = 20_000, host = '127.0.0.1'): Promise<void> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    if (child.exitCode !== null) throw new Error(`proxy exited (${child.exitCode}): ${stderr().slice(-2000)}`);
    const ok = await new Promise<boolean>((r) => {
      const s = connect({ port, host }, () => {
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

/**
 * A launched proxy once it listens: its stderr (and `log`, if given) explain a failed start. Stopping it
 * (or a failed start) removes its temporary directory `dir`: a cache, a log and a config per run.
 */
async function running(name: string, port: number, child: ChildProcess, log?: string, dir?: string, host = '127.0.0.1'): Promise<Target> {
  let err = '';
  child.stderr!.on('data', (c) => (err += c));
  const stop = async () => {
    await stopChild(child);
    if (dir) rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitForPort(port, child, () => err + (log ? readSafe(log) : ''), 20_000, host);
  } catch (e) {
    await stop();
    throw e;
  }
  return { name, url: `http://${host}:${port}`, pid: child.pid, stop };
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode) return;
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await new Promise((r) => child.once('exit', r));
  clearTimeout(t);
}

/** The environment every shipped launcher gives cuttle (its shebang, `npm start`, the Dockerfile, the unit). */
export const SHIPPED_ENV = { GLIBC_TUNABLES: 'glibc.malloc.mmap_threshold=131072' };

/**
 * Node's compile cache, warmed before cuttle starts, as docker/cuttle.service and the Dockerfile do: the
 * measured process never loads the TypeScript stripper (production RSS, not a first run's).
 */
function warmCompileCache(): NodeJS.ProcessEnv {
  const env = { ...process.env, ...SHIPPED_ENV, NODE_COMPILE_CACHE: join(tmpdir(), 'cuttle-bench-compile-cache') };
  const r = spawnSync(process.execPath, ['src/main.ts', '--version'], { env, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`node src/main.ts --version failed: ${r.stderr}`);
  return env;
}

/** cuttle on host:port (host: 127.0.0.1 unless given; a bank's members listen on 127.0.0.2 and .3 too). */
export async function startCuttle(port: number, opts: { memoryCache: string; extra?: string[]; core?: number; host?: string; name?: string; admin?: number; dir?: string }): Promise<Target> {
  // `dir`: the caller's, kept at stop (rolling restarts keep their cache); else a fresh one, removed at stop.
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'cuttle-bench-'));
  const env = warmCompileCache();
  const host = opts.host ?? '127.0.0.1';
  // One event loop on one core unless the run asks for workers (--workers N: every core, unpinned).
  const extra = opts.extra ?? [];
  const at = extra.lastIndexOf('--workers');
  const workers = at < 0 ? 1 : Number(extra[at + 1]);
  const args = ['--max-semi-space-size=8', 'src/main.ts', '--listen', `${host}:${port}`, '--cache-dir', join(dir, 'cache'), '--allow-local-dest', '127.0.0.1', '--access-log', join(dir, 'access.log'), '--memory-cache', opts.memoryCache, '--log-level', 'warn', '--admin-listen', opts.admin ? `127.0.0.1:${opts.admin}` : 'none', ...(at < 0 ? ['--workers', '1'] : []), ...extra];
  // Workers get every core explicitly: the bench itself runs pinned to core 1, and a child inherits that.
  return running(opts.name ?? 'cuttle', port, launch(process.execPath, args, workers > 1 && opts.core === undefined ? `0-${availableParallelism() - 1}` : (opts.core ?? 0), env), undefined, opts.dir ? undefined : dir, host);
}

/**
 * The ceiling of a hit through node:http: a bare node:http server on the same Node as cuttle, answering
 * every request with the hot object from memory and a hit's head fields. It caches, checks and logs
 * nothing. (cuttle's hit lane skips node:http's per-request objects, so it can reach or pass it.)
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
export function squidConfig(port: number, dir: string, memoryCacheMB: number, visibleHostname?: string): string {
  return [
    // A parent needs its own name: Squid's default, the host name, is in the Via of a child on the same
    // host, and Squid would take the child's requests for a forwarding loop.
    ...(visibleHostname ? [`visible_hostname ${visibleHostname}`] : []),
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

export async function startSquid(port: number, opts: { memoryCacheMB: number; core?: number; visibleHostname?: string; name?: string }): Promise<Target> {
  if (!squidBinary) throw new Error('squid is not installed (apt-get install squid)');
  const dir = mkdtempSync(join(tmpdir(), 'squid-bench-'));
  mkdirSync(join(dir, 'cache'));
  const conf = join(dir, 'squid.conf');
  writeFileSync(conf, squidConfig(port, dir, opts.memoryCacheMB, opts.visibleHostname));
  for (const p of [dir, join(dir, 'cache')]) {
    try {
      chownSync(p, uidOf('proxy'), gidOf('proxy'));
    } catch {
      /* not root: squid runs as ourselves */
    }
  }
  const z = spawnSync(squidBinary, ['-N', '-z', '-f', conf], { encoding: 'utf8' });
  if (z.status !== 0) throw new Error(`squid -z failed: ${z.stderr}${readSafe(join(dir, 'cache.log'))}`);
  return running(opts.name ?? 'squid', port, launch(squidBinary, ['-N', '-f', conf], opts.core ?? 0), join(dir, 'cache.log'), dir);
}

/**
 * nginx as a caching proxy in front of one origin: the reference for per-core efficiency (issue 13).
 * One process (no master), so its CPU and RSS are one pid's. proxy_cache_lock is nginx's coalescing;
 * the access log is on, as cuttle's and Squid's are. The http block starts as Debian's own nginx.conf
 * does (`sendfile on; tcp_nopush on;`, types_hash_max_size): a hit then leaves the cache file by
 * sendfile(2), as on a Debian host; without it nginx copies through user space and its CPU is inflated.
 * nginx is a reverse proxy: it takes the absolute-form request line and serves the path from `origin`,
 * so it fits scenarios with a single origin.
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
  sendfile on;
  tcp_nopush on;
  types_hash_max_size 2048;
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
  return running('nginx', port, launch(nginxBinary, ['-c', conf, '-p', dir, '-e', join(dir, 'error.log')], opts.core ?? 0), join(dir, 'error.log'), dir);
}

/**
 * Varnish as a caching proxy in front of one origin, like nginx: the absolute-form request line is cut
 * to its path. Its VCL is the builtin one otherwise (it honours Cache-Control, and it coalesces a miss
 * into one fetch by itself). Varnish keeps its log in shared memory; varnishncsa writes it to a file as
 * the others write theirs, and its CPU is counted with Varnish's.
 */
export function varnishVcl(origin: string): string {
  const u = new URL(origin);
  return `vcl 4.1;
backend origin { .host = "${u.hostname}"; .port = "${u.port}"; }
sub vcl_recv {
  set req.url = regsub(req.url, "^[a-zA-Z]+://[^/]+", "");
  set req.http.host = "${u.host}";
}
`;
}

export async function startVarnish(port: number, opts: { origin: string; memoryCacheMB: number; core?: number }): Promise<Target> {
  if (!varnishBinary || !varnishncsaBinary) throw new Error('varnish is not installed (apt-get install varnish)');
  const dir = mkdtempSync(join(tmpdir(), 'varnish-bench-'));
  const vcl = join(dir, 'bench.vcl');
  writeFileSync(vcl, varnishVcl(opts.origin));
  const work = join(dir, 'work');
  // -j none: no privilege separation, so it runs from a temporary directory as whoever runs the bench.
  const child = launch(varnishBinary, ['-F', '-j', 'none', '-a', `127.0.0.1:${port}`, '-f', vcl, '-n', work, '-s', `malloc,${opts.memoryCacheMB}m`], opts.core ?? 0);
  const t = await running('varnish', port, child, undefined, dir);
  const ncsa = launch(varnishncsaBinary, ['-n', work, '-w', join(dir, 'access.log')], opts.core ?? 0);
  return { ...t, extraPids: () => (ncsa.pid ? [ncsa.pid] : []), stop: async () => { await stopChild(ncsa); await t.stop(); } };
}

/** The records.config lines that make Debian's Apache Traffic Server a one-core forward proxy on `port`. */
export function atsRecords(port: number, memoryCacheMB: number): Record<string, string> {
  return {
    'proxy.config.http.server_ports': `STRING ${port}:ip-in=127.0.0.1`,
    'proxy.config.url_remap.remap_required': 'INT 0', // a forward proxy: absolute-form URLs, no remap rules
    'proxy.config.exec_thread.autoconfig': 'INT 0',
    'proxy.config.exec_thread.limit': 'INT 1', // one event thread for the one core it is pinned to
    'proxy.config.accept_threads': 'INT 0',
    'proxy.config.task_threads': 'INT 1',
    'proxy.config.cache.ram_cache.size': `INT ${memoryCacheMB * 1024 * 1024}`,
    'proxy.config.admin.user_id': 'STRING #-1', // stay whoever runs the bench
  };
}

/**
 * Apache Traffic Server from Debian as a forward proxy, with Debian's configuration but one event thread,
 * a RAM cache the size of the others' memory cache and a 512 MB cache file, all in a temporary runroot. Its
 * squid-format access log is written as text, as the others write theirs.
 */
export async function startAts(port: number, opts: { memoryCacheMB: number; core?: number }): Promise<Target> {
  if (!atsBinary || !existsSync(atsConfigDir)) throw new Error('trafficserver is not installed (apt-get install trafficserver)');
  const dir = mkdtempSync(join(tmpdir(), 'ats-bench-'));
  const etc = join(dir, 'etc');
  for (const d of ['etc', 'cache', 'run', 'log', 'var']) mkdirSync(join(dir, d));
  cpSync(atsConfigDir, etc, { recursive: true });
  const records = atsRecords(port, opts.memoryCacheMB);
  const kept = readFileSync(join(atsConfigDir, 'records.config'), 'utf8').split('\n').filter((l) => !Object.keys(records).some((k) => l.includes(` ${k} `)));
  writeFileSync(join(etc, 'records.config'), [...kept, ...Object.entries(records).map(([k, v]) => `CONFIG ${k} ${v}`), ''].join('\n'));
  writeFileSync(join(etc, 'storage.config'), `${join(dir, 'cache')} 512M\n`);
  writeFileSync(join(etc, 'logging.yaml'), readFileSync(join(atsConfigDir, 'logging.yaml'), 'utf8').replace('mode: binary', 'mode: ascii'));
  const root = { prefix: '/usr', exec_prefix: '/usr', bindir: '/usr/bin', sbindir: '/usr/sbin', sysconfdir: etc, datadir: join(dir, 'cache'), includedir: '/usr/include', libdir: '/usr/lib/trafficserver', libexecdir: '/usr/lib/trafficserver/modules', localstatedir: join(dir, 'var'), runtimedir: join(dir, 'run'), logdir: join(dir, 'log'), cachedir: join(dir, 'cache') };
  const runroot = join(dir, 'runroot.yaml');
  writeFileSync(runroot, Object.entries(root).map(([k, v]) => `${k}: ${v}`).join('\n') + '\n');
  return running('ats', port, launch(atsBinary, [`--run-root=${runroot}`], opts.core ?? 0), join(dir, 'log', 'diags.log'), dir);
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

/**
 * CPU seconds and peak RSS of a proxy: its process (bash execs, so the launcher's pid is the proxy's),
 * every process under it (Varnish's worker, Squid's helpers) and its extra ones, summed.
 */
export function procStats(t: Pick<Target, 'pid' | 'extraPids'>): { cpuS: number; peakRssMiB: number } {
  if (!t.pid) return { cpuS: NaN, peakRssMiB: NaN };
  const seen = new Set<number>();
  const todo = [t.pid, ...(t.extraPids?.() ?? [])];
  let ticks = 0;
  let hwmKiB = 0;
  while (todo.length) {
    const pid = todo.pop()!;
    if (seen.has(pid)) continue;
    seen.add(pid);
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(fields[11]) + Number(fields[12]); // utime + stime
      hwmKiB += Number(/VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
      for (const c of readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').split(' ')) if (c.trim()) todo.push(Number(c));
    } catch {
      if (pid === t.pid) return { cpuS: NaN, peakRssMiB: NaN };
    }
  }
  return { cpuS: ticks / CLK_TCK, peakRssMiB: hwmKiB / 1024 };
}
