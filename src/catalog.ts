// The CVMFS repository format, read side (cvmfs-notes §7; cvmfs's manifest.cc, catalog_sql.{h,cc},
// crypto/hash.h): the manifest, object paths, and a catalog (an SQLite file, zlib-compressed on the
// wire) listed for the content objects under a set of sub-trees. `cuttle warm` walks repositories with
// it; bench/cvmfs-repository.ts writes the same format for the emulator.
import { createHash } from 'node:crypto';
import { DatabaseSync } from 'node:sqlite';

/** catalog.flags bits (catalog_sql.h, SqlDirent). */
export const FLAG = {
  dir: 1,
  nestedMountpoint: 2,
  file: 4,
  link: 8,
  special: 16,
  nestedRoot: 32,
  chunked: 64,
  external: 128,
  bindMountpoint: 0x4000,
  hidden: 0x8000,
} as const;

/** Bits 8–10 hold the content hash's algorithm minus one (SHA-1 = 0); its id follows the hex digits. */
const ALGORITHM_IDS = ['', '-rmd160', '-shake128'] as const;
const HASH_POS = 8;
/** Every content hash cvmfs names is 160 bits (SHA-1, RIPEMD-160, SHAKE-128 cut to 160). */
const DIGEST_BYTES = 20;

/** A content hash as a path names it: 40 hex digits and the algorithm's id (none for SHA-1). */
const HASH = /^[0-9a-f]{40}(-rmd160|-shake128)?$/;

export interface Manifest {
  /** Root catalog hash (C). */
  catalog: string;
  /** Revision (S). */
  revision: number;
  /** The client's TTL for this manifest, seconds (D; 240 when absent). */
  ttlS: number;
  /** Signing certificate hash (X), fetched with suffix X. */
  certificate: string | undefined;
  /** Repository name (N). */
  name: string | undefined;
}

/** Parse a .cvmfspublished manifest (its lines up to `--`; the signature after it is not checked here). */
export function parseManifest(text: string): Manifest {
  const f = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line.startsWith('--')) break;
    if (line.length > 1) f.set(line[0]!, line.slice(1).trim());
  }
  const catalog = f.get('C');
  if (catalog === undefined || !HASH.test(catalog)) throw new Error(`not a CVMFS manifest: no root catalog hash (C line)${catalog ? `: ${catalog.slice(0, 60)}` : ''}`);
  const cert = f.get('X');
  return {
    catalog,
    revision: Number(f.get('S') ?? 0),
    ttlS: Number(f.get('D') ?? 240) || 240,
    certificate: cert !== undefined && HASH.test(cert) ? cert : undefined,
    name: f.get('N'),
  };
}

/** A content object's path under the repository's URL: data/XX/<rest of the hash><suffix>. */
export function objectPath(hash: string, suffix: '' | 'C' | 'P' | 'X'): string {
  if (!HASH.test(hash)) throw new Error(`not a content hash: ${hash.slice(0, 60)}`);
  return `data/${hash.slice(0, 2)}/${hash.slice(2)}${suffix}`;
}

/** The two signed 64-bit halves of a path's MD5, as a catalog keys its rows (Md5::ToIntPair, little-endian). */
export function pathHash(path: string): [bigint, bigint] {
  const d = createHash('md5').update(path).digest();
  return [d.readBigInt64LE(0), d.readBigInt64LE(8)];
}

/** A row's raw digest as a path names it, with the algorithm its flags carry. */
export function hashOf(blob: Uint8Array, flags: number): string {
  if (blob.length !== DIGEST_BYTES) throw new Error(`a content hash of ${blob.length} bytes, not ${DIGEST_BYTES}`);
  const id = ALGORITHM_IDS[(flags >> HASH_POS) & 7];
  if (id === undefined) throw new Error(`unknown hash algorithm in flags ${flags}`);
  return Buffer.from(blob).toString('hex') + id;
}

/** The flags bits that name a content hash's algorithm (for writers). */
export function algorithmFlags(hash: string): number {
  const id = /-(rmd160|shake128)$/.exec(hash)?.[0] ?? '';
  return ALGORITHM_IDS.indexOf(id as (typeof ALGORITHM_IDS)[number]) << HASH_POS;
}

export interface CatalogObject {
  hash: string;
  /** '' for a whole file, 'P' for a chunk of a chunked file. */
  suffix: '' | 'P';
  /** Uncompressed bytes, as the catalog records them. */
  size: number;
}

export interface NestedCatalog {
  /** The sub-tree's root path ('/sw/gcc'). */
  path: string;
  hash: string;
}

/**
 * Sub-trees to walk: absolute repository paths without a trailing slash ('' is the whole repository).
 * A path is in scope when it is inside one of them; a directory is walked when it is in scope or on the
 * way to one, as a dirtab prunes.
 */
export class Scope {
  readonly prefixes: readonly string[];
  constructor(paths: readonly string[]) {
    const norm = paths.map((p) => `/${p}`.replace(/\/+/g, '/').replace(/\/$/, ''));
    this.prefixes = norm.length === 0 || norm.includes('') ? [''] : [...new Set(norm)];
  }

  get whole(): boolean {
    return this.prefixes[0] === '';
  }

  /** Is `path` inside a walked sub-tree? */
  covers(path: string): boolean {
    return this.prefixes.some((p) => p === '' || path === p || path.startsWith(`${p}/`));
  }

  /** The innermost walked sub-tree `path` is in, if any. */
  longestCovering(path: string): string | undefined {
    let best: string | undefined;
    for (const p of this.prefixes) if ((p === '' || path === p || path.startsWith(`${p}/`)) && (best === undefined || p.length > best.length)) best = p;
    return best;
  }

  /** Is `path` inside a walked sub-tree, or a directory on the way to one? */
  reaches(path: string): boolean {
    return this.covers(path) || this.prefixes.some((p) => p.startsWith(`${path}/`) || path === '');
  }
}

interface Row {
  hash: Uint8Array | null;
  size: number | bigint;
  flags?: number | bigint;
  name?: string;
}

const num = (v: number | bigint | null | undefined): number => Number(v ?? 0);

/** A whole file's content object: a regular file, not chunked (its chunks are), not external, not special. */
function wholeFile(flags: number): boolean {
  return (flags & FLAG.file) !== 0 && (flags & (FLAG.chunked | FLAG.external | FLAG.special | FLAG.link)) === 0;
}

/** One catalog, opened read-only from its decompressed SQLite file. */
export class Catalog {
  readonly #db: DatabaseSync;
  /** The sub-tree this catalog holds ('' for the root catalog). */
  readonly rootPath: string;

  constructor(file: string) {
    this.#db = new DatabaseSync(file, { readOnly: true });
    try {
      const prop = this.#db.prepare('SELECT value FROM properties WHERE key = ?').get('root_prefix') as { value: string } | undefined;
      this.rootPath = prop?.value && prop.value !== '/' ? prop.value : '';
      // A file that is SQLite but not a catalog fails here, not halfway through a walk.
      this.#db.prepare('SELECT hash, size, flags, name FROM catalog WHERE parent_1 = 0 LIMIT 1').get();
    } catch (err) {
      this.#db.close();
      throw err;
    }
  }

  close(): void {
    if (this.#db.isOpen) this.#db.close();
  }

  /** The nested catalogs directly below this one, in scope (bind mountpoints are another table: never walked). */
  nested(scope: Scope): NestedCatalog[] {
    const rows = this.#db.prepare('SELECT path, sha1 FROM nested_catalogs ORDER BY path').all() as { path: string; sha1: string }[];
    return rows.filter((r) => scope.reaches(r.path)).map((r) => {
      if (!HASH.test(r.sha1)) throw new Error(`nested catalog ${r.path} has no valid hash: ${String(r.sha1).slice(0, 60)}`);
      return { path: r.path, hash: r.sha1 };
    });
  }

  /**
   * The content objects of this catalog's own entries in scope, each once: whole files and the chunks
   * of chunked files; never external files, bind mountpoints or what a nested catalog holds. A catalog
   * wholly in scope is listed with two DISTINCT queries (swissknife pull's SqlAllChunks); otherwise its
   * directories are walked from the root down, pruned by the scope.
   */
  *objects(scope: Scope): Generator<CatalogObject> {
    // Identical files share one object: each is listed once (the set is bounded by the catalog's rows).
    const seen = new Set<string>();
    if (scope.covers(this.rootPath)) {
      for (const r of this.#db.prepare('SELECT DISTINCT hash, size, flags FROM catalog WHERE hash IS NOT NULL AND length(hash) > 0').iterate() as Iterable<Row>) {
        const o: CatalogObject = { hash: hashOf(r.hash!, num(r.flags)), suffix: '', size: num(r.size) };
        if (wholeFile(num(r.flags)) && once(seen, o)) yield o;
      }
      const chunks = this.#db.prepare(`SELECT DISTINCT chunks.hash AS hash, chunks.size AS size, catalog.flags AS flags FROM chunks JOIN catalog ON chunks.md5path_1 = catalog.md5path_1 AND chunks.md5path_2 = catalog.md5path_2 WHERE (catalog.flags & ${FLAG.external}) = 0`);
      for (const c of this.#chunks(chunks.iterate() as Iterable<Row>)) if (once(seen, c)) yield c;
      return;
    }
    const children = this.#db.prepare('SELECT hash, size, flags, name FROM catalog WHERE parent_1 = ? AND parent_2 = ?');
    const chunksOf = this.#db.prepare('SELECT hash, size FROM chunks WHERE md5path_1 = ? AND md5path_2 = ?');
    const dirs = [this.rootPath];
    while (dirs.length) {
      const dir = dirs.pop()!;
      for (const r of children.all(...pathHash(dir)) as unknown as Row[]) {
        const path = `${dir}/${r.name}`;
        const flags = num(r.flags);
        if (flags & FLAG.dir) {
          // A nested mountpoint's sub-tree is the nested catalog's; a bind mountpoint is never walked.
          if (!(flags & (FLAG.nestedMountpoint | FLAG.bindMountpoint)) && scope.reaches(path)) dirs.push(path);
          continue;
        }
        if (!scope.covers(path) || flags & FLAG.external) continue;
        if (flags & FLAG.chunked) {
          for (const c of this.#chunks(chunksOf.all(...pathHash(path)) as unknown as Row[], flags)) if (once(seen, c)) yield c;
        } else if (wholeFile(flags) && r.hash && r.hash.length > 0) {
          const o: CatalogObject = { hash: hashOf(r.hash, flags), suffix: '', size: num(r.size) };
          if (once(seen, o)) yield o;
        }
      }
    }
  }

  *#chunks(rows: Iterable<Row>, fileFlags?: number): Generator<CatalogObject> {
    for (const r of rows) if (r.hash && r.hash.length > 0) yield { hash: hashOf(r.hash, fileFlags ?? num(r.flags)), suffix: 'P', size: num(r.size) };
  }
}

function once(seen: Set<string>, o: CatalogObject): boolean {
  const k = o.hash + o.suffix;
  if (seen.has(k)) return false;
  seen.add(k);
  return true;
}
