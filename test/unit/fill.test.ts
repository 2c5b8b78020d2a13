// A fill whose body is being verified withholds only the body's last byte: with a known length, every
// byte before it goes to readers as it arrives (one write per upstream chunk, not a chunk and a 1-byte
// remainder); without one, the newest byte received might be the last, so it waits.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Fill } from '../../src/fill.ts';

function verifyingFill(contentLength: number | undefined): { fill: Fill; reader: number } {
  const fill = new Fill('k', 0, 1024 * 1024, { limitBytes: 1024 * 1024, usedBytes: 0 });
  const reader = fill.addReader();
  fill.respond({ head: { status: 200, headers: {}, contentLength }, shared: true, holdBack: true }, undefined, true);
  return { fill, reader };
}

const text = (p: ReturnType<Fill['peek']>): string => (Buffer.isBuffer(p) ? p.toString() : p);

describe('Fill: the byte held back while the content is checked', () => {
  it('with a known length, only the last byte of the body waits for finish()', () => {
    const { fill, reader } = verifyingFill(10);
    fill.push(Buffer.from('abcde'));
    assert.equal(text(fill.peek(reader, 0)), 'abcde', 'the whole chunk: the body is not complete yet');
    assert.equal(fill.peek(reader, 5), 'wait');
    fill.push(Buffer.from('fghij'));
    assert.equal(text(fill.peek(reader, 5)), 'fghi', 'the last byte of the body is withheld');
    assert.equal(fill.peek(reader, 9), 'wait');
    fill.finish();
    assert.equal(text(fill.peek(reader, 9)), 'j');
    assert.equal(fill.peek(reader, 10), 'end');
  });

  it('without a length, the newest byte received waits', () => {
    const { fill, reader } = verifyingFill(undefined);
    fill.push(Buffer.from('abcde'));
    assert.equal(text(fill.peek(reader, 0)), 'abcd');
    fill.push(Buffer.from('fg'));
    assert.equal(text(fill.peek(reader, 4)), 'e');
    assert.equal(text(fill.peek(reader, 5)), 'f');
    fill.finish();
    assert.equal(text(fill.peek(reader, 6)), 'g');
    assert.equal(fill.peek(reader, 7), 'end');
  });

  it('a failed check never releases the last byte', () => {
    const { fill, reader } = verifyingFill(4);
    fill.push(Buffer.from('abcd'));
    assert.equal(text(fill.peek(reader, 0)), 'abc');
    fill.fail(undefined);
    assert.equal(fill.peek(reader, 3), 'failed');
  });
});

describe('fill outcome', () => {
  it('is published once: a response, a 304 or a failure, and a second publication is a bug', async () => {
    const budget = { limitBytes: 1024, usedBytes: 0 };
    const failed = new Fill('a', 0, 1024, budget);
    const waiting = failed.published();
    failed.fail(undefined);
    const o = await waiting;
    assert.equal(o.kind, 'failed');
    assert.equal(o.kind === 'failed' && o.error.code, 'ERR_UPSTREAM_RESET');
    const revalidated = new Fill('b', 0, 1024, budget);
    revalidated.revalidated();
    assert.equal(revalidated.outcome?.kind, 'notModified');
    assert.equal(revalidated.state, 'done');
    assert.throws(() => revalidated.respond({ head: { status: 200, headers: {}, contentLength: 0 }, shared: true }, undefined), /published twice/);
    const released = new Fill('c', 0, 1024, budget);
    released.addReader();
    released.respond({ head: { status: 200, headers: {}, contentLength: 1 }, shared: false }, undefined);
    assert.equal(released.released, true);
    // A failure after the response changes the state, never the outcome readers switched over.
    released.fail(undefined);
    assert.equal(released.outcome?.kind, 'response');
    assert.equal(released.state, 'failed');
  });
});
