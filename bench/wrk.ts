// Hit throughput with wrk (Debian package): one C thread drives far more requests per core than a Node
// load generator, so the proxy, not the generator, is what is measured. wrk has no forward-proxy mode;
// its Lua script sends the absolute-form request line a proxy expects. The generator's own CPU time is
// read from the launching shell (a waited-for child's time lands in its cutime/cstime), so every figure
// says whether the generator, rather than the proxy, was the limit.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLK_TCK, hasTaskset } from './targets.ts';

export const wrkBinary = spawnSync('sh', ['-c', 'command -v wrk'], { encoding: 'utf8' }).stdout.trim() || undefined;

/** Above this share of its core the generator, not the proxy, may be the limit: no ratio is printed. */
export const GENERATOR_SATURATED = 0.9;

export interface WrkResult {
  connections: number;
  reqPerSec: number;
  mibPerSec: number;
  errors: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
  /** Generator CPU time over wall time: 1 is a full core. */
  generatorShare: number;
}

function script(url: string): string {
  const u = new URL(url);
  return `wrk.method = "GET"
wrk.path = "${u.href}"
wrk.headers["Host"] = "${u.host}"
done = function(s, lat, req)
  io.write(string.format('WRKJSON {"requests":%d,"bytes":%d,"durationUs":%d,"errors":%d,"p50":%f,"p99":%f}\\n',
    s.requests, s.bytes, s.duration, s.errors.connect + s.errors.read + s.errors.write + s.errors.status + s.errors.timeout,
    lat:percentile(50), lat:percentile(99)))
end
`;
}

/** A load generator's standard output, once it has exited 0 (else its output in the error). */
export function outputOf(what: string, cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('exit', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`${what} failed (${code}): ${stderr}${stdout}`))));
  });
}

/** Run wrk (one thread, on `core`) against `proxy` for `url`. */
export async function runWrk(o: { proxy: string; url: string; connections: number; seconds: number; core?: number }): Promise<WrkResult> {
  if (!wrkBinary) throw new Error('the hot scenarios need wrk: apt-get install wrk');
  const dir = mkdtempSync(join(tmpdir(), 'cuttle-wrk-'));
  const lua = join(dir, 'proxy.lua');
  writeFileSync(lua, script(o.url));
  const pin = hasTaskset && o.core !== undefined ? `taskset -c ${o.core} ` : '';
  const cmd = `ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; ${pin}"$0" -t1 -c${o.connections} -d${o.seconds}s --timeout 10s -s "$1" "$2"; s=$?; read -a f < /proc/$$/stat; echo "CPUTICKS $((f[15] + f[16]))"; exit $s`;
  try {
    const out = await outputOf('wrk', 'bash', ['-c', cmd, wrkBinary, lua, o.proxy]);
    const json = /WRKJSON (\{.*\})/.exec(out)?.[1];
    const ticks = Number(/CPUTICKS (\d+)/.exec(out)?.[1]);
    if (!json) throw new Error(`no summary from wrk: ${out}`);
    const s = JSON.parse(json) as { requests: number; bytes: number; durationUs: number; errors: number; p50: number; p99: number };
    const wallS = s.durationUs / 1e6;
    return {
      connections: o.connections,
      reqPerSec: s.requests / wallS,
      mibPerSec: s.bytes / 2 ** 20 / wallS,
      errors: s.errors,
      latencyP50Ms: s.p50 / 1000,
      latencyP99Ms: s.p99 / 1000,
      generatorShare: ticks / CLK_TCK / wallS,
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
