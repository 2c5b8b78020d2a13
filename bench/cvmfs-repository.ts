// A CVMFS repository in the real format, for the Stratum 1 emulator and the tests of `cuttle warm`: a
// manifest whose C line names the root catalog, zlib-compressed SQLite catalogs with cvmfs's schema
// (catalog_sql.cc CreateEmptyDatabase, schema 2.5), nested catalogs, a chunked file, and the entries a
// walker must skip (an external file, a bind mountpoint). Written with node:sqlite; every object is
// named by the SHA-1 of its compressed bytes, as on a real Stratum 1.
//
// The tree (FILES files per leaf directory, default 6):
//   /README, /data/f*                     root catalog
//   /sw/gcc/f*, /sw/big.tar (3 chunks)    nested catalog /sw
//   /sw/root/f*                           nested catalog /sw/root, inside /sw
//   /rev/f*                               nested catalog /rev: the one sub-tree a new revision changes
//   /dup (the same bytes as /data/f0), /link (symlink), /ext (external file), /bind (bind mountpoint)
// Revision N differs from N-1 only under /rev (new contents), so only /rev's catalog and the root
// catalog (which names /rev's hash and the revision) change; /sw and /sw/root keep their hashes.
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { deflateSync } from 'node:zlib';
import { algorithmFlags, FLAG, objectPath, pathHash } from '../src/catalog.ts';

export interface RepositoryOptions {
  repo: string;
  revision: number;
  seed?: number;
  /** Files per leaf directory (default 6). */
  files?: number;
  /** A file's uncompressed size range, bytes (default 1–8 KiB). */
  fileBytes?: [number, number];
  /** The chunked file's chunk size, bytes (default 256 KiB); it has three. */
  chunkBytes?: number;
}

export interface Repository {
  /** Bodies by path under /cvmfs/<repo>/ (".cvmfspublished", "data/ab/cdef…C"). */
  bodies: Map<string, Buffer>;
  /** The paths of the content objects (files and chunks) a full walk fetches, under /cvmfs/<repo>/. */
  objects: Set<string>;
  /** Catalog paths under /cvmfs/<repo>/, by sub-tree ('' is the root catalog). */
  catalogs: Map<string, string>;
  /** Per sub-tree ('' root, '/sw', '/sw/root', '/rev'): its content object paths. */
  objectsBySubtree: Map<string, Set<string>>;
  /** What a bind mountpoint and an external file name: a walker must never ask for these. */
  neverFetched: Set<string>;
  /** The whole-file hash of the chunked file: clients read its chunks, never this. */
  chunkedWhole: string;
  rootCatalog: string;
}

interface Entry {
  path: string;
  flags: number;
  hash?: string;
  size?: number;
  symlink?: string;
  chunks?: { hash: string; size: number }[];
}

const sha1 = (b: Buffer) => createHash('sha1').update(b).digest('hex');

/** `n` bytes that depend on `seed` only (SHA-256 in counter mode: incompressible, as real objects are once zlib'd). */
function bytes(seed: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0, block = 0; i < n; block++) i += createHash('sha256').update(`${seed}:${block}`).digest().copy(b, i);
  return b;
}

function seedOf(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Build revision `o.revision` of the repository (deterministic: the same options give the same bytes). */
export function buildRepository(o: RepositoryOptions): Repository {
  const files = o.files ?? 6;
  const [lo, hi] = o.fileBytes ?? [1024, 8192];
  const chunkBytes = o.chunkBytes ?? 256 * 1024;
  const seed = o.seed ?? 1;
  const repo: Repository = { bodies: new Map(), objects: new Set(), catalogs: new Map(), objectsBySubtree: new Map(), neverFetched: new Set(), chunkedWhole: '', rootCatalog: '' };

  /** Store compressed bytes as a content object; its path under the repository. */
  const store = (raw: Buffer, suffix: '' | 'C' | 'P' | 'X'): { hash: string; path: string } => {
    const z = deflateSync(raw);
    const hash = sha1(z);
    const path = objectPath(hash, suffix);
    repo.bodies.set(path, z);
    return { hash, path };
  };
  const file = (subtree: string, path: string, salt = ''): Entry => {
    const raw = bytes(seedOf(`${seed}:${path}:${salt}`), lo + (seedOf(`${seed}${path}${salt}`) % (hi - lo)));
    const { hash, path: p } = store(raw, '');
    repo.objects.add(p);
    addTo(repo.objectsBySubtree, subtree, p);
    return { path, flags: FLAG.file, hash, size: raw.length };
  };
  const dir = (path: string, extra = 0): Entry => ({ path, flags: FLAG.dir | extra });
  const leaf = (subtree: string, d: string, salt = ''): Entry[] => Array.from({ length: files }, (_, i) => file(subtree, `${d}/f${i}`, salt));

  // /sw/root, inside /sw.
  const swRoot = writeCatalog('/sw/root', 1, [dir('/sw/root', FLAG.nestedRoot), ...leaf('/sw/root', '/sw/root')], [], store);
  // /sw: a leaf directory, a chunked file, the mountpoint of /sw/root.
  const chunks = [0, 1, 2].map((i) => {
    const raw = bytes(seedOf(`${seed}:big:${i}`), chunkBytes);
    const { hash, path } = store(raw, 'P');
    repo.objects.add(path);
    addTo(repo.objectsBySubtree, '/sw', path);
    return { hash, size: raw.length };
  });
  repo.chunkedWhole = sha1(deflateSync(bytes(seedOf(`${seed}:big:whole`), 64)));
  const sw = writeCatalog(
    '/sw',
    1, // unchanged since the first revision, as cvmfs keeps an untouched nested catalog
    [dir('/sw', FLAG.nestedRoot), dir('/sw/gcc'), ...leaf('/sw', '/sw/gcc'), { path: '/sw/big.tar', flags: FLAG.file | FLAG.chunked, hash: repo.chunkedWhole, size: chunkBytes * 3, chunks }, dir('/sw/root', FLAG.nestedMountpoint)],
    [{ path: '/sw/root', hash: swRoot.hash }],
    store,
  );
  // /rev: what each revision changes.
  const rev = writeCatalog('/rev', o.revision, [dir('/rev', FLAG.nestedRoot), ...leaf('/rev', '/rev', `r${o.revision}`)], [], store);
  // The root: files of its own, the mountpoints, and what a walker must skip.
  const readme = file('', '/README');
  const data = leaf('', '/data');
  const ext = bytes(seedOf(`${seed}:ext`), 100);
  const extHash = sha1(deflateSync(ext));
  repo.neverFetched.add(objectPath(extHash, ''));
  const bindHash = sha1(Buffer.from(`${seed}:bind`));
  repo.neverFetched.add(objectPath(bindHash, 'C'));
  repo.neverFetched.add(objectPath(repo.chunkedWhole, ''));
  const root = writeCatalog(
    '',
    o.revision,
    [
      dir('', 0),
      readme,
      dir('/data'),
      ...data,
      { path: '/dup', flags: FLAG.file, hash: data[0]!.hash, size: data[0]!.size },
      { path: '/link', flags: FLAG.file | FLAG.link, symlink: '/data/f0' },
      { path: '/ext', flags: FLAG.file | FLAG.external, hash: extHash, size: ext.length },
      dir('/bind', FLAG.bindMountpoint),
      dir('/sw', FLAG.nestedMountpoint),
      dir('/rev', FLAG.nestedMountpoint),
    ],
    [
      { path: '/sw', hash: sw.hash },
      { path: '/rev', hash: rev.hash },
    ],
    store,
    [{ path: '/bind', hash: bindHash }],
  );
  repo.catalogs.set('', root.path).set('/sw', sw.path).set('/sw/root', swRoot.path).set('/rev', rev.path);
  repo.rootCatalog = root.hash;
  const cert = store(Buffer.from(`-----BEGIN CERTIFICATE-----\n${o.repo} emulated\n-----END CERTIFICATE-----\n`), 'X');
  const t = 1_700_000_000 + o.revision * 600;
  repo.bodies.set('.cvmfspublished', Buffer.from(`C${root.hash}\nB${repo.bodies.get(root.path)!.length}\nR${createHash('md5').update('').digest('hex')}\nD240\nS${o.revision}\nN${o.repo}\nX${cert.hash}\nT${t}\n--\n${sha1(Buffer.from(`${o.repo}${o.revision}`))}\n`));
  repo.bodies.set('.cvmfswhitelist', Buffer.from(`${t}\nE${t + 30 * 86400}\nN${o.repo}\n--\n`));
  return repo;
}

function addTo(m: Map<string, Set<string>>, k: string, v: string): void {
  let s = m.get(k);
  if (!s) m.set(k, (s = new Set()));
  s.add(v);
}

const parentOf = (path: string): string => path.slice(0, path.lastIndexOf('/'));

/** cvmfs's catalog schema 2.5 (catalog_sql.cc CreateEmptyDatabase). */
export const CATALOG_SCHEMA = `
  CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, parent_2 INTEGER, hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, mtimens INTEGER, flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, xattr BLOB, CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2));
  CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2);
  CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER, hash BLOB, CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size), FOREIGN KEY (md5path_1, md5path_2) REFERENCES catalog(md5path_1, md5path_2));
  CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER, CONSTRAINT pk_nested_catalogs PRIMARY KEY (path));
  CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER, CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path));
  CREATE TABLE statistics (counter TEXT, value INTEGER, CONSTRAINT pk_statistics PRIMARY KEY (counter));
  CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
`;

/** Write one catalog as cvmfs does, compress it and store it: its hash and path. */
function writeCatalog(rootPath: string, revision: number, entries: Entry[], nested: { path: string; hash: string }[], store: (raw: Buffer, suffix: 'C') => { hash: string; path: string }, binds: { path: string; hash: string }[] = []): { hash: string; path: string } {
  const dir = mkdtempSync(join(tmpdir(), 'cvmfs-catalog-'));
  const file = join(dir, 'catalog.db');
  try {
    const db = new DatabaseSync(file);
    db.exec(CATALOG_SCHEMA);
    const prop = db.prepare('INSERT INTO properties (key, value) VALUES (?, ?)');
    prop.run('schema', '2.5');
    prop.run('schema_revision', '7');
    prop.run('revision', String(revision));
    if (rootPath) prop.run('root_prefix', rootPath);
    const row = db.prepare('INSERT INTO catalog VALUES (?, ?, ?, ?, 0, ?, ?, ?, 1700000000, 0, ?, ?, ?, 0, 0, NULL)');
    const chunk = db.prepare('INSERT INTO chunks VALUES (?, ?, ?, ?, ?)');
    db.exec('BEGIN');
    for (const e of entries) {
      const self = pathHash(e.path);
      // The root of the root catalog has the zero hash as its parent (InsertInitialValues).
      const parent: [bigint, bigint] = e.path === '' ? [0n, 0n] : pathHash(parentOf(e.path));
      const flags = e.flags | (e.hash ? algorithmFlags(e.hash) : 0);
      const mode = e.flags & FLAG.dir ? 0o40755 : e.flags & FLAG.link ? 0o120777 : 0o100644;
      row.run(self[0], self[1], parent[0], parent[1], e.hash ? Buffer.from(e.hash.slice(0, 40), 'hex') : null, e.size ?? 4096, mode, flags, e.path.slice(e.path.lastIndexOf('/') + 1), e.symlink ?? '');
      let offset = 0;
      for (const c of e.chunks ?? []) {
        chunk.run(self[0], self[1], offset, c.size, Buffer.from(c.hash, 'hex'));
        offset += c.size;
      }
    }
    for (const n of nested) db.prepare('INSERT INTO nested_catalogs VALUES (?, ?, 0)').run(n.path, n.hash);
    for (const b of binds) db.prepare('INSERT INTO bind_mountpoints VALUES (?, ?, 0)').run(b.path, b.hash);
    db.prepare('INSERT INTO statistics VALUES (?, ?)').run('self_regular', entries.filter((e) => e.flags & FLAG.file).length);
    db.exec('COMMIT');
    db.close();
    return store(readFileSync(file), 'C');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
