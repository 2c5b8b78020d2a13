// `cuttle warm` (issue 31) on real sockets: the real CLI as a child process, a real cuttle, and a
// scripted Stratum 1 serving a repository in cvmfs's own format (bench/cvmfs-repository.ts). Each test
// counts what reached the Stratum 1.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { buildRepository, type Repository } from '../../bench/cvmfs-repository.ts';
import { gate, startOrigin, type Gate, type Origin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { startWarm } from '../helpers/warm.ts';
import { get, proxyClient, refusedFor, startChildProxy, startProxy, tmpDir, type TestProxy } from '../helpers/proxy.ts';

const REPO = 'test.cern.ch';
const ROOT = `/cvmfs/${REPO}/`;

/** Serve a revision's bodies as a Stratum 1 does (Apache's expiry: 61 s for .cvmfs*, 3 days for data). */
function serve(origin: Origin, repo: Repository, opts: { gates?: Map<string, Gate>; corrupt?: string } = {}): void {
  for (const [rel, body] of repo.bodies) {
    let b = body;
    if (rel === opts.corrupt) {
      b = Buffer.from(body);
      b[b.length >> 1]! ^= 0xff;
    }
    origin.route(ROOT + rel, { body: b, gate: opts.gates?.get(rel), headers: { 'content-type': 'application/x-cvmfs', 'cache-control': rel.startsWith('.') ? 'max-age=61' : 'max-age=259200' } });
  }
}

const warm = (args: string[]) => startWarm(args).done;

/** Requests the Stratum 1 has seen, by path under the repository. */
function seen(origin: Origin): Map<string, number> {
  const m = new Map<string, number>();
  for (const r of origin.seen) m.set(r.path.slice(ROOT.length), (m.get(r.path.slice(ROOT.length)) ?? 0) + 1);
  return m;
}

interface Rig {
  origin: Origin;
  proxy: TestProxy;
  repoUrl: string;
  state: string;
  args: (...extra: string[]) => string[];
}

async function rig(repo: Repository, opts: Parameters<typeof serve>[2] = {}, proxyOptions: Record<string, unknown> = {}): Promise<Rig> {
  const origin = await startOrigin();
  serve(origin, repo, opts);
  const proxy = await startProxy(proxyOptions);
  const state = join(tmpDir(), 'warm-state.json');
  const repoUrl = `${origin.url}/cvmfs/${REPO}`;
  after(async () => {
    await proxy.close();
    await origin.close();
  });
  return { origin, proxy, repoUrl, state, args: (...extra) => [repoUrl, '--proxy', proxy.url, '--state', state, ...extra] };
}

describe('cuttle warm', () => {
  const r1 = buildRepository({ repo: REPO, revision: 1 });
  const r2 = buildRepository({ repo: REPO, revision: 2 });
  const catalogsOf = (r: Repository) => new Set(r.catalogs.values());

  it('fetches every object and catalog once and nothing a walker must skip; a second warm costs the Stratum 1 nothing; the next revision costs exactly its new objects', async () => {
    const t = await rig(r1);
    const first = await warm(t.args('--json'));
    assert.equal(first.code, 0, first.stderr);
    const report = JSON.parse(first.stdout) as { ok: boolean; repositories: { fetched: { objects: number }; revision: number }[] };
    assert.equal(report.ok, true);
    assert.equal(report.repositories[0]!.fetched.objects, r1.objects.size + 2, 'objects, the whitelist and the certificate');
    const s1 = seen(t.origin);
    for (const p of [...r1.objects, ...catalogsOf(r1), '.cvmfspublished', '.cvmfswhitelist']) assert.equal(s1.get(p), 1, p);
    for (const p of r1.neverFetched) assert.equal(s1.get(p), undefined, `never asked for ${p}`);
    assert.equal(t.origin.seen.length, r1.objects.size + r1.catalogs.size + 3, 'upstream requests = distinct objects + catalogs + manifest, whitelist, certificate');

    const second = await warm(t.args());
    assert.equal(second.code, 0, second.stderr);
    // The root catalog is complete (the state file says so): nothing below it is even asked of the cache.
    assert.match(second.stdout, /fetched 0 objects .* skipped 2 cached .* 1 catalogs already complete/);
    assert.equal(t.origin.seen.length, r1.objects.size + r1.catalogs.size + 3, 'a second warm of the same revision: 0 upstream requests');

    // Publish revision 2; a client's refresh after the manifest's TTL brings it into the cache.
    serve(t.origin, r2);
    const pool = proxyClient(t.proxy.url, 1);
    assert.equal((await get(pool, `${t.repoUrl}/.cvmfspublished`, { 'cache-control': 'no-cache' })).status, 200);
    await pool.close();
    const before = t.origin.seen.length;
    const third = await warm(t.args('--json'));
    assert.equal(third.code, 0, third.stderr);
    const r3 = JSON.parse(third.stdout) as { repositories: { revision: number; fetched: { objects: number }; catalogs: { complete: number } }[] };
    assert.equal(r3.repositories[0]!.revision, 2);
    const added = [...r2.objects].filter((p) => !r1.objects.has(p));
    assert.equal(r3.repositories[0]!.fetched.objects, added.length);
    assert.equal(r3.repositories[0]!.catalogs.complete, 1, '/sw (with /sw/root below it) was complete: not walked again');
    const newCatalogs = [...catalogsOf(r2)].filter((c) => !catalogsOf(r1).has(c));
    assert.deepEqual(newCatalogs.sort(), [r2.catalogs.get('')!, r2.catalogs.get('/rev')!].sort());
    assert.equal(t.origin.seen.length - before, added.length + newCatalogs.length, 'the next revision: exactly its new objects and catalogs');
    const s3 = seen(t.origin);
    for (const p of [...r2.objects, ...catalogsOf(r2)]) assert.equal(s3.get(p), 1, p);
  });

  it('yields to clients: while they keep cuttle busy its fills are refused (--background-wait) and asked again later, each object still fetched once', async () => {
    const t = await rig(r1, {}, { 'background-wait': '0s' });
    // The gate is driven here (background.test.ts): busy until warm has been refused, then idle.
    const gate = t.proxy.proxy.background;
    gate.stopSampling();
    gate.tick(performance.now(), 1, 100);
    const w = startWarm(t.args());
    await waitFor('a fill of warm refused', async () => (await refusedFor(t.proxy, 'background')) >= 1);
    // The manifest, warm's first fill, was refused: nothing reached the Stratum 1.
    assert.equal(t.origin.seen.filter((r) => r.path.startsWith(ROOT)).length, 0);
    gate.tick(performance.now(), 0, 0);
    const run = await w.done;
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /times asked again after the proxy was busy with clients/);
    const s = seen(t.origin);
    for (const p of [...r1.objects, ...catalogsOf(r1), '.cvmfspublished']) assert.equal(s.get(p), 1, p);
  });

  it('--path walks only the sub-trees asked for, pruning on nested catalogs and on directories', async () => {
    const t = await rig(r1);
    const run = await warm(t.args('--path', '/sw/gcc'));
    assert.equal(run.code, 0, run.stderr);
    const s = seen(t.origin);
    const gcc = [...r1.objectsBySubtree.get('/sw')!].filter((p) => !p.endsWith('P'));
    assert.equal(gcc.length, 6);
    for (const p of gcc) assert.equal(s.get(p), 1, p);
    for (const p of [r1.catalogs.get('')!, r1.catalogs.get('/sw')!]) assert.equal(s.get(p), 1, p);
    for (const p of [r1.catalogs.get('/rev')!, r1.catalogs.get('/sw/root')!]) assert.equal(s.get(p), undefined, `pruned: ${p}`);
    const objects = [...s.keys()].filter((p) => r1.objects.has(p));
    assert.deepEqual(objects.sort(), gcc.sort(), 'no object outside /sw/gcc');
  });

  it('--check asks nothing upstream, and its cached and missing counts match what was warmed', async () => {
    const t = await rig(r1);
    assert.equal((await warm(t.args('--path', '/sw'))).code, 0);
    const before = t.origin.seen.length;
    const check = await warm(t.args('--check', '--json'));
    assert.equal(check.code, 1, 'not everything is cached');
    assert.equal(t.origin.seen.length, before, '--check made no upstream request');
    const r = (JSON.parse(check.stdout) as { repositories: { mountable: boolean; paths: { path: string; cached: { objects: number; bytes: number }; missing: { objects: number; bytes: number } }[]; catalogs: { missing: string[] }; largestMissing: { path: string; objects: number }[] }[] }).repositories[0]!;
    const sw = r1.objectsBySubtree.get('/sw')!.size + r1.objectsBySubtree.get('/sw/root')!.size;
    const rootOwn = r1.objectsBySubtree.get('')!.size;
    assert.equal(r.mountable, true);
    assert.deepEqual(r.paths, [{ path: '/', cached: { objects: sw, bytes: r.paths[0]!.cached.bytes }, missing: { objects: rootOwn, bytes: r.paths[0]!.missing.bytes } }]);
    assert.deepEqual(r.catalogs.missing, ['/rev'], "/rev's catalog was never fetched: its sub-tree is unreadable without the WAN");
    assert.deepEqual(r.largestMissing.map((m) => [m.path, m.objects]), [['/', rootOwn]]);
    const swOnly = await warm(t.args('--check', '--path', '/sw'));
    assert.equal(swOnly.code, 0, swOnly.stdout);
    assert.match(swOnly.stdout, new RegExp(`/sw: cached ${sw} objects .* missing 0 objects`));
    assert.equal(t.origin.seen.length, before);
  });

  it('resumes after a kill mid-walk: completed catalogs are skipped, and nothing is fetched twice', async () => {
    const held = gate();
    const gated = [...r1.objectsBySubtree.get('/sw/root')!][0]!;
    const t = await rig(r1, { gates: new Map([[gated, held]]) });
    const first = startWarm(t.args('--concurrency', '1'));
    await waitFor('the walk to reach /sw/root', () => t.origin.count(ROOT + gated) === 1);
    first.kill();
    assert.equal((await first.done).code, null, 'killed');
    const state = JSON.parse(readFileSync(t.state, 'utf8')) as { complete: Record<string, Record<string, string[]>> };
    const done = Object.keys(Object.values(state.complete)[0]!);
    assert.ok(done.includes(r1.catalogs.get('/rev')!.replace(/^data\/(..)\/(.*)C$/, '$1$2')), '/rev was complete before the kill');
    held.open();
    const second = await warm(t.args('--json'));
    assert.equal(second.code, 0, second.stderr);
    const r = (JSON.parse(second.stdout) as { repositories: { catalogs: { complete: number } }[] }).repositories[0]!;
    assert.equal(r.catalogs.complete, 1);
    const s = seen(t.origin);
    for (const p of [...r1.objects, ...catalogsOf(r1)]) assert.equal(s.get(p), 1, p);
  });

  it('a catalog that fails its hash is refused (exit 5), and cuttle does not store it', async () => {
    const t = await rig(r1, { corrupt: r1.catalogs.get('/sw')! });
    const run = await warm(t.args());
    assert.equal(run.code, 5, run.stdout + run.stderr);
    assert.match(run.stdout, /CATALOG_FAILED: catalog \/sw/);
    const pool = proxyClient(t.proxy.url, 1);
    const again = await get(pool, `${t.repoUrl}/${r1.catalogs.get('/sw')}`, { 'cache-control': 'only-if-cached' }, 'HEAD');
    await pool.close();
    assert.equal(again.status, 504, 'the corrupt catalog was not stored');
    assert.equal(seen(t.origin).get(r1.catalogs.get('/sw')!), 1);
  });

  it('a proxy that is not a cuttle is refused (exit 3) before any walk', async () => {
    const t = await rig(r1);
    const run = await warm([t.repoUrl, '--proxy', t.origin.url, '--state', t.state]);
    assert.equal(run.code, 3, run.stdout + run.stderr);
    assert.match(run.stdout, /NOT_CUTTLE/);
    assert.equal([...seen(t.origin).keys()].filter((p) => p.startsWith('data/')).length, 0);
  });

  it('--watch warms each new revision as it is published, and stops cleanly on SIGTERM', async () => {
    const t = await rig(r1);
    const w = startWarm(t.args('--watch', '--watch-interval', '20ms'));
    await waitFor('revision 1 warmed', () => [...r1.objects].every((p) => t.origin.count(ROOT + p) === 1));
    serve(t.origin, r2);
    const added = [...r2.objects].filter((p) => !r1.objects.has(p));
    await waitFor('revision 2 warmed', () => added.every((p) => t.origin.count(ROOT + p) === 1));
    // Fetched upstream is not yet walked: its summary comes once the last body is read.
    await waitFor('revision 2 summarised', () => w.stdout().includes('revision 2: fetched'));
    w.kill('SIGTERM');
    const run = await w.done;
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /revision 1: fetched/);
    assert.match(run.stdout, /revision 2: fetched/);
    const s = seen(t.origin);
    for (const p of [...r1.objects, ...r2.objects, ...catalogsOf(r1), ...catalogsOf(r2)]) assert.equal(s.get(p), 1, p);
  });

  it('a walk larger than --disk-cache is announced before it starts, and stops at --max-bytes (exit 6)', async () => {
    const t = await rig(r1);
    const config = join(tmpDir(), 'cuttle.yaml');
    writeFileSync(config, 'disk-cache: 200KB\nmax-object-size: 100KB\nmax-memory-object-size: 64KB\nmemory-cache: 128KB\n');
    const run = await warm(t.args('--config', config, '--concurrency', '1'));
    assert.equal(run.code, 6, run.stdout + run.stderr);
    assert.match(run.stderr, /more than --disk-cache \(200 KiB\); it stops after fetching 180 KiB \(--max-bytes\)/);
    assert.match(run.stdout, /LIMIT: /);
    const fetched = [...seen(t.origin).keys()].filter((p) => r1.objects.has(p)).map((p) => r1.bodies.get(p)!.length);
    assert.ok(fetched.reduce((a, b) => a + b, 0) <= 180 * 1024, 'no more than 90% of --disk-cache fetched');
    assert.ok(fetched.length < r1.objects.size);
  });

  it("its state file sits in cuttle's cache dir by default, and cuttle still starts on that dir", async () => {
    const origin = await startOrigin();
    serve(origin, r1);
    after(() => origin.close());
    const cacheDir = join(tmpDir(), 'cache');
    const config = join(tmpDir(), 'cuttle.yaml');
    writeFileSync(config, `cache-dir: ${cacheDir}\n`);
    const first = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', cacheDir, '--allow-local-dest', '127.0.0.1']);
    const run = await warm([`${origin.url}/cvmfs/${REPO}`, '--proxy', first.url, '--config', config]);
    assert.equal(run.code, 0, run.stderr);
    assert.ok(readFileSync(join(cacheDir, 'warm-state.json'), 'utf8').length > 0);
    await first.stop();
    const second = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', cacheDir, '--allow-local-dest', '127.0.0.1']);
    const again = await warm([`${origin.url}/cvmfs/${REPO}`, '--proxy', second.url, '--config', config]);
    await second.stop();
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /fetched 0 objects .* 1 catalogs already complete/, 'the state survived the restart');
    assert.equal(seen(origin).get(r1.catalogs.get('')!), 1);
  });

  it('an unreachable Stratum 1 is exit 4 quoting cuttle\'s labelled answer, and an unreachable proxy exit 3', async () => {
    const t = await rig(r1);
    const gone = await startOrigin();
    const goneUrl = gone.url;
    await gone.close();
    const s1 = await warm([`${goneUrl}/cvmfs/${REPO}`, '--proxy', t.proxy.url, '--state', t.state]);
    assert.equal(s1.code, 4, s1.stdout + s1.stderr);
    assert.match(s1.stdout, /STRATUM1_UNREACHABLE: .*HTTP 502 \(ERR_CONNECT_FAIL 111\)/);
    const proxy = await warm([t.repoUrl, '--proxy', goneUrl, '--state', t.state]);
    assert.equal(proxy.code, 3, proxy.stdout + proxy.stderr);
    assert.match(proxy.stdout, /PROXY_UNREACHABLE/);
    assert.equal(t.origin.seen.length, 0);
  });
});
