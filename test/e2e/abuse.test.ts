// Clients that misbehave: hang up at every stage of every kind of request, send garbage, or stall.
// The proxy (its own process, as in production) must survive all of it, keep serving, and hold no
// fills, passes or connections open afterwards.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, tmpDir, type ChildProxy } from '../helpers/proxy.ts';
import { casBodies, REPO, TestMirror } from '../helpers/mirrors.ts';

const big = Buffer.alloc(2 * 1024 * 1024, 7);

function rawClient(port: number, read: boolean): Socket {
  const s = connect({ port, host: '127.0.0.1' });
  s.on('error', () => {});
  if (read) s.resume(); // otherwise a client that never reads: the proxy meets backpressure
  return s;
}

describe('abuse', () => {
  let origin: Origin;
  let mirror: TestMirror;
  let proxy: ChildProxy;
  let adminPort: string;
  const bodies = casBodies([600_000, 700_000]);
  before(async () => {
    origin = await startOrigin({
      '/slow': { headers: { 'cache-control': 'max-age=60' }, body: big, chunkBytes: 64 * 1024, chunkDelayMs: 20 },
      '/fast': { headers: { 'cache-control': 'max-age=60' }, body: 'fast' },
      '/late': { delayMs: 200, body: 'late' },
      '/err': { status: 503, body: 'down' },
    });
    mirror = await new TestMirror({ repo: REPO, bodies, latencyMs: 5, responseBytesPerSec: 4 * 1024 * 1024 }).start();
    proxy = await startChildProxy([
      '--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'cache'), '--allow-local-dest', '127.0.0.1',
      '--allow-connect-port', String(origin.port), '--stratum1', mirror.url, '--probe-repo', REPO, '--probe-interval', '200ms',
    ]);
    adminPort = /"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]!;
  });
  after(async () => {
    await proxy?.stop();
    await origin?.close();
    await mirror?.stop();
  });

  it('survives hang-ups at every stage, garbage and half-sent requests, and keeps serving', async () => {
    const o = origin.url;
    const [cas1, cas2] = [...bodies.keys()].map((p) => `${mirror.url}${p}`);
    const requests = [
      `GET ${o}/slow HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET ${o}/slow HTTP/1.1\r\nHost: x\r\nCache-Control: no-cache\r\n\r\n`,
      `GET ${cas1} HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET ${cas2} HTTP/1.1\r\nHost: x\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n\r\n`,
      `GET ${o}/late HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET ${o}/err HTTP/1.1\r\nHost: x\r\n\r\n`,
      `HEAD ${o}/slow HTTP/1.1\r\nHost: x\r\n\r\n`,
      `POST ${o}/late HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n${'p'.repeat(5000)}`,
      `POST ${o}/late HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n`,
      `CONNECT 127.0.0.1:${origin.port} HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n`,
      `PURGE ${o}/fast HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET /cvmfs/${REPO}/.cvmfspublished HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET ${o}/fast HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n`,
      `\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello`,
      `GET ${o}/fast HTTP/1.1\r\nHost: x\r\n${'X-Big: y\r\n'.repeat(2000)}\r\n`,
      `GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n`,
      `GET ${o}/fast HTTP/1.1\r\nHost: x\r\n\r\nGET ${o}/slow HTTP/1.1\r\nHost: x\r\n\r\n`,
    ];
    // Each request is cut at several points: mid-request-line, after the head, and after 1, 30, 120
    // and 300 ms (mid-response for the slow ones), once by a client that never reads its response.
    const sockets: Promise<void>[] = [];
    for (const text of requests) {
      for (const [cut, read] of [[Math.floor(text.length / 3), true], [text.length, true], [-1, true], [-30, true], [-120, true], [-300, true], [-300, false]] as const) {
        sockets.push(
          (async () => {
            const s = rawClient(proxy.port, read);
            await new Promise<void>((r) => s.once('connect', () => r()));
            s.write(cut > 0 ? text.slice(0, cut) : text);
            await sleep(cut > 0 ? 5 : -cut);
            s.destroy();
          })(),
        );
      }
    }
    await Promise.all(sockets);
    assert.equal(proxy.child.exitCode, null, `the proxy is still running\n${proxy.stderr().slice(-3000)}`);
    // And it serves: a miss, a coalesced content-addressed object, the dashboard's /status.
    const c = proxyClient(proxy.url, 4);
    const fast = await get(c, `${o}/fast`).catch((err: Error) => {
      throw new Error(`${err.message}; proxy exit ${proxy.child.exitCode}\n${proxy.stderr().slice(-3000)}`);
    });
    assert.equal(fast.status, 200);
    const [a, b] = await Promise.all([get(c, cas1!), get(c, cas1!)]);
    assert.ok(a.body.equals(bodies.get(new URL(cas1!).pathname)!) && b.body.equals(a.body));
    await c.close();
    // Nothing held: every fill and pass ended, every connection closed.
    let status: { fills: { inFlight: number }; counters: { passesInFlight: number }; clientConnections: number } | undefined;
    for (let i = 0; i < 200; i++) {
      status = (await (await fetch(`http://127.0.0.1:${adminPort}/status`)).json()) as typeof status;
      if (status!.fills.inFlight === 0 && status!.counters.passesInFlight === 0 && status!.clientConnections === 0) break;
      await sleep(50);
    }
    assert.deepEqual([status!.fills.inFlight, status!.counters.passesInFlight, status!.clientConnections], [0, 0, 0], JSON.stringify(status));
    assert.equal(origin.count('/fast') >= 1, true);
  });
});
