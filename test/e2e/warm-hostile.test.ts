// `cuttle warm` against a hostile repository: catalogs a Stratum 1 (or whoever holds its signing key)
// can publish that no cvmfs server writes. warm must end, bounded, with one of its named exits; never
// a stack trace, never a walk that does not end. Real CLI, real cuttle, a scripted Stratum 1.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { after, describe, it } from 'node:test';
import { deflateSync } from 'node:zlib';
import { CATALOG_SCHEMA } from '../../bench/cvmfs-repository.ts';
import { objectPath, pathHash } from '../../src/catalog.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { startWarm, type WarmRun } from '../helpers/warm.ts';
import { startProxy, tmpDir, type TestProxy } from '../helpers/proxy.ts';

const REPO = 'hostile.cern.ch';
const ROOT = `/cvmfs/${REPO}/`;

const sha1 = (b: Buffer) => createHash('sha1').update(b).digest('hex');

/** A repository's bodies by path under ROOT; add() stores a compressed object and names it. */
class Bodies extends Map<string, Buffer> {
  add(raw: Buffer, suffix: '' | 'C' | 'P' | 'X'): string {
    const z = deflateSync(raw);
    const hash = sha1(z);
    this.set(objectPath(hash, suffix), z);
    return hash;
  }

  /** A catalog in cvmfs's schema, then `sql` (rows of the test's choosing); its hash. */
  catalog(sql: (db: DatabaseSync) => void, schema = CATALOG_SCHEMA): string {
    const dir = mkdtempSync(join(tmpdir(), 'hostile-catalog-'));
    try {
      const db = new DatabaseSync(join(dir, 'c.db'));
      db.exec(schema);
      sql(db);
      db.close();
      return this.add(readFileSync(join(dir, 'c.db')), 'C');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  manifest(root: string, extra = ''): this {
    this.set('.cvmfspublished', Buffer.from(`C${root}\nD240\nS1\nN${REPO}\n${extra}--\n${sha1(Buffer.from('sig'))}\n`));
    this.set('.cvmfswhitelist', Buffer.from(`N${REPO}\n--\n`));
    return this;
  }
}

/** The root directory's row, as cvmfs writes it (its parent is the zero hash). */
function rootDir(db: DatabaseSync): void {
  const [a, b] = pathHash('');
  db.prepare("INSERT INTO catalog VALUES (?, ?, 0, 0, 0, NULL, 4096, 16877, 0, 0, 1, '', '', 0, 0, NULL)").run(a, b);
}

const warm = (args: string[]) => startWarm(args).done;

async function rig(bodies: Bodies): Promise<{ origin: Origin; proxy: TestProxy; args: (...extra: string[]) => string[]; state: string }> {
  const origin = await startOrigin();
  for (const [rel, body] of bodies) origin.route(ROOT + rel, { body, headers: { 'cache-control': 'max-age=259200' } });
  const proxy = await startProxy();
  after(async () => {
    await proxy.close();
    await origin.close();
  });
  const state = join(tmpDir(), 'warm-state.json');
  return { origin, proxy, state, args: (...extra) => [`${origin.url}/cvmfs/${REPO}`, '--proxy', proxy.url, '--state', state, '--max-bytes', '1GB', ...extra] };
}

const noStack = (r: WarmRun) => assert.doesNotMatch(r.stderr, /fatal|    at /, r.stderr);

/** A file row under the root directory, with the hash blob and flags of the test's choosing. */
function fileRow(db: DatabaseSync, name: string, hash: Buffer, flags = 4): void {
  const [a, b] = pathHash(`/${name}`);
  const [p1, p2] = pathHash('');
  db.prepare("INSERT INTO catalog VALUES (?, ?, ?, ?, 0, ?, 10, 33188, 0, 0, ?, ?, '', 0, 0, NULL)").run(a, b, p1, p2, hash, flags, name);
}

describe('cuttle warm against a hostile repository', () => {
  const unreadable: [string, (b: Bodies) => string][] = [
    ['a nested catalog without a hash', (b) => b.catalog((db) => (rootDir(db), db.prepare('INSERT INTO nested_catalogs VALUES (?, NULL, 0)').run('/x')))],
    ['a content hash of 5 bytes', (b) => b.catalog((db) => (rootDir(db), fileRow(db, 'f', Buffer.from('abcde'))))],
    ['a hash algorithm cvmfs has not', (b) => b.catalog((db) => (rootDir(db), fileRow(db, 'f', Buffer.alloc(20, 1), 4 | (7 << 8))))],
    ['no chunks table', (b) => b.catalog((db) => rootDir(db), CATALOG_SCHEMA.replace(/CREATE TABLE chunks[^;]*;/, ''))],
    ['no nested_catalogs table', (b) => b.catalog((db) => rootDir(db), CATALOG_SCHEMA.replace(/CREATE TABLE nested_catalogs[^;]*;/, ''))],
  ];
  for (const [what, build] of unreadable) {
    it(`a catalog with ${what} is exit 5 CATALOG_FAILED, not a crash, with and without --check`, async () => {
      const b = new Bodies();
      const root = build(b);
      const { args, origin } = await rig(b.manifest(root));
      const r = await warm(args());
      noStack(r);
      assert.equal(r.code, 5, r.stderr + r.stdout);
      assert.match(r.stdout, /CATALOG_FAILED: catalog \/ is not a readable catalog/);
      // --check reads the catalog warm has just had cuttle store.
      const c = await warm(args('--check'));
      noStack(c);
      assert.equal(c.code, 5, c.stderr + c.stdout);
      assert.equal(origin.seen.filter((s) => s.path === ROOT + objectPath(root, 'C')).length, 1, 'the catalog was fetched upstream once');
    });
  }

  it('catalogs that each name the one below at two mountpoints (2^12 paths to the leaf) are each read once per run, and --check too', async () => {
    const b = new Bodies();
    // The leaf names an object the Stratum 1 does not have: no catalog is ever complete, so the state
    // file can't cut the walk short either.
    const leaf = b.catalog((db) => (rootDir(db), fileRow(db, 'gone', Buffer.alloc(20, 7))));
    const catalogs = [leaf];
    for (let d = 0; d < 12; d++) {
      const below = catalogs.at(-1)!;
      catalogs.push(
        b.catalog((db) => {
          rootDir(db);
          for (const at of ['/a', '/b']) db.prepare('INSERT INTO nested_catalogs VALUES (?, ?, 0)').run(at, below);
        }),
      );
    }
    const { args, proxy, origin } = await rig(b.manifest(catalogs.at(-1)!));
    const asked = () => proxy.logLines.filter((l) => / GET \S+C /.test(l)).length;
    const r = await warm(args());
    noStack(r);
    assert.equal(r.code, 1, r.stderr + r.stdout); // INCOMPLETE: the leaf's object is missing
    assert.equal(asked(), 2 * catalogs.length, 'each catalog asked of cuttle twice: once to plan, once to walk');
    const c = await warm(args('--check'));
    noStack(c);
    assert.equal(c.code, 1, c.stderr + c.stdout);
    assert.equal(asked(), 3 * catalogs.length, '--check reads each once');
    assert.match(c.stdout, /missing 1 objects/);
    const upstream = origin.seen.filter((s) => s.path.endsWith('C')).length;
    assert.equal(upstream, catalogs.length, 'each catalog fetched upstream once');
  });

  for (const d of ['-1', '0.000001', '1e12']) {
    it(`--watch under a manifest whose TTL is D${d} waits at least a minute, not a loop asking the Stratum 1 without pause`, async () => {
      const b = new Bodies();
      const { args, origin } = await rig(b.manifest(b.catalog(rootDir), `D${d}\n`));
      const w = startWarm(args('--watch'));
      await waitFor('revision 1 summarised', () => w.stdout().includes('revision 1: fetched'));
      w.kill('SIGTERM');
      const r = await w.done;
      noStack(r);
      assert.equal(r.code, 0, r.stderr + r.stdout);
      assert.doesNotMatch(r.stderr, /TimeoutOverflowWarning/);
      assert.equal(origin.seen.filter((s) => s.path === `${ROOT}.cvmfspublished`).length, 1, 'the manifest asked once');
    });
  }

  it('--watch-interval past what a timer holds (30d) is no loop either', async () => {
    const b = new Bodies();
    const { args, origin } = await rig(b.manifest(b.catalog(rootDir)));
    const w = startWarm(args('--watch', '--watch-interval', '30d'));
    await waitFor('revision 1 summarised', () => w.stdout().includes('revision 1: fetched'));
    w.kill('SIGTERM');
    const r = await w.done;
    assert.equal(r.code, 0, r.stderr + r.stdout);
    assert.doesNotMatch(r.stderr, /TimeoutOverflowWarning/);
    assert.equal(origin.seen.filter((s) => s.path === `${ROOT}.cvmfspublished`).length, 1, 'the manifest asked once');
  });

  it('a --state file of another shape is no state (the walk starts afresh), and one that cannot be written is exit 2 naming it, leaving no temporary file', async () => {
    const b = new Bodies();
    const { args, state, origin } = await rig(b.manifest(b.catalog(rootDir)));
    const shapes = ['{"version":2,"complete":null}', '{"version":2,"complete":{"x":5}}', '{"version":2,"complete":{"x":{"y":7}}}', '[]', 'null', '{"version":2,"complete":{"x":{"y":[1]}}}'];
    for (const text of shapes) {
      writeFileSync(state, text);
      const r = await warm(args());
      noStack(r);
      assert.equal(r.code, 0, `${text}: ${r.stderr}${r.stdout}`);
      assert.ok(JSON.parse(readFileSync(state, 'utf8')).complete, 'written afresh');
    }
    const root = origin.seen.filter((s) => s.path.endsWith('C')).length;
    assert.equal(root, 1, 'the root catalog fetched upstream once, then hits');
    rmSync(state);
    mkdirSync(state);
    const r = await warm(args());
    noStack(r);
    assert.equal(r.code, 2, r.stderr + r.stdout);
    assert.match(r.stdout, /USAGE: --state \S+ cannot be written/);
    assert.deepEqual(readdirSync(dirname(state)), ['warm-state.json'], 'no temporary file left beside it');
  });
});
