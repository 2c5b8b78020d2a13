// `cuttle warm`: fill a running cuttle's cache from a CVMFS repository's catalogs, follow each publish
// (--watch), and report what a WAN cut would leave unreadable (--check). Everything goes through the
// proxy, so every object lands in its cache hash-checked, as any content-addressed fill does; an
// object the cache holds is skipped with `Cache-Control: only-if-cached`, which costs the Stratum 1
// nothing. The walk (src/catalog.ts) goes catalog by catalog, depth first; a catalog is complete, and
// remembered in the state file, once its own objects and every catalog below it are.
import { createWriteStream, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { createInflate } from 'node:zlib';
import { Pool } from 'undici';
import { Catalog, objectPath, parseManifest, Scope, type CatalogObject, type Manifest } from './catalog.ts';
import { casObject, HashCheck } from './content-hash.ts';
import { ConfigError } from './errors.ts';
import { formatSize, loadConfig, parseCli, parseDurationMs, parseSize } from './config.ts';
import { VERSION } from './version.ts';

const USER_AGENT = `cuttle-warm/${VERSION}`;
/** Share of --disk-cache a run may fetch before it stops (--max-bytes' default): past it, a warm would evict what it warmed first. */
const CACHE_SHARE = 0.9;

/**
 * How long --watch waits for a manifest's D: 240 s when no repository answered, else within 1 min and
 * 1 day (cvmfs's clamp for a TTL). A D of -1 or 1e-9 asked again without pause, each ask going upstream
 * (max-age=0).
 */
const watchTtlS = (d: number): number => (Number.isFinite(d) ? Math.min(Math.max(d, 60), 86_400) : 240);
/** Node fires a timer of more than 2^31-1 ms at once (TimeoutOverflowWarning): a long --watch-interval is this. */
const TIMER_MAX_MS = 2 ** 31 - 1;

/** warm's named failures and their exit statuses (README "cuttle warm"). */
export const WARM_ERRORS = {
  INCOMPLETE: { exit: 1, text: 'some objects could not be warmed' },
  NOT_CACHED: { exit: 1, text: 'not everything is cached' },
  USAGE: { exit: 2, text: 'usage' },
  PROXY_UNREACHABLE: { exit: 3, text: 'the proxy cannot be reached' },
  NOT_CUTTLE: { exit: 3, text: 'the proxy is not a cuttle' },
  STRATUM1_UNREACHABLE: { exit: 4, text: 'the repository manifest cannot be fetched' },
  BAD_MANIFEST: { exit: 4, text: 'not a CVMFS manifest' },
  CATALOG_FAILED: { exit: 5, text: 'a catalog failed its hash, or could not be fetched whole or read' },
  LIMIT: { exit: 6, text: 'stopped at --max-bytes' },
} as const;
export type WarmErrorCode = keyof typeof WARM_ERRORS;

export class WarmError extends Error {
  readonly code: WarmErrorCode;
  constructor(code: WarmErrorCode, detail: string) {
    super(`${code}: ${detail}`);
    this.code = code;
  }
}

export interface WarmOptions {
  repos: string[];
  proxy: string;
  paths: string[];
  concurrency: number;
  /** Bytes per second over all objects; undefined: no cap. */
  rateBytesPerSec: number | undefined;
  statePath: string;
  watch: boolean;
  /** --watch: how often the manifest is asked again; undefined: its TTL (D). */
  watchIntervalMs: number | undefined;
  check: boolean;
  json: boolean;
  diskCacheBytes: number;
  maxBytes: number;
  /** Where progress goes on a terminal (undefined: none). */
  progress: NodeJS.WritableStream | undefined;
  out: (text: string) => void;
  warn: (text: string) => void;
  signal: AbortSignal;
}

interface Tally {
  objects: number;
  bytes: number;
}

const tally = (): Tally => ({ objects: 0, bytes: 0 });
const add = (t: Tally, bytes: number): void => {
  t.objects++;
  t.bytes += bytes;
};

/** What one run over one repository did (or, with --check, found). */
export interface RepoReport {
  repository: string;
  revision: number;
  fetched: Tally;
  skipped: Tally;
  failed: { url: string; why: string }[];
  catalogs: { walked: number; complete: number; missing: string[] };
  /** --check: per --path, cached and missing. */
  paths: { path: string; cached: Tally; missing: Tally }[];
  /** --check: the sub-trees (catalogs) with the most missing bytes. */
  largestMissing: { path: string; objects: number; bytes: number }[];
  /** --check: manifest, whitelist, certificate and root catalog are all cached. */
  mountable: boolean;
  /** Requests cuttle refused as busy (its clients come first), each asked again after a pause. */
  busyRefusals: number;
  error?: { code: WarmErrorCode; message: string };
}

interface StateFile {
  version: 2;
  /** By repository URL and scope: each completed catalog's hash, and the hashes of the catalogs below it in scope. */
  complete: Record<string, Record<string, string[]>>;
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Completed catalogs by repository and scope, kept across runs (--state). */
class WarmState {
  readonly #path: string;
  #data: StateFile;
  constructor(path: string) {
    this.#path = path;
    try {
      const d = JSON.parse(readFileSync(path, 'utf8')) as StateFile;
      // A file of another shape (not one warm wrote, or cut short into valid JSON) is no state, as unparsable bytes are.
      this.#data = d?.version === 2 && isRecord(d.complete) && Object.values(d.complete).every((r) => isRecord(r) && Object.values(r).every((c) => Array.isArray(c) && c.every((h) => typeof h === 'string'))) ? d : { version: 2, complete: {} };
    } catch {
      this.#data = { version: 2, complete: {} };
    }
  }

  /** The catalogs below a completed one (itself included), or undefined when it is not complete. */
  subtree(key: string, hash: string): string[] | undefined {
    const all = this.#data.complete[key];
    if (!all?.[hash]) return undefined;
    const out = new Set<string>();
    const todo = [hash];
    while (todo.length) {
      const h = todo.pop()!;
      if (out.has(h)) continue;
      out.add(h);
      todo.push(...(all[h] ?? []));
    }
    return [...out];
  }

  /** Record a completed catalog and the catalogs below it, on disk at once (a kill keeps it). */
  add(key: string, hash: string, children: string[]): void {
    (this.#data.complete[key] ??= {})[hash] = children;
    this.#save();
  }

  /** After a whole walk: only this revision's catalogs, so the file stays as small as the tree. */
  keepOnly(key: string, hashes: readonly string[]): void {
    const all = this.#data.complete[key] ?? {};
    this.#data.complete[key] = Object.fromEntries(hashes.filter((h) => all[h]).map((h) => [h, all[h]!]));
    this.#save();
  }

  #save(): void {
    const tmp = `${this.#path}.${process.pid}.tmp`;
    try {
      mkdirSync(dirname(this.#path), { recursive: true });
      writeFileSync(tmp, `${JSON.stringify(this.#data)}\n`);
      renameSync(tmp, this.#path);
    } catch (err) {
      rmSync(tmp, { force: true });
      throw new WarmError('USAGE', `--state ${this.#path} cannot be written: ${(err as Error).message}`);
    }
  }
}

/** A byte-rate cap shared by all objects: a debt paid in time, up to 100 ms ahead. */
class Rate {
  readonly #perSec: number | undefined;
  #freeAt = 0;
  constructor(perSec: number | undefined) {
    this.#perSec = perSec;
  }

  async take(bytes: number, signal: AbortSignal): Promise<void> {
    if (!this.#perSec) return;
    const now = performance.now();
    this.#freeAt = Math.max(this.#freeAt, now) + (bytes / this.#perSec) * 1000;
    const wait = this.#freeAt - now - 100;
    if (wait > 0) await sleep(wait, undefined, { signal });
  }
}

/** Whatever reading an open catalog throws (a table missing, a row no cvmfs writes) is that catalog's failure, not a crash. */
function readCatalog<T>(path: string, read: () => T): T {
  try {
    return read();
  } catch (err) {
    if (err instanceof WarmError) throw err;
    throw new WarmError('CATALOG_FAILED', `catalog ${path || '/'} is not a readable catalog: ${(err as Error).message}`);
  }
}

/** A catalog's rows, read lazily, under readCatalog. */
function* catalogRows<T>(path: string, rows: () => Iterable<T>): Generator<T> {
  const it = readCatalog(path, () => rows()[Symbol.iterator]());
  for (let next = readCatalog(path, () => it.next()); !next.done; next = readCatalog(path, () => it.next())) yield next.value;
}

/** Run `fn` over `items` with at most `n` at once, pulling lazily (a catalog's rows are read as they are needed). */
async function eachLimited<T>(items: Iterable<T>, n: number, fn: (item: T) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let failed = false; // the first failure stops the others taking more
  const run = async (): Promise<void> => {
    try {
      for (let next = it.next(); !failed && !next.done; next = it.next()) await fn(next.value);
    } catch (err) {
      failed = true;
      throw err;
    }
  };
  await Promise.all(Array.from({ length: n }, run));
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: AsyncIterable<Buffer> & { dump(): Promise<void> };
}

/** Times an overload refusal other than a background one (--max-fills, say) is asked again. */
const OVERLOAD_RETRIES = 5;

const CONNECT_ERRORS = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT']);

/** The running cuttle, asked with absolute URLs. */
class ProxyClient {
  readonly #pool: Pool;
  readonly #signal: AbortSignal;
  readonly #url: string;
  constructor(url: string, connections: number, signal: AbortSignal) {
    this.#url = url;
    // A held fill answers within --background-wait (at most 10 minutes): wait longer than that.
    this.#pool = new Pool(url, { connections, keepAliveTimeout: 30_000, headersTimeout: 15 * 60_000 });
    this.#signal = signal;
  }

  /** Times cuttle refused a request as overloaded (a busy loop holds warm's fills: background.ts), each asked again. */
  busyRefusals = 0;

  /**
   * Ask until cuttle does not refuse for load. warm is background work (RFC 9218 urgency 7): cuttle holds
   * its new fills while clients keep the loop busy and refuses them after --background-wait; warm then
   * waits and asks again, for as long as the proxy stays busy. Any other overload refusal (--max-fills,
   * say) is asked again OVERLOAD_RETRIES times, then is that object's failure.
   */
  async ask(method: 'GET' | 'HEAD', url: string, cacheControl?: string): Promise<Answer> {
    for (let pauseMs = 1000, others = 0; ; pauseMs = Math.min(2 * pauseMs, 10_000)) {
      const a = await this.#ask(method, url, cacheControl);
      const status = String(a.headers['proxy-status'] ?? '');
      if (a.status !== 503 || !/^cuttle;.*error=connection_limit_reached/.test(status)) return a;
      const background = /details="[^"]*background/.test(status);
      if (!background && ++others > OVERLOAD_RETRIES) return a;
      await a.body.dump();
      this.busyRefusals++;
      await sleep(pauseMs, undefined, { signal: this.#signal });
    }
  }

  async #ask(method: 'GET' | 'HEAD', url: string, cacheControl?: string): Promise<Answer> {
    const headers: Record<string, string> = { host: new URL(url).host, 'user-agent': USER_AGENT, priority: 'u=7' };
    if (cacheControl) headers['cache-control'] = cacheControl;
    try {
      const r = await this.#pool.request({ path: url, method, headers, signal: this.#signal });
      return { status: r.statusCode, headers: r.headers, body: r.body as unknown as Answer['body'] };
    } catch (err) {
      if (this.#signal.aborted) throw err;
      const code = String((err as { code?: unknown }).code ?? '');
      if (CONNECT_ERRORS.has(code)) throw new WarmError('PROXY_UNREACHABLE', `${this.#url}: ${(err as Error).message}`);
      // The proxy closed this exchange without an answer (it does so for bytes that fail their hash).
      return { status: 0, headers: { 'x-squid-error': `no answer: ${(err as Error).message}` }, body: Object.assign((async function* () {})(), { dump: async () => {} }) };
    }
  }

  close(): Promise<void> {
    return this.#pool.close();
  }
}

/** What a failed answer says: the status, and cuttle's own label when it is cuttle's. */
function why(a: Answer): string {
  const label = a.headers['x-squid-error'] ?? a.headers['proxy-status'];
  return a.status === 0 ? String(label) : `HTTP ${a.status}${label ? ` (${String(label)})` : ''}`;
}

/** One run over one repository. */
class RepoWalk {
  readonly #o: WarmOptions;
  readonly #proxy: ProxyClient;
  readonly #rate: Rate;
  readonly #state: WarmState;
  readonly #scope: Scope;
  readonly #base: string;
  readonly #key: string;
  /** Where catalogs are decompressed (each unlinked once open); made by run(), removed after it. */
  #tmp = '';
  readonly report: RepoReport;
  #planned = 0;
  #done = 0;
  #started = performance.now();
  #lastProgress = 0;
  /** This revision's catalogs, each complete or walked. */
  readonly #tree: string[] = [];
  /**
   * Catalogs planned, and walked (with the walk's answer), in this run: a catalog is read once however
   * many mountpoints name it. No cvmfs server names one twice, but a repository whose catalogs each name
   * the one below at two paths would otherwise cost 2^depth walks.
   */
  readonly #plannedCatalogs = new Set<string>();
  readonly #walked = new Map<string, boolean>();

  constructor(o: WarmOptions, proxy: ProxyClient, rate: Rate, state: WarmState, repository: string) {
    this.#o = o;
    this.#proxy = proxy;
    this.#rate = rate;
    this.#state = state;
    this.#scope = new Scope(o.paths);
    this.#base = repository.replace(/\/+$/, '');
    this.#key = `${this.#base} ${this.#scope.prefixes.join(',') || '/'}`;
    this.report = {
      repository: this.#base,
      revision: 0,
      fetched: tally(),
      skipped: tally(),
      failed: [],
      catalogs: { walked: 0, complete: 0, missing: [] },
      paths: this.#scope.prefixes.map((p) => ({ path: p || '/', cached: tally(), missing: tally() })),
      largestMissing: [],
      mountable: true,
      busyRefusals: 0,
    };
  }

  /** The manifest; the proxy must be a cuttle (its Via says so). */
  async manifest(cacheControl?: string): Promise<Manifest | undefined> {
    const url = `${this.#base}/.cvmfspublished`;
    const a = await this.#proxy.ask('GET', url, this.#o.check ? 'only-if-cached, max-stale' : cacheControl);
    const text = Buffer.concat(await collect(a.body)).toString('latin1');
    if (!/\(cuttle\/[^)]*\)/.test(String(a.headers.via ?? ''))) throw new WarmError('NOT_CUTTLE', `${this.#o.proxy} answered without cuttle in its Via (${String(a.headers.via ?? 'no Via')})`);
    if (this.#o.check && a.status === 504) {
      this.report.mountable = false;
      return undefined;
    }
    if (a.status !== 200) throw new WarmError('STRATUM1_UNREACHABLE', `${url}: ${why(a)}`);
    try {
      return parseManifest(text);
    } catch (err) {
      throw new WarmError('BAD_MANIFEST', `${url}: ${(err as Error).message}`);
    }
  }

  async run(m: Manifest): Promise<void> {
    this.report.revision = m.revision;
    this.#tmp = mkdtempSync(join(tmpdir(), 'cuttle-warm-'));
    try {
      // What a client needs before any catalog: the whitelist and the signing certificate.
      await this.#object(`${this.#base}/.cvmfswhitelist`, 0, undefined);
      if (m.certificate) await this.#object(`${this.#base}/${objectPath(m.certificate, 'X')}`, 0, undefined);
      if (!this.#o.check) {
        this.#planned = await this.#plan(m.catalog, '');
        if (this.#planned > this.#o.diskCacheBytes) this.#o.warn(`cuttle warm: ${this.#base} needs up to ${formatSize(this.#planned)} in scope, more than --disk-cache (${formatSize(this.#o.diskCacheBytes)}); it stops after fetching ${formatSize(this.#o.maxBytes)} (--max-bytes), so it does not evict what it warmed first`);
      }
      const complete = await this.#catalog(m.catalog, '');
      if (complete && !this.#o.check) this.#state.keepOnly(this.#key, this.#tree);
      if (this.#o.check && this.report.catalogs.missing.length) this.report.mountable &&= !this.report.catalogs.missing.includes('/');
    } finally {
      rmSync(this.#tmp, { recursive: true, force: true });
      this.#progress(true);
    }
  }

  /** Bytes in scope of the catalogs not yet complete (fetching them, as the walk would). */
  async #plan(hash: string, path: string): Promise<number> {
    if (this.#plannedCatalogs.has(hash)) return 0;
    this.#plannedCatalogs.add(hash);
    if (this.#state.subtree(this.#key, hash)) return 0;
    const c = await this.#open(hash, path, 'GET');
    if (!c) return 0;
    let bytes = 0;
    let nested;
    try {
      for (const o of catalogRows(path, () => c.objects(this.#scope))) bytes += o.size;
      nested = readCatalog(path, () => c.nested(this.#scope));
    } finally {
      c.close();
    }
    for (const n of nested) bytes += await this.#plan(n.hash, n.path);
    return bytes;
  }

  /**
   * Walk one catalog: its objects, then the catalogs below it. True when it is complete (everything
   * in it and below it is cached now); with --check, when everything was found cached.
   */
  async #catalog(hash: string, path: string): Promise<boolean> {
    const walked = this.#walked.get(hash);
    if (walked !== undefined) return walked;
    // Until its walk ends it counts as complete: a catalog can't name itself or an ancestor (each names
    // the hash of the bytes below it), so this is only ever read for a catalog already walked.
    this.#walked.set(hash, true);
    const ok = await this.#walk(hash, path);
    this.#walked.set(hash, ok);
    return ok;
  }

  async #walk(hash: string, path: string): Promise<boolean> {
    const done = this.#o.check ? undefined : this.#state.subtree(this.#key, hash);
    if (done) {
      this.#tree.push(...done);
      this.report.catalogs.complete++;
      return true;
    }
    this.#tree.push(hash);
    const c = await this.#open(hash, path, this.#o.check ? 'CHECK' : 'GET');
    if (!c) {
      this.report.catalogs.missing.push(path || '/');
      return false;
    }
    this.report.catalogs.walked++;
    const missing = tally();
    let ok = true;
    let nested;
    try {
      const root = c.rootPath;
      await eachLimited(catalogRows(path, () => c.objects(this.#scope)), this.#o.concurrency, async (o) => {
        if (this.#o.signal.aborted) return;
        const got = await this.#object(`${this.#base}/${objectPath(o.hash, o.suffix)}`, o.size, o);
        if (!got) {
          ok = false;
          add(missing, o.size);
        }
        if (this.#o.check) this.#byPath(root, o, got);
      });
      nested = readCatalog(path, () => c.nested(this.#scope));
    } finally {
      c.close();
    }
    if (this.#o.check && missing.objects) this.report.largestMissing.push({ path: path || '/', ...missing });
    for (const n of nested) {
      if (this.#o.signal.aborted) return false;
      if (!(await this.#catalog(n.hash, n.path))) ok = false;
    }
    if (ok && !this.#o.check && !this.#o.signal.aborted) this.#state.add(this.#key, hash, nested.map((n) => n.hash));
    return ok && !this.#o.signal.aborted;
  }

  #byPath(root: string, o: CatalogObject, cached: boolean): void {
    const p = this.#scope.longestCovering(root) ?? '';
    const row = this.report.paths.find((r) => r.path === (p || '/'));
    if (row) add(cached ? row.cached : row.missing, o.size);
  }

  /**
   * Fetch, verify and open a catalog. 'CHECK' asks only the cache (a miss is undefined: its sub-tree
   * can't be listed without the WAN).
   */
  async #open(hash: string, path: string, mode: 'GET' | 'CHECK'): Promise<Catalog | undefined> {
    const rel = objectPath(hash, 'C');
    const url = `${this.#base}/${rel}`;
    const a = await this.#proxy.ask('GET', url, mode === 'CHECK' ? 'only-if-cached, max-stale' : undefined);
    if (mode === 'CHECK' && a.status === 504) {
      await a.body.dump();
      return undefined;
    }
    if (a.status !== 200) {
      await a.body.dump();
      throw new WarmError('CATALOG_FAILED', `catalog ${path || '/'} (${url}): ${why(a)}`);
    }
    const file = join(this.#tmp, `${hash}.db`);
    // The proxy checks the hash of what it stores; so does warm, of what it reads, before it trusts it.
    const check = new HashCheck(casObject(new URL(url).pathname)!);
    const tap = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        check.update(chunk);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(a.body, tap, createInflate(), createWriteStream(file));
    } catch (err) {
      rmSync(file, { force: true });
      throw new WarmError('CATALOG_FAILED', `catalog ${path || '/'} (${url}): ${check.matches() ? '' : 'its bytes fail their hash; '}${(err as Error).message}`);
    }
    if (!check.matches()) {
      rmSync(file, { force: true });
      throw new WarmError('CATALOG_FAILED', `catalog ${path || '/'} (${url}): its bytes fail their hash`);
    }
    try {
      const c = new Catalog(file);
      // Unlinked at once: the open handle keeps it readable, and nothing is left behind by a kill.
      rmSync(file, { force: true });
      return c;
    } catch (err) {
      rmSync(file, { force: true });
      throw new WarmError('CATALOG_FAILED', `catalog ${path || '/'} (${url}) is not a readable catalog: ${(err as Error).message}`);
    }
  }

  /**
   * One object: skipped when the cache holds it (HEAD with only-if-cached costs the Stratum 1
   * nothing), else fetched through the proxy and read to the end. With --check, only the first.
   * True when it is cached now.
   */
  async #object(url: string, size: number, o: CatalogObject | undefined): Promise<boolean> {
    const head = await this.#proxy.ask('HEAD', url, this.#o.check ? 'only-if-cached, max-stale' : 'only-if-cached');
    await head.body.dump();
    if (head.status === 200) {
      add(this.report.skipped, size);
      this.#tick(size);
      return true;
    }
    if (this.#o.check) {
      if (!o) this.report.mountable = false;
      return false;
    }
    if (this.report.fetched.bytes + size > this.#o.maxBytes) throw new WarmError('LIMIT', `${formatSize(this.report.fetched.bytes)} fetched; the next object would pass --max-bytes (${formatSize(this.#o.maxBytes)})`);
    await this.#rate.take(size, this.#o.signal);
    const a = await this.#proxy.ask('GET', url);
    if (a.status !== 200) {
      await a.body.dump();
      this.report.failed.push({ url, why: why(a) });
      return false;
    }
    let got = 0;
    try {
      for await (const chunk of a.body) got += chunk.length;
    } catch (err) {
      if (this.#o.signal.aborted) throw err;
      this.report.failed.push({ url, why: `cut short after ${got} bytes: ${(err as Error).message}` });
      return false;
    }
    add(this.report.fetched, got);
    this.#tick(size);
    return true;
  }

  #tick(bytes: number): void {
    this.#done += bytes;
    this.#progress(false);
  }

  #progress(last: boolean): void {
    const out = this.#o.progress;
    if (!out) return;
    const now = performance.now();
    if (!last && now - this.#lastProgress < 250) return;
    this.#lastProgress = now;
    const s = (now - this.#started) / 1000;
    const rate = this.report.fetched.bytes / Math.max(s, 0.001);
    const left = Math.max(0, this.#planned - this.#done);
    const eta = rate > 0 && this.#planned ? `, ETA ${Math.ceil(left / rate)} s` : '';
    const r = this.report;
    out.write(`\r${this.#base}: ${r.fetched.objects + r.skipped.objects} objects (${r.fetched.objects} fetched, ${r.skipped.objects} cached), ${formatSize(r.fetched.bytes)}, ${formatSize(rate)}/s${eta}   ${last ? '\n' : ''}`);
  }
}

async function collect(body: AsyncIterable<Buffer>, limit = 1 << 20): Promise<Buffer[]> {
  const out: Buffer[] = [];
  let n = 0;
  for await (const c of body) {
    n += c.length;
    if (n <= limit) out.push(c);
  }
  return out;
}

function summaryLine(r: RepoReport, check: boolean, elapsedS: number): string {
  if (check) {
    const lines = [`${r.repository} revision ${r.revision}: ${r.mountable ? 'mountable from the cache' : 'NOT mountable from the cache'}`];
    for (const p of r.paths) lines.push(`  ${p.path}: cached ${p.cached.objects} objects (${formatSize(p.cached.bytes)}), missing ${p.missing.objects} objects (${formatSize(p.missing.bytes)})`);
    if (r.catalogs.missing.length) lines.push(`  catalogs not cached (their sub-trees are unreadable without the WAN): ${r.catalogs.missing.join(', ')}`);
    if (r.largestMissing.length) lines.push(`  largest missing sub-trees: ${r.largestMissing.map((m) => `${m.path} (${m.objects} objects, ${formatSize(m.bytes)})`).join('; ')}`);
    return lines.join('\n');
  }
  const err = r.error ? `; stopped: ${r.error.message}` : '';
  const busy = r.busyRefusals ? `, ${r.busyRefusals} times asked again after the proxy was busy with clients` : '';
  return `${r.repository} revision ${r.revision}: fetched ${r.fetched.objects} objects (${formatSize(r.fetched.bytes)}), skipped ${r.skipped.objects} cached (${formatSize(r.skipped.bytes)}), ${r.catalogs.complete} catalogs already complete, ${r.failed.length} errors${busy}, ${elapsedS.toFixed(1)} s${err}`;
}

/** Warm (or check) every repository once. The exit status: 0 when everything is warmed (or cached). */
async function once(o: WarmOptions, proxy: ProxyClient, rate: Rate, state: WarmState, revisions: Map<string, number>): Promise<{ status: number; ttlS: number }> {
  const reports: RepoReport[] = [];
  let status = 0;
  let ttlS = Infinity;
  for (const repo of o.repos) {
    const t0 = performance.now();
    const walk = new RepoWalk(o, proxy, rate, state, repo);
    const busyBefore = proxy.busyRefusals;
    try {
      // --watch asks for the newest manifest: a cached one may be up to its max-age old.
      const m = await walk.manifest(revisions.has(repo) ? 'max-age=0' : undefined);
      if (m) {
        revisions.set(repo, m.revision);
        ttlS = Math.min(ttlS, m.ttlS);
        await walk.run(m);
      }
    } catch (err) {
      if (!(err instanceof WarmError)) throw err;
      walk.report.error = { code: err.code, message: err.message };
      status = Math.max(status, WARM_ERRORS[err.code].exit);
    }
    const r = walk.report;
    r.busyRefusals = proxy.busyRefusals - busyBefore;
    if (o.check) {
      r.largestMissing.sort((a, b) => b.bytes - a.bytes).splice(10);
      if (!r.mountable || r.catalogs.missing.length || r.paths.some((p) => p.missing.objects)) status = Math.max(status, WARM_ERRORS.NOT_CACHED.exit);
    } else if (r.failed.length) status = Math.max(status, WARM_ERRORS.INCOMPLETE.exit);
    reports.push(r);
    if (!o.json) {
      o.out(`${summaryLine(r, o.check, (performance.now() - t0) / 1000)}\n`);
      for (const f of r.failed.slice(0, 20)) o.out(`  failed: ${f.url}: ${f.why}\n`);
      if (r.error && o.check) o.out(`  ${r.error.message}\n`);
    }
  }
  if (o.json) o.out(`${JSON.stringify({ ok: status === 0, status, repositories: reports })}\n`);
  return { status, ttlS };
}

export async function warm(o: WarmOptions): Promise<number> {
  const proxy = new ProxyClient(o.proxy, o.concurrency + 2, o.signal);
  const rate = new Rate(o.rateBytesPerSec);
  const state = new WarmState(o.statePath);
  const revisions = new Map<string, number>();
  try {
    for (;;) {
      const { status, ttlS } = await once(o, proxy, rate, state, revisions);
      if (!o.watch || o.signal.aborted) return status;
      // The next look: at the manifest's TTL (D, what the clients wait), or --watch-interval; a run
      // that failed looks again at the default TTL.
      const ttlMs = Math.min(o.watchIntervalMs ?? watchTtlS(ttlS) * 1000, TIMER_MAX_MS);
      try {
        await sleep(ttlMs, undefined, { signal: o.signal });
      } catch {
        return 0;
      }
    }
  } catch (err) {
    if (o.signal.aborted) return 0;
    throw err;
  } finally {
    await proxy.close();
  }
}

const USAGE = `usage: cuttle warm REPOSITORY_URL... [options]
  REPOSITORY_URL        a Stratum 1 repository URL, e.g. http://s1.example.org:8000/cvmfs/atlas.cern.ch
  --proxy URL           the running cuttle (default: the first --listen of --config, else http://127.0.0.1:3128)
  --config FILE         cuttle's configuration: its listen address, cache dir and --disk-cache
  --path PREFIX         walk only this sub-tree (repeatable)
  --concurrency N       objects in flight (default 4)
  --rate SIZE           cap on bytes per second, e.g. 50MB (default: no cap)
  --max-bytes SIZE      stop after fetching this much in a run (default: 90% of --disk-cache)
  --state FILE          completed catalogs (default: CACHE_DIR/warm-state.json)
  --watch               keep running: warm each new revision as it is published
  --watch-interval DUR  how often --watch asks for the manifest (default: its TTL, D)
  --check               ask nothing upstream: report what is cached and what is not
  --json                the report as JSON
exit: 0 all warmed (or cached); 1 objects failed (or not cached); 2 usage; 3 proxy unreachable or not a
cuttle; 4 Stratum 1 unreachable or no manifest; 5 a catalog failed its hash; 6 stopped at --max-bytes`;

/** `cuttle warm ...` from the command line. */
export async function warmMain(argv: string[], signal: AbortSignal): Promise<number> {
  let o: WarmOptions;
  try {
    o = warmOptions(argv, signal);
  } catch (err) {
    if (err instanceof ConfigError || err instanceof TypeError) {
      process.stderr.write(`cuttle warm: ${err instanceof ConfigError ? err.problems.join('; ') : err.message}\n${USAGE}\n`);
      return WARM_ERRORS.USAGE.exit;
    }
    throw err;
  }
  if (o.repos.length === 0) {
    process.stdout.write(`${USAGE}\n`);
    return argv.includes('--help') ? 0 : WARM_ERRORS.USAGE.exit;
  }
  return warm(o);
}

export function warmOptions(argv: string[], signal: AbortSignal): WarmOptions {
  const { values: v, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      proxy: { type: 'string' },
      config: { type: 'string' },
      path: { type: 'string', multiple: true },
      concurrency: { type: 'string' },
      rate: { type: 'string' },
      'max-bytes': { type: 'string' },
      state: { type: 'string' },
      watch: { type: 'boolean' },
      'watch-interval': { type: 'string' },
      check: { type: 'boolean' },
      json: { type: 'boolean' },
      help: { type: 'boolean' },
    },
  });
  const cfg = loadConfig(parseCli(v.config ? ['--config', v.config] : []));
  const problems: string[] = [];
  const size = (k: string, s: string | undefined): number | undefined => {
    if (s === undefined) return undefined;
    const n = parseSize(s);
    if (n === undefined || n <= 0) problems.push(`--${k}: expected a size such as 50MB, got ${s}`);
    return n;
  };
  const concurrency = Number(v.concurrency ?? 4);
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 256) problems.push(`--concurrency: expected a whole number from 1 to 256, got ${v.concurrency}`);
  const watchIntervalMs = v['watch-interval'] === undefined ? undefined : parseDurationMs(v['watch-interval']);
  if (v['watch-interval'] !== undefined && !watchIntervalMs) problems.push(`--watch-interval: expected a duration such as 4m, got ${v['watch-interval']}`);
  for (const r of positionals) if (!/^http:\/\/[^/]+\/cvmfs\/[^/]+\/?$/.test(r)) problems.push(`${r}: expected a repository URL, http://HOST[:PORT]/cvmfs/REPOSITORY`);
  if (v.check && v.watch) problems.push('--check and --watch do not go together');
  const rateBytesPerSec = size('rate', v.rate);
  const maxBytes = size('max-bytes', v['max-bytes']) ?? Math.floor(cfg.diskCacheBytes * CACHE_SHARE);
  if (problems.length) throw new ConfigError(problems);
  const listen = cfg.listen[0]!;
  const host = !listen.host || listen.host === '0.0.0.0' || listen.host === '::' ? '127.0.0.1' : listen.host.includes(':') ? `[${listen.host}]` : listen.host;
  return {
    repos: positionals,
    proxy: v.proxy ?? `http://${host}:${listen.port}`,
    paths: v.path ?? [],
    concurrency,
    rateBytesPerSec,
    statePath: v.state ?? join(cfg.cacheDir, 'warm-state.json'),
    watch: v.watch ?? false,
    watchIntervalMs,
    check: v.check ?? false,
    json: v.json ?? false,
    diskCacheBytes: cfg.diskCacheBytes,
    maxBytes,
    progress: process.stderr.isTTY ? process.stderr : undefined,
    out: (t) => process.stdout.write(t),
    warn: (t) => process.stderr.write(`${t}\n`),
    signal,
  };
}
