// One behaviour every storage tier shares (undici cacheStoreTests, hono runTest): each Tier passes it.
import assert from 'node:assert/strict';
import { it } from 'node:test';
import { createFreshness } from '../src/freshness.ts';
import { systemClock } from '../src/clock.ts';
import type { StoredMeta, StoredObject, Tier } from '../src/store.ts';

const freshness = createFreshness(systemClock, 60_000);

export function metaFor(key: string): { meta: StoredMeta; policy: ReturnType<typeof freshness.policyFor> } {
  const policy = freshness.policyFor({ url: '/x', method: 'GET', headers: { host: 'h' } }, { status: 200, headers: { 'cache-control': 'max-age=60' } });
  return { meta: { key, url: 'http://h/x', status: 200, headers: { 'content-type': 'text/plain' }, policy: policy.toObject(), vary: [], storedAt: Date.now() }, policy };
}

export async function bodyOf(o: StoredObject): Promise<Buffer> {
  if (o.body.kind === 'buffer') return o.body.data;
  const parts: Buffer[] = [];
  for (let pos = 0; pos < o.size; ) {
    const b = await o.body.read(pos, 4096);
    o.body.feed(b);
    parts.push(b);
    pos += b.length;
  }
  assert.equal(o.body.verify(), 'ok');
  o.body.close();
  return Buffer.concat(parts);
}

/** Run the shared suite against a fresh tier from `make` (maxBytes 64 KiB, max entry 16 KiB). */
export function tierConformance(name: string, make: () => Promise<Tier>): void {
  it(`${name}: a committed object reads back byte-identical with its meta`, async () => {
    const t = await make();
    const { meta, policy } = metaFor('k1');
    const w = t.openWriter(meta, policy, undefined)!;
    w.append(Buffer.from('hello '));
    w.append(Buffer.from('world'));
    assert.equal(await w.commit(), true);
    const o = (await t.get('k1'))!;
    assert.equal(o.meta.key, 'k1');
    assert.equal(o.size, 11);
    assert.equal((await bodyOf(o)).toString(), 'hello world');
    assert.equal(t.stats().objects, 1);
  });

  it(`${name}: an aborted or uncommitted writer leaves nothing`, async () => {
    const t = await make();
    const { meta, policy } = metaFor('k2');
    const w = t.openWriter(meta, policy, undefined)!;
    w.append(Buffer.from('partial'));
    assert.equal(await t.get('k2'), undefined);
    w.abort();
    assert.equal(await t.get('k2'), undefined);
  });

  it(`${name}: refuses objects over the entry bound`, async () => {
    const t = await make();
    const { meta, policy } = metaFor('big');
    assert.equal(t.openWriter(meta, policy, 17 * 1024), undefined);
    const w = t.openWriter(meta, policy, undefined)!;
    w.append(Buffer.alloc(17 * 1024));
    assert.equal(await w.commit(), false);
    assert.equal(await t.get('big'), undefined);
  });

  it(`${name}: stays within its byte bound, evicting least recently used`, async () => {
    const t = await make();
    for (let i = 0; i < 12; i++) {
      const { meta, policy } = metaFor(`e${i}`);
      const w = t.openWriter(meta, policy, 10_000)!;
      w.append(Buffer.alloc(10_000, i));
      await w.commit();
    }
    const s = t.stats();
    assert.ok(s.bytes <= s.maxBytes, `${s.bytes} <= ${s.maxBytes}`);
    assert.ok(s.evictions > 0);
    assert.equal(await t.get('e0'), undefined);
    const last = (await t.get('e11'))!;
    assert.equal((await bodyOf(last))[0], 11);
  });

  it(`${name}: delete and updateMeta`, async () => {
    const t = await make();
    const { meta, policy } = metaFor('d');
    const w = t.openWriter(meta, policy, undefined)!;
    w.append(Buffer.from('body'));
    await w.commit();
    await t.updateMeta({ ...meta, headers: { 'content-type': 'text/plain', 'x-new': '1' } }, policy);
    const o = (await t.get('d'))!;
    assert.equal(o.meta.headers['x-new'], '1');
    assert.equal((await bodyOf(o)).toString(), 'body');
    await t.delete('d');
    assert.equal(await t.get('d'), undefined);
  });
}
