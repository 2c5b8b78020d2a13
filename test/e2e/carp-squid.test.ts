// Golden test of src/carp.ts against a real Squid (Debian's): Squid CARP-balances thousands of URLs over
// scripted parents that record what they receive; cuttle's Carp must name the parent Squid chose for
// every URL, with all parents up and with one parent dead (Squid still hashes it, it cannot win).
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Carp, carpKey, type CarpMember } from '../../src/carp.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, proxyClient } from '../helpers/proxy.ts';
import { findTool, requireTool } from '../helpers/tools.ts';
import { freePort } from '../helpers/ports.ts';

/** A parent that answers every request 200 no-store and records each request-target it was sent. */
interface Parent {
  port: number;
  seen: string[];
  close(): Promise<void>;
}

async function startParent(): Promise<Parent> {
  const seen: string[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    let buf = '';
    s.on('data', (chunk) => {
      buf += chunk.toString('latin1');
      if (buf.length > 65536) return s.destroy(); // bounded: requests here are a few hundred bytes
      for (let end = buf.indexOf('\r\n\r\n'); end >= 0; end = buf.indexOf('\r\n\r\n')) {
        const head = buf.slice(0, end);
        buf = buf.slice(end + 4);
        seen.push(head.split(' ')[1]!);
        s.write('HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 2\r\n\r\nok');
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    seen,
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        for (const s of sockets) s.destroy();
      }),
  };
}


// Mixed weights with equal ones (their order is the line order: glibc's qsort is stable here), names in
// mixed case (hashed as spelled). The member that dies is a weight-1 one in the middle of the sort.
const MEMBERS: CarpMember[] = [
  { name: 'Bank-Alpha', weight: 3 },
  { name: 'bank-beta', weight: 1 },
  { name: 'BANK-gamma', weight: 2 },
  { name: 'bank-Delta', weight: 1 },
  { name: 'bank-epsilon', weight: 5 },
];
const DIES = 3;

/** Deterministic URLs: CVMFS objects, an upper-case host, the default port written and omitted, query strings. */
function urls(n: number, seed: number): string[] {
  let x = seed >>> 0;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
  const hex = () => next().toString(16).padStart(8, '0');
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const obj = `${hex().slice(0, 2)}/${hex()}${hex()}${hex()}${hex()}${hex().slice(0, 6)}`;
    switch (i % 6) {
      case 0:
      case 1:
        out.push(`http://s1.example.org:8000/cvmfs/atlas.cern.ch/data/${obj}`);
        break;
      case 2:
        out.push(`http://S1.Example.ORG:8000/cvmfs/cms.cern.ch/data/${obj}C`);
        break;
      case 3:
        out.push(`http://cvmfs-s1.example.org/cvmfs/lhcb.cern.ch/data/${obj}`);
        break;
      case 4:
        out.push(`http://cvmfs-s1.example.org:80/cvmfs/lhcb.cern.ch/data/${obj}P`);
        break;
      default:
        out.push(`http://s1.example.org:8000/cvmfs/atlas.cern.ch/api/v1.0/geo/x/${hex()}?a=${next()}&B=c`);
    }
  }
  return out;
}

describe('Squid CARP golden test', { timeout: 60_000 }, () => {
  const squidBin = findTool(['squid', '/usr/sbin/squid']);
  let dir = '';
  let squid: ChildProcess | undefined;
  let port = 0;
  const parents: Parent[] = [];
  const carp = new Carp(MEMBERS);
  const log = () => (dir && existsSync(join(dir, 'cache.log')) ? readFileSync(join(dir, 'cache.log'), 'utf8') : '');

  before(async () => {
    if (!squidBin) return;
    for (const _ of MEMBERS) parents.push(await startParent());
    dir = mkdtempSync(join(tmpdir(), 'cuttle-carp-squid-')); // not under tmpDir()'s 0700 root: Squid runs as `proxy` when started as root
    chmodSync(dir, 0o777);
    port = await freePort();
    const conf = [
      `http_port 127.0.0.1:${port}`,
      'acl localnet src 127.0.0.0/8',
      'http_access allow localnet',
      'http_access deny all',
      'cache deny all',
      'cache_mem 8 MB',
      ...MEMBERS.map(
        (m, i) =>
          `cache_peer 127.0.0.1 parent ${parents[i]!.port} 0 no-query no-digest carp name=${m.name} weight=${m.weight}` +
          (i === DIES ? ' connect-fail-limit=1' : ''),
      ),
      'never_direct allow all',
      'shutdown_lifetime 0 seconds',
      `pid_filename ${join(dir, 'squid.pid')}`,
      `cache_log ${join(dir, 'cache.log')}`,
      'access_log none',
      `coredump_dir ${dir}`,
      'cache_effective_user proxy',
      '',
    ].join('\n');
    writeFileSync(join(dir, 'squid.conf'), conf);
    squid = spawn(squidBin, ['-N', '-f', join(dir, 'squid.conf')], { stdio: 'ignore' });
    await waitFor('squid to accept connections', () => {
      if (squid!.exitCode !== null) throw new Error(`squid exited ${squid!.exitCode}: ${log()}`);
      return /Accepting HTTP Socket connections/.test(log());
    }).catch((e: Error) => {
      throw new Error(`${e.message}: ${log().slice(-2000)}`);
    });
  });

  after(async () => {
    if (squid && squid.exitCode === null && squid.signalCode === null) {
      const exited = new Promise((r) => squid!.once('exit', r));
      squid.kill('SIGKILL'); // nothing to flush: no cache, no access log
      await exited;
    }
    await Promise.all(parents.map((p) => p.close()));
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Sends every URL through Squid (keep-alive, 4 connections, bounded) and returns the parent each reached. */
  async function route(list: string[]): Promise<number[]> {
    for (const p of parents) p.seen.length = 0;
    const pool = proxyClient(`http://127.0.0.1:${port}`, 4);
    try {
      let next = 0;
      const worker = async () => {
        while (next < list.length) {
          const r = await get(pool, list[next++]!);
          assert.equal(r.status, 200);
        }
      };
      await Promise.all([worker(), worker(), worker(), worker()]);
    } finally {
      await pool.close();
    }
    // Squid forwards absolute-form with the host lower-cased: identify a URL by its unique path and query.
    const at = new Map<string, number>();
    parents.forEach((p, i) => {
      for (const target of p.seen) {
        const u = new URL(target);
        assert.equal(at.has(u.pathname + u.search), false, `one fetch for ${target}`);
        at.set(u.pathname + u.search, i);
      }
    });
    return list.map((s) => {
      const u = new URL(s);
      return at.get(u.pathname + u.search) ?? -1;
    });
  }

  it("names the parent Squid's CARP chose for every URL, all parents up", async (t) => {
    if (!requireTool(t, ['squid', '/usr/sbin/squid'], 'squid')) return;
    const list = urls(2400, 0x9e3779b9);
    const got = await route(list);
    const want = list.map((s) => carp.owner(carpKey(new URL(s))));
    const wrong = list.filter((_, i) => got[i] !== want[i]);
    assert.deepEqual(wrong, [], `${wrong.length} of ${list.length} URLs went elsewhere`);
    assert.equal(parents.reduce((n, p) => n + p.seen.length, 0), list.length, 'one upstream fetch per URL');
    for (let i = 0; i < MEMBERS.length; i++) assert.ok(got.includes(i), `parent ${i} got URLs`);
  });

  it("prints the same hashes and multipliers in mgr:carp as Carp's table()", async (t) => {
    if (!requireTool(t, ['squid', '/usr/sbin/squid'], 'squid')) return;
    const pool = proxyClient(`http://127.0.0.1:${port}`, 1);
    const r = await get(pool, '/squid-internal-mgr/carp', { host: `127.0.0.1:${port}` });
    await pool.close();
    assert.equal(r.status, 200);
    const rows = new Map(
      r.body
        .toString()
        .split('\n')
        .map((l) => l.trim().split(/\s+/))
        .filter((f) => f.length === 5 && /^[0-9a-f]+$/.test(f[1]!))
        .map((f) => [f[0]!, { hash: parseInt(f[1]!, 16), multiplier: f[2]!, factor: f[3]! }]),
    );
    const table = carp.table();
    assert.equal(rows.size, table.length);
    for (const p of table) assert.deepEqual(rows.get(p.name), { hash: p.hash, multiplier: p.multiplier.toFixed(6), factor: p.factor.toFixed(6) }, p.name);
  });

  it('names the parent Squid chose with one parent dead: only the dead parent\'s URLs move', async (t) => {
    if (!requireTool(t, ['squid', '/usr/sbin/squid'], 'squid')) return;
    const dead = MEMBERS[DIES]!.name;
    await parents[DIES]!.close();
    // A request it owns makes Squid connect, fail (connect-fail-limit=1) and mark the parent dead.
    const owned = urls(200, 7).filter((s) => carp.owner(carpKey(new URL(s))) === DIES);
    const pool = proxyClient(`http://127.0.0.1:${port}`, 1);
    let sent = 0;
    try {
      await waitFor(`squid to mark ${dead} dead`, async () => {
        if (log().includes(`Detected DEAD Parent: ${dead}`)) return true;
        assert.ok(sent < owned.length, 'bounded number of triggering requests');
        assert.equal((await get(pool, owned[sent++]!)).status, 200); // served by another parent
        return log().includes(`Detected DEAD Parent: ${dead}`);
      });
    } finally {
      await pool.close();
    }
    const list = urls(2400, 0x9e3779b9);
    const got = await route(list);
    const want = list.map((s) => carp.owner(carpKey(new URL(s)), (i) => i !== DIES));
    const wrong = list.filter((_, i) => got[i] !== want[i]);
    assert.deepEqual(wrong, [], `${wrong.length} of ${list.length} URLs went elsewhere`);
    assert.equal(parents[DIES]!.seen.length, 0, 'nothing reached the dead parent');
    assert.equal(parents.reduce((n, p) => n + p.seen.length, 0), list.length, 'one upstream fetch per URL');
    const moved = list.filter((s) => carp.owner(carpKey(new URL(s))) !== carp.owner(carpKey(new URL(s)), (i) => i !== DIES));
    assert.ok(moved.length > 0 && moved.every((s) => carp.owner(carpKey(new URL(s))) === DIES), 'only the dead parent\'s URLs moved');
  });
});
