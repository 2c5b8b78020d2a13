// Every counter in one table: Prometheus exports each monotonic number as a counter that never goes
// down, and /metrics, /status (what the dashboard polls) and SNMP show the same numbers after a known
// sequence of requests: a herd of 10 on one gated miss, a hit, a refusal.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import snmp from 'net-snmp';
import { Pool } from 'undici';
import { waitFor } from '../helpers/mirrors.ts';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';

type Series = Map<string, number>;
interface Scrape { types: Map<string, string>; series: Series }

/** The metrics of one /metrics text: each metric's TYPE, and every series' value. */
function parse(text: string): Scrape {
  const types = new Map<string, string>();
  const series: Series = new Map();
  for (const line of text.split('\n')) {
    const t = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (t) types.set(t[1]!, t[2]!);
    else if (line && !line.startsWith('#')) {
      const at = line.lastIndexOf(' ');
      series.set(line.slice(0, at), Number(line.slice(at + 1)));
    }
  }
  return { types, series };
}

const nameOf = (series: string) => series.split('{')[0]!;

/** Squid MIB scalars read with net-snmp's own client (a real UDP exchange with the agent). */
function snmpGet(port: number, oids: string[]): Promise<number[]> {
  const session = snmp.createSession('127.0.0.1', 'wlcg', { port, version: snmp.Version2c, timeout: 20_000, retries: 0 });
  return new Promise((resolve, reject) =>
    session.get(oids, (err, vbs) => {
      session.close();
      if (err) reject(err);
      else resolve((vbs ?? []).map((v) => Number(v.value)));
    }),
  );
}

const SQUID = '1.3.6.1.4.1.3495.1';

describe('the counter table', () => {
  let origin: Origin;
  let p: TestProxy;
  let g: Gate;
  const body = randomBytes(64 * 1024);
  before(async () => {
    g = gate();
    origin = await startOrigin({ '/herd': { headers: { 'cache-control': 'max-age=600' }, body, gate: g } });
    p = await startProxy({ 'allow-client': ['127.0.0.1/32'], 'snmp-listen': '127.0.0.1:0', 'snmp-community': 'wlcg' });
  });
  after(async () => {
    await p.close();
    await origin.close();
  });

  const admin = async (path: string) => (await fetch(`http://127.0.0.1:${p.proxy.adminAddress()!.port}${path}`)).text();

  it('exports monotonic numbers as counters that never go down, and every view shows the same numbers', async () => {
    const first = parse(await admin('/metrics'));
    // Fills, mirrors and tiers are counted since start: counters, not gauges of a count.
    for (const name of ['cuttle_fills_started_total', 'cuttle_fills_committed_total', 'cuttle_fills_failed_total', 'cuttle_upstream_fetches_total', 'cuttle_served_bytes_total', 'cuttle_cache_evictions', 'cuttle_mirror_fetches', 'cuttle_mirror_failures', 'cuttle_mirror_bytes', 'cuttle_mirror_probe_failures', 'cuttle_stale_served_total', 'cuttle_truncated_responses_total']) {
      assert.equal(first.types.get(name), 'counter', name);
    }

    // A herd of 10 on one miss, held at the origin until the proxy has all 10 on its fill.
    const c = proxyClient(p.url, 10);
    const url = `${origin.url}/herd`;
    const herd = Promise.all(Array.from({ length: 10 }, () => get(c, url)));
    await waitFor('ten readers on one fill', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 10);
    g.open();
    for (const r of await herd) assert.equal(r.body.length, body.length);
    await waitFor('the fill stored, its fill gone', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0);
    const middle = parse(await admin('/metrics'));
    // Then a hit, and a refusal (cuttle's own answer: its bytes are bytes out too).
    assert.equal((await get(c, url)).status, 200);
    const outsider = new Pool(p.url, { localAddress: '127.0.0.2' });
    const denied = await get(outsider, url);
    assert.equal(denied.status, 403);
    await outsider.close();
    await c.close();
    const last = parse(await admin('/metrics'));

    // Monotonic: no counter series falls from one scrape to the next (nor vanishes).
    for (const [a, b] of [[first, middle], [middle, last]] as const) {
      for (const [s, v] of a.series) {
        if (a.types.get(nameOf(s)) !== 'counter') continue;
        assert.ok((b.series.get(s) ?? -1) >= v, `${s}: ${v} then ${b.series.get(s)}`);
      }
    }

    const prom = (s: string) => last.series.get(s) ?? 0;
    const status = JSON.parse(await admin('/status'));
    // The herd cost one upstream fetch and one fill: /status and Prometheus say so alike.
    assert.equal(status.upstream.fetches, 1);
    assert.equal(prom('cuttle_upstream_fetches_total'), 1);
    assert.equal(origin.hits.get('/herd'), 1);
    assert.deepEqual([status.fills.fillsStarted, status.fills.fillsCommitted], [1, 1]);
    assert.deepEqual([prom('cuttle_fills_started_total'), prom('cuttle_fills_committed_total')], [1, 1]);
    assert.deepEqual([status.counters.requests, status.counters.misses, status.counters.coalesced, status.counters.hits, status.counters.denied], [12, 1, 9, 1, 1]);
    for (const k of ['requests', 'hits', 'misses', 'coalesced', 'denied', 'errors']) assert.equal(prom(`cuttle_requests_counted_total{counter="${k}"}`), status.counters[k], k);
    assert.equal(prom('cuttle_upstream_bytes_total'), status.upstream.bytes);
    assert.equal(status.upstream.bytes, body.length);
    // One definition of bytes out: the served bytes by where they came from, summed; the refusal's body included.
    const servedProm = ['memory', 'disk', 'upstream', 'cuttle'].map((t) => prom(`cuttle_served_bytes_total{tier="${t}"}`));
    const servedStatus = ['memory', 'disk', 'upstream', 'cuttle'].map((t) => status.servedBytes[t]);
    assert.deepEqual(servedProm, servedStatus);
    const sum = servedStatus.reduce((a: number, b: number) => a + b, 0);
    assert.equal(status.counters.bytesOut, sum);
    assert.equal(servedStatus[0] + servedStatus[2], 11 * body.length, 'ten from the fill, one from memory');
    assert.ok(servedStatus[3] > 0, "the refusal's body counts as bytes out");
    assert.equal(status.results.DENIED, 1);
    assert.equal(prom('cuttle_errors_total{error="http_request_denied"}'), status.errors.http_request_denied);
    assert.equal(prom('cuttle_cache_evictions{tier="memory"}'), status.tiers.memory.evictions);

    // SNMP reads the same figures (Squid's cacheHttpOutKb is bytes out in KiB).
    const [requests, hits, errors, outKb, serverRequests, serverInKb] = await snmpGet(p.proxy.snmpPort()!, ['3.2.1.1.0', '3.2.1.2.0', '3.2.1.3.0', '3.2.1.5.0', '3.2.1.10.0', '3.2.1.12.0'].map((o) => `${SQUID}.${o}`));
    assert.deepEqual(
      { requests, hits, errors, outKb, serverRequests, serverInKb },
      { requests: 12, hits: 1, errors: 1, outKb: Math.floor(sum / 1024), serverRequests: 1, serverInKb: Math.floor(body.length / 1024) },
    );
  });
});
