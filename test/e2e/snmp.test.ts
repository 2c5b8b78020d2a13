// The SNMP agent, walked with Debian's snmpwalk/snmpget (package snmp) on loopback.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import dgram from 'node:dgram';
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

/** A BER TLV (definite length). */
function tlv(tag: number, body: Buffer): Buffer {
  const n = body.length;
  const len = n < 0x80 ? [n] : n < 0x100 ? [0x81, n] : [0x82, n >> 8, n & 0xff];
  return Buffer.concat([Buffer.from([tag, ...len]), body]);
}
const int32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return tlv(0x02, b);
};
/** A v2c GetBulkRequest for `oid` (BER bytes), with any non-repeaters and max-repetitions, raw as a hostile manager sends them. */
function getBulk(id: number, community: string, nonRepeaters: number, maxRepetitions: number, oid: number[]): Buffer {
  const varbind = tlv(0x30, Buffer.concat([tlv(0x06, Buffer.from(oid)), Buffer.from([0x05, 0x00])]));
  const pdu = tlv(0xa5, Buffer.concat([int32(id), int32(nonRepeaters), int32(maxRepetitions), tlv(0x30, varbind)]));
  return tlv(0x30, Buffer.concat([int32(1), tlv(0x04, Buffer.from(community)), pdu]));
}
/** The TLVs in `b`, each as [tag, body]. */
function tlvs(b: Buffer): [number, Buffer][] {
  const out: [number, Buffer][] = [];
  for (let i = 0; i < b.length; ) {
    const tag = b[i]!;
    let len = b[i + 1]!;
    let at = i + 2;
    if (len & 0x80) {
      const k = len & 0x7f;
      len = b.subarray(at, at + k).reduce((a, x) => a * 256 + x, 0);
      at += k;
    }
    out.push([tag, b.subarray(at, at + len)]);
    i = at + len;
  }
  return out;
}
/** A response message's request id and number of varbinds. */
function response(msg: Buffer): { id: number; varbinds: number } {
  const [, , pdu] = tlvs(tlvs(msg)[0]![1]);
  const [id, , , list] = tlvs(pdu![1]);
  return { id: id![1].readIntBE(0, id![1].length), varbinds: tlvs(list![1]).length };
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

  it('a hostile GETBULK (negative non-repeaters, max-repetitions 2^31-1) is answered within the MIB, and the agent serves on', async () => {
    const sock = dgram.createSocket('udp4');
    const answers = new Map<number, number>();
    const waiters = new Map<number, () => void>();
    sock.on('message', (msg) => {
      const r = response(msg);
      answers.set(r.id, r.varbinds);
      waiters.get(r.id)?.();
    });
    const ask = (id: number, nonRepeaters: number, maxRepetitions: number) =>
      new Promise<number>((resolve) => {
        waiters.set(id, () => resolve(answers.get(id)!));
        sock.send(getBulk(id, 'wlcg', nonRepeaters, maxRepetitions, [0x2b, 6, 1, 4, 1, 0x9b, 0x27, 1]), p.proxy.snmpPort()!, '127.0.0.1');
      });
    try {
      // Before: -1 threw out of net-snmp's socket handler (the process died); 2^31-1 never ended (the
      // walk does not stop at the end of the MIB), holding the event loop until the heap ran out.
      assert.equal(await ask(1, -1, 5), 5);
      const all = await ask(2, 0, 2 ** 31 - 1);
      assert.ok(all >= 20 && all <= 21, `${all} varbinds: the MIB's 20 objects (and its end), not 2^31`);
      assert.equal(await ask(3, 0, 3), 3, 'a plain GETBULK is answered as asked');
      assert.deepEqual([...answers.keys()], [1, 2, 3], 'each packet answered once');
    } finally {
      sock.close();
    }
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
