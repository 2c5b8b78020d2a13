// Fuzz: random response-header shapes from an origin (duplicates of every caching header, empty values,
// unbalanced quotes, huge and negative numbers, garbage dates, hundreds of Vary names, odd status codes)
// and random request headers, each through a miss, a repeat and a revalidation. The proxy never exits,
// never logs an internal error, and answers every request with a valid status line.
//   npm test runs FUZZ_RUNS (default 40) cases; `npm run fuzz` runs 2,000.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import type { Pool } from 'undici';
import { startOrigin, type Origin, type Route } from '../helpers/origin.ts';
import { proxyClient, startProxy, type TestProxy } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

const RUNS = Number(process.env.FUZZ_RUNS ?? 40);
const REPO = 'fuzz.cern.ch';

// Printable header-value characters, quotes and commas included (no CR/LF: Node refuses to send them).
const valueChar = fc.constantFrom(...'abcXYZ019 =,;"\'-_/.:*!#$%&+^`|~()<>?@[]{}\\\t'.split(''));
const junk = fc.string({ unit: valueChar, maxLength: 40 });
const number = fc.oneof(fc.constantFrom('0', '-1', '1', '60', '3600', '99999999999999999999', '1e3', '0x10', '', ' 5 ', '2147483648', '-0'), fc.integer({ min: -1e9, max: 1e12 }).map(String));
const date = fc.oneof(
  fc.constantFrom('Thu, 01 Jan 1970 00:00:00 GMT', 'Fri, 31 Dec 9999 23:59:59 GMT', '0', '-1', 'garbage', '', 'Sun, 06 Nov 1994 08:49:37 GMT', 'Sunday, 06-Nov-94 08:49:37 GMT', 'Sun Nov  6 08:49:37 1994'),
  fc.date({ min: new Date(0), max: new Date(4e12), noInvalidDate: true }).map((d) => d.toUTCString()),
  junk,
);
const directive = fc.oneof(
  fc.constantFrom('no-cache', 'no-store', 'private', 'public', 'must-revalidate', 'proxy-revalidate', 'immutable', 'no-transform', 'only-if-cached', 'No-CaChE', 'MaX-aGe=60', '"', '=', ',,'),
  fc.tuple(fc.constantFrom('max-age', 's-maxage', 'stale-while-revalidate', 'stale-if-error', 'min-fresh', 'max-stale', 'no-cache', 'private'), number).map(([k, v]) => `${k}=${v}`),
  fc.tuple(fc.constantFrom('max-age', 'no-cache', 'private'), junk).map(([k, v]) => `${k}="${v}`),
);
const cacheControl = fc.array(directive, { maxLength: 6 }).map((ds) => ds.join(', '));
const varyNames = fc.oneof(
  fc.constantFrom('*', 'accept-encoding', 'x-a, x-b', '', 'Accept, *'),
  fc.integer({ min: 1, max: 300 }).map((n) => Array.from({ length: n }, (_, i) => `x-v${i}`).join(', ')),
);
/** A header value, or the same header repeated on several lines. */
const maybeRepeated = (v: fc.Arbitrary<string>) => fc.oneof(v, fc.array(v, { minLength: 2, maxLength: 4 }));

const responseHeaders = fc.record(
  {
    'cache-control': maybeRepeated(cacheControl),
    expires: maybeRepeated(date),
    date: maybeRepeated(date),
    'last-modified': maybeRepeated(date),
    age: maybeRepeated(number),
    etag: maybeRepeated(fc.oneof(fc.constantFrom('"a"', 'W/"a"', '"', 'W/', '""'), junk)),
    vary: maybeRepeated(varyNames),
    pragma: maybeRepeated(fc.constantFrom('no-cache', '', 'x')),
    'set-cookie': maybeRepeated(fc.constantFrom('a=b', 'session=1; Path=/', '')),
    'content-type': maybeRepeated(fc.constantFrom('text/plain', '', 'text/html; charset="', 'application/octet-stream')),
    'content-range': fc.constantFrom('bytes 0-1/2', 'bytes */10', 'garbage'),
    'x-extra': junk,
    connection: fc.constantFrom('x-extra', 'close, x-extra'),
    warning: fc.constantFrom('110 - "stale"', '199 x "y"', '"'),
  },
  { requiredKeys: [] },
);

const requestHeaders = fc.record(
  {
    'cache-control': cacheControl,
    pragma: fc.constantFrom('no-cache', '', 'x'),
    'if-none-match': fc.constantFrom('"a"', 'W/"a"', '*', '"', ''),
    'if-modified-since': date,
    range: fc.constantFrom('bytes=0-1', 'bytes=-5', 'bytes=5-', 'bytes=x', 'bytes=0-0,2-3'),
    authorization: fc.constantFrom('Basic dTpw', ''),
    'x-a': junk,
    'x-v1': junk,
    accept: fc.constantFrom('*/*', 'text/plain'),
  },
  { requiredKeys: [] },
);

const STATUSES = [200, 200, 200, 203, 204, 206, 299, 300, 301, 302, 304, 307, 400, 404, 405, 410, 414, 451, 499, 500, 501, 502, 503, 504, 599];

const responseCase = fc.record({
  status: fc.constantFrom(...STATUSES),
  headers: responseHeaders,
  body: fc.uint8Array({ maxLength: 3000 }),
  chunked: fc.boolean(),
  cas: fc.boolean(),
});

describe('fuzz: odd responses and requests never crash, wedge or corrupt the proxy', () => {
  let origin: Origin;
  let p: TestProxy;
  let pool: Pool;
  let n = 0;
  before(async () => {
    origin = await startOrigin();
    p = await startProxy({ stratum1: [origin.url], 'probe-interval': '60s', 'read-timeout': '5s' });
    pool = proxyClient(p.url, 8);
  });
  after(async () => {
    await pool.close();
    await p.close();
    await origin.close();
  });

  it(`${RUNS} random cases, each a miss, a repeat and a revalidation`, async () => {
    await fc.assert(
      fc.asyncProperty(responseCase, fc.array(requestHeaders, { minLength: 3, maxLength: 3 }), fc.constantFrom('GET', 'GET', 'HEAD'), async (rc, reqs, method) => {
        const id = n++;
        const body = Buffer.from(rc.body);
        // Half the cases name a content-addressed object (hash checks, host-independent keys, the
        // safe header set); its bytes may or may not match the hash.
        const corrupt = rc.cas && id % 2 === 0; // the bytes fail their hash
        const hash = createHash('sha1').update(corrupt ? Buffer.from(String(id)) : body).digest('hex');
        const path = rc.cas ? `/cvmfs/${REPO}/data/${hash.slice(0, 2)}/${hash.slice(2)}` : `/fuzz/${id}`;
        origin.route(path, (): Route => ({ status: rc.status, headers: rc.headers as Record<string, string | string[]>, body, chunked: rc.chunked }));
        const revalidate = { ...reqs[2]!, 'cache-control': 'max-age=0' };
        const before = origin.count(path); // shrinking may reuse a path (the same body, the same hash)
        for (const headers of [reqs[0]!, reqs[1]!, revalidate]) {
          let res;
          try {
            res = await pool.request({ path: `${origin.url}${path}`, method: method as 'GET', headers: headers as Record<string, string> });
          } catch (err) {
            // A corrupt object is cut short; when its body is empty, before its head (never a complete 200).
            if (corrupt && (err as { code?: string }).code === 'UND_ERR_SOCKET') continue;
            throw err;
          }
          await res.body.dump({ limit: 1 << 20 });
          assert.ok(res.statusCode >= 100 && res.statusCode <= 599, `status ${res.statusCode}`);
        }
        assert.ok(origin.count(path) - before <= 3, `upstream fetches ${origin.count(path) - before} for 3 requests`);
      }),
      { numRuns: RUNS, seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined },
    );
    // Nothing wedged: no fill left running once every answer is in, and a plain request still works.
    // (A fill's disk commit may still be landing after its last reader got its bytes: wait for that.)
    await waitFor('every fill ended', () => p.proxy.coalescer.running === 0);
    origin.route('/after', { body: 'ok', headers: { 'cache-control': 'max-age=60' } });
    const res = await pool.request({ path: `${origin.url}/after`, method: 'GET' });
    assert.equal(await res.body.text(), 'ok');
    assert.equal(origin.count('/after'), 1);
  });
});
