// Operating cuttle: metrics move with traffic, readiness, SIGHUP reload, SIGTERM drain, log reopen.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { userInfo } from 'node:os';
import { requireTool } from '../helpers/tools.ts';
import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { Pool } from 'undici';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, startProxy, tmpDir } from '../helpers/proxy.ts';
import { buildConfig } from '../../src/config.ts';

function metric(text: string, name: string, labels = ''): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels ? `{${labels}}` : ''} `));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function adminGet(port: number, path: string): Promise<{ status: number; text: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, text: await res.text() };
}

describe('operations', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin({ '/m': { headers: { 'cache-control': 'max-age=60', 'content-type': 'text/plain' }, body: 'metric me' } });
  });
  after(() => origin.close());

  it('metrics count a MISS, a MEM_HIT and a DENIED; healthz and readyz answer', async () => {
    const p = await startProxy({ 'allow-client': ['127.0.0.1/32'] });
    const admin = p.proxy.adminAddress()!.port;
    const c = proxyClient(p.url);
    await get(c, `${origin.url}/m`);
    await get(c, `${origin.url}/m`);
    const denied = new Pool(p.url, { localAddress: '127.0.0.2' });
    await get(denied, `${origin.url}/m`);
    const m = (await adminGet(admin, '/metrics')).text;
    assert.equal(metric(m, 'cuttle_requests_total', 'result="MISS",method="GET"'), 1);
    assert.equal(metric(m, 'cuttle_requests_total', 'result="MEM_HIT",method="GET"'), 1);
    assert.equal(metric(m, 'cuttle_requests_total', 'result="DENIED",method="GET"'), 1);
    assert.equal(metric(m, 'cuttle_errors_total', 'error="http_request_denied"'), 1);
    assert.equal(metric(m, 'cuttle_upstream_fetches_total'), 1);
    assert.equal(metric(m, 'cuttle_served_bytes_total', 'tier="memory"'), 9);
    assert.equal(metric(m, 'cuttle_cache_objects', 'tier="memory"'), 1);
    assert.match(m, /cuttle_process_nodejs_eventloop_lag_seconds/);
    // The duration histogram: one observation per request, by result group, every one under +Inf.
    assert.match(m, /^# TYPE cuttle_request_duration_seconds histogram$/m);
    for (const group of ['MISS', 'MEM_HIT', 'DENIED']) {
      assert.equal(metric(m, 'cuttle_request_duration_seconds_count', `result="${group}"`), 1, group);
      assert.equal(metric(m, 'cuttle_request_duration_seconds_bucket', `le="+Inf",result="${group}"`), 1, group);
    }
    assert.equal((await adminGet(admin, '/healthz')).status, 200);
    await p.proxy.disk.loaded;
    assert.equal((await adminGet(admin, '/readyz')).status, 200);
    const status = JSON.parse((await adminGet(admin, '/status')).text);
    assert.equal(status.counters.requests, 3);
    // One counter table: Prometheus shows the very numbers /status (and SNMP) show.
    for (const k of ['requests', 'hits', 'memHits', 'misses', 'denied', 'errors']) assert.equal(metric(m, 'cuttle_requests_counted_total', `counter="${k}"`), status.counters[k], k);
    assert.deepEqual([status.counters.hits, status.counters.misses, status.counters.denied], [1, 1, 1]);
    await c.close();
    await denied.close();
    await p.close();
  });

  it('the admin listener answers only --allow-admin clients, and a reload changes the list', async () => {
    const p = await startProxy({ 'allow-admin': ['127.0.0.1/32'] });
    const url = `http://127.0.0.1:${p.proxy.adminAddress()!.port}`;
    const outsider = new Pool(url, { localAddress: '127.0.0.2' });
    const denied = await outsider.request({ path: '/status', method: 'GET' });
    assert.equal(denied.statusCode, 403);
    assert.match(await denied.body.text(), /not open to 127\.0\.0\.2: see --allow-admin/);
    assert.equal((await adminGet(p.proxy.adminAddress()!.port, '/metrics')).status, 200);
    p.proxy.reload({ ...p.proxy.config, allowAdmin: buildConfig({ 'allow-admin': ['127.0.0.0/8'] }).allowAdmin });
    const allowed = await outsider.request({ path: '/metrics', method: 'GET' });
    assert.equal(allowed.statusCode, 200);
    await allowed.body.dump();
    assert.equal(p.proxy.counters.requests, 0, 'admin requests are not proxy requests');
    await outsider.close();
    await p.close();
  });

  it('--pid-file holds the pid while cuttle runs and is removed when it stops', async () => {
    const pidFile = join(tmpDir(), 'cuttle.pid');
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]);
    assert.equal(readFileSync(pidFile, 'utf8'), `${proxy.child.pid}\n`);
    assert.equal(await proxy.stop(), 0);
    assert.equal(existsSync(pidFile), false);
  });

  it('PURGE removes a stored object for an allowed client and is denied to others', async () => {
    const p = await startProxy({ 'allow-purge': ['127.0.0.1/32'] });
    const c = proxyClient(p.url);
    const n = origin.count('/m');
    await get(c, `${origin.url}/m`);
    const other = new Pool(p.url, { localAddress: '127.0.0.3' });
    const denied = await get(other, `${origin.url}/m`, {}, 'PURGE');
    assert.equal(denied.status, 403);
    assert.match(String(denied.headers['proxy-status']), /error=http_request_denied/);
    assert.match(String((await get(c, `${origin.url}/m`)).headers['x-cache']), /^HIT/, 'still stored');
    assert.equal((await get(c, `${origin.url}/m`, {}, 'PURGE')).status, 200);
    assert.equal((await get(c, `${origin.url}/m`, {}, 'PURGE')).status, 404, 'already gone');
    assert.match(String((await get(c, `${origin.url}/m`)).headers['x-cache']), /^MISS/);
    assert.equal(origin.count('/m'), n + 2);
    await other.close();
    await c.close();
    await p.close();
  });

  it('SIGHUP applies a valid config live (ACL) and keeps the old one when the new file is bad', async () => {
    const dir = tmpDir();
    const file = join(dir, 'cuttle.yaml');
    writeFileSync(file, `listen: 127.0.0.1:0\ncache-dir: ${join(dir, 'cache')}\nallow-local-dest: [127.0.0.1]\n`);
    const proxy = await startChildProxy(['--config', file]);
    const c = proxyClient(proxy.url);
    assert.equal((await get(c, `${origin.url}/m`)).status, 200);
    writeFileSync(file, `listen: 127.0.0.1:0\ncache-dir: ${join(dir, 'cache')}\nallow-local-dest: [127.0.0.1]\nallow-client: [10.0.0.0/8]\nmemory-cache: 64MB\n`);
    proxy.child.kill('SIGHUP');
    await waitFor('the reload applied', () => /configuration reloaded/.test(proxy.stderr()));
    assert.equal((await get(c, `${origin.url}/m`)).status, 403, 'the new ACL is live');
    // Options that need a restart are named as the admin wrote them.
    assert.match(proxy.stderr(), /"options":\["memory-cache"\],"msg":"reload: memory-cache takes effect only after a restart"/);
    writeFileSync(file, 'allow-client: [not-a-cidr]\n');
    proxy.child.kill('SIGHUP');
    await waitFor('the reload rejected', () => /reload rejected/.test(proxy.stderr()));
    assert.equal((await get(c, `${origin.url}/m`)).status, 403, 'the running ACL stays');
    await c.close();
    assert.equal(await proxy.stop(), 0);
  });

  it('SIGTERM during a large transfer: the transfer completes, readyz says draining, and the exit code is 0', async () => {
    const body = randomBytes(8 * 1024 * 1024);
    const g = gate();
    origin.route('/large', { headers: { 'cache-control': 'max-age=60' }, body, bodyGate: { after: 2 * 1024 * 1024, gate: g } });
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--allow-local-dest', '127.0.0.1']);
    const adminPort = Number(/"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]);
    const c = proxyClient(proxy.url);
    const transfer = get(c, `${origin.url}/large`);
    await waitFor('the transfer mid-body', () => g.waiting === 1);
    proxy.child.kill('SIGTERM');
    await waitFor('draining', () => /draining, then shutting down/.test(proxy.stderr()));
    assert.equal((await adminGet(adminPort, '/readyz')).status, 503);
    g.open();
    const r = await transfer;
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(body), 'the whole body arrived');
    const [code] = await new Promise<[number | null]>((resolve) => proxy.child.once('exit', (code) => resolve([code])));
    assert.equal(code, 0);
    assert.equal(origin.count('/large'), 1);
    await c.close();
  });

  it('--access-log-format frontier writes the lines WLCG awstats and failover monitoring parse', async () => {
    const dir = tmpDir();
    const log = join(dir, 'access.log');
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(dir, 'c'), '--allow-local-dest', '127.0.0.1', '--access-log', log, '--access-log-format', 'frontier']);
    const c = proxyClient(proxy.url);
    await get(c, `${origin.url}/m?frontier`, { 'user-agent': 'cvmfs Fuse 2.11.5', 'cvmfs-info': 'atlas.cern.ch:/software' });
    await get(c, `${origin.url}/m?frontier`, { 'user-agent': 'cvmfs Fuse 2.11.5' });
    await c.close();
    assert.equal(await proxy.stop(), 0);
    const lines = readFileSync(log, 'utf8').trim().split('\n');
    assert.equal(lines.length, 2);
    const date = '\\[\\d{2}/[A-Z][a-z]{2}/\\d{4}:\\d{2}:\\d{2}:\\d{2}\\.\\d{3} [+-]\\d{4}\\]'; // local time (access-log.test.ts)
    assert.match(lines[0]!, new RegExp(`^127\\.0\\.0\\.1 - - ${date} "GET ${origin.url.replace(/\./g, '\\.')}/m\\?frontier HTTP/1\\.1" 200 \\d{3} TCP_MISS:HIER_DIRECT \\d+ "- atlas\\.cern\\.ch:/software" "-" "cvmfs Fuse 2\\.11\\.5"$`));
    assert.match(lines[1]!, / 200 \d{3} TCP_MEM_HIT:HIER_NONE \d+ "- -" "-" "cvmfs Fuse 2\.11\.5"$/);
    assert.equal(origin.count('/m?frontier'), 1);
  });

  it('SIGUSR1 reopens the access log: after a rename, new lines go to the new file', async () => {
    const dir = tmpDir();
    const log = join(dir, 'access.log');
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(dir, 'c'), '--allow-local-dest', '127.0.0.1', '--access-log', log]);
    const c = proxyClient(proxy.url);
    await get(c, `${origin.url}/m?one`);
    await waitFor('the first line written', () => existsSync(log) && /\?one/.test(readFileSync(log, 'utf8')));
    renameSync(log, `${log}.1`);
    proxy.child.kill('SIGUSR1');
    await waitFor('the log reopened', () => /access log reopened/.test(proxy.stderr()));
    await get(c, `${origin.url}/m?two`);
    await c.close();
    assert.equal(await proxy.stop(), 0);
    assert.match(readFileSync(`${log}.1`, 'utf8'), /\?one/);
    assert.ok(existsSync(log));
    const fresh = readFileSync(log, 'utf8');
    assert.match(fresh, /\?two/);
    assert.doesNotMatch(fresh, /\?one/);
  });

  it('the shipped logrotate snippet rotates the access log under a running cuttle (rename, then SIGUSR1 by pid file)', async (t) => {
    const logrotate = requireTool(t, ['logrotate', '/usr/sbin/logrotate'], 'logrotate');
    if (!logrotate) return;
    const dir = tmpDir();
    const log = join(dir, 'access.log');
    const pidFile = join(dir, 'cuttle.pid');
    const conf = join(dir, 'logrotate.conf');
    const user = userInfo().username;
    writeFileSync(conf, readFileSync('docker/cuttle.logrotate', 'utf8').replaceAll('/var/log/cuttle/access.log', log).replaceAll('/run/cuttle/cuttle.pid', pidFile).replace('su cuttle cuttle', `su ${user} ${user}`));
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(dir, 'c'), '--allow-local-dest', '127.0.0.1', '--access-log', log, '--pid-file', pidFile]);
    const c = proxyClient(proxy.url);
    await get(c, `${origin.url}/m?before`);
    await waitFor('the first line written', () => existsSync(log) && /\?before/.test(readFileSync(log, 'utf8')));
    const r = spawnSync(logrotate, ['-f', '-s', join(dir, 'state'), conf], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    await waitFor('the log reopened', () => /access log reopened/.test(proxy.stderr()));
    await get(c, `${origin.url}/m?after`);
    await c.close();
    assert.equal(await proxy.stop(), 0);
    assert.match(readFileSync(`${log}.1`, 'utf8'), /\?before/);
    assert.doesNotMatch(readFileSync(`${log}.1`, 'utf8'), /\?after/);
    assert.match(readFileSync(log, 'utf8'), /\?after/);
  });
});

describe('start-up failures', () => {
  it('a listener that cannot be bound after the first (admin, a second --listen) exits non-zero, closing what it opened', async () => {
    const busy = createServer();
    await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
    const port = (busy.address() as AddressInfo).port;
    try {
      for (const extra of [['--admin-listen', `127.0.0.1:${port}`], ['--listen', `127.0.0.1:${port}`, '--admin-listen', 'none']]) {
        const child = spawn(process.execPath, ['src/main.ts', '--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--access-log', 'none', ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        child.stderr!.on('data', (c) => (err += c));
        const [code] = await once(child, 'exit');
        assert.equal(code, 1, err);
        assert.match(err, /cannot listen on .*EADDRINUSE/);
      }
    } finally {
      busy.close();
    }
  });

  it('a second cuttle on the port of a running one fails to listen, although cuttle shares its port among its own sockets (SO_REUSEPORT)', async () => {
    const first = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c')]);
    try {
      const child = spawn(process.execPath, ['src/main.ts', '--listen', `127.0.0.1:${first.port}`, '--cache-dir', join(tmpDir(), 'c'), '--access-log', 'none', '--admin-listen', 'none'], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      child.stderr!.on('data', (c) => (err += c));
      const [code] = await once(child, 'exit');
      assert.equal(code, 1, err);
      assert.match(err, /cannot listen on .*EADDRINUSE/);
      const r = await fetch(`${first.url}/`).catch(() => undefined);
      assert.ok(r, 'the first still answers on its port');
    } finally {
      await first.stop();
    }
  });

  it('a second cuttle on the same --cache-dir is refused; a lock left by a killed one is taken over', async () => {
    const cacheDir = join(tmpDir(), 'c');
    const first = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', cacheDir]);
    const second = spawn(process.execPath, ['src/main.ts', '--listen', '127.0.0.1:0', '--admin-listen', 'none', '--cache-dir', cacheDir, '--access-log', 'none'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    second.stderr!.on('data', (c) => (err += c));
    const [code] = await once(second, 'exit');
    assert.equal(code, 1, err);
    assert.match(err, new RegExp(`in use by another cuttle \\(pid ${first.child.pid}`));
    await first.stop('SIGKILL');
    const third = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', cacheDir]);
    assert.equal(await third.stop(), 0, 'the stale lock was taken over');
  });

  it('a size without a unit is refused, naming its key and the units', async () => {
    const child = spawn(process.execPath, ['src/main.ts', '--check-config', '--disk-cache', '200000'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (c) => (err += c));
    const [code] = await once(child, 'exit');
    assert.equal(code, 2);
    assert.match(err, /disk-cache: expected a size with its unit \(B, KB, MB, GB or TB/);
    assert.doesNotMatch(err, /max-object-size/);
  });
});
