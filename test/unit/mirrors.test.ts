import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { pino } from 'pino';
import { buildConfig } from '../../src/config.ts';
import { casObject, HashCheck } from '../../src/content-hash.ts';
import { FetchPlan } from '../../src/fetch-plan.ts';
import { Mirrors, parseManifest, type ProbeConfig } from '../../src/mirrors.ts';

const PROBE: ProbeConfig = { intervalMs: 5000, timeoutMs: 2000, window: 8, threshold: 3, initial: 2, failThreshold: 3, answerTimeoutMs: 3000, maxLagMs: 3_600_000, repo: '' };
const A = 'http://s1a.example:8000';
const B = 'http://s1b.example:8000';
const C = 'http://s1c.example:8000';

function group(urls = [A, B, C]) {
  const events: string[] = [];
  const log = pino({ level: 'info' }, { write: (l: string) => void events.push(JSON.parse(l).msg) });
  const mirrors = new Mirrors([{ name: 'g', mirrors: urls }], PROBE, log);
  return { mirrors, g: mirrors.groups[0]!, events };
}

describe('mirror health (Varnish window 8, threshold 3, initial 2)', () => {
  it('is healthy only after the first good probe, and down after enough bad ones', () => {
    const { mirrors, g, events } = group();
    const a = g.mirrors[0]!;
    assert.equal(a.healthy, false);
    mirrors.probed(a, true, 10);
    assert.equal(a.healthy, true);
    assert.deepEqual(events, ['mirror up']);
    for (let i = 0; i < 7; i++) mirrors.probed(a, true, 10);
    // 8 good in the window: it takes 6 bad probes to fall below 3 good.
    for (let i = 0; i < 5; i++) mirrors.probed(a, false, undefined);
    assert.equal(a.healthy, true);
    mirrors.probed(a, false, undefined);
    assert.equal(a.healthy, false);
    assert.equal(events.at(-1), 'mirror down');
  });

  it('a mirror that never comes up warns with its reason; a repeat is quiet, a new reason is not; recovery is logged', () => {
    const lines: { level: number; msg: string; reason?: string; downWas?: string }[] = [];
    const mirrors = new Mirrors([{ name: 'g', mirrors: [A] }], PROBE, pino({ level: 'info' }, { write: (l: string) => void lines.push(JSON.parse(l)) }));
    const a = mirrors.groups[0]!.mirrors[0]!;
    mirrors.probed(a, false, undefined, 'dns_error: getaddrinfo ENOTFOUND s1a.example');
    mirrors.probed(a, false, undefined, 'dns_error: getaddrinfo ENOTFOUND s1a.example');
    mirrors.probed(a, false, undefined, 'connection_refused: connect ECONNREFUSED 192.0.2.1:8000');
    assert.deepEqual(lines.map((l) => [l.level, l.msg, l.reason]), [
      [40, 'mirror down', 'probe failed: dns_error: getaddrinfo ENOTFOUND s1a.example'],
      [40, 'mirror down', 'probe failed: connection_refused: connect ECONNREFUSED 192.0.2.1:8000'],
    ]);
    assert.equal(a.snapshot().lastProbeError, 'connection_refused: connect ECONNREFUSED 192.0.2.1:8000');
    for (let i = 0; i < 3; i++) mirrors.probed(a, true, 10);
    assert.equal(lines.length, 3);
    assert.equal(lines[2]!.msg, 'mirror up');
    assert.equal(lines[2]!.downWas, 'probe failed: connection_refused: connect ECONNREFUSED 192.0.2.1:8000');
    assert.equal(a.snapshot().lastProbeOk, true);
  });

  it('passive failures in a row mark it down; only a good probe brings it back', () => {
    const { mirrors, g } = group();
    const a = g.mirrors[0]!;
    mirrors.probed(a, true, 10);
    mirrors.fetched(a, false);
    mirrors.fetched(a, true, 12);
    mirrors.fetched(a, false);
    mirrors.fetched(a, false);
    assert.equal(a.healthy, true, 'not three in a row');
    mirrors.fetched(a, false);
    assert.equal(a.healthy, false);
    mirrors.fetched(a, true, 10);
    assert.equal(a.healthy, false, 'a fetch does not revive it');
    mirrors.probed(a, true, 10);
    assert.equal(a.healthy, true);
  });

  it('ranks by smoothed RTT with hysteresis, and puts down mirrors last', () => {
    const { mirrors, g } = group();
    const [a, b, c] = g.mirrors;
    mirrors.probed(a!, true, 50);
    mirrors.probed(b!, true, 20);
    mirrors.probed(c!, true, 80);
    assert.deepEqual(g.ranked().map((m) => m.origin), [B, A, C]);
    // A gets a little faster than B: not enough to switch.
    for (let i = 0; i < 20; i++) mirrors.probed(a!, true, 19);
    assert.equal(g.ranked()[0]!.origin, B);
    for (let i = 0; i < 20; i++) mirrors.probed(a!, true, 5);
    assert.equal(g.ranked()[0]!.origin, A);
    for (let i = 0; i < 3; i++) mirrors.fetched(a!, false);
    assert.deepEqual(g.ranked().map((m) => m.origin), [B, C, A]);
  });

  it('accelerator mode sticks to one mirror per repository until it fails', () => {
    const { mirrors, g } = group();
    for (const [m, rtt] of [[0, 30], [1, 20], [2, 80]] as const) mirrors.probed(g.mirrors[m]!, true, rtt);
    assert.equal(g.stickyFor('atlas').origin, B);
    for (let i = 0; i < 20; i++) mirrors.probed(g.mirrors[0]!, true, 1);
    assert.equal(g.stickyFor('atlas').origin, B, 'a faster mirror does not move a sticky repository');
    g.unstick('atlas', g.mirrors[1]!);
    assert.equal(g.stickyFor('atlas').origin, A);
  });

  it('a mirror whose manifest lags the newest by more than --mirror-max-lag is stale, and accelerator mode moves off it', () => {
    const { mirrors, g, events } = group();
    const now = 1_800_000_000;
    mirrors.probed(g.mirrors[0]!, true, 5, undefined, { repo: 'atlas', revision: 5, publishedAtS: now - 7200 });
    mirrors.probed(g.mirrors[1]!, true, 30, undefined, { repo: 'atlas', revision: 9, publishedAtS: now });
    assert.equal(g.mirrors[0]!.stale, true);
    assert.ok(events.includes('mirror stale: its manifest lags the newest in its group'));
    assert.equal(g.stickyFor('atlas').origin, B, 'the nearest mirror is stale: the current one is chosen');
    assert.equal(g.ranked()[0]!.origin, A, 'content-addressed misses still go to the nearest (a missing object fails over)');
    mirrors.probed(g.mirrors[0]!, true, 5, undefined, { repo: 'atlas', revision: 9, publishedAtS: now });
    assert.equal(g.mirrors[0]!.stale, false);
    assert.equal(g.stickyFor('atlas').origin, B, 'and the repository stays where it is');
    assert.deepEqual(parseManifest('C0123\nNatlas\nS42\nT1700000000\n--\nsignature'), { repo: 'atlas', revision: 42, publishedAtS: 1_700_000_000 });
    assert.equal(parseManifest('garbage'), undefined);
  });

  it('a sticky choice made before any probe answered is re-made once mirrors are known', () => {
    const { mirrors, g } = group();
    assert.equal(g.stickyFor('cms').origin, A, 'nothing known yet: configured order');
    mirrors.probed(g.mirrors[2]!, true, 5);
    mirrors.probed(g.mirrors[0]!, true, 50);
    assert.equal(g.stickyFor('cms').origin, C, 'the nearest healthy mirror, once known');
    mirrors.probed(g.mirrors[1]!, true, 1);
    assert.equal(g.stickyFor('cms').origin, C, 'and then it sticks');
  });
});

describe('fetch plan', () => {
  const path = '/cvmfs/atlas.cern.ch/data/ab/cdef0123456789abcdef0123456789abcdef01';
  it('a content-addressed object tries every mirror, nearest first, whichever the client named', () => {
    const { mirrors, g } = group();
    mirrors.probed(g.mirrors[0]!, true, 30);
    mirrors.probed(g.mirrors[1]!, true, 10);
    const plan = new FetchPlan({ url: new URL(C + path), cas: casObject(path), mirrors });
    assert.deepEqual([plan.next(), plan.next(), plan.next(), plan.next()].map((a) => a?.url.origin), [B, A, C, undefined]);
    assert.equal(plan.retry404, true);
  });

  it('a manifest goes to the mirror named, and nowhere else', () => {
    const { mirrors, g } = group();
    mirrors.probed(g.mirrors[1]!, true, 10);
    const u = new URL(`${A}/cvmfs/atlas.cern.ch/.cvmfspublished`);
    const plan = new FetchPlan({ url: u, cas: undefined, mirrors });
    assert.equal(plan.next()?.url.href, u.href);
    assert.equal(plan.next(), undefined);
    assert.equal(plan.failover, false);
  });

  it('mirrors that served corrupt bytes for the object go last', () => {
    const { mirrors, g } = group();
    for (const m of g.mirrors) mirrors.probed(m, true, 10 + m.index);
    const plan = new FetchPlan({ url: new URL(A + path), cas: casObject(path), mirrors, avoid: new Set([A]) });
    assert.deepEqual([plan.next(), plan.next(), plan.next()].map((a) => a?.url.origin), [B, C, A]);
  });
});

describe('content hashes', () => {
  it('recognises SHA-1, RIPEMD-160 and SHAKE-128 objects with suffixes, and nothing else', () => {
    const body = Buffer.from('hello cvmfs');
    for (const [algo, id] of [['sha1', ''], ['ripemd160', '-rmd160'], ['shake128', '-shake128']] as const) {
      const hex = createHash(algo, algo === 'shake128' ? { outputLength: 20 } : {}).update(body).digest('hex');
      const o = casObject(`/cvmfs/a.b/data/${hex.slice(0, 2)}/${hex.slice(2)}${id}C`)!;
      assert.equal(o.algo, algo);
      const ok = new HashCheck(o);
      ok.update(body);
      assert.equal(ok.matches(), true);
      const bad = new HashCheck(o);
      bad.update(Buffer.from('hello cvmfS'));
      assert.equal(bad.matches(), false);
    }
    assert.equal(casObject('/cvmfs/a.b/.cvmfspublished'), undefined);
    assert.equal(casObject('/cvmfs/a.b/data/ab/cdef'), undefined);
    assert.equal(casObject('/cvmfs/a.b/data/ab/cdef0123456789abcdef0123456789abcdef01', '?x=1'), undefined);
    assert.equal(casObject('/cvmfs/a.b/api/v1.0/geo/x/y'), undefined);
  });
});

describe('mirror config', () => {
  it('takes a list (one group) or named groups, and rejects a mirror listed twice', () => {
    assert.deepEqual(buildConfig({ stratum1: ['http://s1a:8000/cvmfs/@fqrn@', 'http://s1b:8000'] }).mirrorGroups, [{ name: 'default', mirrors: ['http://s1a:8000', 'http://s1b:8000'] }]);
    assert.deepEqual(buildConfig({ stratum1: { cern: ['http://s1a:8000'], osg: ['http://s1c:8000'] } }).mirrorGroups.map((g) => g.name), ['cern', 'osg']);
    assert.throws(() => buildConfig({ stratum1: { a: ['http://s1a:8000'], b: ['http://s1a:8000'] } }), /listed twice/);
    assert.throws(() => buildConfig({ stratum1: ['ftp://x'] }), /stratum1: expected an http/);
    assert.throws(() => buildConfig({ accel: true }), /accelerator mode needs/);
  });
});
