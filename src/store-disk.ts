// Disk tier: one self-describing record per object under <cache-dir>/v1/objects/<aa>/<sha256(key)>.
//
// Record layout (all integers big-endian):
//   "CUTL" u16 version u16 flags u32 metaLen u32 crc32(meta) | meta JSON (full key, headers, policy) |
//   body | u64 bodyLen u32 crc32(body) "LTUC"
// The meta checksum is checked whenever a record is opened, the body's as a hit streams out. Version 1
// records (no meta checksum) are dropped at start.
// Lifecycle: a writer streams into v1/tmp/<hash>.<pid>.<n>, then writes the trailer and renames the file
// into place. A crash at any moment leaves at worst a temp file (removed at start) or nothing, never a
// record that would be served. At start the index is rebuilt by scanning the directory in the
// background; records whose header, length or trailer don't add up are removed. While the scan runs,
// a lookup that misses the index opens the record's path directly, so the proxy serves during the load.
// The body CRC is checked as a hit streams out; a mismatch cuts the client short and drops the record.
import { constants as fsc } from 'node:fs';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { hashKey } from './cache-key.ts';
import { DiskIndex } from './disk-index.ts';
import type { Freshness, Policy } from './freshness.ts';
import { StoreUnavailable, type StoredMeta, type StoredObject, type Tier, type TierStats, type TierWriter } from './store.ts';

const MAGIC = 0x4355544c; // "CUTL"
const END_MAGIC = 0x4c545543; // "LTUC"
const VERSION = 2;
const PREFIX = 16;
const TRAILER = 16;
const MAX_META = 1024 * 1024;

function encodeHeader(meta: StoredMeta): Buffer {
  const json = Buffer.from(JSON.stringify(meta));
  const b = Buffer.allocUnsafe(PREFIX + json.length);
  b.writeUInt32BE(MAGIC, 0);
  b.writeUInt16BE(VERSION, 4);
  b.writeUInt16BE(0, 6);
  b.writeUInt32BE(json.length, 8);
  b.writeUInt32BE(crc32(json) >>> 0, 12);
  json.copy(b, PREFIX);
  return b;
}

function encodeTrailer(bodyLen: number, crc: number): Buffer {
  const b = Buffer.allocUnsafe(TRAILER);
  b.writeBigUInt64BE(BigInt(bodyLen), 0);
  b.writeUInt32BE(crc >>> 0, 8);
  b.writeUInt32BE(END_MAGIC, 12);
  return b;
}

interface RecordInfo {
  meta: StoredMeta;
  bodyOffset: number;
  bodyLen: number;
  crc: number;
  fileBytes: number;
}

/** Read and check the header and trailer of an open record. Undefined when it doesn't add up. */
async function readRecordInfo(fh: fsp.FileHandle): Promise<RecordInfo | undefined> {
  const { size } = await fh.stat();
  if (size < PREFIX + TRAILER) return undefined;
  const pre = Buffer.allocUnsafe(PREFIX);
  await fh.read(pre, 0, PREFIX, 0);
  if (pre.readUInt32BE(0) !== MAGIC || pre.readUInt16BE(4) !== VERSION) return undefined;
  const metaLen = pre.readUInt32BE(8);
  if (metaLen > MAX_META || PREFIX + metaLen + TRAILER > size) return undefined;
  const metaBuf = Buffer.allocUnsafe(metaLen);
  await fh.read(metaBuf, 0, metaLen, PREFIX);
  // The stored headers are served as they are: a flipped byte there is as bad as one in the body.
  if (crc32(metaBuf) >>> 0 !== pre.readUInt32BE(12)) return undefined;
  const tr = Buffer.allocUnsafe(TRAILER);
  await fh.read(tr, 0, TRAILER, size - TRAILER);
  if (tr.readUInt32BE(12) !== END_MAGIC) return undefined;
  const bodyLen = Number(tr.readBigUInt64BE(0));
  if (PREFIX + metaLen + bodyLen + TRAILER !== size) return undefined;
  let meta: StoredMeta;
  try {
    meta = JSON.parse(metaBuf.toString('utf8')) as StoredMeta;
  } catch {
    return undefined;
  }
  if (typeof meta?.key !== 'string' || typeof meta.status !== 'number' || !meta.policy) return undefined;
  return { meta, bodyOffset: PREFIX + metaLen, bodyLen, crc: tr.readUInt32BE(8), fileBytes: size };
}

export interface DiskTierOptions {
  dir: string;
  maxBytes: number;
  maxEntryBytes: number;
  freshness: Freshness;
  /** Called for each record found by the start-up scan (to learn Vary specs). */
  onRecord?: (meta: StoredMeta) => void;
  onError?: (msg: string, err: unknown) => void;
  /**
   * --workers: the directory is shared by every worker of the process, and each key has one owner
   * worker, its only writer and evictor. This worker indexes, writes, evicts and deletes the keys it
   * owns; another worker's record is read straight from its path (the owner may unlink it meanwhile:
   * an open file stays readable). The process holds the directory's lock and empties tmp before the
   * workers start; a worker's temp files carry its index, so a restarted worker removes its own.
   */
  shared?: { worker: number; owns(key: string): boolean };
}

let tmpSeq = 0;

export class DiskTier implements Tier {
  readonly #o: DiskTierOptions;
  readonly #objects: string;
  readonly #tmp: string;
  /** In a worker's temp file names (--workers): its own, which it removes after a restart. */
  readonly #tmpTag: string;
  readonly #index: DiskIndex;
  #evictions = 0;
  #loaded = false;
  loaded: Promise<void> = Promise.resolve();

  constructor(o: DiskTierOptions) {
    if (!(o.maxBytes > 0)) throw new Error('DiskTier needs maxBytes > 0');
    this.#o = o;
    this.#objects = join(o.dir, 'v1', 'objects');
    this.#tmp = join(o.dir, 'v1', 'tmp');
    this.#tmpTag = o.shared ? `.w${o.shared.worker}` : '';
    this.#index = new DiskIndex(o.maxBytes, o.maxEntryBytes + MAX_META + TRAILER, (hash) => {
      this.#evictions++;
      fs.unlink(this.#pathOf(hash), () => {});
    });
  }

  get isLoaded(): boolean {
    return this.#loaded;
  }

  /** Create the directories and prove they are writable (fail loudly), then start the index scan. */
  async open(): Promise<void> {
    const shared = this.#o.shared;
    // One cuttle per cache directory: a second would delete the first one's temp records below. The
    // lock comes first: it refuses a directory holding another program's files before creating anything.
    if (!shared) await this.#lock();
    await fsp.mkdir(this.#tmp, { recursive: true });
    await fsp.mkdir(this.#objects, { recursive: true });
    const probe = join(this.#tmp, `.probe.${process.pid}${this.#tmpTag}`);
    await fsp.writeFile(probe, 'ok');
    await fsp.unlink(probe);
    // Anything left in tmp is from a crash: it was never complete (a worker's: from its previous life).
    for (const f of await fsp.readdir(this.#tmp)) if (!shared || f.includes(`${this.#tmpTag}.`)) await fsp.rm(join(this.#tmp, f), { force: true });
    this.loaded = this.#scan().then(
      () => {
        this.#loaded = true;
      },
      (err) => {
        this.#loaded = true;
        this.#o.onError?.('disk index scan failed', err);
      },
    );
  }

  /** Take the directory's lock for this process's life (lockCacheDir). */
  async #lock(): Promise<void> {
    await lockCacheDir(this.#o.dir);
    this.#locked = true;
  }

  #locked = false;

  /** Give the directory's lock back (the proxy is closing). */
  async unlock(): Promise<void> {
    if (!this.#locked) return;
    this.#locked = false;
    await unlockCacheDir(this.#o.dir);
  }

  #pathOf(hash: string): string {
    return objectPath(this.#objects, hash);
  }

  /** Another worker's key (--workers): read from its path, never indexed, written or evicted here. */
  #foreign(key: string): boolean {
    return this.#o.shared !== undefined && !this.#o.shared.owns(key);
  }

  async #scan(): Promise<void> {
    const found: { hash: string; bytes: number; mtime: number }[] = [];
    const unreadable: { path: string; hash: string }[] = [];
    const subdirs = await fsp.readdir(this.#objects).catch(() => [] as string[]);
    for (const sub of subdirs) {
      const names = await fsp.readdir(join(this.#objects, sub)).catch(() => [] as string[]);
      // Bounded parallelism: the scan must not starve the requests being served meanwhile.
      for (let i = 0; i < names.length; i += 32) {
        await Promise.all(
          names.slice(i, i + 32).map(async (hash) => {
            const path = join(this.#objects, sub, hash);
            const info = await this.#inspect(path, hash);
            if (!info) return;
            const st = await fsp.stat(path).catch(() => undefined);
            if (info === 'unreadable' && !st) return; // neither read nor counted: found again at the next start
            found.push({ hash, bytes: info === 'unreadable' ? st!.size : info.fileBytes, mtime: st?.mtimeMs ?? 0 });
            if (info !== 'unreadable') this.#o.onRecord?.(info.meta);
            else unreadable.push({ path, hash });
          }),
        );
      }
    }
    // Records that could not be read during the scan (its own descriptors, EMFILE) are read once more
    // now, one at a time, for what they tell the proxy (their Vary spec); still unreadable, they are
    // checked when next opened.
    for (const u of unreadable) {
      const info = await this.#inspect(u.path, u.hash);
      if (info && info !== 'unreadable') this.#o.onRecord?.(info.meta);
    }
    // Oldest first, so the most recently written records are the most recently used.
    found.sort((a, b) => a.mtime - b.mtime);
    for (const f of found) if (!this.#index.has(f.hash)) this.#index.set(f.hash, f.bytes);
  }

  /**
   * Validate a record file; remove it when it is partial, corrupt or from another format. 'unreadable'
   * when it can't be read now (EMFILE, EIO): it is kept, and checked when it is next opened.
   */
  async #inspect(path: string, hash: string): Promise<RecordInfo | 'unreadable' | undefined> {
    let fh: fsp.FileHandle | undefined;
    try {
      fh = await fsp.open(path, fsc.O_RDONLY);
      const info = await readRecordInfo(fh);
      // Another worker's record is that worker's to index, and to remove if it is bad.
      if (info && this.#foreign(info.meta.key)) return undefined;
      if (info && hashKey(info.meta.key) === hash) return info;
      if (this.#o.shared) return undefined; // unreadable here may be another worker's write in progress
    } catch (err) {
      return gone(err) ? undefined : 'unreadable';
    } finally {
      await fh?.close().catch(() => {});
    }
    await fsp.rm(path, { force: true });
    return undefined;
  }

  async get(key: string): Promise<StoredObject | undefined> {
    const hash = hashKey(key);
    const foreign = this.#foreign(key);
    if (!foreign && !this.#index.has(hash) && this.#loaded) return undefined;
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.#pathOf(hash), fsc.O_RDONLY);
    } catch (err) {
      // Only a record that is gone is forgotten: EMFILE, EIO and the like say nothing about it.
      if (!gone(err)) throw new StoreUnavailable(err);
      if (!foreign) this.#index.delete(hash);
      return undefined;
    }
    let info: RecordInfo | undefined;
    try {
      info = await readRecordInfo(fh);
    } catch (err) {
      await fh.close().catch(() => {});
      throw new StoreUnavailable(err);
    }
    if (!info || info.meta.key !== key) {
      await fh.close().catch(() => {});
      if (!info && !foreign) await this.delete(key);
      return undefined;
    }
    if (!foreign) this.#index.use(hash, info.fileBytes);
    const { bodyOffset, bodyLen, crc } = info;
    let running = 0;
    let fed = 0;
    let closed = false;
    return {
      meta: info.meta,
      policy: this.#o.freshness.fromObject(info.meta.policy),
      size: bodyLen,
      tier: 'disk',
      body: {
        kind: 'file',
        read: async (pos, len, into) => {
          const n = Math.min(len, bodyLen - pos, into ? into.length : Infinity);
          const buf = into ?? Buffer.allocUnsafe(n);
          let bytesRead: number;
          try {
            ({ bytesRead } = await fh.read(buf, 0, n, bodyOffset + pos));
          } catch (err) {
            throw new StoreUnavailable(err);
          }
          return bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
        },
        feed: (b) => {
          running = crc32(b, running);
          fed += b.length;
        },
        verify: () => (fed < bodyLen ? 'pending' : fed === bodyLen && running >>> 0 === crc ? 'ok' : 'corrupt'),
        close: () => {
          if (!closed) {
            closed = true;
            fh.close().catch(() => {});
          }
        },
      },
    };
  }

  openWriter(meta: StoredMeta, _policy: Policy, expectedBytes: number | undefined): DiskWriter | undefined {
    if (expectedBytes !== undefined && expectedBytes > this.#o.maxEntryBytes) return undefined;
    const hash = hashKey(meta.key);
    const tmp = join(this.#tmp, `${hash}.${process.pid}${this.#tmpTag}.${++tmpSeq}`);
    // Another worker's key: its owner writes the record. This worker's fill of it (a relay's answer, or
    // a fetch while the owner is down) still spills to a file of its own, so a slow reader here never
    // holds back the others; the file is let go at the end, never indexed (readers keep it open).
    if (this.#foreign(meta.key)) return new DiskWriter(tmp, encodeHeader(meta), this.#o.maxEntryBytes, () => fsp.rm(tmp, { force: true }), true);
    return new DiskWriter(tmp, encodeHeader(meta), this.#o.maxEntryBytes, async (fileBytes) => {
      const dest = this.#pathOf(hash);
      await fsp.mkdir(join(this.#objects, hash.slice(0, 2)), { recursive: true });
      await fsp.rename(tmp, dest);
      this.#index.delete(hash); // replaced in place: don't let dispose unlink the new file
      if (!this.#index.set(hash, fileBytes)) await fsp.rm(dest, { force: true });
    });
  }

  async delete(key: string): Promise<void> {
    if (this.#foreign(key)) return; // its owner deletes it (an invalidation reaches every worker)
    const hash = hashKey(key);
    this.#index.delete(hash);
    await fsp.rm(this.#pathOf(hash), { force: true });
  }

  async updateMeta(meta: StoredMeta, policy: Policy): Promise<void> {
    if (this.#foreign(meta.key)) return;
    const old = await this.get(meta.key);
    if (!old || old.body.kind !== 'file') return;
    const w = this.openWriter(meta, policy, old.size);
    if (!w) return old.body.close();
    let committed = false;
    try {
      for (let pos = 0; pos < old.size; ) {
        const b = await old.body.read(pos, 1 << 20);
        if (b.length === 0) break;
        old.body.feed(b);
        w.append(b);
        pos += b.length;
      }
      if (old.body.verify() === 'ok') committed = await w.commit();
      else await this.delete(meta.key);
    } finally {
      // A failed read must not leak the writer's temp file and descriptor, nor the old record's.
      if (!committed) w.abort();
      old.body.close();
    }
  }

  stats(): TierStats {
    return { objects: this.#index.entries, bytes: this.#index.bytes, maxBytes: this.#o.maxBytes, evictions: this.#evictions };
  }

  /** The index's own bound and cost: entries (records), the most it may hold, and its heap. */
  indexStats(): { entries: number; maxEntries: number; heapBytes: number } {
    return { entries: this.#index.entries, maxEntries: this.#index.maxEntries, heapBytes: this.#index.heapBytes };
  }
}

/**
 * Streams one body into a temp record. It doubles as the spill file of an in-flight fill: readers that
 * fall behind the fill's memory window read bytes back with readAt() while the fill continues.
 */
export class DiskWriter implements TierWriter {
  readonly #path: string;
  readonly #headerLen: number;
  readonly #maxBytes: number;
  readonly #publish: (fileBytes: number) => Promise<void>;
  #fd = -1;
  #opening: Promise<void>;
  #queue: Buffer[] = [];
  #queuedBytes = 0;
  #writing = false;
  #crc = 0;
  #received = 0;
  #state: 'open' | 'committing' | 'committed' | 'aborted' = 'open';
  #refs = 1; // the fill holds one; each readAt in flight holds one
  #idle: (() => void)[] = [];
  failed: Error | undefined;
  /** Body bytes known to be on disk (readable with readAt). */
  flushed = 0;
  onFlush: (() => void) | undefined;

  /** A spill only, committed to nothing (another worker's key). */
  readonly transient: boolean;

  constructor(path: string, header: Buffer, maxBytes: number, publish: (fileBytes: number) => Promise<void>, transient = false) {
    this.transient = transient;
    this.#path = path;
    this.#headerLen = header.length;
    this.#maxBytes = maxBytes;
    this.#publish = publish;
    this.#opening = new Promise((resolve) => {
      fs.open(path, 'wx+', 0o644, (err, fd) => { // read-write: readers read the spill back
        if (err) this.#fail(err);
        else if (this.failed) fs.close(fd, () => {});
        else {
          this.#fd = fd;
          this.#queue.unshift(header); // the header is not counted in #queuedBytes
          this.#headerPending = true;
          this.#kick();
        }
        resolve();
      });
    });
  }

  #headerPending = false;

  get pendingBytes(): number {
    return this.#queuedBytes;
  }

  append(chunk: Buffer): void {
    if (this.#state !== 'open' || this.failed) return;
    this.#received += chunk.length;
    if (this.#received > this.#maxBytes) return this.#fail(new Error('object larger than max-object-size'));
    this.#crc = crc32(chunk, this.#crc);
    this.#queue.push(chunk);
    this.#queuedBytes += chunk.length;
    this.#kick();
  }

  #kick(): void {
    if (this.#writing || this.#fd < 0 || this.#queue.length === 0 || this.failed) {
      if (!this.#writing && this.#queue.length === 0) for (const f of this.#idle.splice(0)) f();
      return;
    }
    this.#writing = true;
    const bufs = this.#queue;
    this.#queue = [];
    const header = this.#headerPending;
    this.#headerPending = false;
    const bodyBytes = bufs.reduce((n, b) => n + b.length, 0) - (header ? this.#headerLen : 0);
    const pos = header ? 0 : this.#headerLen + this.flushed;
    fs.writev(this.#fd, bufs, pos, (err, written) => {
      this.#writing = false;
      if (err || written !== bodyBytes + (header ? this.#headerLen : 0)) {
        this.#fail(err ?? new Error('short write'));
        for (const f of this.#idle.splice(0)) f();
        return;
      }
      this.#queuedBytes -= bodyBytes;
      this.flushed += bodyBytes;
      this.onFlush?.();
      this.#kick();
    });
  }

  #fail(err: Error): void {
    if (this.failed) return;
    this.failed = err;
    this.#queue = [];
    this.#queuedBytes = 0;
    this.onFlush?.();
  }

  #drained(): Promise<void> {
    if (!this.#writing && (this.#queue.length === 0 || this.failed)) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /** Read back flushed body bytes from `pos`, up to `len` (into `into` when given). */
  readAt(pos: number, len: number, into?: Buffer): Promise<Buffer> {
    const n = Math.min(len, this.flushed - pos, into ? into.length : Infinity);
    if (n <= 0 || this.#fd < 0) return Promise.resolve(Buffer.alloc(0));
    this.#refs++;
    const buf = into ?? Buffer.allocUnsafe(n);
    return new Promise((resolve, reject) => {
      fs.read(this.#fd, buf, 0, n, this.#headerLen + pos, (err, bytesRead) => {
        this.release();
        if (err) reject(err);
        else resolve(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
      });
    });
  }

  async commit(): Promise<boolean> {
    if (this.#state !== 'open') return false;
    this.#state = 'committing';
    await this.#opening;
    await this.#drained();
    if (this.failed || this.#fd < 0) {
      this.#discard();
      return false;
    }
    const trailer = encodeTrailer(this.#received, this.#crc);
    try {
      await new Promise<void>((resolve, reject) =>
        fs.write(this.#fd, trailer, 0, TRAILER, this.#headerLen + this.#received, (err) => (err ? reject(err) : resolve())),
      );
      await this.#publish(this.#headerLen + this.#received + TRAILER);
      this.#state = 'committed';
      return true;
    } catch (err) {
      this.failed = err as Error;
      this.#discard();
      return false;
    } finally {
      this.release();
    }
  }

  abort(): void {
    if (this.#state !== 'open') return;
    this.#fail(new Error('aborted'));
    this.#discard();
    this.release();
  }

  #discard(): void {
    this.#state = 'aborted';
    fs.unlink(this.#path, () => {});
  }

  /** Add a holder of the file descriptor (a reader that may still readAt). */
  retain(): void {
    this.#refs++;
  }

  release(): void {
    if (--this.#refs > 0) return;
    void this.#opening.then(() => {
      if (this.#fd >= 0) {
        const fd = this.#fd;
        this.#fd = -1;
        fs.close(fd, () => {});
      }
    });
  }
}

/** The record is not there (any more): the only open failure that says something about the record. */
function gone(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

/** The lock files this process holds (lockCacheDir). */
const heldLocks = new Set<string>();

/** Give a cache directory's lock back. */
export async function unlockCacheDir(dir: string): Promise<void> {
  const path = lockPath(dir);
  heldLocks.delete(path);
  await fsp.rm(path, { force: true });
}

/**
 * Take a cache directory's lock: a file holding our pid, created exclusively. A lock whose pid is no
 * longer alive is stale (kill -9, a crash) and is taken over. With --workers the process takes it once,
 * for all its workers, and empties tmp before they start.
 */
export async function lockCacheDir(dir: string, emptyTmp = false): Promise<void> {
  const foreign = foreignFiles(dir);
  if (foreign) throw new Error(foreign);
  const path = lockPath(dir);
  await fsp.mkdir(join(dir, 'v1', 'tmp'), { recursive: true });
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.writeFile(path, `${process.pid}\n${BOOT_ID ?? ''}\n`, { flag: 'wx' });
      heldLocks.add(path);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    // A lock naming this process's own pid that this process does not hold is from an earlier life of
    // that pid: a container's cuttle is pid 1 in each life, so after a kill -9 it would never start again.
    const pid = lockHolder(dir);
    if (pid !== undefined && (pid !== process.pid || heldLocks.has(path))) throw new Error(`it is in use by another cuttle (pid ${pid}, ${path}); each cuttle needs its own --cache-dir`);
    if (attempt >= 2) throw new Error(`could not take the lock ${path}`);
    await fsp.rm(path, { force: true }); // stale: its process is gone
  }
  if (emptyTmp) {
    const tmp = join(dir, 'v1', 'tmp');
    for (const f of await fsp.readdir(tmp)) await fsp.rm(join(tmp, f), { force: true });
  }
}

/** What may sit beside v1/ in a cache directory: `cuttle warm`'s state (and its temporary), a mount's lost+found, hidden files (the unit's compile cache). */
const OURS = (name: string) => name === 'v1' || name === 'lost+found' || name.startsWith('.') || name.startsWith('warm-state.json');
/** Squid's cache_dir layout: ufs/aufs/diskd's swap.state and first-level 00..FF directories, rock's file. */
const SQUID = (name: string) => /^swap\.state/.test(name) || /^[0-9A-F]{2}$/.test(name) || name === 'rock';

/**
 * Why `dir` is not cuttle's to use, if it holds another program's files (a Squid cache_dir that
 * import-squid's output or a habit pointed at): cuttle would count them in no bound and mix its records
 * in. One cuttle created holds only v1/.
 */
export function foreignFiles(dir: string): string | undefined {
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => !OURS(n)).sort();
  } catch {
    return undefined; // absent (created at start) or not a directory (that error comes at mkdir)
  }
  if (names.length === 0) return undefined;
  const shown = names.slice(0, 4).join(', ') + (names.length > 4 ? `, … (${names.length})` : '');
  const squid = names.some(SQUID) ? "; it looks like Squid's cache directory, whose records cuttle can't read" : '';
  return `it holds files that are not cuttle's (${shown})${squid}: give cuttle a directory of its own, empty or one that cuttle created (the systemd unit's is /var/cache/cuttle)`;
}

/** A record's path under the objects directory, by its key's hash: the one layout of the tier. */
function objectPath(objects: string, hash: string): string {
  return join(objects, hash.slice(0, 2), hash);
}

/** Where a key's record lives under a cache directory (what DiskTier reads and writes). */
export function recordPath(dir: string, key: string): string {
  return objectPath(join(dir, 'v1', 'objects'), hashKey(key));
}

export function lockPath(dir: string): string {
  return join(dir, 'v1', 'cuttle.lock');
}

/** This boot of the host: a lock written in another boot is stale, whatever process has its pid now. */
const BOOT_ID = (() => {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
})();

/**
 * The pid of the live process holding `dir`'s lock, if any; a lock whose process is gone is stale, and
 * so is one written in an earlier boot (after a power loss its pid may be any other daemon's now).
 */
export function lockHolder(dir: string): number | undefined {
  let lines: string[];
  try {
    lines = fs.readFileSync(lockPath(dir), 'utf8').split('\n');
  } catch {
    return undefined;
  }
  const pid = Number(lines[0]!.trim());
  const boot = lines[1]?.trim();
  if (boot && BOOT_ID && boot !== BOOT_ID) return undefined;
  return Number.isInteger(pid) && pid > 0 && alive(pid) ? pid : undefined;
}

/** Is a process with this pid running (ours included)? EPERM means it exists under another user. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
