// The CVMFS client's proxy shard ring (CVMFS_PROXY_SHARD=yes, client >= 2.10), bit-exact with
// cvmfs/network/download.cc UpdateProxiesUnlocked / ChooseProxyUnlocked (cvmfs @ ae7450ec): each member
// URL seeds the client's LCG (util/prng.h) with the first 32 bits of SHA-1(url); its 16 draws are the
// member's points; a key belongs to the first point >= key. Cuttle members that compute the same ring
// as the clients agree with them on every object's owner. Golden vectors: test/fixtures/shard-ring/.
import { createHash } from 'node:crypto';
import { casObject } from './content-hash.ts';

const POINTS_PER_MEMBER = 16; // kProxyMapScale, download.h
const MAX_KEY = 0xffffffff; // the ring's wrap-around sentinel, and Prng::Next's boundary
const LCG_A = 6364136223846793005n;
const LCG_C = 1442695040888963407n;
const U64 = (1n << 64n) - 1n;
const RING_CACHE_MAX = 64;

/**
 * The 16 points of a member, as Prng::Next(0xffffffff) draws them: C++ computes
 * `(uint64)((double)state * 4294967295.0 / 2^64) % 4294967295`. Number(bigint) rounds to nearest-even
 * like the uint64->double conversion, and the multiply and the exact division by 2^64 are the same IEEE
 * operations, so the truncated result is identical (checked against the C++ transcription).
 */
function memberPoints(url: string): number[] {
  let state = BigInt(createHash('sha1').update(url, 'utf8').digest().readUInt32BE(0));
  const points: number[] = [];
  for (let j = 0; j < POINTS_PER_MEMBER; j++) {
    state = (state * LCG_A + LCG_C) & U64;
    points.push(Math.trunc((Number(state) * 4294967295.0) / 18446744073709551616.0) % MAX_KEY);
  }
  return points;
}

interface Ring {
  points: Uint32Array; // ascending, the sentinel 0xFFFFFFFF last
  owners: Int32Array; // member index of each point
}

export class ShardRing {
  private readonly points: number[][];
  private readonly rings = new Map<number | string, Ring>();
  private readonly aliveBuf: number[] = [];

  /** Members' URLs exactly as the client puts them on its ring after DNS expansion: "http://10.1.2.3:3128", "http://[2001:db8::5]:3128". */
  constructor(urls: readonly string[]) {
    this.points = urls.map(memberPoints);
  }

  /**
   * Index (into the constructor's array) of the owner of `key` (uint32) among members for which alive(i)
   * is true (the client rebuilds its ring from the alive ones); -1 if none.
   * Cost: one alive(i) call per member, a Map lookup of the alive set (a bit mask up to 31 members, no
   * allocation; a joined string beyond) and a binary search over 16 points per alive member (~6 steps
   * for 4 members); a ring is built once per alive set.
   */
  owner(key: number, alive?: (i: number) => boolean): number {
    const live = this.aliveBuf;
    live.length = 0;
    let mask = 0;
    for (let i = 0; i < this.points.length; i++) {
      if (alive && !alive(i)) continue;
      live.push(i);
      mask |= 1 << i;
    }
    if (live.length === 0) return -1;
    const id = this.points.length <= 31 ? mask : live.join(',');
    let ring = this.rings.get(id);
    if (!ring) {
      if (this.rings.size >= RING_CACHE_MAX) this.rings.clear(); // bounded: alive sets rarely churn
      ring = this.build(live);
      this.rings.set(id, ring);
    }
    // lower_bound: the first point >= key (the sentinel catches every key above the last point)
    const { points, owners } = ring;
    const k = key >>> 0;
    let lo = 0;
    let hi = points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (points[mid]! < k) lo = mid + 1;
      else hi = mid;
    }
    return owners[lo]!;
  }

  /**
   * The client's std::map: members inserted in (alive) order, 16 points each, a duplicate point keeps its
   * first insert; then 0xFFFFFFFF -> the owner of the smallest point. (After burns the client's group is
   * reordered by swaps, which could only matter for a point two members share: about 1 in 2^27 pairs.)
   */
  private build(live: readonly number[]): Ring {
    const entries: { point: number; member: number; order: number }[] = [];
    for (const m of live) for (const point of this.points[m]!) entries.push({ point, member: m, order: entries.length });
    entries.sort((a, b) => a.point - b.point || a.order - b.order);
    const points: number[] = [];
    const owners: number[] = [];
    for (const e of entries) {
      if (points.length > 0 && points[points.length - 1] === e.point) continue; // first insert wins
      points.push(e.point);
      owners.push(e.member);
    }
    points.push(MAX_KEY);
    owners.push(owners[0]!);
    return { points: Uint32Array.from(points), owners: Int32Array.from(owners) };
  }
}

/**
 * The ring key of a request path: the first 32 bits of the content hash for a content-addressed object
 * under /cvmfs/<repo>/data/xx/<rest> (.../data/ab/cdef01... -> 0xabcdef01), as the client's
 * `expected_hash->Partial32()`; 0 for everything else (manifests, whitelists, info: the client has no
 * expected hash for them and uses key 0, the member with the smallest point). Key 0 is never routed.
 */
export function shardKey(pathname: string): number {
  const cas = casObject(pathname);
  return cas ? parseInt(cas.hex.slice(0, 8), 16) : 0;
}

/** What the client puts on the ring for an address: dns::RewriteUrl of "http://name:port" with the IP, IPv6 bracketed (dns.cc). */
export function memberUrl(host: string, port: number): string {
  const h = host.includes(':') && !host.startsWith('[') ? `[${host}]` : host;
  return `http://${h}:${port}`;
}
