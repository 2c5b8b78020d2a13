// The thundering herd: 1,000 concurrent clients, 50 objects, one of them 16 MiB.
// The proxy runs as its own process (as in production) so the clients don't share its event loop.
// The origin holds each object behind a gate that the test opens once the proxy reports clients on its
// fill (all of them on the big one, after its first MiB, once every client has bytes of it; two on each
// small one): the clients overlap by state, not by an origin's pacing.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { startChildProxy, tmpDir, type ChildProxy } from '../helpers/proxy.ts';
import { procStats } from '../../bench/targets.ts';

const CLIENTS = Number(process.env.HERD_CLIENTS ?? 1000);
const SMALL = 49;
const BIG = 16 * 1024 * 1024;
/** The big body's bytes the origin sends before its gate. */
const FIRST = 1024 * 1024;

describe('herd', () => {
  let origin: Origin;
  let proxy: ChildProxy;
  let adminUrl: string;
  const bodies = new Map<string, Buffer>();
  /** One gate per object, in the order every client asks for them. */
  const gates = new Map<string, Gate>();
  before(async () => {
    origin = await startOrigin();
    const big = randomBytes(BIG);
    bodies.set('/data/big', big);
    gates.set('/data/big', gate());
    origin.route('/data/big', { headers: { 'cache-control': 'max-age=259200' }, body: big, chunkBytes: 256 * 1024, bodyGate: { after: FIRST, gate: gates.get('/data/big')! } });
    for (let i = 0; i < SMALL; i++) {
      const b = randomBytes(4096 + ((i * 7919) % 60_000));
      const g = gate();
      bodies.set(`/data/s${i}`, b);
      gates.set(`/data/s${i}`, g);
      origin.route(`/data/s${i}`, { headers: { 'cache-control': 'max-age=259200' }, body: b, gate: g });
    }
    proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1']);
    adminUrl = `http://127.0.0.1:${/"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]}`;
  });
  after(async () => {
    await proxy?.stop();
    await origin?.close();
  });

  /** Clients the proxy has on the fill of `path` (its /status). */
  async function readersOf(path: string): Promise<number> {
    const status = (await (await fetch(`${adminUrl}/status`)).json()) as { topFills: { url: string; readers: number }[] };
    return status.topFills.find((f) => f.url === `${origin.url}${path}`)?.readers ?? 0;
  }

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
    let streaming = 0; // clients that have bytes of the big body
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
          streaming++;
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
    const herd = Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        try {
          await fetchOne('/data/big');
          for (let i = 0; i < SMALL; i++) await fetchOne(`/data/s${i}`);
        } catch (err) {
          failures.push(String(err));
        }
      }),
    );
    // Open the big object's gate once the whole herd is on its fill and reading it; each small one's once a
    // second client is on its fill. Every object is shared, and no client waits for the slowest of the herd
    // (in lockstep, early clients waited past the 60 s header timeouts on a loaded machine).
    for (const [path, g] of gates) {
      const want = path === '/data/big' ? CLIENTS : 2;
      await waitFor(`${want} clients on the fill of ${path}`, async () => {
        if (failures.length) throw new Error(`clients failed: ${failures.slice(0, 5).join('; ')}\n${proxy.stderr().slice(-3000)}`);
        return g.waiting === 1 && (path !== '/data/big' || streaming === CLIENTS) && (await readersOf(path)) >= want;
      }, 60_000);
      g.open();
    }
    await herd;
    assert.deepEqual(failures.slice(0, 5), [], proxy.stderr().slice(-3000));
    const rssMiB = procStats({ pid: proxy.child.pid }).peakRssMiB;
    await pool.close();
    for (const path of bodies.keys()) assert.equal(origin.count(path), 1, `origin fetches of ${path}`);
    assert.equal(errors, 0);
    assert.equal(mismatches, 0);
    assert.equal(askedBeforeDone, CLIENTS, 'every client asked while the big fill was running');
    assert.equal(streamedBeforeDone, askedBeforeDone, 'every client that asked during the fill got bytes before it completed');
    process.stdout.write(`# herd: ${CLIENTS} clients, origin fetches per object 1.00, streamed early ${streamedBeforeDone}/${askedBeforeDone}, proxy peak RSS ${rssMiB.toFixed(0)} MiB\n`);
  });
});
