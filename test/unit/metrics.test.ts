// The request-duration histogram is counted by cuttle itself (prom-client's observe() costs a label
// hash per request) but must read exactly as prom-client's own histogram would.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Histogram, Registry } from 'prom-client';
import { DurationHistogram } from '../../src/metrics.ts';

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
