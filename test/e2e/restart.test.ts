// The disk tier survives a clean restart and a kill -9 at any moment, and never serves a partial record.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, tmpDir } from '../helpers/proxy.ts';

const sha1 = (b: Buffer) => createHash('sha1').update(b).digest('hex');

function records(cacheDir: string): string[] {
  const root = join(cacheDir, 'v1', 'objects');
  return readdirSync(root).flatMap((d) => readdirSync(join(root, d)).map((f) => join(root, d, f)));
}

describe('restart and crash safety', () => {
  let origin: Origin;
  const bodies = new Map<string, Buffer>();
  before(async () => {
    origin = await startOrigin();
    for (let i = 0; i < 20; i++) {
      const b = randomBytes(1000 + i * 50_000);
      bodies.set(`/obj/${i}`, b);
      origin.route(`/obj/${i}`, { headers: { 'cache-control': 'max-age=259200' }, body: b });
    }
  });
  after(() => origin.close());

  it('a restart keeps the disk tier: every object is a HIT with zero origin fetches', async () => {
    const cacheDir = join(tmpDir(), 'cache');
    const args = ['--listen', '127.0.0.1:0', '--cache-dir', cacheDir, '--allow-local-dest', '127.0.0.1'];
    const first = await startChildProxy(args);
    let c = proxyClient(first.url);
    for (const path of bodies.keys()) assert.equal((await get(c, `${origin.url}${path}`)).status, 200);
    await c.close();
    assert.equal(await first.stop('SIGTERM'), 0);
    const fetched = [...bodies.keys()].map((p) => origin.count(p));
    assert.deepEqual(fetched, Array(20).fill(1));

    const second = await startChildProxy(args);
    c = proxyClient(second.url);
    for (const [path, body] of bodies) {
      const r = await get(c, `${origin.url}${path}`);
      assert.equal(sha1(r.body), sha1(body));
      assert.match(String(r.headers['x-cache']), /^HIT/, path);
    }
    assert.deepEqual([...bodies.keys()].map((p) => origin.count(p)), Array(20).fill(1));
    await c.close();
    await second.stop();
  });

  it('kill -9 during a write leaves nothing that is served; damaged records are removed at start', async () => {
    const cacheDir = join(tmpDir(), 'cache');
    const args = ['--listen', '127.0.0.1:0', '--cache-dir', cacheDir, '--allow-local-dest', '127.0.0.1'];
    const big = randomBytes(8 * 1024 * 1024);
    const g = gate();
    origin.route('/slow', { headers: { 'cache-control': 'max-age=259200' }, body: big, bodyGate: { after: 4 * 1024 * 1024, gate: g } });
    const small = randomBytes(10_000);
    origin.route('/small', { headers: { 'cache-control': 'max-age=259200' }, body: small });

    const first = await startChildProxy(args);
    const c = proxyClient(first.url);
    await get(c, `${origin.url}/small`);
    const pending = c.request({ path: `${origin.url}/slow`, method: 'GET' }).then((r) => r.body.arrayBuffer()).catch(() => undefined);
    // Mid-transfer: the temp record is half written.
    await waitFor('the temp record half written', () => g.waiting === 1 && readdirSync(join(cacheDir, 'v1', 'tmp')).length === 1);
    const tmp = readdirSync(join(cacheDir, 'v1', 'tmp'));
    assert.equal(tmp.length, 1, 'a temp record is being written');
    await first.stop('SIGKILL');
    await pending;
    g.open();
    await c.close();
    // Damage the one complete record too: a torn write must be detected, not served.
    const recs = records(cacheDir);
    assert.equal(recs.length, 1);
    truncateSync(recs[0]!, statSync(recs[0]!).size - 7);

    const second = await startChildProxy(args);
    const c2 = proxyClient(second.url);
    const r = await get(c2, `${origin.url}/slow`);
    assert.equal(sha1(r.body), sha1(big));
    assert.match(String(r.headers['x-cache']), /^MISS/);
    assert.equal(origin.count('/slow'), 2, 'the partial write was not served');
    const s = await get(c2, `${origin.url}/small`);
    assert.equal(sha1(s.body), sha1(small));
    assert.match(String(s.headers['x-cache']), /^MISS/, 'the damaged record was not served');
    assert.equal(origin.count('/small'), 2);
    assert.deepEqual(readdirSync(join(cacheDir, 'v1', 'tmp')).filter((f) => !f.includes(String(second.child.pid))), [], 'crash leftovers removed');
    await c2.close();
    await second.stop();
  });
});
