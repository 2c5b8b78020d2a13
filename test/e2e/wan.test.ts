// The herd's Stratum 1 behind a WAN (bench/wan.ts): on loopback, and in a network namespace over a
// shaped veth (as root with iproute2). States only: right bytes, the emulator's own counts, and nothing
// left behind (listener, child, namespace, veth). The WAN's timing is measured by hand, not asserted.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { connect } from 'node:net';
import { describe, it, type TestContext } from 'node:test';
import { makeCatalog, type CatalogOptions } from '../../bench/emulator.ts';
import { startWanEmulator } from '../../bench/wan.ts';
import { requireTool } from '../helpers/tools.ts';

const catalog: CatalogOptions = { repo: 'wan.cern.ch', objects: 3, seed: 5, chunks: 1, catalogs: 0, chunkMiB: [2, 2] };
const { specs } = makeCatalog(catalog);
const chunk = specs.find((s) => s.kind === 'chunk')!;

/** One GET on a raw socket (Connection: close): status and body. */
async function rawGet(url: string): Promise<{ status: number; body: Buffer }> {
  const u = new URL(url);
  const c = connect(Number(u.port), u.hostname);
  // Not end(): node:http drops a request whose client half-closes before the answer.
  c.write(`GET ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\nConnection: close\r\n\r\n`);
  const parts: Buffer[] = [];
  c.on('data', (d: Buffer) => parts.push(d));
  await once(c, 'close');
  const all = Buffer.concat(parts);
  const end = all.indexOf('\r\n\r\n');
  return { status: Number(/^HTTP\/1\.1 (\d+)/.exec(all.subarray(0, end).toString('latin1'))?.[1]), body: all.subarray(end + 4) };
}

const sha1 = (b: Buffer) => createHash('sha1').update(b).digest('hex');

/** Whether a TCP connect to 127.0.0.1:port is refused (no listener). */
async function refused(port: number): Promise<boolean> {
  const c = connect(port, '127.0.0.1');
  const outcome = await new Promise<string | undefined>((resolve) => {
    c.once('connect', () => resolve('connected'));
    c.once('error', (e: NodeJS.ErrnoException) => resolve(e.code));
  });
  c.destroy();
  return outcome === 'ECONNREFUSED';
}

function netnsAllowed(t: TestContext): boolean {
  if (process.getuid?.() !== 0) {
    t.skip('not root: network namespaces need CAP_NET_ADMIN');
    return false;
  }
  return !!requireTool(t, ['ip'], 'iproute2') && !!requireTool(t, ['tc'], 'iproute2');
}

const ours = () => ({ netns: spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout, links: spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).stdout });

describe('WAN emulator', () => {
  it('loopback: serves a chunk whose SHA-1 is its name, in slow-start rounds, counts it, and leaves no listener', async () => {
    // Every round stalls (for 1 ms), so the stall count is the round count: 2 MiB from a 14,600-byte
    // window doubling each round is 8 rounds (14,600 x 255 >= 2 MiB > 14,600 x 127).
    const w = await startWanEmulator({ emulator: { catalog }, mode: 'loopback', rttMs: 5, lossStallProbability: 1, stallMs: [1, 1] });
    try {
      assert.equal(w.mode, 'loopback');
      assert.equal(w.why, 'mode loopback requested');
      assert.equal(w.host, '127.0.0.1');
      const r = await rawGet(`${w.url}${chunk.path}`);
      assert.equal(r.status, 200);
      assert.equal(r.body.length, 2 * 2 ** 20);
      assert.equal(sha1(r.body), chunk.hash);
      const st = await w.stats();
      assert.equal(st.requests, 1, 'one request counted');
      assert.equal(st.perPath[chunk.path], 1);
      assert.equal(st.bytes, chunk.size);
      assert.equal(st.stalls, 8, 'one stall draw per round of slow start');
    } finally {
      await w.close();
    }
    assert.ok(await refused(w.port), 'no listener after close()');
  });

  it('netns: a GET from the host reaches the namespace over the shaped veth; close() removes namespace and veth', async (t) => {
    if (!netnsAllowed(t)) return;
    const w = await startWanEmulator({ emulator: { catalog }, mode: 'netns', rttMs: 5, lossStallProbability: 0 });
    try {
      assert.equal(w.mode, 'netns');
      assert.match(w.host, /^10\.201\.\d+\.\d+$/);
      assert.match(ours().netns, new RegExp(`^${w.netns}\\b`, 'm'));
      for (const args of [['qdisc', 'show', 'dev', w.veth!], ['-n', w.netns!, 'qdisc', 'show']]) assert.match(spawnSync('tc', args, { encoding: 'utf8' }).stdout, /qdisc tbf .* rate 1Gbit/, `tc ${args.join(' ')}: shaped`);
      const r = await rawGet(`${w.url}${chunk.path}`);
      assert.equal(r.status, 200);
      assert.equal(sha1(r.body), chunk.hash);
      const st = await w.stats();
      assert.equal(st.requests, 1);
      assert.equal(st.perPath[chunk.path], 1);
    } finally {
      await w.close();
    }
    // No connection to the namespace's address after this: with the veth gone it would route off the host.
    const after = ours();
    assert.doesNotMatch(after.netns, new RegExp(`^${w.netns}\\b`, 'm'), 'namespace deleted');
    assert.ok(!after.links.includes(`${w.veth}@`) && !after.links.includes(`${w.veth}:`), 'veth deleted');
  });

  it('netns: a bench ended by SIGTERM tears down; one SIGKILLed is cleaned up by the next start', async (t) => {
    if (!netnsAllowed(t)) return;
    const script = `import { startWanEmulator } from ${JSON.stringify(new URL('../../bench/wan.ts', import.meta.url).href)};
      const w = await startWanEmulator({ emulator: { catalog: { repo: 'wan.cern.ch', objects: 1, seed: 1 } }, mode: 'netns' });
      process.stdout.write(JSON.stringify({ netns: w.netns, veth: w.veth }) + '\\n');
      setInterval(() => {}, 1 << 30);`;
    const run = async (sig: NodeJS.Signals) => {
      const c = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
      const [line] = (await once(c.stdout.setEncoding('utf8'), 'data')) as [string];
      const made = JSON.parse(line) as { netns: string; veth: string };
      assert.match(ours().netns, new RegExp(`^${made.netns}\\b`, 'm'));
      const exited = once(c, 'exit');
      c.kill(sig);
      const [code, signal] = await exited;
      return { made, code, signal };
    };
    const gone = (m: { netns: string; veth: string }) => {
      const now = ours();
      return !new RegExp(`^${m.netns}\\b`, 'm').test(now.netns) && !now.links.includes(`${m.veth}@`) && !now.links.includes(`${m.veth}:`);
    };
    const term = await run('SIGTERM');
    assert.equal(term.signal, 'SIGTERM', 'the signal still ends the process');
    assert.ok(gone(term.made), 'SIGTERM: namespace and veth removed by the exiting process');
    const kill = await run('SIGKILL');
    assert.ok(!gone(kill.made), 'SIGKILL: nothing could run, the namespace is left');
    const w = await startWanEmulator({ emulator: { catalog }, mode: 'netns', rttMs: 5, lossStallProbability: 0 });
    await w.close();
    assert.ok(gone(kill.made), "the next start removed the dead process's namespace and veth");
  });
});
