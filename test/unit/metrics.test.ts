// The request-duration histogram is counted by cuttle itself (prom-client's observe() costs a label
// hash per request) but must read exactly as prom-client's own histogram would.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Histogram, Registry } from 'prom-client';
import { newCounters, type CounterSources } from '../../src/counters.ts';
import { DurationHistogram, Metrics } from '../../src/metrics.ts';
import type { MirrorSnapshot } from '../../src/mirrors.ts';

describe('DurationHistogram', () => {
  it('writes the same Prometheus text as a prom-client histogram fed the same observations', async () => {
    const bounds = [0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30];
    const registry = new Registry();
    const reference = new Histogram({ name: 'd_seconds', help: 'how long', labelNames: ['result'], buckets: bounds, registers: [registry] });
    const ours = new DurationHistogram('d_seconds', 'how long', bounds);
    // Values on, between and beyond the bounds, in two groups.
    const seen: [string, number][] = [['HIT', 0], ['HIT', 0.001], ['HIT', 0.0011], ['MISS', 0.02], ['MISS', 7], ['MISS', 30], ['MISS', 31], ['HIT', 0.25]];
    for (const [group, v] of seen) {
      reference.observe({ result: group }, v);
      ours.observe(group, v);
    }
    const lines = (text: string) => text.split('\n').filter(Boolean).sort();
    assert.deepEqual(lines(ours.text()), lines(await registry.metrics()));
  });

  it('writes only its header before the first observation', () => {
    assert.equal(new DurationHistogram('d_seconds', 'how long', [1]).text(), '# HELP d_seconds how long\n# TYPE d_seconds histogram\n');
  });
});

describe('Metrics counters', () => {
  it('only ever grow: a source that starts over (a mirror a reload dropped and brought back) adds its new count', async () => {
    let fetches = 5;
    const tier = { objects: 0, bytes: 0, maxBytes: 1, evictions: 0 };
    const src: CounterSources = {
      counters: newCounters(),
      fills: () => ({ fillsStarted: 0, fillsCommitted: 0, fillsFailed: 0, fillsReleased: 0, failovers: 0, resumes: 0, hashMismatches: 0, fillsAbandoned: 0, internalErrors: 0, inFlight: 0, memoryBytes: 0 }),
      upstream: () => ({ fetches: 0, bytes: 0 }),
      tiers: () => ({ memory: tier, disk: tier }),
      diskIndex: () => ({ entries: 0, maxEntries: 1, heapBytes: 0 }),
      bufferPoolBytes: () => 0,
      clientConnections: () => 0,
      acceptHandedOver: () => 0,
      backgroundWaiting: () => 0,
      peers: () => [],
      mirrors: () => [{ group: 'g', mirror: 'http://m', healthy: true, rttMs: null, revision: null, stale: false, fetches, failures: 0, bytes: 0, probeFailures: 0 } as MirrorSnapshot],
      accessLogDroppedLines: () => 0,
    };
    const m = new Metrics(src);
    const read = async () => Number(/^cuttle_mirror_fetches\{group="g",mirror="http:\/\/m"\} (\d+)$/m.exec(await m.text())?.[1]);
    assert.equal(await read(), 5);
    fetches = 7;
    assert.equal(await read(), 7);
    fetches = 2; // a new Mirror object: its count starts again
    assert.equal(await read(), 9);
    assert.match(await m.text(), /^# TYPE cuttle_mirror_fetches counter$/m);
  });
});
