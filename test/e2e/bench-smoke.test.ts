// The herd harness end to end, small: 20 nodes x (manifest + 10 objects) against a real cuttle.
// It checks that the report adds up; it asserts nothing about timing.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, it } from 'node:test';
import { bulkLoad } from '../../bench/bulk.ts';
import { runOnce, SCENARIOS } from '../../bench/herd.ts';
import { markdownTable, svgChart } from '../../bench/report.ts';
import { startProxy } from '../helpers/proxy.ts';
import { requireTool } from '../helpers/tools.ts';

describe('bench harness (smoke)', () => {
  it('runs herd with 20 nodes and 10 objects, and its numbers are consistent', async () => {
    const scenario = { ...SCENARIOS.herd!, nodes: 20, objects: 10, latencyMs: 5 };
    const r = await runOnce({ scenario, target: 'cuttle', round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    const n = r.nodes!;
    assert.equal(n.planned, 20 * 11);
    assert.equal(n.requests, n.planned, 'requests counted == requests planned');
    assert.equal(n.completed, n.planned);
    assert.deepEqual(n.errors, {});
    assert.equal(n.watchdogTrips, 0);
    assert.equal(n.hashFailures, 0);
    assert.equal(r.upstreamFetches, r.emulatorRequests, "upstream fetches == the emulator's own count");
    assert.equal(r.uniqueObjects, 10, 'data objects');
    assert.equal(r.manifestFetches, 1);
    assert.equal(r.fetchesPerObjectMean, 1);
    assert.equal(r.objectsFetchedMoreThanOnce, 0);
    assert.ok(n.bytes > 0 && r.proxyPeakRssMiB > 0);
    // The host's TCP memory and losses are read (Linux): a herd that drove the kernel into dropping
    // segments must say so, its wall time and latency are partly loss recovery.
    const k = r.kernelTcp!;
    assert.ok(Number.isFinite(k.peakMemMiB) && k.peakMemMiB >= 0, 'the TCP memory in use is read');
    for (const v of [k.memoryPressures, k.receiveDrops, k.timeouts]) assert.ok(Number.isInteger(v) && v >= 0);
    const table = markdownTable('herd', [r], ['cuttle']);
    assert.match(table, /\| upstream fetches \/ object \(mean\) \| 1 \|/);
    assert.match(table, /\| host TCP memory-pressure episodes \| \d+ \|/);
    assert.match(svgChart('herd', [r], ['cuttle']), /^<svg /);
  });

  it('runs bank with 20 nodes over three cuttles: one fetch per object with --bank, three without, and a member killed costs no client an error', async () => {
    const scenario = { ...SCENARIOS.bank!, nodes: 20, objects: 10, latencyMs: 5 };
    const run = (target: string) => runOnce({ scenario, target, round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    for (const target of ['bank-shard', 'bank-random', 'nobank-random']) {
      const r = await run(target);
      const n = r.nodes!;
      assert.equal(n.completed, n.planned, target);
      assert.deepEqual(n.errors, {}, target);
      assert.equal(r.killedAtS, undefined, `${target}: nobody is killed`);
      assert.equal(r.uniqueObjects, 10, target);
      assert.equal(r.upstreamFetches, r.emulatorRequests, target);
      // Three members without a bank each fetch what their nodes ask (seed 3: every member has nodes).
      assert.equal(r.fetchesPerObjectMean, target.startsWith('nobank') ? 3 : 1, target);
      // Sharding nodes send the manifest (key 0) to one member; random ones to theirs, which fetch it themselves.
      assert.equal(r.manifestFetches, target.endsWith('shard') ? 1 : 3, target);
      assert.ok(r.proxyCpuS > 0 && r.proxyPeakRssMiB > 0, target);
    }
    // Member 2 is SIGKILLed while the Stratum 1 sends a fill (past 30% of the bytes: inside the chunk's):
    // the nodes burn it, rebuild their ring from the others, and every request completes.
    const k = await run('bank-shard-kill');
    assert.ok(k.killedAtS! > 0 && k.killed === 'member 2 (127.0.0.2)', `killed ${k.killed} at ${k.killedAtS}`);
    assert.equal(k.nodes!.completed, k.nodes!.planned);
    assert.deepEqual(k.nodes!.errors, {});
    assert.equal(k.nodes!.burnedNodes, 0);
    assert.match(markdownTable('bank', [k], ['bank-shard-kill']), /\| proxy killed at \(s\) \| [\d.]+ \|/);
  });

  it('runs parent with 20 nodes under two cuttle parents, the first killed mid-fill: no client errors', async () => {
    const scenario = { ...SCENARIOS.parent!, nodes: 20, objects: 10, latencyMs: 5 };
    const r = await runOnce({ scenario, target: 'cuttle-parents', round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    const n = r.nodes!;
    assert.equal(r.killed, 'parent 1');
    assert.ok(r.killedAtS! > 0);
    assert.equal(n.completed, n.planned);
    assert.deepEqual(n.errors, {});
    assert.equal(r.uniqueObjects, 10);
    assert.ok(r.fetchesPerObjectMax <= 2, 'a fill cut by the kill is fetched again through parent 2, nothing more');
    assert.ok(r.childCpuS! > 0 && r.parentsCpuS! > 0);
    assert.ok(Math.abs(r.proxyCpuS - r.childCpuS! - r.parentsCpuS!) < 1e-9, 'proxy CPU is the child and its parents');
  });

  it('measures the heap a waiting request holds, through node:http and in the hit lane', () => {
    const r = spawnSync(process.execPath, ['--expose-gc', 'bench/waiting.ts', '--nodes', '50'], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(r.status, 0, r.stderr);
    for (const what of ['node:http', 'hit lane joins']) {
      const m = new RegExp(`\\| heap held per waiting request, ${what} \\(bytes\\) \\| (-?\\d+) \\|`).exec(r.stdout);
      assert.ok(m && Number(m[1]) > 0, `${what}: ${r.stdout}`);
    }
  });

  it('runs hot-small through wrk at two connection counts and reports the generator beside the proxy', async (t) => {
    if (!requireTool(t, ['wrk'], 'wrk')) return;
    // A bounded run: one second per count; what is checked is the report, not the speed.
    const scenario = { ...SCENARIOS['hot-small']!, hotSeconds: 1, hotWarmupSeconds: 1, hotConnections: [2, 4] };
    const r = await runOnce({ scenario, target: 'cuttle', round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    assert.equal(r.upstreamFetches, 1, 'one fill, every other request a hit');
    assert.deepEqual(r.hot!.map((h) => h.connections), [2, 4]);
    for (const h of r.hot!) {
      assert.equal(h.errors, 0);
      assert.ok(h.reqPerSec > 0 && h.mibPerSec > 0);
      assert.ok(h.generatorShare > 0 && h.proxyShare > 0, 'both CPU shares are read');
    }
    assert.equal(r.hotErrors, 0);
    // The reference: a bare node:http server, the ceiling of a hit in Node, measured the same way.
    const ref = await runOnce({ scenario, target: 'node-http', round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    assert.equal(ref.upstreamFetches, 0, 'it answers from memory, never upstream');
    assert.ok(ref.hot!.every((h) => h.errors === 0 && h.reqPerSec > 0 && h.proxyShare > 0));
  });

  it('runs hot-large through the bulk reader (64 KiB reads, not wrk\'s 8 KiB) and counts only whole answers', async () => {
    const scenario = { ...SCENARIOS['hot-large']!, hotSeconds: 1, hotWarmupSeconds: 1, hotConnections: [2, 4] };
    assert.equal(scenario.hotClient, 'bulk', 'large hits default to the bulk reader');
    const r = await runOnce({ scenario, target: 'cuttle', round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
    assert.equal(r.hotClient, 'bulk');
    assert.equal(r.upstreamFetches, 1, 'one fill, every other request a hit');
    assert.deepEqual(r.hot!.map((h) => h.connections), [2, 4]);
    for (const h of r.hot!) {
      assert.equal(h.errors, 0);
      assert.ok(h.reqPerSec > 0 && h.generatorShare > 0 && h.proxyShare > 0, JSON.stringify(h));
      // Every counted request is a whole 1 MiB answer; the bytes include the heads and any answer cut at the end.
      assert.ok(h.mibPerSec >= h.reqPerSec * 0.99, JSON.stringify(h));
      assert.ok(h.latencyP99Ms >= h.latencyP50Ms && h.latencyP50Ms > 0);
    }
  });

  it('the bulk reader counts an answer that is not a whole 200 as an error, not a request', async () => {
    // A proxy that may not go to loopback destinations answers 403, and the reader reconnects after each.
    const proxy = await startProxy({ 'allow-local-dest': [] });
    try {
      const r = await bulkLoad({ proxy: proxy.url, url: 'http://127.0.0.1:9/x', connections: 2, seconds: 0.5 });
      assert.equal(r.reqPerSec, 0);
      assert.ok(r.errors > 0 && r.errors <= proxy.proxy.counters.denied, `${r.errors} errors, ${proxy.proxy.counters.denied} denied`);
    } finally {
      await proxy.close();
    }
  });

  // The references for large hits (issue 13's goal names them): Debian's Varnish and Traffic Server,
  // started by the harness, cache the hot object from one fetch, and their CPU is read like cuttle's.
  for (const [target, tools, apt] of [
    ['varnish', ['varnishd', '/usr/sbin/varnishd'], 'varnish'],
    ['ats', ['traffic_server', '/usr/bin/traffic_server'], 'trafficserver'],
  ] as const) {
    it(`runs hot-large against ${target}, which serves the bulk reader's requests from its cache`, async (t) => {
      if (!requireTool(t, [...tools], apt)) return;
      const scenario = { ...SCENARIOS['hot-large']!, hotSeconds: 1, hotWarmupSeconds: 1, hotConnections: [2] };
      const r = await runOnce({ scenario, target, round: 1, seed: 3, memoryCache: '64MB', connectionsPerNode: 1 });
      assert.equal(r.target, target);
      // The warm-up's three requests run one after another, and a proxy may still be writing the first
      // copy when the second asks (Traffic Server once fetched twice); wrk's requests are all hits.
      assert.ok(r.upstreamFetches >= 1 && r.upstreamFetches <= 3, `${target}: ${r.upstreamFetches} upstream fetches`);
      assert.equal(r.hotErrors, 0);
      assert.ok(r.hot!.every((h) => h.errors === 0 && h.reqPerSec > 0 && h.proxyShare > 0), JSON.stringify(r.hot));
      assert.ok(r.proxyCpuS > 0 && r.proxyPeakRssMiB > 0);
    });
  }
});
