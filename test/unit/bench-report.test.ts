// The bench's SVG chart of a hot-* scenario: such runs have no per-request latencies and one object
// fetched once, so the herd chart came out empty (issue 33 §3). The runs below are hot-small's as the
// bench wrote them (/tmp/bench28, commit 73a5dd8), a second target added.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { svgChart, type RunResult } from '../../bench/report.ts';

const hot = (target: string, round: number, rps: [number, number], p99: [number, number]): RunResult => ({
  scenario: 'hot-small',
  target,
  round,
  startedAt: '2026-12-04T21:13:22.859Z',
  uniqueObjects: 1,
  upstreamFetches: 1,
  emulatorRequests: 1,
  fetchesPerObjectMean: 1,
  fetchesPerObjectMax: 1,
  objectsFetchedMoreThanOnce: 0,
  proxyCpuS: 18.63,
  proxyPeakRssMiB: 132.578125,
  goodputMiBs: NaN,
  wallS: 23.228,
  hotClient: 'wrk',
  hot: [
    { connections: 64, reqPerSec: rps[0], mibPerSec: 220.6, errors: 0, latencyP50Ms: 0.926, latencyP99Ms: p99[0], generatorShare: 0.497, proxyShare: 0.852 },
    { connections: 256, reqPerSec: rps[1], mibPerSec: 175.7, errors: 0, latencyP50Ms: 4.598, latencyP99Ms: p99[1], generatorShare: 0.42, proxyShare: 0.769 },
  ],
  hotErrors: 0,
  manifestFetches: 0,
});

describe('bench report', () => {
  it('charts a hot scenario: hits / s and latency p99 per connection count, one bar per target', () => {
    const runs = [hot('cuttle', 1, [53207.35, 42369.39], [5.495, 40.114]), hot('squid', 1, [20000, 18000], [9, 50]), hot('cuttle', 2, [50000, 40000], [6, 42]), hot('squid', 2, [22000, 17000], [8, 48])];
    const svg = svgChart('hot-small', runs, ['cuttle', 'squid']);
    assert.match(svg, /^<svg /);
    assert.doesNotMatch(svg, /no per-request latencies/);
    // Bars: 2 panels × 2 connection counts × 2 targets, each with a height and its median written above it.
    const bars = [...svg.matchAll(/<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)" fill="#[0-9a-f]+"\/>\n<text [^>]*>([^<]+)</g)].map((m) => ({ height: Number(m[2]), label: m[3]! }));
    assert.deepEqual(bars.map((b) => b.label), ['51604', '21000', '41185', '17500', '5.75', '8.50', '41.1', '49']);
    assert.ok(bars.every((b) => b.height > 0));
    // Heights in proportion to the medians, on one axis per panel.
    const ratio = (a: number, b: number, want: number) => assert.ok(Math.abs(bars[a]!.height / bars[b]!.height / want - 1) < 0.01, `bars ${a}/${b}: ${bars[a]!.height}/${bars[b]!.height}, not ${want}`);
    ratio(0, 1, 51603.675 / 21000);
    ratio(6, 4, 41.057 / 5.7475);
    for (const axis of ['hits / s', 'latency p99 (ms)', 'by client connections']) assert.ok(svg.includes(axis), axis);
    assert.match(svg, />64<\/text>[\s\S]*>256<\/text>/, 'connection counts on the x axis');
  });
});
