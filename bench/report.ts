// Turning runs into a table of medians (with cuttle/Squid ratios), JSON, Markdown and an SVG chart.
import type { NodesReport } from './nodes.ts';

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
  /** hot-* scenarios */
  reqPerSec?: number;
  mibPerSec?: number;
  hotErrors?: number;
  /** memory: RSS after warm-up and after filling every object. */
  rssBeforeMiB?: number;
  rssAfterMiB?: number;
  /** mirror-kill: when the nearest mirror was killed. */
  mirrorKilledAtS?: number;
}

/** Rows of the summary: label, how to read it from a run, and which direction is better. */
export const FIGURES: { label: string; get: (r: RunResult) => number | undefined; better: 'lower' | 'higher' }[] = [
  { label: 'manifest fetches (expires every 61 s)', get: (r) => r.manifestFetches, better: 'lower' },
  { label: 'upstream fetches / object (mean)', get: (r) => r.fetchesPerObjectMean, better: 'lower' },
  { label: 'upstream fetches / object (max)', get: (r) => r.fetchesPerObjectMax, better: 'lower' },
  { label: 'objects fetched more than once', get: (r) => r.objectsFetchedMoreThanOnce, better: 'lower' },
  { label: 'client errors (after retry)', get: (r) => (r.nodes ? Object.values(r.nodes.errors).reduce((a, b) => a + b, 0) : r.hotErrors), better: 'lower' },
  { label: 'first-attempt failures', get: (r) => (r.nodes ? Object.values(r.nodes.firstAttemptErrors).reduce((a, b) => a + b, 0) : undefined), better: 'lower' },
  { label: 'nodes that switched Stratum 1', get: (r) => r.nodes?.hostSwitches, better: 'lower' },
  { label: 'watchdog trips', get: (r) => r.nodes?.watchdogTrips, better: 'lower' },
  { label: 'hash failures', get: (r) => r.nodes?.hashFailures, better: 'lower' },
  { label: 'latency p50 (ms)', get: (r) => r.nodes?.latencyMs.p50, better: 'lower' },
  { label: 'latency p99 (ms)', get: (r) => r.nodes?.latencyMs.p99, better: 'lower' },
  { label: 'latency max (ms)', get: (r) => r.nodes?.latencyMs.max, better: 'lower' },
  { label: 'TTFB p50 (ms)', get: (r) => r.nodes?.ttfbMs.p50, better: 'lower' },
  { label: 'TTFB p99 (ms)', get: (r) => r.nodes?.ttfbMs.p99, better: 'lower' },
  { label: 'chunk waiters with bytes before the first fill completed', get: (r) => (r.nodes ? r.nodes.streamedBeforeFirstFill : undefined), better: 'higher' },
  { label: 'chunk waiters that arrived during the first fill', get: (r) => r.nodes?.waitersDuringFirstFill, better: 'higher' },
  { label: 'goodput (MiB/s)', get: (r) => (r.nodes ? r.goodputMiBs : undefined), better: 'higher' },
  { label: 'wall time (s)', get: (r) => (r.nodes ? r.wallS : undefined), better: 'lower' },
  { label: 'hit throughput (req/s)', get: (r) => r.reqPerSec, better: 'higher' },
  { label: 'hit throughput (MiB/s)', get: (r) => r.mibPerSec, better: 'higher' },
  { label: 'RSS after warm-up (MiB)', get: (r) => r.rssBeforeMiB, better: 'lower' },
  { label: 'RSS after all objects (MiB)', get: (r) => r.rssAfterMiB, better: 'lower' },
  { label: 'RSS growth (MiB)', get: (r) => (r.rssAfterMiB !== undefined && r.rssBeforeMiB !== undefined ? r.rssAfterMiB - r.rssBeforeMiB : undefined), better: 'lower' },
  { label: 'proxy CPU (s)', get: (r) => r.proxyCpuS, better: 'lower' },
  { label: 'proxy peak RSS (MiB)', get: (r) => r.proxyPeakRssMiB, better: 'lower' },
  { label: 'load generator CPU (s)', get: (r) => r.nodes?.generatorCpuS, better: 'lower' },
  { label: 'load generator loop lag p99 (ms)', get: (r) => r.nodes?.generatorLoopLagMs.p99, better: 'lower' },
  { label: 'load generator stalls excluded from the watchdog (s)', get: (r) => r.nodes?.generatorStallS, better: 'lower' },
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

/** Markdown table of medians per target, with the first target / second target ratio. */
export function markdownTable(scenario: string, runs: RunResult[], targets: string[]): string {
  const head = `| ${scenario} | ${targets.map((t) => `${t} (median)`).join(' | ')}${targets.length === 2 ? ` | ${targets[0]}/${targets[1]} |` : ' |'}`;
  const sep = `|---|${targets.map(() => '---:').join('|')}|${targets.length === 2 ? '---:|' : ''}`;
  const rows: string[] = [];
  for (const f of FIGURES) {
    const meds = targets.map((t) => median(runs.filter((r) => r.target === t).map((r) => f.get(r) ?? NaN)));
    if (meds.every((m) => !Number.isFinite(m))) continue;
    const ratio = meds.length === 2 && Number.isFinite(meds[0]!) && Number.isFinite(meds[1]!) && meds[1] !== 0 ? `${(meds[0]! / meds[1]!).toFixed(2)}×` : meds.length === 2 ? '–' : '';
    rows.push(`| ${f.label} | ${meds.map(fmt).join(' | ')}${targets.length === 2 ? ` | ${ratio} |` : ' |'}`);
  }
  return [head, sep, ...rows].join('\n');
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd'];

/** Latency CDF per target (log x axis) and upstream fetches per object, as one self-contained SVG. */
export function svgChart(scenario: string, runs: RunResult[], targets: string[]): string {
  const W = 760;
  const H = 300;
  const pad = 50;
  const cdfW = 460;
  const parts: string[] = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="11">`, `<rect width="${W}" height="${H}" fill="white"/>`, `<text x="${pad}" y="18" font-size="13">${scenario}: latency CDF (ms, log) and upstream fetches per object</text>`];
  const all = runs.flatMap((r) => r.nodes?.latencyMs.cdf.map(([v]) => v) ?? []).filter((v) => v > 0);
  const lo = Math.max(0.1, Math.min(...all, 1));
  const hi = Math.max(...all, 10);
  const x = (v: number) => pad + ((Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo) || 1)) * (cdfW - pad);
  const y = (q: number) => H - pad - (q / 100) * (H - 2 * pad);
  parts.push(`<line x1="${pad}" y1="${H - pad}" x2="${cdfW}" y2="${H - pad}" stroke="#333"/><line x1="${pad}" y1="${pad}" x2="${pad}" y2="${H - pad}" stroke="#333"/>`);
  for (const q of [0, 50, 90, 99, 100]) parts.push(`<text x="${pad - 30}" y="${y(q) + 4}">${q}%</text>`);
  for (let e = Math.ceil(Math.log10(lo)); e <= Math.log10(hi); e++) parts.push(`<text x="${x(10 ** e) - 8}" y="${H - pad + 14}">${10 ** e}</text>`);
  targets.forEach((t, i) => {
    const r = runs.find((run) => run.target === t && run.nodes);
    if (!r?.nodes) return;
    const pts = r.nodes.latencyMs.cdf.map(([v, q]) => `${x(v).toFixed(1)},${y(q).toFixed(1)}`).join(' ');
    parts.push(`<polyline fill="none" stroke="${COLORS[i % 4]}" stroke-width="2" points="${pts}"/>`, `<text x="${pad + 10}" y="${pad + 14 * i}" fill="${COLORS[i % 4]}">${t}</text>`);
  });
  const bx = cdfW + 60;
  const maxF = Math.max(2, ...runs.map((r) => r.fetchesPerObjectMax));
  const bh = (v: number) => (v / maxF) * (H - 2 * pad);
  parts.push(`<line x1="${bx}" y1="${H - pad}" x2="${W - 20}" y2="${H - pad}" stroke="#333"/>`);
  targets.forEach((t, i) => {
    const mean = median(runs.filter((r) => r.target === t).map((r) => r.fetchesPerObjectMean));
    const max = median(runs.filter((r) => r.target === t).map((r) => r.fetchesPerObjectMax));
    const x0 = bx + 10 + i * 110;
    parts.push(
      `<rect x="${x0}" y="${H - pad - bh(mean)}" width="40" height="${bh(mean)}" fill="${COLORS[i % 4]}"/>`,
      `<rect x="${x0 + 45}" y="${H - pad - bh(max)}" width="40" height="${bh(max)}" fill="${COLORS[i % 4]}" opacity="0.5"/>`,
      `<text x="${x0}" y="${H - pad + 14}">mean ${fmt(mean)}</text><text x="${x0 + 45}" y="${H - pad + 26}">max ${fmt(max)}</text>`,
      `<text x="${x0}" y="${H - pad - bh(max) - 6}" fill="${COLORS[i % 4]}">${t}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}
