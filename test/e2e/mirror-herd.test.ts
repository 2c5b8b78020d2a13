// A herd of 500 clients while the nearest Stratum 1 is killed mid-run: zero client errors, zero corrupt
// bytes, at most two upstream requests per object (the broken one and its resume or failover).
// The nearest mirror is a scripted origin that holds the big object after its first MiB: it is killed
// once the proxy has the whole herd on that fill (state, not a slow mirror's pacing).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { startProxy, type TestProxy } from '../helpers/proxy.ts';
import { casBodies, healthy, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';

const CLIENTS = 500;

describe('mirror herd', () => {
  let nearest: Origin;
  let others: TestMirror[];
  let p: TestProxy;
  const big = casBodies([4 * 1024 * 1024], 'P');
  const small = casBodies(Array.from({ length: 20 }, (_, i) => 4096 + ((i * 7919) % 60_000)));
  const bodies = new Map([...big, ...small]);
  const held = gate(); // never opened: the nearest mirror dies with the big body part-sent
  before(async () => {
    const data = { 'content-type': 'application/x-cvmfs', 'cache-control': 'max-age=259200' };
    nearest = await startOrigin({
      [`/cvmfs/${REPO}/.cvmfspublished`]: { headers: { 'cache-control': 'max-age=61' }, body: `N${REPO}\n` },
      ...Object.fromEntries([...small].map(([path, body]) => [path, { headers: data, body }])),
      ...Object.fromEntries([...big].map(([path, body]) => [path, { headers: data, body, bodyGate: { after: 1024 * 1024, gate: held } }])),
    });
    others = await startMirrors(bodies, [40, 80]);
    p = await startProxy({ stratum1: [nearest.url, ...others.map((m) => m.url)], 'probe-interval': '200ms', 'probe-timeout': '1s', 'probe-repo': REPO });
    await waitFor('mirrors healthy', () => [nearest.url, ...others.map((m) => m.url)].every((u) => healthy(p.proxy, u)));
  });
  after(async () => {
    await p?.close();
    await nearest?.close();
    for (const m of others ?? []) await m.stop().catch(() => {});
  });

  it('500 clients, nearest mirror killed mid-run: no errors, exact bytes, <= 2 upstream requests per object', async () => {
    const pool = new Pool(p.url, { connections: CLIENTS, pipelining: 1, headersTimeout: 60_000, bodyTimeout: 60_000 });
    const paths = [...big.keys(), ...small.keys()];
    let errors = 0;
    let corrupt = 0;
    const failures: string[] = [];
    const fetchOne = async (path: string) => {
      const res = await pool.request({ path: `${nearest.url}${path}`, method: 'GET', headers: { 'user-agent': 'cvmfs Fuse 2.11.5' } });
      if (res.statusCode !== 200) errors++;
      const h = createHash('sha1');
      for await (const c of res.body) h.update(c as Buffer);
      if (`${path.split('/')[4]}${path.split('/')[5]!.slice(0, 38)}` !== h.digest('hex')) corrupt++;
    };
    const herd = Promise.all(
      Array.from({ length: CLIENTS }, async (_, n) => {
        // Each node reads the big chunk, then the small files in its own rotation.
        const order = [paths[0]!, ...paths.slice(1).map((_, i, a) => a[(i + n) % a.length]!)];
        for (const path of order) {
          try {
            await fetchOne(path);
          } catch (err) {
            failures.push(`${path}: ${(err as Error).message}`);
          }
        }
      }),
    );
    await waitFor('the whole herd on the big fill, held by the nearest mirror', () => held.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === CLIENTS);
    const killedAt = performance.now();
    await nearest.close();
    await waitFor('the killed mirror marked down', () => !healthy(p.proxy, nearest.url));
    const downAfterMs = performance.now() - killedAt;
    await herd;
    await pool.close();
    assert.deepEqual(failures.slice(0, 5), []);
    assert.equal(errors, 0);
    assert.equal(corrupt, 0);
    let worst = 0;
    for (const path of paths) {
      const n = nearest.count(path) + others.reduce((sum, m) => sum + m.count(path), 0);
      worst = Math.max(worst, n);
      assert.ok(n >= 1 && n <= 2, `${path}: ${n} upstream requests`);
    }
    const { resumes, failovers } = p.proxy.coalescer.stats;
    assert.ok(resumes >= 1, 'the big fill was resumed on another mirror');
    process.stdout.write(`# mirror herd: ${CLIENTS} clients x ${paths.length} objects, 0 errors, 0 corrupt, max ${worst} upstream requests per object, ${resumes} resumes, ${failovers} failovers, marked down ${downAfterMs.toFixed(0)} ms after the kill\n`);
  });
});
