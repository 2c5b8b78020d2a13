// The live dashboard renders its numbers in a real headless Chromium (Debian's chromium).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { get, proxyClient, startProxy, tmpDir, type TestProxy } from '../helpers/proxy.ts';
import { casBodies, healthy, REPO, startMirrors, waitFor, type TestMirror } from '../helpers/mirrors.ts';
import { decodePng } from '../helpers/png.ts';
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

describe('dashboard', () => {
  let p: TestProxy;
  let mirrors: TestMirror[];
  let page: string;
  before(async () => {
    const bodies = casBodies([10_000, 20_000, 30_000]);
    mirrors = await startMirrors(bodies, [5]);
    p = await startProxy({ stratum1: mirrors.map((m) => m.url), 'probe-interval': '200ms', 'probe-repo': REPO });
    await waitFor('mirror healthy', () => healthy(p.proxy, mirrors[0]!.url));
    const c = proxyClient(p.url, 2);
    // 3 misses then 6 hits: a 66.7 % hit ratio.
    for (let i = 0; i < 3; i++) for (const path of bodies.keys()) assert.equal((await get(c, mirrors[0]!.url + path)).status, 200);
    await c.close();
    page = `http://127.0.0.1:${p.proxy.adminAddress()!.port}/`;
  });
  after(async () => {
    await p?.close();
    for (const m of mirrors ?? []) await m.stop();
  });

  it('is one self-contained page with a strict Content-Security-Policy', async () => {
    const res = await fetch(page);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-security-policy')!, /default-src 'none'; connect-src 'self'.*script-src 'sha256-/);
    const html = await res.text();
    assert.doesNotMatch(html, /<script[^>]+src=|<link[^>]+href=|https?:\/\//, 'no external script, stylesheet or URL');
  });

  it('renders hit ratio, request counts, cache fill and mirror health in headless Chromium', async (t) => {
    const bin = requireTool(t, ['chromium', 'chromium-browser', 'google-chrome'], 'chromium');
    if (!bin) return;
    // Virtual time lets the page's 2 s poll run twice, so the per-second rates are filled in too.
    const dom = await chromium(bin, ['--virtual-time-budget=5000', '--dump-dom', page]);
    assert.equal(dom.code, 0, dom.stderr.slice(-2000));
    const html = dom.stdout;
    const text = (id: string) => new RegExp(`id="${id}"[^>]*>([^<]*)<`).exec(html)?.[1];
    assert.equal(text('hitratio-life'), '66.7 % since start');
    const made = 3 * 3; // three rounds over three objects, in before()
    assert.equal(text('requests'), `${made} requests`);
    assert.match(text('rps') ?? '', /^\d+\.\d$/, 'requests/s computed from two polls');
    // The memory tier counts bodies and their per-entry overhead (headers, policy, bookkeeping).
    const kib = (p.proxy.store.memory.stats().bytes / 1024).toFixed(1);
    assert.equal(p.proxy.store.memory.stats().objects, 3);
    assert.match(text('level-memory') ?? '', new RegExp(`^${kib.replace('.', '\\.')} KiB of 256\\.0 MiB · 3 objects`));
    assert.match(html, new RegExp(`${mirrors[0]!.url.replace(/\./g, '\\.')}</td><td class="good">healthy</td>`));
    assert.equal(text('state'), 'serving');
    // The admin page's own requests are not proxy requests.
    assert.equal(p.proxy.counters.requests, made);
  });

  it('paints a non-blank page (screenshot)', async (t) => {
    const bin = requireTool(t, ['chromium', 'chromium-browser', 'google-chrome'], 'chromium');
    if (!bin) return;
    const file = join(tmpDir('cuttle-shot-'), 'dashboard.png');
    const shot = await chromium(bin, ['--virtual-time-budget=5000', '--window-size=1200,900', `--screenshot=${file}`, page]);
    assert.equal(shot.code, 0, shot.stderr.slice(-2000));
    const img = decodePng(readFileSync(file));
    assert.equal(img.width, 1200);
    const [r, g, b] = img.pixel(5, 5);
    assert.ok(r < 60 && g < 60 && b < 80, `dark header bar painted (${r},${g},${b})`);
    // The cards' big numbers: dark text on white in the band below the header.
    let ink = 0;
    for (let y = 60; y < 160; y++) for (let x = 20; x < 1180; x += 2) {
      const [pr, pg, pb] = img.pixel(x, y);
      if (pr < 90 && pg < 90 && pb < 90) ink++;
    }
    assert.ok(ink > 300, `numbers painted in the cards (${ink} dark pixels)`);
  });
});
