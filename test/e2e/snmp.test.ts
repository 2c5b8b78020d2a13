// The SNMP agent, walked with Debian's snmpwalk/snmpget (package snmp) on loopback.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { requireTool } from '../helpers/tools.ts';

const SQUID = '.1.3.6.1.4.1.3495.1';
const REQUESTS = `${SQUID}.3.2.1.1.0`;
const HITS = `${SQUID}.3.2.1.2.0`;

/** Run an net-snmp tool (asynchronously: the agent answers from this very process). */
async function snmp(tool: string, args: string[]): Promise<{ code: number; values: Map<string, string>; out: string }> {
  // -On: numeric OIDs; -t/-r: a dropped packet fails fast instead of retrying for seconds.
  const r = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
    execFile(tool, ['-On', '-t', '1', '-r', '0', ...args], { encoding: 'utf8', timeout: 20_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? Number((err as { code?: number }).code ?? 1) || 1 : 0, stdout, stderr }),
    ),
  );
  const values = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const m = /^(\S+) = (?:[\w-]+: )?(.*)$/.exec(line.trim());
    if (m) values.set(m[1]!, m[2]!);
  }
  return { code: r.code, values, out: r.stdout + r.stderr };
}

describe('snmp agent (Squid MIB)', () => {
  let origin: Origin;
  let p: TestProxy;
  before(async () => {
    origin = await startOrigin({ '/obj': { headers: { 'cache-control': 'max-age=60' }, body: 'x'.repeat(4096) } });
    p = await startProxy({ 'snmp-listen': '127.0.0.1:0', 'snmp-community': 'wlcg' });
  });
  after(async () => {
    await p?.close();
    await origin?.close();
  });

  it('snmpwalk sees the request, hit and byte counters, cache size and uptime; they move with traffic', async (t) => {
    const walk = requireTool(t, ['snmpwalk'], 'snmp');
    const getTool = requireTool(t, ['snmpget'], 'snmp');
    if (!walk || !getTool) return;
    const target = `127.0.0.1:${p.proxy.snmpPort()}`;
    const c = proxyClient(p.url, 1);
    await get(c, `${origin.url}/obj`);
    // The disk commit lands after the response: wait for it, or the walk may read the size mid-commit.
    await waitFor('the object committed', () => p.proxy.coalescer.running === 0);
    const w1 = await snmp(walk, ['-v2c', '-c', 'wlcg', target, SQUID]);
    assert.equal(w1.code, 0, w1.out);
    assert.equal(w1.values.get(REQUESTS), '1');
    assert.equal(w1.values.get(`${SQUID}.1.2.0`), w1.values.get(`${SQUID}.3.2.1.14.0`), 'cacheSysStorage = cacheCurrentSwapSize (KB)');
    assert.match(w1.values.get(`${SQUID}.1.3.0`) ?? '', /^\(\d+\)/, 'cacheUptime in timeticks');
    assert.equal(w1.values.get(`${SQUID}.2.2.0`), '"cuttle"');
    assert.equal(w1.values.get(`${SQUID}.3.2.1.10.0`), '1', 'cacheServerRequests: one upstream fetch');
    assert.ok(w1.values.size >= 15, `${w1.values.size} objects walked`);
    for (let i = 0; i < 3; i++) await get(c, `${origin.url}/obj`);
    await c.close();
    // SNMPv1 too, as MRTG polls.
    const g = await snmp(getTool, ['-v1', '-c', 'wlcg', target, REQUESTS, HITS, `${SQUID}.3.2.1.5.0`]);
    assert.equal(g.code, 0, g.out);
    assert.equal(g.values.get(REQUESTS), '4');
    assert.equal(g.values.get(HITS), '3');
    assert.equal(g.values.get(`${SQUID}.3.2.1.5.0`), '16', 'cacheHttpOutKb: 4 x 4 KiB');
    assert.equal(origin.count('/obj'), 1);
  });

  it('a wrong community gets no answer', async (t) => {
    const getTool = requireTool(t, ['snmpget'], 'snmp');
    if (!getTool) return;
    const r = await snmp(getTool, ['-v2c', '-c', 'public', `127.0.0.1:${p.proxy.snmpPort()}`, REQUESTS]);
    assert.notEqual(r.code, 0);
    assert.match(r.out, /Timeout/);
  });

  it('a client outside --allow-snmp is dropped unanswered', async (t) => {
    const getTool = requireTool(t, ['snmpget'], 'snmp');
    if (!getTool) return;
    const q = await startProxy({ 'snmp-listen': '127.0.0.1:0', 'allow-snmp': ['10.0.0.0/8'] });
    try {
      const r = await snmp(getTool, ['-v2c', '-c', 'public', `127.0.0.1:${q.proxy.snmpPort()}`, REQUESTS]);
      assert.notEqual(r.code, 0);
      assert.match(r.out, /Timeout/);
    } finally {
      await q.close();
    }
  });
});
