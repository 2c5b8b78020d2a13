// Content-addressed CVMFS objects: /cvmfs/<repo>/data/XX/<rest of hex>[-rmd160|-shake128][suffix].
// The path names the hash of the exact bytes on the wire (the compressed object), so such an object is
// the same on every Stratum 1: it can be keyed without the host, fetched from any mirror, resumed with
// Range on another mirror, and verified before it is stored or delivered as complete.
import { createHash, type Hash } from 'node:crypto';

export type HashAlgo = 'sha1' | 'ripemd160' | 'shake128';

export interface CasObject {
  repo: string;
  /** Hex digest the bytes must have. */
  hex: string;
  algo: HashAlgo;
  /** Host-independent cache key. */
  key: string;
}

// 2 + 38 hex = 160 bits, which all three algorithms produce in CVMFS (SHAKE-128 is cut to 160 bits).
// Suffixes: C catalog, H history, P chunk, X certificate, M metainfo, L micro-catalog, T temporary.
const CAS = /^\/cvmfs\/([A-Za-z0-9][A-Za-z0-9._-]*)\/data\/([0-9a-f]{2})\/([0-9a-f]{38})(-rmd160|-shake128)?([CHPXMLT]?)$/;

/** The content-addressed object a URL path names, or undefined (manifests, whitelists, API, info...). */
export function casObject(pathname: string, search = ''): CasObject | undefined {
  if (search) return undefined;
  const m = CAS.exec(pathname);
  if (!m) return undefined;
  const algo: HashAlgo = m[4] === '-rmd160' ? 'ripemd160' : m[4] === '-shake128' ? 'shake128' : 'sha1';
  return { repo: m[1]!, hex: m[2]! + m[3]!, algo, key: `cvmfs-cas:${pathname}` };
}

/** The repository a /cvmfs/<repo>/... path belongs to ('' if none). */
export function repoOf(pathname: string): string {
  const m = /^\/cvmfs\/([^/]+)\//.exec(pathname);
  return m ? m[1]! : '';
}

/** Hashes bytes as they stream past. */
export class HashCheck {
  readonly #hash: Hash;
  readonly #want: string;
  constructor(o: CasObject) {
    this.#hash = o.algo === 'shake128' ? createHash('shake128', { outputLength: 20 }) : createHash(o.algo);
    this.#want = o.hex;
  }

  update(chunk: Buffer): void {
    this.#hash.update(chunk);
  }

  /** Finalise: true when the bytes are exactly the object the path names. Call once. */
  matches(): boolean {
    return this.#hash.digest('hex') === this.#want;
  }
}
