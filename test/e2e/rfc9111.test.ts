// RFC 9111 behaviours that the conformance suite scores, each checked here over real sockets with an
// upstream fetch count: 304 to a conditional client, Age carried through, Vary stored and coalesced from
// the first response, invalid Expires, case-insensitive directives, a fresh must-revalidate reused.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { connect } from 'node:net';
import { describe, it } from 'node:test';
import { gate, startOrigin, type Route } from '../helpers/origin.ts';
import { get, proxyClient, startProxy, useProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

describe('RFC 9111 through cuttle', () => {
  const rig = useProxy({}, 24);

  it('a client whose If-None-Match or If-Modified-Since matches gets 304 from the cache', async () => {
    const { origin, pool } = rig;
    origin.route('/cond', { headers: { 'cache-control': 'max-age=600', etag: '"v7"', 'last-modified': 'Thu, 01 Jan 2026 00:00:00 GMT', 'content-type': 'text/plain' }, body: 'seven' });
    assert.equal((await get(pool, `${origin.url}/cond`)).status, 200);
    const inm = await get(pool, `${origin.url}/cond`, { 'if-none-match': 'W/"v7"' });
    assert.equal(inm.status, 304);
    assert.equal(inm.body.length, 0);
    assert.equal(inm.headers.etag, '"v7"');
    assert.equal(inm.headers['content-type'], undefined);
    assert.equal((await get(pool, `${origin.url}/cond`, { 'if-none-match': '"other"' })).status, 200);
    assert.equal((await get(pool, `${origin.url}/cond`, { 'if-modified-since': 'Fri, 02 Jan 2026 00:00:00 GMT' })).status, 304);
    assert.equal((await get(pool, `${origin.url}/cond`, { 'if-modified-since': 'Wed, 31 Dec 2025 00:00:00 GMT' })).status, 200);
    assert.equal(origin.count('/cond'), 1);
  });

  it("the upstream's Age is carried through on a miss and counted on a hit", async () => {
    const { origin, pool } = rig;
    origin.route('/aged', { headers: { 'cache-control': 'max-age=3600', age: '1000' }, body: 'old news' });
    const miss = await get(pool, `${origin.url}/aged`);
    assert.ok(Number(miss.headers.age) >= 1000, `Age ${miss.headers.age}`);
    const hit = await get(pool, `${origin.url}/aged`);
    assert.ok(Number(hit.headers.age) >= 1000, `Age ${hit.headers.age}`);
    assert.equal(origin.count('/aged'), 1);
  });

  it('a response with Vary is stored from the first response: 20 concurrent clients cost one fetch per variant', async () => {
    const { origin, pool, p } = rig;
    const g = gate();
    origin.route('/varied', (req) => ({ gate: req.headers['accept-language'] === 'en' ? g : undefined, headers: { 'cache-control': 'max-age=600', vary: 'Accept-Language' }, body: `lang=${req.headers['accept-language']}` }));
    const en = Array.from({ length: 15 }, () => get(pool, `${origin.url}/varied`, { 'accept-language': 'en' }));
    await waitFor('the English fill with 15 waiters', () => g.waiting === 1 && p.proxy.coalescer.topFills(1, 0)[0]?.readers === 15);
    const de = Array.from({ length: 5 }, () => get(pool, `${origin.url}/varied`, { 'accept-language': 'de' }));
    await waitFor('the German clients joined', () => p.proxy.coalescer.topFills(1, 0)[0]?.readers === 20);
    g.open();
    for (const r of await Promise.all(en)) assert.equal(r.body.toString(), 'lang=en');
    for (const r of await Promise.all(de)) assert.equal(r.body.toString(), 'lang=de', 'a joiner of another variant gets its own');
    assert.equal(origin.count('/varied'), 2, 'one fetch per variant');
    assert.match(String((await get(pool, `${origin.url}/varied`, { 'accept-language': 'de' })).headers['x-cache']), /HIT/);
    assert.equal(origin.count('/varied'), 2);
  });

  it('Vary: selecting values match after whitespace and case normalisation where the field defines them (RFC 9111 §4.1)', async () => {
    const { origin, pool } = rig;
    origin.route('/lang', (req) => ({ headers: { 'cache-control': 'max-age=600', vary: 'Accept-Language, Accept-Encoding' }, body: `for ${req.headers['accept-language']}` }));
    const first = await get(pool, `${origin.url}/lang`, { 'accept-language': 'en, de', 'accept-encoding': 'gzip, br' });
    assert.equal(first.body.toString(), 'for en, de');
    for (const [lang, enc] of [['eN, De', 'GZIP,BR'], [' en ,   de', 'gzip ,br'], ['en,,de', 'gzip, br']]) {
      const r = await get(pool, `${origin.url}/lang`, { 'accept-language': lang!, 'accept-encoding': enc! });
      assert.match(String(r.headers['x-cache']), /HIT/, `${lang} / ${enc}`);
      assert.equal(r.body.toString(), 'for en, de');
    }
    assert.equal(origin.count('/lang'), 1);
    // The order of languages may carry priority (RFC 9110 §12.5.4): another variant.
    assert.equal((await get(pool, `${origin.url}/lang`, { 'accept-language': 'de, en', 'accept-encoding': 'gzip, br' })).body.toString(), 'for de, en');
    assert.equal(origin.count('/lang'), 2);
    // Any other field: OWS around its commas is not significant (a list's syntax); case, the whitespace
    // inside a member and a quoted string's commas are.
    origin.route('/foo', (req) => ({ headers: { 'cache-control': 'max-age=600', vary: 'Foo' }, body: `foo ${req.headers.foo}` }));
    await get(pool, `${origin.url}/foo`, { foo: '1,2' });
    assert.equal((await get(pool, `${origin.url}/foo`, { foo: ' 1 ,  2 ' })).body.toString(), 'foo 1,2');
    assert.equal(origin.count('/foo'), 1);
    assert.equal((await get(pool, `${origin.url}/foo`, { foo: '1,2 3' })).body.toString(), 'foo 1,2 3');
    assert.equal((await get(pool, `${origin.url}/foo`, { foo: 'A,2' })).body.toString(), 'foo A,2');
    await get(pool, `${origin.url}/foo`, { foo: '"1,2"' });
    assert.equal((await get(pool, `${origin.url}/foo`, { foo: '"1, 2"' })).body.toString(), 'foo "1, 2"');
    assert.equal(origin.count('/foo'), 5);
  });

  it('an invalid Expires counts as expired; directive names are case-insensitive', async () => {
    const { origin, pool } = rig;
    origin.route('/bad-expires', { headers: { expires: 'Thu, 01 Jan 2037 00:00:00 UTC' }, body: 'x' }); // "UTC" is no HTTP-date
    origin.route('/shouty', { headers: { 'cache-control': 'MaX-AgE=600' }, body: 'y' });
    origin.route('/shouty-no', { headers: { 'cache-control': 'max-age=600, No-Store' }, body: 'z' });
    for (let i = 0; i < 2; i++) for (const path of ['/bad-expires', '/shouty', '/shouty-no']) await get(pool, `${origin.url}${path}`);
    assert.equal(origin.count('/bad-expires'), 2);
    assert.equal(origin.count('/shouty'), 1);
    assert.equal(origin.count('/shouty-no'), 2);
  });

  it('an Expires in the wrong case is a date (RFC 9111 §4.2: matched case-insensitively); another zone is not', async () => {
    const { origin, pool } = rig;
    const dates = ['THU, 18 Aug 2050 02:01:18 GMT', 'Thu, 18 AUG 2050 02:01:18 GMT', 'Thu, 18 Aug 2050 02:01:18 gMT', 'thursday, 18-aug-50 02:01:18 gmt', 'thu aug 18 02:01:18 2050'];
    for (const [i, expires] of dates.entries()) origin.route(`/case${i}`, { headers: { expires }, body: 'c' });
    origin.route('/zone', { headers: { expires: 'Thu, 18 Aug 2050 02:01:18 CET' }, body: 'z' });
    for (let n = 0; n < 2; n++) for (const path of [...dates.map((_d, i) => `/case${i}`), '/zone']) await get(pool, `${origin.url}${path}`);
    for (const i of dates.keys()) assert.equal(origin.count(`/case${i}`), 1, dates[i]!);
    assert.equal(origin.count('/zone'), 2);
  });

  it('the answer to a request with Authorization is stored only when it says a shared cache may (RFC 9111 §3.5)', async () => {
    const { origin, pool } = rig;
    const auth = { authorization: 'Basic dTpw' };
    for (const cc of ['max-age=600, public', 'max-age=600, must-revalidate', 's-maxage=600']) {
      const path = `/auth-${cc.replace(/\W/g, '')}`;
      origin.route(path, { headers: { 'cache-control': cc }, body: 'shared' });
      assert.equal((await get(pool, `${origin.url}${path}`, auth)).body.toString(), 'shared');
      assert.equal(origin.seen.at(-1)!.headers.authorization, 'Basic dTpw', 'the credentials go upstream');
      assert.match(String((await get(pool, `${origin.url}${path}`)).headers['x-cache']), /HIT/, cc);
      // Credentials get their own answer, never a stored copy.
      await get(pool, `${origin.url}${path}`, auth);
      assert.equal(origin.count(path), 2, cc);
    }
    // Without such a directive the answer is this client's alone, and the URL stays cacheable.
    origin.route('/auth-own', { headers: { 'cache-control': 'max-age=600' }, body: 'mine' });
    await get(pool, `${origin.url}/auth-own`, auth);
    for (let i = 0; i < 3; i++) assert.equal((await get(pool, `${origin.url}/auth-own`)).body.toString(), 'mine');
    assert.equal(origin.count('/auth-own'), 2);
  });

  it('must-understand: no-store is ignored for a status code whose rules cuttle implements; another is not stored (RFC 9111 §5.2.2.3)', async () => {
    const { origin, pool } = rig;
    origin.route('/mu', { headers: { 'cache-control': 'max-age=600, no-store, must-understand' }, body: 'understood' });
    origin.route('/mu299', { status: 299, headers: { 'cache-control': 'max-age=600, must-understand' }, body: 'unknown' });
    origin.route('/299', { status: 299, headers: { 'cache-control': 'max-age=600' }, body: 'unknown, but explicitly fresh' });
    for (let i = 0; i < 2; i++) for (const path of ['/mu', '/mu299', '/299']) await get(pool, `${origin.url}${path}`);
    assert.match(String((await get(pool, `${origin.url}/mu`)).headers['x-cache']), /HIT/);
    assert.equal(origin.count('/mu'), 1);
    assert.equal(origin.count('/mu299'), 2);
    assert.equal(origin.count('/299'), 1);
  });

  it('a fresh must-revalidate response is reused, also for a request with its own directives', async () => {
    const { origin, pool } = rig;
    origin.route('/mr', { headers: { 'cache-control': 'max-age=600, must-revalidate' }, body: 'm' });
    await get(pool, `${origin.url}/mr`);
    assert.match(String((await get(pool, `${origin.url}/mr`, { 'cache-control': 'max-stale=10' })).headers['x-cache']), /HIT/);
    assert.equal(origin.count('/mr'), 1);
  });
});

describe('Expect: 100-continue', () => {
  const rig = useProxy({}, 2);

  it('is answered by the proxy: the client gets 100, then the origin answer (GET and POST)', async () => {
    const { origin, p } = rig;
    origin.route('/upload', (req) => ({ body: `got ${req.body.length} bytes by ${req.method}` }));
    for (const method of ['POST', 'GET']) {
      const body = 'x'.repeat(2048);
      const s = connect(p.port, '127.0.0.1');
      s.write(`${method} ${origin.url}/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`);
      let text = '';
      let sent = false;
      s.on('data', (c) => {
        text += c;
        if (!sent && text.startsWith('HTTP/1.1 100 Continue\r\n\r\n')) {
          sent = true;
          s.write(body);
        }
      });
      await once(s, 'close');
      assert.ok(sent, text);
      // A GET's body has no meaning (RFC 9110 §9.3.1): it is not forwarded into a shared fill.
      assert.match(text, new RegExp(`HTTP/1.1 200 [^]*got ${method === 'POST' ? 2048 : 0} bytes by ${method}$`));
    }
    assert.equal(origin.count('/upload'), 2);
    assert.equal(origin.seen.filter((r) => r.headers.expect !== undefined).length, 0);
  });
});

describe('Range served from the cache', () => {
  const rig = useProxy({ 'max-memory-object-size': '4KB', 'range-offset-limit': '32KB' }, 2);

  it('a single range of a stored object is answered 206, from memory and from disk; others get the full 200', async () => {
    const { origin, pool } = rig;
    const small = Buffer.from('0123456789abcdef');
    const big = Buffer.alloc(64 * 1024, 7);
    big.write('HEAD', 0);
    big.write('TAIL', big.length - 4);
    origin.route('/small', { headers: { 'cache-control': 'max-age=600', etag: '"s1"' }, body: small });
    origin.route('/big', { headers: { 'cache-control': 'max-age=600', etag: '"b1"' }, body: big });
    for (const [path, body] of [['/small', small], ['/big', big]] as const) {
      assert.equal((await get(pool, `${origin.url}${path}`)).status, 200);
      await waitFor('stored', () => rig.p.proxy.coalescer.running === 0); // not a fill being committed
      const first = await get(pool, `${origin.url}${path}`, { range: 'bytes=0-3' });
      assert.equal(first.status, 206);
      assert.equal(first.headers['content-range'], `bytes 0-3/${body.length}`);
      assert.ok(first.body.equals(body.subarray(0, 4)));
      const suffix = await get(pool, `${origin.url}${path}`, { range: 'bytes=-4' });
      assert.equal(suffix.status, 206);
      assert.ok(suffix.body.equals(body.subarray(body.length - 4)));
      const open = await get(pool, `${origin.url}${path}`, { range: `bytes=${body.length - 2}-` });
      assert.ok(open.body.equals(body.subarray(body.length - 2)));
      assert.equal((await get(pool, `${origin.url}${path}`, { range: `bytes=${body.length}-` })).status, 416);
      assert.equal((await get(pool, `${origin.url}${path}`, { range: 'bytes=0-1,4-5' })).status, 200, 'several ranges: the full 200');
      assert.equal((await get(pool, `${origin.url}${path}`, { range: 'bytes=0-3', 'if-range': '"other"' })).status, 200, 'If-Range that does not match: the full 200');
      assert.equal(origin.count(path), 1);
    }
  });
});

describe('A fill that ends during a lookup', () => {
  const rig = useProxy({}, 2);

  it('a range asked while the fill is stored is answered from what it stored, not fetched again', async () => {
    const { origin, pool, p } = rig;
    const g = gate();
    origin.route('/late', { gate: g, headers: { 'cache-control': 'max-age=3600' }, body: '0123456789A' });
    const key = `${origin.url}/late`;
    const first = get(pool, key);
    await waitFor('the fill waiting for the origin', () => g.waiting === 1);
    // The range request's disk read is held until the fill has put the object in memory and left.
    const d = gate();
    const getFromDisk = p.proxy.store.getFromDisk.bind(p.proxy.store);
    p.proxy.store.getFromDisk = async (k: string) => {
      if (k === key) {
        d.waiting++;
        await d.opened;
      }
      return getFromDisk(k);
    };
    const ranged = get(pool, key, { range: 'bytes=-1', 'cache-control': 'nothing-to-see-here' });
    await waitFor('the range request reading the disk', () => d.waiting === 1);
    g.open();
    assert.equal((await first).body.toString(), '0123456789A');
    await waitFor('the object in memory, the fill gone', () => p.proxy.store.getFromMemory(key) !== undefined && !p.proxy.coalescer.joinable(key));
    d.open();
    const r = await ranged;
    assert.equal(r.status, 206);
    assert.equal(r.body.toString(), 'A');
    assert.equal(origin.count('/late'), 1);
    p.proxy.store.getFromDisk = getFromDisk;
  });
});

describe('Range that misses', () => {
  const rig = useProxy({ 'range-offset-limit': '32KB' }, 2);

  it('within --range-offset-limit fills the whole object and answers the range from the fill; the next request is a hit', async () => {
    const { origin, pool } = rig;
    const body = Buffer.alloc(100_000, 1);
    body.write('RANGE', 10);
    origin.route('/rng', { headers: { 'cache-control': 'max-age=600' }, body });
    const r = await get(pool, `${origin.url}/rng`, { range: 'bytes=10-14' });
    assert.equal(r.status, 206);
    assert.equal(r.body.toString(), 'RANGE');
    assert.equal(r.headers['content-range'], 'bytes 10-14/100000');
    assert.equal(origin.seen.at(-1)!.headers.range, undefined, 'the fill asked for the whole object');
    await waitFor('stored', () => rig.p.proxy.coalescer.running === 0);
    const all = await get(pool, `${origin.url}/rng`);
    assert.ok(all.body.equals(body));
    assert.match(String(all.headers['x-cache']), /HIT/);
    assert.equal(origin.count('/rng'), 1);
  });

  it('beyond --range-offset-limit is passed with its Range, and nothing is stored', async () => {
    const { origin, pool } = rig;
    origin.route('/far', (req): Route => (req.headers.range ? { status: 206, headers: { 'content-range': 'bytes 50000-50001/100000' }, body: 'xy' } : { body: 'whole' }));
    const r = await get(pool, `${origin.url}/far`, { range: 'bytes=50000-50001' });
    assert.equal(r.status, 206);
    assert.equal(r.body.toString(), 'xy');
    assert.equal(origin.seen.at(-1)!.headers.range, 'bytes=50000-50001');
    assert.equal(origin.count('/far'), 1);
  });
});

describe('Interim responses (RFC 9110 §15.2)', () => {
  const rig = useProxy({}, 2);

  /** A raw request on its own connection: everything the proxy writes back, as text, until it closes. */
  function raw(port: number, head: string): { text: () => string; closed: Promise<unknown> } {
    const s = connect(port, '127.0.0.1');
    let text = '';
    s.on('data', (c) => (text += c));
    s.write(head);
    return { text: () => text, closed: once(s, 'close') };
  }

  it('a 103 and a 102 reach the client whose request caused the fetch, before the final answer; the stored answer has neither, nor their headers', async () => {
    const { origin, pool, p } = rig;
    const g = gate();
    const hints = { link: '</styles.css>; rel=preload; as=style', 'x-my-header': 'test' };
    origin.route('/early', { interim: [{ status: 103, headers: hints }, { status: 102 }], gate: g, headers: { 'cache-control': 'max-age=600' }, body: 'final' });
    const c = raw(p.port, `GET ${origin.url}/early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    await waitFor('both interim responses at the client', () => c.text().includes('HTTP/1.1 102 Processing\r\n\r\n'));
    assert.equal(g.waiting, 1, 'the final answer is still held');
    assert.match(c.text(), /^HTTP\/1\.1 103 Early Hints\r\nlink: <\/styles\.css>; rel=preload; as=style\r\nx-my-header: test\r\n\r\nHTTP\/1\.1 102 Processing\r\n\r\n$/i);
    g.open();
    await c.closed;
    const final = c.text().slice(c.text().indexOf('HTTP/1.1 200'));
    assert.match(final, /^HTTP\/1\.1 200 [^]*final$/);
    assert.doesNotMatch(final, /x-my-header/i);
    const hit = raw(p.port, `GET ${origin.url}/early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    await hit.closed;
    assert.match(hit.text(), /^HTTP\/1\.1 200 [^]*X-Cache: HIT[^]*final$/i);
    assert.doesNotMatch(hit.text(), /x-my-header|^HTTP\/1\.1 1/im);
    assert.match(String((await get(pool, `${origin.url}/early`)).headers['x-cache']), /HIT/);
    assert.equal(origin.count('/early'), 1);
  });

  it('a passed request gets them too; an HTTP/1.0 client gets none (§15.2)', async () => {
    const { origin, p } = rig;
    origin.route('/proc', { interim: [{ status: 102 }], body: 'done' });
    const post = raw(p.port, `POST ${origin.url}/proc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi`);
    await post.closed;
    assert.match(post.text(), /^HTTP\/1\.1 102 Processing\r\n\r\nHTTP\/1\.1 200 [^]*done$/);
    const old = raw(p.port, `GET ${origin.url}/proc HTTP/1.0\r\nHost: x\r\n\r\n`);
    await old.closed;
    assert.match(old.text(), /^HTTP\/1\.1 200 [^]*done$/);
    assert.equal(origin.count('/proc'), 2);
  });
});

describe('Authorization and a content-addressed object', () => {
  it("a small answer to credentials is not shared with the fill's other waiters", async () => {
    const mirror = await startOrigin();
    const p = await startProxy({ stratum1: [mirror.url], 'probe-interval': '60s' });
    const pool = proxyClient(p.url, 4);
    try {
      const obj = randomBytes(1000);
      const h = createHash('sha1').update(obj).digest('hex');
      const path = `/cvmfs/auth.cern.ch/data/${h.slice(0, 2)}/${h.slice(2)}`;
      const g = gate();
      mirror.route(path, (req): Route => (req.headers.authorization ? { status: 403, gate: g, body: 'not for you' } : { body: obj, headers: { 'cache-control': 'max-age=600' } }));
      const authed = get(pool, `${mirror.url}${path}`, { authorization: 'Basic dTpw' });
      await waitFor('the fill of the request with credentials', () => g.waiting === 1);
      const plain = get(pool, `${mirror.url}${path}`);
      await waitFor('the plain request joined it', () => p.proxy.coalescer.topFills(1, 0)[0]?.readers === 2);
      g.open();
      assert.equal((await authed).status, 403);
      const r = await plain;
      assert.equal(r.status, 200);
      assert.ok(r.body.equals(obj));
      assert.equal(mirror.count(path), 2);
    } finally {
      await pool.close();
      await p.close();
      await mirror.close();
    }
  });
});
