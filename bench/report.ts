// Turning runs into a table of medians (with cuttle/Squid ratios), JSON, Markdown and an SVG chart.
import type { KernelTcp } from './kernel-tcp.ts';
import type { NodesReport } from './nodes.ts';
import { GENERATOR_SATURATED, type WrkResult } from './wrk.ts';

/** Hit scenarios are measured at both: a lean client with few connections, and a crowd. */
export const HOT_CONNECTIONS = [64, 256] as const;

export interface RunResult {
  scenario: string;
  target: string;
  round: number;
  startedAt: string;
  nodes?: NodesReport;
  /** Data objects seen by the emulator (the manifest is counted in manifestFetches). */
  uniqueObjects: number;
  /** All upstream requests, manifest included. */
  upstreamFetches: number;
  manifestFetches?: number;
  emulatorRequests: number;
  fetchesPerObjectMean: number;
  fetchesPerObjectMax: number;
  objectsFetchedMoreThanOnce: number;
  proxyCpuS: number;
  proxyPeakRssMiB: number;
  goodputMiBs: number;
  wallS: number;
  /** hot-* scenarios: one load-generator run per connection count, with the proxy's share of its core. */
  hot?: (WrkResult & { proxyShare: number; perWorkerReqPerSec?: number[] })[];
  /** hot-* scenarios: which load generator measured them. */
  hotClient?: string;
  hotErrors?: number;
  /** memory: RSS after warm-up and after filling every object. */
  rssBeforeMiB?: number;
  rssAfterMiB?: number;
  /** mirror-kill: when the nearest mirror was killed. */
  mirrorKilledAtS?: number;
  /** parent and bank: which proxy was killed mid-herd, and when. */
  killed?: string;
  killedAtS?: number;
  /** parent: the child's CPU and its parents' (proxyCpuS is their sum). */
  childCpuS?: number;
  parentsCpuS?: number;
  /** The host's TCP memory and losses during the run (Linux). */
  kernelTcp?: KernelTcp;
  /** --wan: how the Stratum 1 was reached (netns or loopback, and why), and its loss stalls. */
  wan?: string;
  wanStalls?: number;
  /** rolling: each member's turn, the fetch goal per object, and the check after the roll. */
  rolling?: RollingReport;
}

/** rolling (bench/rolling.ts): what the roll did and what it cost. */
export interface RollingReport {
  steps: import('./rolling.ts').RollStep[];
  /** Epoch ms at which the herd ended (a step after it rolled an idle bank). */
  herdEndedAt: number;
  /** Data objects over the goal: fetches > 1 + the restarts (a member's SIGTERM to its return) that fell inside the object's fill (first fetch seen to first complete response). */
  objectsOverGoal: number;
  /** Data objects fetched again while a member was down, though stored before it went down. */
  refetchedWhileDown: number;
  /** After the roll: every member up in every member's view, and each data object asked at its owner. */
  after: { allPeersUp: boolean; asked: number; hits: number; missesByMember: number[]; missesNeverStored: number; errors: number; upstreamFetchesDuring: number };
}

interface Figure {
  label: string;
  get: (r: RunResult) => number | undefined;
  better: 'lower' | 'higher';
  /** A run where this figure may be the load generator's limit rather than the proxy's: no ratio. */
  generatorBound?: (r: RunResult) => boolean;
}

const at = (r: RunResult, c: number) => r.hot?.find((h) => h.connections === c);
const hotFigures = (c: number): Figure[] => {
  const generatorBound = (r: RunResult) => (at(r, c)?.generatorShare ?? 0) >= GENERATOR_SATURATED;
  return [
    { label: `hits, ${c} connections (req/s)`, get: (r) => at(r, c)?.reqPerSec, better: 'higher', generatorBound },
    { label: `hits, ${c} connections (MiB/s)`, get: (r) => at(r, c)?.mibPerSec, better: 'higher', generatorBound },
    { label: `hits, ${c} connections: proxy CPU per request (µs)`, get: (r) => { const h = at(r, c); return h ? (h.proxyShare * 1e6) / h.reqPerSec : undefined; }, better: 'lower' },
    { label: `hits, ${c} connections: latency p99 (ms)`, get: (r) => at(r, c)?.latencyP99Ms, better: 'lower', generatorBound },
    { label: `hits, ${c} connections: proxy share of its core`, get: (r) => at(r, c)?.proxyShare, better: 'lower' },
    { label: `hits, ${c} connections: load generator's share of its core`, get: (r) => at(r, c)?.generatorShare, better: 'lower' },
  ];
};

/** Rows of the summary: label, how to read it from a run, and which direction is better. */
export const FIGURES: Figure[] = [
  { label: 'manifest fetches (expires every 61 s)', get: (r) => r.manifestFetches, better: 'lower' },
  { label: 'upstream fetches / object (mean)', get: (r) => r.fetchesPerObjectMean, better: 'lower' },
  { label: 'upstream fetches / object (max)', get: (r) => r.fetchesPerObjectMax, better: 'lower' },
  { label: 'objects fetched more than once', get: (r) => r.objectsFetchedMoreThanOnce, better: 'lower' },
  { label: 'client errors (after retry)', get: (r) => (r.nodes ? Object.values(r.nodes.errors).reduce((a, b) => a + b, 0) : r.hotErrors), better: 'lower' },
  { label: 'first-attempt failures', get: (r) => (r.nodes ? Object.values(r.nodes.firstAttemptErrors).reduce((a, b) => a + b, 0) : undefined), better: 'lower' },
  { label: 'nodes that switched Stratum 1', get: (r) => r.nodes?.hostSwitches, better: 'lower' },
  { label: 'nodes that burned the proxy (too slow or cut, twice)', get: (r) => r.nodes?.burnedNodes, better: 'lower' },
  { label: 'nodes refused (labelled 503 or refused connection)', get: (r) => r.nodes?.refusedNodes, better: 'lower' },
  { label: 'proxy group: members burned by nodes that went on with the others', get: (r) => r.nodes?.proxyBurns, better: 'lower' },
  { label: 'proxy group: nodes that switched member', get: (r) => r.nodes?.nodesSwitchedProxy, better: 'lower' },
  { label: 'proxy killed at (s)', get: (r) => r.killedAtS, better: 'lower' },
  { label: 'refusal time p99 (ms)', get: (r) => (r.nodes?.refusedNodes ? r.nodes.refusalMs.p99 : undefined), better: 'lower' },
  { label: 'watchdog trips', get: (r) => r.nodes?.watchdogTrips, better: 'lower' },
  { label: 'hash failures', get: (r) => r.nodes?.hashFailures, better: 'lower' },
  { label: 'latency p50 (ms)', get: (r) => r.nodes?.latencyMs.p50, better: 'lower' },
  { label: 'latency p99 (ms)', get: (r) => r.nodes?.latencyMs.p99, better: 'lower' },
  { label: 'latency max (ms)', get: (r) => r.nodes?.latencyMs.max, better: 'lower' },
  { label: 'TTFB p50 (ms)', get: (r) => r.nodes?.ttfbMs.p50, better: 'lower' },
  { label: 'TTFB p99 (ms)', get: (r) => r.nodes?.ttfbMs.p99, better: 'lower' },
  { label: 'TTFB max (ms)', get: (r) => r.nodes?.ttfbMs.max, better: 'lower' },
  { label: 'chunk waiters with bytes before the first fill completed', get: (r) => (r.nodes ? r.nodes.streamedBeforeFirstFill : undefined), better: 'higher' },
  { label: 'chunk waiters that arrived during the first fill', get: (r) => r.nodes?.waitersDuringFirstFill, better: 'higher' },
  { label: 'WAN loss stalls at the Stratum 1 (retransmission timeouts)', get: (r) => r.wanStalls, better: 'lower' },
  { label: 'goodput (MiB/s)', get: (r) => (r.nodes ? r.goodputMiBs : undefined), better: 'higher' },
  { label: 'wall time (s)', get: (r) => (r.nodes ? r.wallS : undefined), better: 'lower' },
  ...HOT_CONNECTIONS.flatMap(hotFigures),
  { label: 'RSS after warm-up (MiB)', get: (r) => r.rssBeforeMiB, better: 'lower' },
  { label: 'RSS after all objects (MiB)', get: (r) => r.rssAfterMiB, better: 'lower' },
  { label: 'RSS growth (MiB)', get: (r) => (r.rssAfterMiB !== undefined && r.rssBeforeMiB !== undefined ? r.rssAfterMiB - r.rssBeforeMiB : undefined), better: 'lower' },
  { label: 'proxy CPU (s)', get: (r) => r.proxyCpuS, better: 'lower' },
  { label: 'child proxy CPU (s)', get: (r) => r.childCpuS, better: 'lower' },
  { label: 'parent proxies CPU (s)', get: (r) => r.parentsCpuS, better: 'lower' },
  { label: 'proxy peak RSS (MiB)', get: (r) => r.proxyPeakRssMiB, better: 'lower' },
  { label: 'load generator CPU (s)', get: (r) => r.nodes?.generatorCpuS, better: 'lower' },
  { label: "load generator's share of its core (≥ 0.9: saturated)", get: (r) => (r.nodes ? r.nodes.generatorCpuS / r.wallS : undefined), better: 'lower' },
  { label: 'load generator loop lag p99 (ms)', get: (r) => r.nodes?.generatorLoopLagMs.p99, better: 'lower' },
  { label: 'load generator stalls excluded from the watchdog (s)', get: (r) => r.nodes?.generatorStallS, better: 'lower' },
  { label: "host's TCP memory peak (MiB)", get: (r) => r.kernelTcp?.peakMemMiB, better: 'lower' },
  { label: 'host TCP memory-pressure episodes', get: (r) => r.kernelTcp?.memoryPressures, better: 'lower' },
  { label: 'segments dropped by receivers (host)', get: (r) => r.kernelTcp?.receiveDrops, better: 'lower' },
  { label: 'retransmission timeouts (host)', get: (r) => r.kernelTcp?.timeouts, better: 'lower' },
  { label: 'listen queue overflows (host)', get: (r) => r.kernelTcp?.listenOverflows, better: 'lower' },
];

export function median(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function fmt(x: number): string {
  if (!Number.isFinite(x)) return '–';
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 10 ? x.toFixed(1) : x.toFixed(2);
}

/** Markdown table of medians per target, with the ratio of the first target to each other one. */
export function markdownTable(scenario: string, runs: RunResult[], targets: string[]): string {
  const others = targets.slice(1);
  const head = `| ${scenario} | ${targets.map((t) => `${t} (median)`).join(' | ')} |${others.map((o) => ` ${targets[0]}/${o} |`).join('')}`;
  const sep = `|---|${targets.map(() => '---:').join('|')}|${others.map(() => '---:|').join('')}`;
  const rows: string[] = [];
  for (const f of FIGURES) {
    const meds = targets.map((t) => median(runs.filter((r) => r.target === t).map((r) => f.get(r) ?? NaN)));
    if (meds.every((m) => !Number.isFinite(m))) continue;
    // A ratio is withheld when the generator limited either of its two targets, not a third one.
    const bound = (other: string) => f.generatorBound !== undefined && runs.some((r) => (r.target === targets[0] || r.target === other) && f.generatorBound!(r));
    const ratios = meds.slice(1).map((m, i) => (bound(others[i]!) ? `no ratio: load generator saturated (≥ ${GENERATOR_SATURATED * 100}% of its core)` : Number.isFinite(meds[0]!) && Number.isFinite(m) && m !== 0 ? `${(meds[0]! / m).toFixed(2)}×` : '–'));
    rows.push(`| ${f.label} | ${meds.map(fmt).join(' | ')} |${ratios.map((r) => ` ${r} |`).join('')}`);
  }
  return [head, sep, ...rows].join('\n');
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd'];

/** A round top for an axis: 1, 2, 2.5 or 5 × 10^k, at least `max`. */
function axisTop(max: number): number {
  if (!(max > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(max / 4));
  return 4 * [1, 2, 2.5, 5, 10].find((m) => m * p * 4 >= max)! * p;
}

/**
 * The hot-* scenarios' chart: they have no per-request latencies nor a herd's fetches per object (one
 * object, fetched once), so the chart of the others was empty. Here: hits per second and latency p99,
 * per connection count, one bar per target (medians over rounds).
 */
function svgHotChart(scenario: string, runs: RunResult[], targets: string[]): string {
  const W = 900;
  const H = 380;
  const top = 70;
  const bottom = 60;
  const plotH = H - top - bottom;
  const esc = (t: string) => t.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const color = (i: number) => COLORS[i % COLORS.length];
  const conns = [...new Set(runs.flatMap((r) => r.hot?.map((h) => h.connections) ?? []))].sort((a, b) => a - b);
  const med = (t: string, c: number, f: (h: NonNullable<RunResult['hot']>[number]) => number) => median(runs.filter((r) => r.target === t).flatMap((r) => r.hot?.filter((h) => h.connections === c).map(f) ?? []));
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="70" y="22" font-size="15" font-weight="bold">${esc(scenario)}: ${esc(targets.join(' vs '))} (medians of ${Math.max(...targets.map((t) => runs.filter((r) => r.target === t).length))} rounds)</text>`,
  ];
  targets.forEach((t, i) => {
    const client = runs.find((r) => r.target === t)?.hotClient;
    const y = 42 + 16 * i;
    parts.push(`<rect x="70" y="${y - 10}" width="14" height="10" fill="${color(i)}"/>`, `<text x="90" y="${y}"><tspan font-weight="bold" fill="${color(i)}">${esc(t)}</tspan>  proxy CPU ${fmt(median(runs.filter((r) => r.target === t).map((r) => r.proxyCpuS)))} s · peak RSS ${fmt(median(runs.filter((r) => r.target === t).map((r) => r.proxyPeakRssMiB)))} MiB${client ? ` · load generator ${esc(client)}` : ''}</text>`);
  });
  const panel = (x0: number, x1: number, title: string, unit: string, get: (h: NonNullable<RunResult['hot']>[number]) => number) => {
    const vals = conns.flatMap((c) => targets.map((t) => med(t, c, get)));
    const max = axisTop(Math.max(0, ...vals.filter(Number.isFinite)));
    const y = (v: number) => top + plotH - (v / max) * plotH;
    parts.push(`<line x1="${x0}" y1="${top + plotH}" x2="${x1}" y2="${top + plotH}" stroke="#333"/><line x1="${x0}" y1="${top}" x2="${x0}" y2="${top + plotH}" stroke="#333"/>`);
    parts.push(`<text transform="translate(${x0 - 52} ${top + plotH / 2}) rotate(-90)" text-anchor="middle">${esc(unit)}</text>`, `<text x="${(x0 + x1) / 2}" y="${H - 18}" text-anchor="middle">${esc(title)}, by client connections</text>`);
    for (let k = 0; k <= 4; k++) parts.push(`<text x="${x0 - 6}" y="${y((max * k) / 4) + 4}" text-anchor="end">${fmt((max * k) / 4)}</text><line x1="${x0}" y1="${y((max * k) / 4)}" x2="${x1}" y2="${y((max * k) / 4)}" stroke="#eee"/>`);
    const group = (x1 - x0) / Math.max(1, conns.length);
    const bw = Math.min(60, (group - 20) / Math.max(1, targets.length));
    conns.forEach((c, ci) => {
      const gx = x0 + ci * group + (group - bw * targets.length) / 2;
      targets.forEach((t, ti) => {
        const v = med(t, c, get);
        if (!Number.isFinite(v)) return;
        const bx = gx + ti * bw;
        parts.push(`<rect x="${bx.toFixed(1)}" y="${y(v).toFixed(1)}" width="${(bw - 4).toFixed(1)}" height="${(top + plotH - y(v)).toFixed(1)}" fill="${color(ti)}"/>`, `<text x="${(bx + bw / 2 - 2).toFixed(1)}" y="${(y(v) - 4).toFixed(1)}" text-anchor="middle">${fmt(v)}</text>`);
      });
      parts.push(`<text x="${(x0 + ci * group + group / 2).toFixed(1)}" y="${top + plotH + 16}" text-anchor="middle">${c}</text>`);
    });
  };
  panel(110, 480, 'hits per second', 'hits / s', (h) => h.reqPerSec);
  panel(600, W - 20, 'latency p99', 'latency p99 (ms)', (h) => h.latencyP99Ms);
  parts.push('</svg>');
  return parts.join('\n');
}

/** Latency CDF per target (log x axis) and upstream fetches per object, as one self-contained SVG. */
export function svgChart(scenario: string, runs: RunResult[], targets: string[]): string {
  if (runs.some((r) => r.hot?.length) && !runs.some((r) => r.nodes)) return svgHotChart(scenario, runs, targets);
  const W = 900;
  const H = 380;
  const top = 70;
  const bottom = 60;
  const left = 70;
  const cdfR = 520; // right edge of the CDF plot
  const plotH = H - top - bottom;
  const esc = (t: string) => t.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const color = (i: number) => COLORS[i % COLORS.length];
  const med = (t: string, f: (r: RunResult) => number | undefined) => {
    const v = runs.filter((r) => r.target === t).map(f).filter((x): x is number => x !== undefined);
    return v.length ? median(v) : undefined;
  };
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${left}" y="22" font-size="15" font-weight="bold">${esc(scenario)}: ${esc(targets.join(' vs '))} (medians of ${Math.max(...targets.map((t) => runs.filter((r) => r.target === t).length))} rounds)</text>`,
  ];
  // Legend, with the figures that matter for each target written beside its colour.
  targets.forEach((t, i) => {
    const p50 = med(t, (r) => r.nodes?.latencyMs.p50);
    const p99 = med(t, (r) => r.nodes?.latencyMs.p99);
    const figs = [p50 !== undefined ? `p50 ${fmt(p50)} ms` : '', p99 !== undefined ? `p99 ${fmt(p99)} ms` : '', `proxy CPU ${fmt(med(t, (r) => r.proxyCpuS) ?? 0)} s`, `peak RSS ${fmt(med(t, (r) => r.proxyPeakRssMiB) ?? 0)} MiB`, med(t, (r) => r.hot?.[0]?.reqPerSec) !== undefined ? `${fmt(med(t, (r) => r.hot?.[0]?.reqPerSec)!)} req/s at ${HOT_CONNECTIONS[0]} conns` : '']
      .filter(Boolean)
      .join(' · ');
    const y = 42 + 16 * i;
    parts.push(`<rect x="${left}" y="${y - 10}" width="14" height="10" fill="${color(i)}"/>`, `<text x="${left + 20}" y="${y}"><tspan font-weight="bold" fill="${color(i)}">${esc(t)}</tspan>  ${esc(figs)}</text>`);
  });
  // Left: latency CDF, log-scale x.
  const all = runs.flatMap((r) => r.nodes?.latencyMs.cdf.map(([v]) => v) ?? []).filter((v) => v > 0);
  const y = (q: number) => top + plotH - (q / 100) * plotH;
  parts.push(`<line x1="${left}" y1="${top + plotH}" x2="${cdfR}" y2="${top + plotH}" stroke="#333"/><line x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}" stroke="#333"/>`);
  parts.push(`<text x="${(left + cdfR) / 2}" y="${H - 18}" text-anchor="middle">request latency, ms (log scale)</text>`, `<text transform="translate(18 ${top + plotH / 2}) rotate(-90)" text-anchor="middle">requests done within (%)</text>`);
  for (const q of [0, 25, 50, 75, 90, 100]) parts.push(`<text x="${left - 6}" y="${y(q) + 4}" text-anchor="end">${q}</text><line x1="${left}" y1="${y(q)}" x2="${cdfR}" y2="${y(q)}" stroke="#eee"/>`);
  if (all.length) {
    const lo = Math.max(0.1, Math.min(...all, 1));
    const hi = Math.max(...all, 10);
    const x = (v: number) => left + ((Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo) || 1)) * (cdfR - left);
    for (let e = Math.ceil(Math.log10(lo)); e <= Math.log10(hi); e++) parts.push(`<text x="${x(10 ** e)}" y="${top + plotH + 16}" text-anchor="middle">${10 ** e}</text>`);
    targets.forEach((t, i) => {
      const r = runs.find((run) => run.target === t && run.nodes);
      if (!r?.nodes) return;
      const pts = r.nodes.latencyMs.cdf.map(([v, q]) => `${x(v).toFixed(1)},${y(q).toFixed(1)}`).join(' ');
      parts.push(`<polyline fill="none" stroke="${color(i)}" stroke-width="2.5" points="${pts}"/>`);
    });
  } else parts.push(`<text x="${(left + cdfR) / 2}" y="${top + plotH / 2}" text-anchor="middle" fill="#888">no per-request latencies in this scenario</text>`);
  // Right: upstream fetches per object (1 is ideal: one fetch however many clients).
  const bx = cdfR + 80;
  const maxF = Math.max(2, ...runs.map((r) => r.fetchesPerObjectMax).filter(Number.isFinite));
  const bh = (v: number) => (Number.isFinite(v) ? (v / maxF) * plotH : 0);
  parts.push(`<line x1="${bx}" y1="${top + plotH}" x2="${W - 20}" y2="${top + plotH}" stroke="#333"/><line x1="${bx}" y1="${top}" x2="${bx}" y2="${top + plotH}" stroke="#333"/>`);
  parts.push(`<text transform="translate(${bx - 40} ${top + plotH / 2}) rotate(-90)" text-anchor="middle">upstream fetches per object</text>`, `<text x="${(bx + W - 20) / 2}" y="${H - 18}" text-anchor="middle">mean (solid) and max (light); 1 is ideal</text>`);
  for (const v of [0, 1, maxF]) parts.push(`<text x="${bx - 6}" y="${top + plotH - bh(v) + 4}" text-anchor="end">${fmt(v)}</text>`);
  targets.forEach((t, i) => {
    const mean = med(t, (r) => r.fetchesPerObjectMean) ?? NaN;
    const max = med(t, (r) => r.fetchesPerObjectMax) ?? NaN;
    const x0 = bx + 12 + i * 100;
    parts.push(
      `<rect x="${x0}" y="${top + plotH - bh(mean)}" width="40" height="${bh(mean)}" fill="${color(i)}"/>`,
      `<rect x="${x0 + 42}" y="${top + plotH - bh(max)}" width="40" height="${bh(max)}" fill="${color(i)}" opacity="0.45"/>`,
      `<text x="${x0 + 20}" y="${top + plotH - bh(mean) - 4}" text-anchor="middle">${Number.isFinite(mean) ? fmt(mean) : '–'}</text>`,
      `<text x="${x0 + 62}" y="${top + plotH - bh(max) - 4}" text-anchor="middle">${Number.isFinite(max) ? fmt(max) : '–'}</text>`,
      `<text x="${x0 + 41}" y="${top + plotH + 16}" text-anchor="middle" fill="${color(i)}" font-weight="bold">${esc(t)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}
