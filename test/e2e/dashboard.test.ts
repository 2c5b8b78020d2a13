// The live dashboard renders its numbers in a real headless Chromium (Debian's chromium): every figure
// is a number and the one /status says, the charts are drawn from /status's history, and the page fills
// its window.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Pool } from 'undici';
import { assertNoInternalErrors, get, memoryLogger, proxyClient, startProxy, tmpDir, type TestProxy } from '../helpers/proxy.ts';
import { buildConfig } from '../../src/config.ts';
import { startWorkers } from '../../src/workers.ts';
import { casBodies, healthy, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';
import { decodePng } from '../helpers/png.ts';
import { gate, startOrigin, type Origin } from '../helpers/origin.ts';
import { ManualClock } from '../../src/clock.ts';
import { RateHistory } from '../../src/rate-history.ts';
import { requireTool } from '../helpers/tools.ts';

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage', '--hide-scrollbars'];

function chromium(bin: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(bin, [...FLAGS, `--user-data-dir=${tmpDir('cuttle-chromium-')}`, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    const kill = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('exit', (code) => {
      clearTimeout(kill);
      resolve({ code, stdout, stderr });
    });
  });
}

interface Sample {
  at: number;
  seconds: number;
  counts: { requests: number; upstreamFetches: number; memoryBytes: number; diskBytes: number; upstreamServedBytes: number; upstreamBytes: number };
}
interface Status {
  counters: { requests: number; hits: number; coalesced: number; bytesOut: number; staleServed: number };
  upstream: { fetches: number; bytes: number };
  ratios: { hitRatio: number | null; offloadRequests: number | null; offloadBytes: number | null };
  history: { intervalS: number; samples: Sample[] };
  fills: { inFlight: number; failovers: number };
  clientConnections: number;
  topFills: { url: string; readers: number }[];
  workers?: { requests: number | null }[];
}

/** A figure as the page writes it ("76.5 %", "1,234", "3.5", "214.8 KiB/s"), as a number in its base unit. */
function figure(text: string | undefined): number {
  const m = /^(-?[\d,]+(?:\.\d+)?)(?: (%|B|KiB|MiB|GiB)(?:\/s)?)?$/.exec(text ?? '');
  assert.ok(m, `a number: ${JSON.stringify(text)}`);
  const n = Number(m[1]!.replace(/,/g, ''));
  return m[2] === '%' ? n / 100 : n * 1024 ** Math.max(0, ['B', 'KiB', 'MiB', 'GiB'].indexOf(m[2] ?? 'B'));
}
/** Equal as shown: `shown` is `want` rounded to the page's digits (relative, for scaled units). */
function near(shown: number, want: number, tol: number, what: string) {
  assert.ok(Math.abs(shown - want) <= tol, `${what}: the page shows ${shown}, /status says ${want}`);
}

describe('dashboard', () => {
  let p: TestProxy;
  let mirrors: TestMirror[];
  let origin: Origin;
  let page: string;
  let admin: string;
  const clock = new ManualClock();
  const HERD = 8;
  before(async () => {
    const bodies = casBodies([10_000, 20_000, 30_000]);
    mirrors = await startMirrors(bodies, [5]);
    origin = await startOrigin();
    p = await startProxy({ stratum1: mirrors.map((m) => m.url), 'probe-interval': '200ms', 'probe-repo': REPO }, { clock });
    admin = `http://127.0.0.1:${p.proxy.adminAddress()!.port}`;
    page = `${admin}/`;
    await waitFor('mirror healthy', () => healthy(p.proxy, mirrors[0]!.url));
    const c = proxyClient(p.url, HERD);
    // A first 10 s: three misses.
    for (const path of bodies.keys()) assert.equal((await get(c, mirrors[0]!.url + path)).status, 200);
    clock.advance(10_000);
    await p.proxy.history!.tick();
    // Then, 4 s into the next interval: six hits, and a herd of 8 on one object that costs 1 fetch (7
    // coalesced requests: misses to Squid, spared to the origin).
    for (let i = 0; i < 2; i++) for (const path of bodies.keys()) assert.equal((await get(c, mirrors[0]!.url + path)).status, 200);
    const g = gate();
    origin.route('/herd', { headers: { 'cache-control': 'max-age=600' }, body: 'h'.repeat(5000), gate: g });
    const herd = Array.from({ length: HERD }, () => get(c, `${origin.url}/herd`));
    await waitFor('the herd on one fill', async () => g.waiting === 1 && (await status()).topFills.some((f) => f.readers === HERD));
    g.open();
    for (const r of await Promise.all(herd)) assert.equal(r.status, 200);
    await c.close();
    clock.advance(4_000);
  });
  after(async () => {
    await p?.close();
    await origin?.close();
    for (const m of mirrors ?? []) await m.stop();
  });
  const status = async () => (await (await fetch(`${admin}/status`)).json()) as Status;

  it('/status: origin offload counts coalesced requests as spared, beside Squid hit ratio', async () => {
    const s = await status();
    const requests = 3 * 3 + HERD;
    assert.equal(s.counters.requests, requests);
    assert.equal(origin.hits.get('/herd'), 1, 'the herd cost the origin one fetch');
    assert.equal(s.upstream.fetches, 3 + 1);
    assert.equal(s.counters.coalesced, HERD - 1);
    assert.equal(s.ratios.hitRatio, 6 / requests, "Squid's: hits / requests; a coalesced request is a miss");
    assert.equal(s.ratios.offloadRequests, (requests - 4) / requests, 'requests that cost no upstream fetch');
    const out = 3 * 60_000 + HERD * 5000;
    assert.equal(s.counters.bytesOut, out);
    assert.equal(s.upstream.bytes, 60_000 + 5000);
    assert.equal(s.ratios.offloadBytes, (out - 65_000) / out);
  });

  it('/status history: a bounded ring of samples that add up to the counters', async () => {
    const { history: h, counters } = await status();
    assert.equal(h.intervalS, 10);
    assert.deepEqual(h.samples.map((x) => [x.seconds, x.counts.requests, x.counts.upstreamFetches]), [[10, 3, 3], [4, 6 + HERD, 1]], 'one closed 10 s sample, and the 4 s running now');
    assert.equal(h.samples.reduce((a, x) => a + x.counts.requests, 0), counters.requests);
    assert.equal(h.samples[1]!.counts.memoryBytes + h.samples[1]!.counts.diskBytes + h.samples[1]!.counts.upstreamServedBytes, 2 * 60_000 + HERD * 5000);
    // Bounded: a ring of 360 (an hour of 10 s samples) and the running one.
    const ring = new RateHistory(0, 10, 3);
    for (let t = 10; t <= 100; t += 10) ring.sample(t, new Map([['a', { counters: { requests: t } }]]));
    const snap = ring.snapshot(105, new Map([['a', { counters: { requests: 107 } }]]));
    assert.deepEqual(snap.samples.map((x) => [x.at, x.counts.requests]), [[80, 10], [90, 10], [100, 10], [105, 7]]);
  });

  it('is one self-contained page with a strict Content-Security-Policy', async () => {
    const res = await fetch(page);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-security-policy')!, /default-src 'none'; connect-src 'self'.*script-src 'sha256-/);
    const html = await res.text();
    assert.doesNotMatch(html, /<script[^>]+src=|<link[^>]+href=|https?:\/\//, 'no external script, stylesheet or URL');
  });

  it('in headless Chromium, every figure is a number and matches /status', async (t) => {
    const bin = requireTool(t, ['chromium', 'chromium-browser', 'google-chrome'], 'chromium');
    if (!bin) return;
    const dom = await chromium(bin, ['--virtual-time-budget=5000', '--dump-dom', page]);
    assert.equal(dom.code, 0, dom.stderr.slice(-2000));
    const html = dom.stdout;
    const text = (id: string) => new RegExp(`id="${id}"[^>]*>([^<]*)<`).exec(html)?.[1];
    const s = await status();
    // Every card's big figure: a number.
    const bigs = [...html.matchAll(/class="big" id="([^"]+)">([^<]*)</g)].map((m) => [m[1]!, m[2]!] as const);
    assert.equal(bigs.length, 10);
    for (const [id, v] of bigs) assert.doesNotThrow(() => figure(v), `${id}: ${v}`);
    near(figure(text('offload-requests')), s.ratios.offloadRequests!, 0.0005, 'origin offload, requests');
    near(figure(text('offload-bytes')), s.ratios.offloadBytes!, 0.0005, 'origin offload, bytes');
    near(figure(text('hitratio')), s.ratios.hitRatio!, 0.0005, 'hit ratio');
    assert.equal(text('offload-requests'), '76.5 %');
    assert.equal(text('hitratio'), '35.3 %');
    // The rates are the last closed sample's: 3 requests and 3 fetches in 10 s, 60,000 bytes out.
    const last = s.history.samples[0]!;
    near(figure(text('rps')), last.counts.requests / last.seconds, 0.05, 'requests / s');
    near(figure(text('ups')), last.counts.upstreamFetches / last.seconds, 0.05, 'upstream fetches / s');
    near(figure(text('bps-out')), (last.counts.memoryBytes + last.counts.diskBytes + last.counts.upstreamServedBytes) / last.seconds, 0.05 * 1024, 'bytes / s to clients');
    assert.equal(figure(text('fills')), s.fills.inFlight);
    assert.equal(figure(text('conns')), s.clientConnections);
    assert.equal(figure(text('failovers')), s.fills.failovers);
    assert.equal(figure(text('stale')), s.counters.staleServed);
    assert.match(text('offload-requests-of') ?? '', new RegExp(`^${s.counters.requests} client requests, ${s.upstream.fetches} sent upstream$`));
    // The memory tier counts bodies and their per-entry overhead (headers, policy, bookkeeping).
    const kib = (p.proxy.store.memory.stats().bytes / 1024).toFixed(1);
    assert.equal(p.proxy.store.memory.stats().objects, 4);
    assert.match(text('level-memory') ?? '', new RegExp(`^${kib.replace('.', '\\.')} KiB of 256\\.0 MiB · 4 objects`));
    assert.match(html, new RegExp(`${mirrors[0]!.url.replace(/\./g, '\\.')}</td><td class="good">healthy</td>`));
    assert.equal(text('state'), 'serving');

    // The requests chart, drawn from /status's history: axes with numbers and units, one step per sample.
    const svg = /<svg id="chart-requests"[^>]*>([\s\S]*?)<\/svg>/.exec(html)![1]!;
    const ticks = [...svg.matchAll(/<text[^>]*class="tick"[^>]*>([^<]*)</g)].map((m) => m[1]!);
    assert.deepEqual(ticks.slice(0, 5), ['0', '1', '2', '3', '4'], 'y axis: 0 to 4 req/s');
    assert.ok(ticks.includes('requests / s'), 'y unit');
    assert.ok(ticks.includes('now') && ticks.includes('−10 s'), `x axis in seconds before now: ${ticks.join('|')}`);
    const lines = [...svg.matchAll(/<polyline[^>]* points="([^"]*)"/g)].map((m) => m[1]!.split(' ').map((pt) => pt.split(',').map(Number)));
    assert.equal(lines.length, 2, 'client requests and upstream fetches');
    const y = (v: number) => 12 + (230 - 12 - 36) * (1 - v / 4);
    const samples = s.history.samples;
    assert.deepEqual(lines[0]!.map(([, py]) => py), samples.flatMap((x) => [x.counts.requests / x.seconds, x.counts.requests / x.seconds]).map((v) => Number(y(v).toFixed(1))), 'each step at its sample\'s requests / s');
    assert.deepEqual(lines[1]!.map(([, py]) => py), samples.flatMap((x) => [x.counts.upstreamFetches / x.seconds, x.counts.upstreamFetches / x.seconds]).map((v) => Number(y(v).toFixed(1))));
    // The admin page's own requests are not proxy requests.
    assert.equal(p.proxy.counters.requests, 3 * 3 + HERD);
  });

  it('fills the window at 1400×1000 (screenshot)', async (t) => {
    const bin = requireTool(t, ['chromium', 'chromium-browser', 'google-chrome'], 'chromium');
    if (!bin) return;
    const file = join(process.env.CUTTLE_SHOT_DIR ?? tmpDir('cuttle-shot-'), 'dashboard.png');
    const shot = await chromium(bin, ['--virtual-time-budget=5000', '--window-size=1400,1000', `--screenshot=${file}`, page]);
    assert.equal(shot.code, 0, shot.stderr.slice(-2000));
    const img = decodePng(readFileSync(file));
    assert.equal(img.width, 1400);
    const [r, g, b] = img.pixel(5, 5);
    assert.ok(r < 60 && g < 60 && b < 80, `dark header bar painted (${r},${g},${b})`);
    // The page's own grey (#f4f5f7) is empty space; cards and sections are white, text is dark.
    const empty = (x: number, y: number) => {
      const [pr, pg, pb] = img.pixel(x, y);
      return pr === 0xf4 && pg === 0xf5 && pb === 0xf7;
    };
    let blank = 0;
    let all = 0;
    let lowest = 0;
    for (let y = 0; y < img.height; y += 2) {
      let row = 0;
      for (let x = 0; x < img.width; x += 2, all++) if (empty(x, y)) blank++, row++;
      if (row < img.width / 2 / 2) lowest = y;
    }
    assert.ok(blank / all < 0.2, `at most a fifth of the window is empty (${((100 * blank) / all).toFixed(1)} %)`);
    assert.ok(lowest > 0.85 * img.height, `content reaches down the window (to ${lowest} of ${img.height} px)`);
    // The cards' big numbers: dark text on white in the band below the header.
    let ink = 0;
    for (let y = 60; y < 160; y++) for (let x = 20; x < 1380; x += 2) {
      const [pr, pg, pb] = img.pixel(x, y);
      if (pr < 90 && pg < 90 && pb < 90) ink++;
    }
    assert.ok(ink > 300, `numbers painted in the cards (${ink} dark pixels)`);
  });
});

describe('dashboard under --workers 2', () => {
  it("/status's ratios and history are of the workers' sum, not of one worker", async () => {
    const bodies = casBodies([4000, 5000, 6000]);
    const [mirror] = (await startMirrors(bodies, [1])) as [TestMirror];
    const { logger, logs } = memoryLogger();
    const raw = { workers: 2, listen: ['127.0.0.1:0'], 'cache-dir': join(tmpDir(), 'cache'), stratum1: [mirror.url], 'access-log': 'none', 'admin-listen': '127.0.0.1:0', 'log-level': 'warn' };
    const set = await startWorkers(buildConfig(raw), raw, logger);
    const url = `http://127.0.0.1:${set.addresses[0]!.port}`;
    // Many one-connection pools, so the kernel spreads them over both workers' sockets.
    const pools = Array.from({ length: 16 }, () => new Pool(url, { connections: 1, pipelining: 1 }));
    try {
      for (const path of bodies.keys()) for (const r of await Promise.all(pools.map((pool) => get(pool, `${mirror.url}${path}`)))) assert.equal(r.status, 200);
      const s = (await (await fetch(`http://127.0.0.1:${set.adminAddress()!.port}/status`)).json()) as Status;
      const sent = 3 * pools.length;
      assert.ok(s.workers!.every((w) => (w.requests ?? 0) > 0 && w.requests! < sent), `both workers served clients: ${JSON.stringify(s.workers)}`);
      assert.equal(s.counters.requests, sent);
      for (const path of bodies.keys()) assert.equal(mirror.count(path), 1);
      assert.equal(s.upstream.fetches, 3);
      assert.equal(s.ratios.offloadRequests, (sent - 3) / sent, 'from the summed counters');
      assert.equal(s.ratios.hitRatio, s.counters.hits / sent);
      assert.equal(s.history.samples.reduce((a, x) => a + x.counts.requests, 0), sent, 'the history adds up to the summed requests');
      assert.equal(s.history.samples.reduce((a, x) => a + x.counts.upstreamFetches, 0), 3);
      assertNoInternalErrors(logs);
    } finally {
      for (const p of pools) await p.close();
      await set.close(1000);
      await mirror.stop();
    }
  });
});
