// The live dashboard at / on the admin listener: one self-contained page (no CDN: sites are often
// offline) that polls /status every 2 s and shows hit ratio, requests/s, bytes/s by tier, fills in
// flight, the fills with the most waiters, cache fill levels and mirror health. The inline script is
// allowed by its hash in the Content-Security-Policy, and nothing else is.
import { createHash } from 'node:crypto';

const SCRIPT = `
const $ = (id) => document.getElementById(id);
const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + ' ' + UNITS[i];
}
function num(n, d = 0) { return Number.isFinite(n) ? n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d }) : '–'; }
function pct(a, b) { return b > 0 ? (100 * a / b).toFixed(1) + ' %' : '–'; }
function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
const history = [];
let prev;
function spark(values) {
  const w = 300, h = 40, max = Math.max(1, ...values);
  const pts = values.map((v, i) => (i * w / Math.max(1, values.length - 1)).toFixed(1) + ',' + (h - v / max * (h - 2) - 1).toFixed(1)).join(' ');
  $('spark').setAttribute('points', pts);
  $('sparkmax').textContent = num(max, 1) + ' req/s';
}
function render(s, rates) {
  const c = s.counters;
  const served = c.hits + c.misses + c.coalesced + c.passes;
  $('state').textContent = s.draining ? 'draining' : 'serving';
  $('state').className = s.draining ? 'bad' : 'good';
  $('version').textContent = 'cuttle ' + s.version + ' · up ' + num(s.uptimeS) + ' s';
  // The last interval's ratio; with no traffic in it, the ratio since start.
  $('hitratio').textContent = rates && rates.served > 0 ? pct(rates.hits, rates.served) : pct(c.hits, served);
  $('hitratio-life').textContent = pct(c.hits, served) + ' since start';
  $('rps').textContent = rates ? num(rates.rps, 1) : '–';
  $('requests').textContent = num(c.requests) + ' requests';
  for (const t of ['memory', 'disk', 'upstream']) $('bps-' + t).textContent = rates ? bytes(rates.bps[t]) + '/s' : '–';
  $('upstream').textContent = rates ? bytes(rates.ups) + '/s' : '–';
  $('fetches').textContent = num(s.upstream.fetches) + ' fetches';
  $('fills').textContent = num(s.fills.inFlight);
  $('coalesced').textContent = num(c.coalesced) + ' coalesced';
  $('conns').textContent = num(s.clientConnections);
  $('failovers').textContent = num(s.fills.failovers);
  $('stale').textContent = num(c.staleServed);
  $('resumes').textContent = num(s.fills.resumes) + ' resumed · ' + num(s.fills.hashMismatches) + ' bad hashes';
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
    const t = performance.now();
    let rates;
    if (prev) {
      const dt = Math.max(0.001, (t - prev.t) / 1000), a = prev.s.counters, b = s.counters;
      const served = (x) => x.hits + x.misses + x.coalesced + x.passes;
      rates = {
        rps: (b.requests - a.requests) / dt,
        hits: b.hits - a.hits,
        served: served(b) - served(a),
        ups: (s.upstream.bytes - prev.s.upstream.bytes) / dt,
        bps: Object.fromEntries(['memory', 'disk', 'upstream'].map((k) => [k, (s.servedBytes[k] - prev.s.servedBytes[k]) / dt])),
      };
      history.push(rates.rps);
      if (history.length > 90) history.shift();
      spark(history);
    }
    prev = { s, t };
    render(s, rates);
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
header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; }
main { padding: 16px 20px; display: grid; gap: 16px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
.card, section { background: #fff; border-radius: 6px; padding: 12px 14px; box-shadow: 0 1px 2px #0002; }
.card h2, section h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #667; margin: 0 0 6px; }
.big { font-size: 28px; font-weight: 600; font-variant-numeric: tabular-nums; }
.sub, .muted { color: #778; font-size: 12px; }
.bar { background: #e4e7ec; border-radius: 3px; height: 12px; overflow: hidden; margin: 4px 0; }
.bar div { background: #3b7ddd; height: 100%; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.url { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.good { color: #1a7f37; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
svg { display: block; }
`;

const HTML = (script: string) => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>cuttle dashboard</title><style>${STYLE}</style></head>
<body>
<header><h1>cuttle</h1><span id="version"></span><span id="state">connecting…</span><span id="updated" class="sub"></span></header>
<main>
<div class="cards">
  <div class="card"><h2>Hit ratio</h2><div class="big" id="hitratio">–</div><div class="sub" id="hitratio-life"></div></div>
  <div class="card"><h2>Requests / s</h2><div class="big" id="rps">–</div><div class="sub" id="requests"></div></div>
  <div class="card"><h2>From memory</h2><div class="big" id="bps-memory">–</div><div class="sub">served bytes / s</div></div>
  <div class="card"><h2>From disk</h2><div class="big" id="bps-disk">–</div><div class="sub">served bytes / s</div></div>
  <div class="card"><h2>From upstream</h2><div class="big" id="bps-upstream">–</div><div class="sub">served bytes / s (misses)</div></div>
  <div class="card"><h2>Upstream in</h2><div class="big" id="upstream">–</div><div class="sub" id="fetches"></div></div>
  <div class="card"><h2>Fills in flight</h2><div class="big" id="fills">–</div><div class="sub" id="coalesced"></div></div>
  <div class="card"><h2>Client connections</h2><div class="big" id="conns">–</div></div>
  <div class="card"><h2>Mirror failovers</h2><div class="big" id="failovers">–</div><div class="sub" id="resumes"></div></div>
  <div class="card"><h2>Stale served</h2><div class="big" id="stale">–</div><div class="sub">upstream down: stored copies served (TCP_REFRESH_FAIL_OLD)</div></div>
</div>
<section><h2>Requests / s, last 3 minutes</h2><svg width="300" height="40" viewBox="0 0 300 40"><polyline id="spark" fill="none" stroke="#3b7ddd" stroke-width="1.5" points=""/></svg><span class="sub" id="sparkmax"></span></section>
<section><h2>Cache fill</h2>
  <div>memory <span class="sub" id="level-memory"></span><div class="bar"><div id="fill-memory" style="width:0"></div></div></div>
  <div>disk <span class="sub" id="level-disk"></span><div class="bar"><div id="fill-disk" style="width:0"></div></div></div>
</section>
<section><h2>Top waiters: fills in flight by clients attached</h2>
<table><thead><tr><th>object</th><th class="n">clients</th><th class="n">received</th><th class="n">age</th></tr></thead><tbody id="top"></tbody></table></section>
<section><h2>Stratum 1 mirrors</h2>
<table><thead><tr><th>group</th><th>mirror</th><th>health</th><th>last probe error</th><th class="n">manifest</th><th class="n">RTT</th><th class="n">fetches</th><th class="n">failures</th><th class="n">bytes</th></tr></thead><tbody id="mirrors"></tbody></table></section>
</main>
<script>${script}</script>
</body></html>
`;

export const DASHBOARD_HTML = HTML(SCRIPT);
const scriptHash = createHash('sha256').update(SCRIPT).digest('base64');
export const DASHBOARD_CSP = `default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-${scriptHash}'; img-src 'self' data:`;
