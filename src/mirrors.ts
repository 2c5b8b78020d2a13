// Stratum 1 mirror groups: health, smoothed RTT, ranking and the order a fill tries mirrors in.
//
// Health follows Varnish probes: a sliding window of the last `window` probe results, healthy while at
// least `threshold` of them were good; the window starts with `initial` good results, so a mirror is
// healthy only after its first good probe. Passive failures of real fetches (connect errors, timeouts,
// 5xx, corrupt bytes) mark a mirror down after `failThreshold` in a row; only a good probe revives it.
// The RTT is an EWMA of probe round trips and real time-to-first-byte. The ranking keeps the current
// first choice until another healthy mirror is clearly faster (hysteresis), so near-equal mirrors don't flap.
// Probes also read the manifest's revision and publish time: a mirror far behind its group is stale.
// Accelerator mode sticks each repository to one mirror (MirrorGroup.stickyFor).
//
// The state here is pure: results come in with their timings, and the prober (at the bottom) is the
// only part that owns timers.
import { LRUCache } from 'lru-cache';
import type { Logger } from './log.ts';

export interface MirrorGroupConfig {
  readonly name: string;
  /** Base URLs' origins, e.g. http://cvmfs-s1a.example:8000 */
  readonly mirrors: readonly string[];
}

export interface ProbeConfig {
  intervalMs: number;
  timeoutMs: number;
  window: number;
  threshold: number;
  initial: number;
  failThreshold: number;
  /** A mirror with another behind it must connect and send headers within this, or the next is asked. */
  answerTimeoutMs: number;
  /** Repository whose manifest is probed; '' means the one each mirror last served. */
  repo: string;
  /** A mirror whose manifest was published this much earlier than the group's newest is stale. */
  maxLagMs: number;
}

/** What a probe read from a `.cvmfspublished`: the repository, its revision (S) and publish time (T). */
export interface ManifestInfo {
  repo: string;
  revision: number;
  publishedAtS: number;
}

/** Parse the text fields of a signed manifest (cvmfs-notes §2.2): one letter, then the value, up to `--`. */
export function parseManifest(text: string): ManifestInfo | undefined {
  const f: Record<string, string> = {};
  for (const line of text.split('\n')) {
    if (line.startsWith('--')) break;
    if (line.length > 1) f[line[0]!] = line.slice(1).trim();
  }
  const revision = Number(f.S);
  const publishedAtS = Number(f.T);
  if (!f.N || !Number.isSafeInteger(revision) || !Number.isSafeInteger(publishedAtS)) return undefined;
  return { repo: f.N, revision, publishedAtS };
}

const EWMA_ALPHA = 0.3;
/** A challenger must be this much faster than the current first choice to replace it. */
const HYSTERESIS = 0.2;
const HYSTERESIS_MS = 2;

export class Mirror {
  readonly origin: string;
  /** host:port as it appears in a request URL (default port omitted, as WHATWG URL does). */
  readonly host: string;
  readonly group: MirrorGroup;
  readonly index: number;
  rttMs: number | undefined;
  /** Failures of real fetches in a row. */
  consecutiveFailures = 0;
  /** Marked down by passive failures; cleared only by a good probe. */
  passiveDown = false;
  fetches = 0;
  failures = 0;
  bytes = 0;
  probes = 0;
  probeFailures = 0;
  lastProbeOk: boolean | undefined;
  /** Why the latest failed probe failed (kept after recovery, so an admin sees what happened last). */
  lastProbeError: string | undefined;
  /** The reason last logged for this mirror being down; a new reason is logged again, a repeat is not. */
  loggedDown: string | undefined;
  /** The last manifest a probe read from this mirror. */
  manifest: ManifestInfo | undefined;
  /** Its manifest is older than the group's newest by more than --mirror-max-lag. */
  stale = false;
  /**
   * The repository this mirror last answered a 200 for: what its probes fetch (unless --probe-repo).
   * Only a served answer sets it, so a client asking for a repository that doesn't exist can't steer the
   * probes to a 404 and mark the mirror down.
   */
  servedRepo = '';
  readonly #window: boolean[];
  readonly #cfg: ProbeConfig;

  constructor(origin: string, group: MirrorGroup, index: number, cfg: ProbeConfig) {
    const u = new URL(origin);
    this.origin = u.origin;
    this.host = u.host;
    this.group = group;
    this.index = index;
    this.#cfg = cfg;
    this.#window = Array.from({ length: cfg.window }, (_, i) => i >= cfg.window - cfg.initial); // the initial good results are the most recent
  }

  get goodProbes(): number {
    let n = 0;
    for (const ok of this.#window) if (ok) n++;
    return n;
  }

  get healthy(): boolean {
    return !this.passiveDown && this.goodProbes >= this.#cfg.threshold;
  }

  recordProbe(ok: boolean, rttMs: number | undefined, why?: string): void {
    this.probes++;
    this.lastProbeOk = ok;
    if (!ok) this.lastProbeError = why ?? 'unknown';
    this.#window.shift();
    this.#window.push(ok);
    if (ok) {
      this.passiveDown = false;
      this.consecutiveFailures = 0;
      if (rttMs !== undefined) this.#sample(rttMs);
    } else this.probeFailures++;
  }

  recordFetch(ok: boolean, ttfbMs?: number): void {
    this.fetches++;
    if (ok) {
      this.consecutiveFailures = 0;
      if (ttfbMs !== undefined) this.#sample(ttfbMs);
      return;
    }
    this.failures++;
    this.consecutiveFailures++;
    if (this.consecutiveFailures >= this.#cfg.failThreshold) this.passiveDown = true;
  }

  /** Take over the health, RTT and totals of the same mirror from before a reload. */
  inherit(old: Mirror): void {
    this.rttMs = old.rttMs;
    this.consecutiveFailures = old.consecutiveFailures;
    this.passiveDown = old.passiveDown;
    this.fetches = old.fetches;
    this.failures = old.failures;
    this.bytes = old.bytes;
    this.probes = old.probes;
    this.probeFailures = old.probeFailures;
    this.lastProbeOk = old.lastProbeOk;
    this.lastProbeError = old.lastProbeError;
    this.loggedDown = old.loggedDown;
    this.manifest = old.manifest;
    this.stale = old.stale;
    this.servedRepo = old.servedRepo;
    const w = old.#window.slice(-this.#window.length);
    this.#window.splice(this.#window.length - w.length, w.length, ...w);
  }

  #sample(ms: number): void {
    this.rttMs = this.rttMs === undefined ? ms : this.rttMs + EWMA_ALPHA * (ms - this.rttMs);
  }

  snapshot(): MirrorSnapshot {
    return {
      group: this.group.name,
      mirror: this.origin,
      healthy: this.healthy,
      rttMs: this.rttMs === undefined ? null : Math.round(this.rttMs * 10) / 10,
      repo: this.manifest?.repo ?? null,
      revision: this.manifest?.revision ?? null,
      stale: this.stale,
      goodProbes: this.goodProbes,
      passiveDown: this.passiveDown,
      fetches: this.fetches,
      failures: this.failures,
      bytes: this.bytes,
      probes: this.probes,
      probeFailures: this.probeFailures,
      lastProbeOk: this.lastProbeOk ?? null,
      lastProbeError: this.lastProbeError ?? null,
    };
  }
}

export interface MirrorSnapshot {
  group: string;
  mirror: string;
  healthy: boolean;
  rttMs: number | null;
  /** The probed repository's manifest revision on this mirror. */
  repo: string | null;
  revision: number | null;
  stale: boolean;
  goodProbes: number;
  passiveDown: boolean;
  fetches: number;
  failures: number;
  bytes: number;
  probes: number;
  probeFailures: number;
  lastProbeOk: boolean | null;
  /** e.g. "dns_error: getaddrinfo ENOTFOUND s1.example", "connection_refused: …", "timeout: …", "HTTP 503". */
  lastProbeError: string | null;
}

const byRtt = (a: Mirror, b: Mirror) => (a.rttMs ?? Infinity) - (b.rttMs ?? Infinity) || a.index - b.index;

export class MirrorGroup {
  readonly name: string;
  readonly mirrors: Mirror[] = [];
  /** The mirror misses go to first; changes only with hysteresis. */
  #first: Mirror | undefined;
  /** Accelerator mode: the mirror each repository sticks to. */
  // Repository names come from client paths: bounded, least recently used dropped (it is re-chosen).
  readonly #sticky = new LRUCache<string, Mirror>({ max: 4096 });
  /** Sticky choices made before any mirror was known healthy (at startup): re-made once one is. */
  readonly #provisional = new LRUCache<string, true>({ max: 4096 });
  readonly #onChange: (event: string, fields: Record<string, unknown>) => void;

  constructor(cfg: MirrorGroupConfig, probe: ProbeConfig, onChange: (event: string, fields: Record<string, unknown>) => void) {
    this.name = cfg.name;
    this.#onChange = onChange;
    cfg.mirrors.forEach((m, i) => this.mirrors.push(new Mirror(m, this, i, probe)));
  }

  /**
   * Mirrors in the order a miss should try them: healthy ones nearest first (with hysteresis), then the
   * rest as a last resort (down mirrors are better than an error when nothing else is left).
   */
  ranked(): Mirror[] {
    const healthy = this.mirrors.filter((m) => m.healthy).sort(byRtt);
    const best = healthy[0];
    const cur = this.#first;
    if (best && cur !== best) {
      const keep = cur?.healthy && cur.rttMs !== undefined && best.rttMs !== undefined && best.rttMs > cur.rttMs * (1 - HYSTERESIS) - HYSTERESIS_MS;
      if (keep) {
        healthy.splice(healthy.indexOf(cur!), 1);
        healthy.unshift(cur!);
      } else {
        this.#first = best;
        this.#onChange('mirror ranking changed', { group: this.name, first: best.origin, rttMs: best.rttMs, previous: cur?.origin });
      }
    }
    const rest = this.mirrors.filter((m) => !m.healthy).sort((a, b) => Number(a.passiveDown) - Number(b.passiveDown) || byRtt(a, b));
    return [...healthy, ...rest];
  }

  /** Accelerator mode: the repository's mirror; it moves only when it stops being healthy. */
  stickyFor(repo: string): Mirror {
    const cur = this.#sticky.get(repo);
    const anyHealthy = this.mirrors.some((m) => m.healthy);
    // A stale sticky mirror (replication stuck) is left when a healthy, current one exists.
    const fresh = (m: Mirror) => m.healthy && !m.stale;
    const anyFresh = this.mirrors.some(fresh);
    if (cur && (anyHealthy ? cur.healthy && (!cur.stale || !anyFresh) && !this.#provisional.has(repo) : true)) return cur;
    const ranked = this.ranked();
    const next = ranked.find(fresh) ?? ranked[0]!;
    this.#sticky.set(repo, next);
    if (anyHealthy) this.#provisional.delete(repo);
    else this.#provisional.set(repo, true);
    if (cur !== next) this.#onChange('sticky mirror changed', { group: this.name, repo, mirror: next.origin, previous: cur?.origin });
    return next;
  }

  /** After a reload: keep the repositories' sticky mirrors that are still in this group. */
  inheritSticky(old: MirrorGroup): void {
    for (const [repo, m] of old.#sticky.entries()) {
      const same = this.mirrors.find((x) => x.origin === m.origin);
      if (same) this.#sticky.set(repo, same);
    }
  }

  /** The sticky mirror failed a fetch: move the repository on to the next mirror now. */
  unstick(repo: string, failed: Mirror): void {
    if (this.#sticky.get(repo) !== failed) return;
    const next = this.ranked().find((m) => m !== failed) ?? failed;
    this.#sticky.set(repo, next);
    if (next !== failed) this.#onChange('sticky mirror changed', { group: this.name, repo, mirror: next.origin, previous: failed.origin, reason: 'fetch failed' });
  }
}

/** All groups, and which group a request's host:port belongs to. */
export class Mirrors {
  readonly groups: MirrorGroup[];
  readonly #byHost = new Map<string, Mirror>();
  readonly cfg: ProbeConfig;
  readonly #log: Logger;

  constructor(groups: readonly MirrorGroupConfig[], probe: ProbeConfig, log: Logger) {
    this.cfg = probe;
    this.#log = log;
    this.groups = groups.map((g) => new MirrorGroup(g, probe, (event, fields) => log.info(fields, event)));
    for (const g of this.groups) for (const m of g.mirrors) this.#byHost.set(m.host, m);
  }

  /** After a reload: carry health, RTT, totals and sticky choices over from the previous groups. */
  carryOver(prev: Mirrors): void {
    for (const g of this.groups) {
      for (const m of g.mirrors) {
        const old = prev.byHost(m.host);
        if (old) m.inherit(old);
      }
      const og = prev.groups.find((x) => x.name === g.name);
      if (og) g.inheritSticky(og);
    }
  }

  /** The mirror a request URL names, if it is one of ours. */
  byHost(host: string): Mirror | undefined {
    return this.#byHost.get(host);
  }

  get empty(): boolean {
    return this.groups.length === 0;
  }

  all(): Mirror[] {
    return this.groups.flatMap((g) => g.mirrors);
  }

  /** Apply a probe result, logging a health change as one structured line. */
  probed(m: Mirror, ok: boolean, rttMs: number | undefined, why?: string, manifest?: ManifestInfo): void {
    const was = m.healthy;
    m.recordProbe(ok, rttMs, why);
    this.#logState(m, was, ok, ok ? 'probe succeeded' : `probe failed: ${why ?? 'unknown'}`);
    if (manifest) {
      m.manifest = manifest;
      this.#judgeLag(m.group, manifest.repo);
    }
  }

  /** Mark the mirrors whose manifest of `repo` lags the group's newest by more than --mirror-max-lag. */
  #judgeLag(g: MirrorGroup, repo: string): void {
    const known = g.mirrors.filter((m) => m.manifest?.repo === repo);
    const newest = Math.max(...known.map((m) => m.manifest!.publishedAtS));
    for (const m of known) {
      const lagS = newest - m.manifest!.publishedAtS;
      const stale = lagS * 1000 > this.cfg.maxLagMs;
      if (stale !== m.stale) {
        m.stale = stale;
        this.#log.warn({ ...m.snapshot(), lagS }, stale ? 'mirror stale: its manifest lags the newest in its group' : 'mirror caught up');
      }
    }
  }

  /** Apply the outcome of a real fetch. */
  fetched(m: Mirror, ok: boolean, ttfbMs?: number, why?: string): void {
    const was = m.healthy;
    m.recordFetch(ok, ttfbMs);
    this.#logState(m, was, ok, ok ? 'fetch succeeded' : `fetch failed: ${why ?? 'unknown'}`);
  }

  /**
   * A mirror that is down is a warning with its reason: when it goes down, when it never came up (a
   * mistyped or unreachable --stratum1 at start), and again whenever the reason changes; the same
   * reason every probe interval is not repeated. Coming back is logged once, at info.
   */
  #logState(m: Mirror, was: boolean, ok: boolean, reason: string): void {
    if (m.healthy) {
      if (!was || m.loggedDown !== undefined) this.#log.info({ ...m.snapshot(), reason, downWas: m.loggedDown ?? null }, 'mirror up');
      m.loggedDown = undefined;
      return;
    }
    if (ok || (!was && m.loggedDown === reason)) return;
    m.loggedDown = reason;
    this.#log.warn({ ...m.snapshot(), reason }, 'mirror down');
  }

  snapshot(): MirrorSnapshot[] {
    return this.all().map((m) => m.snapshot());
  }
}

export type ProbeFn = (url: URL, timeoutMs: number, wantOk: boolean) => Promise<{ ok: boolean; rttMs: number; why?: string; text?: string }>;

/**
 * Active probes: each group is probed at a jittered interval (±20%), each mirror with a GET of the
 * probed repository's manifest (Cache-Control: no-cache). With no repository known yet, the server's
 * global /cvmfs/info/v1/repositories.json is fetched and any answer below 500 counts as alive.
 */
export class Prober {
  readonly #mirrors: Mirrors;
  readonly #probe: ProbeFn;
  readonly #timers = new Set<NodeJS.Timeout>();
  #stopped = false;

  constructor(mirrors: Mirrors, probe: ProbeFn) {
    this.#mirrors = mirrors;
    this.#probe = probe;
  }

  start(): void {
    for (const g of this.#mirrors.groups) void this.#round(g);
  }

  async #round(g: MirrorGroup): Promise<void> {
    if (this.#stopped) return;
    const cfg = this.#mirrors.cfg;
    await Promise.all(
      g.mirrors.map(async (m) => {
        const repo = cfg.repo || m.servedRepo;
        const path = repo ? `/cvmfs/${repo}/.cvmfspublished` : '/cvmfs/info/v1/repositories.json';
        const r: Awaited<ReturnType<ProbeFn>> = await this.#probe(new URL(path, m.origin), cfg.timeoutMs, Boolean(repo)).catch((err: Error) => ({ ok: false, rttMs: 0, why: err.message }));
        const manifest = r.ok && r.text ? parseManifest(r.text) : undefined;
        if (!this.#stopped) this.#mirrors.probed(m, r.ok, r.ok ? r.rttMs : undefined, r.why, manifest?.repo === repo ? manifest : undefined);
      }),
    );
    if (this.#stopped) return;
    const t = setTimeout(() => {
      this.#timers.delete(t);
      void this.#round(g);
    }, cfg.intervalMs * (0.8 + 0.4 * Math.random()));
    t.unref();
    this.#timers.add(t);
  }

  stop(): void {
    this.#stopped = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
  }
}
