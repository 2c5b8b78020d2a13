// --workers 2: two event loops on one port. Each key has one owner worker: a herd spread over both
// workers' connections costs one upstream fetch per object; hits, PURGE, the access log, /status and
// /metrics cover the whole process; a stop drains both.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { casBodies, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';
import { get, memoryLogger, startChildProxy, tmpDir, type ChildProxy } from '../helpers/proxy.ts';
import { buildConfig } from '../../src/config.ts';
import { startWorkers } from '../../src/workers.ts';

interface Status {
  counters: { requests: number; hits: number };
  workers: { index: number; running: boolean; requests: number | null }[];
  upstream: { fetches: number };
}

describe('workers: one owner per key across event loops', () => {
  const bodies = casBodies(Array.from({ length: 30 }, (_, i) => 3000 + 997 * i));
  const paths = [...bodies.keys()];
  let mirror: TestMirror;
  let proxy: ChildProxy;
  let admin: string;
  let log: string;
  // Many connections, so the kernel spreads them over both workers' sockets.
  const pools: Pool[] = [];
  let sent = 0;
  before(async () => {
    [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
    const dir = tmpDir();
    log = join(dir, 'access.log');
    proxy = await startChildProxy(['--workers', '2', '--listen', '127.0.0.1:0', '--cache-dir', join(dir, 'cache'), '--stratum1', mirror.url, '--access-log', log, '--visible-hostname', 'w-test']);
    admin = `http://127.0.0.1:${/"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]}`;
    for (let i = 0; i < 16; i++) pools.push(new Pool(proxy.url, { connections: 1, pipelining: 1 }));
  });
  after(async () => {
    for (const p of pools) await p.close();
    assert.equal(await proxy.stop(), 0, 'a stop drains every worker and exits 0');
    await mirror.stop();
  });

  const status = async () => (await (await fetch(`${admin}/status`)).json()) as Status;

  it('a herd over both workers fetches each object once', async () => {
    await Promise.all(
      paths.flatMap((p) =>
        pools.map(async (pool) => {
          const r = await get(pool, `${mirror.url}${p}`);
          sent++;
          assert.equal(r.status, 200);
          assert.ok(r.body.equals(bodies.get(p)!), 'the exact bytes');
        }),
      ),
    );
    for (const p of paths) assert.equal(mirror.count(p), 1, `${p}: one upstream fetch across the workers`);
    const s = await status();
    assert.equal(s.workers.length, 2);
    assert.ok(s.workers.every((w) => w.running && (w.requests ?? 0) > 0), `both workers served clients: ${JSON.stringify(s.workers)}`);
    assert.equal(s.counters.requests, sent, 'relays between workers are not counted as requests');
    assert.equal(s.upstream.fetches >= paths.length, true);
  });

  it('hits are served by whichever worker takes them; nothing is fetched again', async () => {
    for (const p of paths) for (const pool of pools.slice(0, 4)) assert.equal((await get(pool, `${mirror.url}${p}`)).status, 200), sent++;
    for (const p of paths) assert.equal(mirror.count(p), 1);
    const s = await status();
    assert.equal(s.counters.requests, sent);
    assert.ok(s.counters.hits >= paths.length * 4, 'every second pass is a hit');
  });

  it('a PURGE through any worker reaches the owner: the next request is fetched again', async () => {
    const p = paths[0]!;
    const r = await get(pools[5]!, `${mirror.url}${p}`, {}, 'PURGE');
    sent++;
    assert.equal(r.status, 200);
    await Promise.all(pools.map(async (pool) => (await get(pool, `${mirror.url}${p}`)).status === 200 && sent++));
    assert.equal(mirror.count(p), 2, 'fetched once more, once');
  });

  it('the access log has one line per client request, and /metrics sums the workers', async () => {
    await waitFor('the access log to hold every request', () => readFileSync(log, 'utf8').split('\n').filter(Boolean).length >= sent);
    assert.equal(readFileSync(log, 'utf8').split('\n').filter(Boolean).length, sent);
    const text = await (await fetch(`${admin}/metrics`)).text();
    assert.match(text, new RegExp(`cuttle_requests_counted_total\\{counter="requests"\\} ${sent}\\n`));
    assert.match(text, /cuttle_workers 2\n/);
    assert.equal((await fetch(`${admin}/readyz`)).status, 200);
    // A manifest is a key like any other: one owner, one fetch.
    const m = `/cvmfs/${REPO}/.cvmfspublished`;
    await Promise.all(pools.map((pool) => get(pool, `${mirror.url}${m}`)));
    assert.equal(mirror.count(m), 1);
  });
});

describe('workers: a worker that dies', () => {
  it('is restarted; meanwhile its keys are fetched by the others, and it takes them back', async () => {
    const bodies = casBodies(Array.from({ length: 20 }, (_, i) => 5000 + 31 * i));
    const paths = [...bodies.keys()];
    const [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
    const dir = tmpDir();
    const { logger, logs } = memoryLogger();
    const raw = { workers: 2, listen: ['127.0.0.1:0'], 'cache-dir': join(dir, 'cache'), stratum1: [mirror.url], 'access-log': 'none', 'admin-listen': '127.0.0.1:0', 'visible-hostname': 'w-crash', 'log-level': 'warn' };
    const set = await startWorkers(buildConfig(raw), raw, logger);
    const url = `http://127.0.0.1:${set.addresses[0]!.port}`;
    const pools = Array.from({ length: 8 }, () => new Pool(url, { connections: 1, pipelining: 1 }));
    const admin = `http://127.0.0.1:${set.adminAddress()!.port}`;
    try {
      const half = paths.slice(0, 10);
      await Promise.all(half.flatMap((p) => pools.map((pool) => get(pool, `${mirror.url}${p}`))));
      await set.thread(1)!.terminate(); // as a crash would end it
      await waitFor('worker 1 restarted and serving', async () => set.restarts(1) === 1 && set.thread(1) !== undefined);
      // Every object, old and new, through both workers again: no error, one fetch each.
      for (const p of paths) {
        const rs = await Promise.all(pools.map((pool) => get(pool, `${mirror.url}${p}`)));
        assert.ok(rs.every((r) => r.status === 200 && r.body.equals(bodies.get(p)!)), p);
      }
      for (const p of paths.slice(10)) assert.equal(mirror.count(p), 1, `${p}: fetched once`);
      const s = (await (await fetch(`${admin}/status`)).json()) as { workers: { running: boolean; restarts: number }[] };
      assert.deepEqual(s.workers.map((w) => [w.running, w.restarts]), [[true, 0], [true, 1]]);
      assert.ok(logs.some((l) => l.msg === 'worker exited; restarting it'));
    } finally {
      for (const p of pools) await p.close();
      await set.close(1000);
      await mirror.stop();
    }
  });
});
