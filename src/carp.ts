// Squid's CARP parent selection (src/carp.cc, Squid >= 3.2), bit-exact so that a cuttle bank member and
// a Squid with the same `cache_peer ... carp` lines agree on every URL's owner. What makes it Squid's and
// not the CARP draft's: the key's bytes are folded into ONE running user_hash once per member in sorted
// order (never reset: the k-th member scores the key hashed k times), bytes are signed chars, members are
// sorted by weight (stable: glibc's qsort merge sort), weight 0 is skipped, and a dead member still feeds
// user_hash but cannot win. Checked against Debian's Squid 5.7 in test/e2e/carp-squid.test.ts and against
// a C transcription of carp.cc in test/fixtures/carp/.

export interface CarpMember {
  /** Exactly as spelled in squid.conf: the `name=` value, else the host (Squid does not lower-case it). */
  name: string;
  /** >= 0, default 1 in Squid; 0 leaves the member out of CARP. */
  weight: number;
}

interface Peer {
  index: number; // into the constructor's array
  name: string;
  weight: number;
  hash: number;
  factor: number;
  multiplier: number;
}

const encoder = new TextEncoder();

/** user_hash += ROTL(user_hash, 19) + (signed char)b over the bytes: uint32 arithmetic. */
function fold(h: number, bytes: Uint8Array, len: number): number {
  for (let i = 0; i < len; i++) {
    const b = bytes[i]!;
    h = (h + ((h << 19) | (h >>> 13)) + (b >= 0x80 ? b - 0x100 : b)) >>> 0;
  }
  return h;
}

/** x += x * 0x62531965; x = ROTL(x, 21) */
function mix(x: number): number {
  x = (x + Math.imul(x, 0x62531965)) >>> 0;
  return ((x << 21) | (x >>> 11)) >>> 0;
}

export class Carp {
  private readonly peers: Peer[];
  private buf = new Uint8Array(1024);

  /** Members in squid.conf line order. */
  constructor(members: readonly CarpMember[]) {
    const peers: Peer[] = [];
    let total = 0;
    members.forEach((m, index) => {
      if (!Number.isInteger(m.weight) || m.weight < 0) throw new Error(`CARP member ${m.name}: weight must be an integer >= 0`);
      if (m.weight === 0) return; // carpInit skips weight 0
      total += m.weight;
      const name = encoder.encode(m.name);
      peers.push({ index, name: m.name, weight: m.weight, hash: mix(fold(0, name, name.length)), factor: 0, multiplier: 0 });
    });
    for (const p of peers) {
      p.factor = p.weight / total;
      if (Math.floor(p.factor * 1000) === 0) p.factor = 0;
    }
    peers.sort((a, b) => a.weight - b.weight); // stable, as glibc's qsort (merge sort) is for these sizes
    // The load multipliers X_k, in carpInit's order of double operations.
    const K = peers.length;
    let pLast = 0;
    let xLast = 0;
    let xn = 1;
    for (let k = 1; k <= K; k++) {
      const kk1 = K - k + 1;
      const p = peers[k - 1]!;
      let m = (kk1 * (p.factor - pLast)) / xn;
      m += Math.pow(xLast, kk1);
      m = Math.pow(m, 1 / kk1);
      p.multiplier = m;
      xn *= m;
      xLast = m;
      pLast = p.factor;
    }
    this.peers = peers;
  }

  /**
   * Index (into the constructor's array) of the owner of `key`, among members for which alive(i) is true;
   * -1 if none (or if no alive member scores above 0, as in Squid). Dead members still feed the
   * cumulative user_hash, as in Squid.
   * Cost: the key is UTF-8 encoded once into a reused buffer; then one pass over its bytes per member
   * (K * length uint32 steps: ~400 for 4 members and a 100-byte URL), no allocation.
   */
  owner(key: string, alive?: (i: number) => boolean): number {
    let len: number;
    for (;;) {
      const r = encoder.encodeInto(key, this.buf);
      if (r.read === key.length) {
        len = r.written;
        break;
      }
      this.buf = new Uint8Array(this.buf.length * 2);
    }
    let user = 0;
    let best = -1;
    let high = 0;
    for (const p of this.peers) {
      user = fold(user, this.buf, len); // cumulative across members: Squid >= 3.2
      const score = mix((user ^ p.hash) >>> 0) * p.multiplier;
      if (score > high && (!alive || alive(p.index))) {
        best = p.index;
        high = score;
      }
    }
    return best;
  }

  /** The members' hashes and load multipliers in CARP (weight-sorted) order, as `squidclient mgr:carp` prints them. */
  table(): { name: string; hash: number; multiplier: number; factor: number }[] {
    return this.peers.map((p) => ({ name: p.name, hash: p.hash, multiplier: p.multiplier, factor: p.factor }));
  }
}

/**
 * Squid's default CARP key for a request URL, HttpRequest::effectiveRequestUri() = Uri::absolute() as of
 * Squid 3.2-7.x: scheme "://" host (lower-cased, trailing dots removed, IPv6 bracketed) [":" port only
 * when not the scheme's default] then the path and query as received ("?" kept even with an empty
 * query), no user info, no fragment. Where WHATWG URL parsing already rewrote the request-target
 * (dot segments, percent-encoding of spaces or non-ASCII) the key follows the parsed form: CVMFS URLs
 * have none of these. (Squid's unreleased master encodes the path with PathChars() since 2025-08.)
 */
export function carpKey(url: URL): string {
  let host = url.hostname;
  while (host.endsWith('.')) host = host.slice(0, -1);
  const port = url.port ? `:${url.port}` : '';
  let tail = url.pathname + url.search;
  if (!url.search) {
    const href = url.href;
    const end = href.length - url.hash.length - (url.hash === '' && href.endsWith('#') ? 1 : 0);
    if (href.charCodeAt(end - 1) === 0x3f /* ? */) tail += '?';
  }
  return `${url.protocol}//${host}${port}${tail}`;
}
