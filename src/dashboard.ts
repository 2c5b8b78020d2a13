// The live dashboard at / on the admin listener: one self-contained page (no CDN: sites are often
// offline) that polls /status every 2 s and draws every figure from that one answer (no rate of its
// own: the page may have just opened): origin offload and Squid's hit ratio, the last hour of request
// and byte rates from /status's history, fills in flight, the fills with the most waiters, cache fill
// levels, mirror health and the drain state. The inline script is
// allowed by its hash in the Content-Security-Policy, and nothing else is.
import { createHash } from 'node:crypto';

const SCRIPT = `
const $ = (id) => document.getElementById(id);
const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
function bytes(n) {
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + ' ' + UNITS[i];
}
function num(n, d = 0) { return n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d }); }
// A ratio of /status (null before there is anything to divide: 0 requests so far).
function pct(r) { return r === null ? 'no requests yet' : (100 * r).toFixed(1) + ' %'; }
function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
function el(parent, name, attrs, text) {
  const e = document.createElementNS(parent.namespaceURI, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  parent.appendChild(e);
  return e;
}
const rate = (sample, series) => sample.counts[series] / sample.seconds;
// The rate the cards show: the last whole interval's, or the one running when none has closed yet.
function latest(h) {
  const s = h.samples.filter((x) => x.seconds > 0);
  return s.length > 1 ? s[s.length - 2] : s[s.length - 1];
}
// A step line per series over the history's samples: x in minutes before the newest, y in its unit.
function chart(id, h, lines, fmt, unit, base) {
  const svg = $(id);
  svg.replaceChildren();
  const W = 640, H = 230, L = 70, R = 12, T = 12, B = 36;
  const samples = h.samples.filter((x) => x.seconds > 0);
  const end = samples.length ? samples[samples.length - 1].at : 0;
  const begin = samples.length ? Math.min(end - 60000, samples[0].at - samples[0].seconds * 1000) : end - 60000;
  const span = (end - begin) / 1000;
  let max = 0;
  for (const x of samples) for (const l of lines) max = Math.max(max, rate(x, l.series));
  // y: 0 up to four round steps (1, 2, 2.5 or 5 × 10^k of the unit: bytes count in KiB, MiB, …).
  let top = 1;
  if (max > 0) {
    const u = base === 1 ? 1 : base ** Math.max(0, Math.floor(Math.log(max) / Math.log(base))), m = max / u;
    const p = 10 ** Math.floor(Math.log10(m / 4));
    top = 4 * [1, 2, 2.5, 5, 10].find((k) => k * p * 4 >= m) * p * u;
  }
  const x = (t) => L + (W - L - R) * (t - begin) / 1000 / span;
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4;
    el(svg, 'line', { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: i ? '#e4e7ec' : '#556' });
    el(svg, 'text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, fmt(v));
  }
  el(svg, 'line', { x1: L, x2: L, y1: T, y2: H - B, stroke: '#556' });
  el(svg, 'text', { transform: 'translate(14 ' + ((H - B + T) / 2) + ') rotate(-90)', 'text-anchor': 'middle', class: 'tick' }, unit);
  // x: seconds or minutes before the newest sample.
  const inMin = span > 180, step = [10, 15, 30, 60, 120, 300, 600, 900].find((s) => span / s <= 6) || 900;
  for (let a = 0; a <= span + 1e-9; a += step) {
    const t = end - a * 1000;
    el(svg, 'line', { x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4, stroke: '#556' });
    el(svg, 'text', { x: x(t), y: H - B + 16, 'text-anchor': a === 0 ? 'end' : 'middle', class: 'tick' }, a === 0 ? 'now' : '−' + (inMin ? num(a / 60, a % 60 ? 1 : 0) + ' min' : a + ' s'));
  }
  el(svg, 'text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle', class: 'tick' }, 'time before the latest sample (' + h.intervalS + ' s samples, the last hour kept)');
  for (const l of lines) {
    const pts = [];
    for (const s of samples) { const v = y(rate(s, l.series)); pts.push(x(s.at - s.seconds * 1000).toFixed(1) + ',' + v.toFixed(1), x(s.at).toFixed(1) + ',' + v.toFixed(1)); }
    el(svg, 'polyline', { fill: 'none', stroke: l.color, 'stroke-width': 2, points: pts.join(' ') });
  }
}
function showDrain(s) {
  const d = s.drain;
  if (d === undefined || d === null) return '';
  if (typeof d !== 'object') return 'drain: ' + d;
  return 'drain: ' + Object.entries(d).filter(([, v]) => v !== null && typeof v !== 'object').map(([k, v]) => k + ' ' + (typeof v === 'number' ? num(v, 1) : v)).join(' · ');
}
function render(s) {
  const c = s.counters, r = s.ratios, h = s.history;
  const draining = s.draining || (s.drain && s.drain.draining === true);
  $('state').textContent = draining ? 'draining' : 'serving';
  $('state').className = draining ? 'bad' : 'good';
  $('drain').textContent = showDrain(s);
  $('version').textContent = 'cuttle ' + s.version + ' · up ' + num(s.uptimeS) + ' s';
  $('offload-requests').textContent = pct(r.offloadRequests);
  $('offload-requests-of').textContent = num(c.requests) + ' client requests, ' + num(s.upstream.fetches) + ' sent upstream';
  $('offload-bytes').textContent = pct(r.offloadBytes);
  $('offload-bytes-of').textContent = bytes(c.bytesOut) + ' to clients, ' + bytes(s.upstream.bytes) + ' from upstream';
  $('hitratio').textContent = pct(r.hitRatio);
  $('hitratio-of').textContent = num(c.hits) + ' hits of ' + num(c.requests) + ' requests; ' + num(c.coalesced) + ' coalesced count as misses';
  const last = latest(h);
  $('rps').textContent = last ? num(rate(last, 'requests'), 1) : '0.0';
  $('rps-over').textContent = last ? 'client requests / s over the ' + num(last.seconds, 1) + ' s to ' + new Date(last.at).toLocaleTimeString() : 'no sample yet';
  $('bps-out').textContent = last ? bytes(rate(last, 'memoryBytes') + rate(last, 'diskBytes') + rate(last, 'upstreamServedBytes')) + '/s' : '0 B/s';
  $('bps-tiers').textContent = last ? 'memory ' + bytes(rate(last, 'memoryBytes')) + '/s · disk ' + bytes(rate(last, 'diskBytes')) + '/s · upstream ' + bytes(rate(last, 'upstreamServedBytes')) + '/s' : '';
  $('ups').textContent = last ? num(rate(last, 'upstreamFetches'), 1) : '0.0';
  $('ups-in').textContent = (last ? bytes(rate(last, 'upstreamBytes')) + '/s in · ' : '') + num(s.upstream.fetches) + ' fetches since start';
  $('fills').textContent = num(s.fills.inFlight);
  $('coalesced').textContent = num(c.coalesced) + ' requests joined a running fill';
  $('conns').textContent = num(s.clientConnections);
  $('failovers').textContent = num(s.fills.failovers);
  $('stale').textContent = num(c.staleServed);
  $('resumes').textContent = num(s.fills.resumes) + ' resumed · ' + num(s.fills.hashMismatches) + ' bad hashes';
  chart('chart-requests', h, [{ series: 'requests', color: '#3b7ddd' }, { series: 'upstreamFetches', color: '#e8590c' }], (v) => num(v, v < 10 && v % 1 ? 1 : 0), 'requests / s', 1);
  chart('chart-bytes', h, [{ series: 'outBytes', color: '#3b7ddd' }, { series: 'upstreamBytes', color: '#e8590c' }], (v) => bytes(v), 'bytes / s', 1024);
  for (const t of ['memory', 'disk']) {
    const st = s.tiers[t];
    $('fill-' + t).style.width = Math.min(100, 100 * st.bytes / Math.max(1, st.maxBytes)).toFixed(1) + '%';
    $('level-' + t).textContent = bytes(st.bytes) + ' of ' + bytes(st.maxBytes) + ' · ' + num(st.objects) + ' objects · ' + num(st.evictions) + ' evicted';
  }
  const top = $('top');
  top.replaceChildren();
  for (const f of s.topFills) {
    const tr = document.createElement('tr');
    cell(tr, f.url, 'url');
    cell(tr, num(f.readers), 'n');
    cell(tr, f.of ? bytes(f.bytes) + ' / ' + bytes(f.of) : bytes(f.bytes), 'n');
    cell(tr, num(f.ageS, 1) + ' s', 'n');
    top.appendChild(tr);
  }
  if (!s.topFills.length) { const tr = document.createElement('tr'); cell(tr, 'no fills in flight', 'muted').colSpan = 4; top.appendChild(tr); }
  const mt = $('mirrors');
  mt.replaceChildren();
  for (const m of s.mirrors) {
    const tr = document.createElement('tr');
    cell(tr, m.group);
    cell(tr, m.mirror, 'url');
    cell(tr, m.healthy ? (m.stale ? 'stale' : 'healthy') : 'down', m.healthy && !m.stale ? 'good' : 'bad');
    cell(tr, m.lastProbeError === null ? '–' : (m.lastProbeOk ? 'before: ' : '') + m.lastProbeError, m.lastProbeOk === false ? 'bad' : 'muted');
    cell(tr, m.revision === null ? '–' : m.repo + ' r' + m.revision, 'n');
    cell(tr, m.rttMs === null ? '–' : num(m.rttMs, 1) + ' ms', 'n');
    cell(tr, num(m.fetches), 'n');
    cell(tr, num(m.failures), 'n');
    cell(tr, bytes(m.bytes), 'n');
    mt.appendChild(tr);
  }
  if (!s.mirrors.length) { const tr = document.createElement('tr'); cell(tr, 'no mirror groups configured (--stratum1)', 'muted').colSpan = 9; mt.appendChild(tr); }
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
}
async function tick() {
  try {
    const r = await fetch('status', { cache: 'no-store' });
    const s = await r.json();
    // Bytes out, per sample: the three tiers that serve clients.
    for (const x of s.history.samples) x.counts.outBytes = x.counts.memoryBytes + x.counts.diskBytes + x.counts.upstreamServedBytes;
    render(s);
  } catch (err) {
    $('state').textContent = 'no answer from cuttle';
    $('state').className = 'bad';
  }
}
tick();
setInterval(tick, 2000);
`;

const STYLE = `
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header .sub { color: #aab; }
main { padding: 14px 20px; display: grid; gap: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 14px; align-items: start; }
.card, section { background: #fff; border-radius: 6px; padding: 12px 14px; box-shadow: 0 1px 2px #0002; }
.card.key { border-top: 3px solid #3b7ddd; }
.card h2, section h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #667; margin: 0 0 6px; }
.big { font-size: 28px; font-weight: 600; font-variant-numeric: tabular-nums; }
.sub, .muted { color: #778; font-size: 12px; }
.bar { background: #e4e7ec; border-radius: 3px; height: 12px; overflow: hidden; margin: 4px 0 10px; }
.bar div { background: #3b7ddd; height: 100%; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.url { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.good { color: #1a7f37; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
svg { display: block; width: 100%; height: auto; }
svg .tick { font-size: 11px; fill: #556; }
.key-line { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin: 0 4px 0 10px; }
`;

const HTML = (script: string) => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>cuttle dashboard</title><style>${STYLE}</style></head>
<body>
<header><h1>cuttle</h1><span id="version"></span><span id="state">connecting…</span><span id="drain" class="sub"></span><span id="updated" class="sub"></span></header>
<main>
<div class="cards">
  <div class="card key"><h2>Origin offload, requests</h2><div class="big" id="offload-requests">–</div><div class="sub">client requests that cost no upstream fetch, since start: <span id="offload-requests-of"></span></div></div>
  <div class="card key"><h2>Origin offload, bytes</h2><div class="big" id="offload-bytes">–</div><div class="sub">bytes sent to clients that did not come from upstream, since start: <span id="offload-bytes-of"></span></div></div>
  <div class="card"><h2>Hit ratio (Squid's)</h2><div class="big" id="hitratio">–</div><div class="sub">requests answered from a stored copy, since start: <span id="hitratio-of"></span></div></div>
  <div class="card"><h2>Requests / s</h2><div class="big" id="rps">–</div><div class="sub" id="rps-over"></div></div>
  <div class="card"><h2>Served to clients</h2><div class="big" id="bps-out">–</div><div class="sub" id="bps-tiers"></div></div>
  <div class="card"><h2>Upstream fetches / s</h2><div class="big" id="ups">–</div><div class="sub" id="ups-in"></div></div>
  <div class="card"><h2>Fills in flight</h2><div class="big" id="fills">–</div><div class="sub" id="coalesced"></div></div>
  <div class="card"><h2>Client connections</h2><div class="big" id="conns">–</div><div class="sub">open now</div></div>
  <div class="card"><h2>Mirror failovers</h2><div class="big" id="failovers">–</div><div class="sub" id="resumes"></div></div>
  <div class="card"><h2>Stale served</h2><div class="big" id="stale">–</div><div class="sub">upstream down: stored copies served (TCP_REFRESH_FAIL_OLD)</div></div>
</div>
<div class="two">
<section><h2>Requests / s, the last hour</h2><svg id="chart-requests" viewBox="0 0 640 230" role="img" aria-label="requests per second"></svg>
  <div class="sub"><span class="key-line" style="background:#3b7ddd"></span>client requests<span class="key-line" style="background:#e8590c"></span>upstream fetches (the gap between them is the origin offload)</div></section>
<section><h2>Bytes / s, the last hour</h2><svg id="chart-bytes" viewBox="0 0 640 230" role="img" aria-label="bytes per second"></svg>
  <div class="sub"><span class="key-line" style="background:#3b7ddd"></span>body bytes to clients<span class="key-line" style="background:#e8590c"></span>body bytes from upstream</div></section>
</div>
<div class="two">
<section><h2>Cache fill</h2>
  <div>memory <span class="sub" id="level-memory"></span><div class="bar"><div id="fill-memory" style="width:0"></div></div></div>
  <div>disk <span class="sub" id="level-disk"></span><div class="bar"><div id="fill-disk" style="width:0"></div></div></div>
</section>
<section><h2>Top waiters: fills in flight by clients attached</h2>
<table><thead><tr><th>object</th><th class="n">clients</th><th class="n">received</th><th class="n">age</th></tr></thead><tbody id="top"></tbody></table></section>
</div>
<section><h2>Stratum 1 mirrors</h2>
<table><thead><tr><th>group</th><th>mirror</th><th>health</th><th>last probe error</th><th class="n">manifest</th><th class="n">RTT</th><th class="n">fetches</th><th class="n">failures</th><th class="n">bytes</th></tr></thead><tbody id="mirrors"></tbody></table></section>
</main>
<script>${script}</script>
</body></html>
`;

export const DASHBOARD_HTML = HTML(SCRIPT);
const scriptHash = createHash('sha256').update(SCRIPT).digest('base64');
export const DASHBOARD_CSP = `default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-${scriptHash}'; img-src 'self' data:`;
