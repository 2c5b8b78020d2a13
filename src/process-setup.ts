// Process-wide settings: the libuv thread pool size (before anything uses it; imported first by
// main.ts) and the open-files limit, which a herd of 10^4–10^5 client sockets needs.
import { spawnSync } from 'node:child_process';
import { openFilesLimit } from './overload.ts';
import { setFlagsFromString } from 'node:v8';

// Disk hits and fill spill files are file-system work on the pool; the default of 4 threads queues a
// herd of disk hits behind each other.
process.env.UV_THREADPOOL_SIZE ??= '16';

// A proxy's heap is short-lived request garbage beside a bounded cache. V8's adaptive growth let the
// old generation reach 3x its live size in a storm of small misses (+270 MiB RSS with a 32 MB memory
// tier); a fixed 1.2x growth keeps it near the live size (README "Memory"). V8 reads this at every
// GC, so it can be set here. The young generation cannot: --max-semi-space-size is on the command line.
setFlagsFromString('--heap-growing-percent=20');

/**
 * Raise the soft open-files limit to the hard limit where the OS allows (Node has no setrlimit, so
 * util-linux prlimit does it for our pid). Returns the limit now in force, or undefined if unknown.
 */
export function raiseOpenFilesLimit(): number | undefined {
  const before = openFilesLimit();
  if (!before) return undefined;
  if (before.soft < before.hard) {
    const to = Number.isFinite(before.hard) ? String(before.hard) : 'unlimited';
    spawnSync('prlimit', ['--pid', String(process.pid), `--nofile=${to}:${to}`], { stdio: 'ignore', timeout: 2000 });
  }
  return openFilesLimit()?.soft;
}
