// The catalog reader (src/catalog.ts) on catalogs in cvmfs's own format (bench/cvmfs-repository.ts).
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { inflateSync } from 'node:zlib';
import { Catalog, objectPath, parseManifest, pathHash, Scope, type CatalogObject } from '../../src/catalog.ts';
import { buildRepository, type Repository } from '../../bench/cvmfs-repository.ts';

const dir = mkdtempSync(join(tmpdir(), 'catalog-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function open(repo: Repository, subtree: string): Catalog {
  const file = join(dir, `${Math.random()}.db`);
  writeFileSync(file, inflateSync(repo.bodies.get(repo.catalogs.get(subtree)!)!));
  return new Catalog(file);
}

const paths = (objs: Iterable<CatalogObject>) => new Set([...objs].map((o) => objectPath(o.hash, o.suffix)));

describe('catalog', () => {
  const r1 = buildRepository({ repo: 'test.cern.ch', revision: 1 });
  const r2 = buildRepository({ repo: 'test.cern.ch', revision: 2 });

  it('reads the manifest: root catalog, revision, TTL, certificate', () => {
    const m = parseManifest(r1.bodies.get('.cvmfspublished')!.toString());
    assert.equal(m.catalog, r1.rootCatalog);
    assert.equal(m.revision, 1);
    assert.equal(m.ttlS, 240);
    assert.ok(r1.bodies.has(objectPath(m.certificate!, 'X')));
    assert.throws(() => parseManifest('Cnot-a-hash\n--\n'), /no root catalog hash/);
  });

  it('md5 path halves match cvmfs (Md5::ToIntPair, little-endian, signed)', () => {
    // md5("") = d41d8cd98f00b204e9800998ecf8427e
    assert.deepEqual(pathHash(''), [BigInt.asIntN(64, 0x04b2008fd98c1dd4n), BigInt.asIntN(64, 0x7e42f8ec980980e9n)]);
  });

  it('lists every object of a whole catalog once, and never an external file, a bind mountpoint or a chunked file by its whole hash', () => {
    const union = new Set<string>();
    for (const [subtree] of r1.catalogs) {
      const c = open(r1, subtree);
      const objs = paths(c.objects(new Scope([])));
      assert.deepEqual(objs, r1.objectsBySubtree.get(subtree), subtree);
      for (const p of objs) union.add(p);
      c.close();
    }
    assert.deepEqual(union, r1.objects);
    for (const p of r1.neverFetched) assert.ok(!union.has(p), p);
    const root = open(r1, '');
    assert.deepEqual(root.nested(new Scope([])).map((n) => n.path), ['/rev', '/sw']);
    root.close();
  });

  it('prunes by --path: on nested-catalog paths and on directory entries', () => {
    const scope = new Scope(['/sw/gcc/']);
    const root = open(r1, '');
    assert.deepEqual([...root.objects(scope)], [], 'nothing of the root catalog is under /sw/gcc');
    assert.deepEqual(root.nested(scope).map((n) => n.path), ['/sw'], '/rev is pruned, /sw is on the way');
    root.close();
    const sw = open(r1, '/sw');
    const objs = [...sw.objects(scope)];
    assert.equal(objs.length, 6);
    assert.ok(objs.every((o) => o.suffix === ''), 'the chunked file is outside /sw/gcc');
    assert.deepEqual(sw.nested(scope), [], '/sw/root is pruned');
    sw.close();
    const data = open(r1, '');
    assert.equal([...data.objects(new Scope(['/data']))].length, 6);
    assert.equal([...data.objects(new Scope(['/dup']))].length, 1);
    data.close();
  });

  it('a new revision changes one sub-tree: /sw and /sw/root keep their catalogs', () => {
    assert.equal(r2.catalogs.get('/sw'), r1.catalogs.get('/sw'));
    assert.equal(r2.catalogs.get('/sw/root'), r1.catalogs.get('/sw/root'));
    assert.notEqual(r2.catalogs.get('/rev'), r1.catalogs.get('/rev'));
    assert.notEqual(r2.catalogs.get(''), r1.catalogs.get(''));
    const added = [...r2.objects].filter((p) => !r1.objects.has(p));
    assert.deepEqual(new Set(added), r2.objectsBySubtree.get('/rev'));
  });
});
