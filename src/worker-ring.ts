// Which worker (--workers) owns a key: rendezvous hashing (highest random weight) of the key's primary
// part over the workers. Every variant of a URL, and a content-addressed object under any mirror's
// name, has one owner: it runs the key's fills and is the only writer and evictor of its disk record.
// A worker that is down leaves only its own keys to the others, and takes them back when it returns.
// The salt keeps this choice independent of a bank's (the members' CARP or ring), so the workers of
// one bank member share its keys evenly.

/** FNV-1a over the UTF-16 code units, then a murmur3 finaliser: cheap, and well spread for short keys. */
function score(key: string, worker: number): number {
  let h = (0x811c9dc5 ^ Math.imul(worker + 0x9e37, 0x85ebca6b)) >>> 0;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/** The primary key of a stored key: the part before its Vary variant. */
export function primaryOfKey(key: string): string {
  const nl = key.indexOf('\n');
  return nl < 0 ? key : key.slice(0, nl);
}

/** The owner among `n` workers of a primary key, skipping those `alive` rejects; -1 if none is alive. */
export function workerOf(primary: string, n: number, alive?: (i: number) => boolean): number {
  let best = -1;
  let high = -1;
  for (let i = 0; i < n; i++) {
    if (alive && !alive(i)) continue;
    const s = score(primary, i);
    if (s > high) {
      high = s;
      best = i;
    }
  }
  return best;
}
