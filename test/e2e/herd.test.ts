// The thundering herd: 1,000 concurrent clients, 50 objects, one of them 16 MiB and paced by the origin.
// The proxy runs as its own process (as in production) so the clients don't share its event loop.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { startChildProxy, tmpDir, type ChildProxy } from '../helpers/proxy.ts';
import { procStats } from '../../bench/targets.ts';

const CLIENTS = Number(process.env.HERD_CLIENTS ?? 1000);
const SMALL = 49;
const BIG = 16 * 1024 * 1024;


describe('herd', () => {
  let origin: Origin;
  let proxy: ChildProxy;
  const bodies = new Map<string, Buffer>();
  before(async () => {
    origin = await startOrigin();
    const big = randomBytes(BIG);
    bodies.set('/data/big', big);
    // Paced: 16 MiB in about 3 s, so the herd is all attached while the fill is still running.
    origin.route('/data/big', { headers: { 'cache-control': 'max-age=259200' }, body: big, chunkBytes: 256 * 1024, chunkDelayMs: 45 });
    for (let i = 0; i < SMALL; i++) {
      const b = randomBytes(4096 + ((i * 7919) % 60_000));
      bodies.set(`/data/s${i}`, b);
      origin.route(`/data/s${i}`, { headers: { 'cache-control': 'max-age=259200' }, body: b, delayMs: 20 });
    }
    proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1']);
  });
  after(async () => {
    await proxy?.stop();
    await origin?.close();
  });

  it('1,000 clients x 50 objects: one origin fetch per object, identical bytes, streaming before the fill completes', async () => {
    let bigDone = false;
    origin.onComplete = (path) => {
      if (path === '/data/big') bigDone = true;
    };
    const pool = new Pool(proxy.url, { connections: CLIENTS, pipelining: 1, headersTimeout: 60_000, bodyTimeout: 60_000 });
    let mismatches = 0;
    let errors = 0;
    let askedBeforeDone = 0;
    let streamedBeforeDone = 0;
    const fetchOne = async (path: string) => {
      const expected = bodies.get(path)!;
      const askedEarly = !bigDone;
      const res = await pool.request({ path: `${origin.url}${path}`, method: 'GET', headers: { 'user-agent': 'cvmfs Fuse 2.11.5' } });
      if (res.statusCode !== 200) errors++;
      let off = 0;
      let first = true;
      for await (const chunk of res.body) {
        const c = chunk as Buffer;
        if (first && path === '/data/big') {
          first = false;
          if (askedEarly) {
            askedBeforeDone++;
            if (!bigDone) streamedBeforeDone++;
          }
        }
        if (off + c.length > expected.length || expected.compare(c, 0, c.length, off, off + c.length) !== 0) mismatches++;
        off += c.length;
      }
      if (off !== expected.length) mismatches++;
    };
    const failures: string[] = [];
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        try {
        await fetchOne('/data/big');
        for (let i = 0; i < SMALL; i++) await fetchOne(`/data/s${i}`);
        } catch (err) {
          failures.push(String(err));
        }
      }),
    );
    assert.deepEqual(failures.slice(0, 5), [], proxy.stderr().slice(-3000));
    const rssMiB = procStats({ pid: proxy.child.pid }).peakRssMiB;
    await pool.close();
    for (const path of bodies.keys()) assert.equal(origin.count(path), 1, `origin fetches of ${path}`);
    assert.equal(errors, 0);
    assert.equal(mismatches, 0);
    assert.ok(askedBeforeDone > 0, 'some clients asked while the big fill was running');
    assert.equal(streamedBeforeDone, askedBeforeDone, 'every client that asked during the fill got bytes before it completed');
    process.stdout.write(`# herd: ${CLIENTS} clients, origin fetches per object 1.00, streamed early ${streamedBeforeDone}/${askedBeforeDone}, proxy peak RSS ${rssMiB.toFixed(0)} MiB\n`);
  });
});
