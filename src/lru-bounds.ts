/**
 * lru-cache options bounding a map at `n` entries without preallocating it. With `max`, lru-cache
 * allocates storage for all `n` entries up front: ~1.75 MiB for 65,536, ~2.75 MiB with TTLs, paid in
 * RSS by an idle proxy. `maxSize` with every entry counting 1 is the same bound, grown as it is used.
 */
export function upTo(n: number): { maxSize: number; sizeCalculation: () => number } {
  return { maxSize: n, sizeCalculation: () => 1 };
}
