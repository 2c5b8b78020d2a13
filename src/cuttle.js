#!/usr/bin/env -S GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 node --max-semi-space-size=8
// The `cuttle` command. Plain JavaScript that any Node parses, so that an unsupported Node says so
// instead of failing on main.ts (Node 20 cannot load .ts: ERR_UNKNOWN_FILE_EXTENSION); then the proxy.
// --max-semi-space-size: V8 would otherwise grow its young generation to 128 MiB under a proxy's
// allocation rate, memory that --memory-cache does not see (README "Memory"). 8 (16 MiB young) cost
// no CPU against 16 in the herd or in hits, and saved 5-45 MiB of peak RSS.
// GLIBC_TUNABLES: glibc's own mmap threshold (128 KiB), pinned; see README "The C allocator's slack".
const NEEDS = 24; // package.json "engines"
if (Number(process.versions.node.split('.')[0]) < NEEDS) {
  process.stderr.write(`cuttle needs Node ≥ ${NEEDS} (this is v${process.versions.node})\n`);
  process.exit(1);
}
import('./main.ts');
