// The pacer's policy: a first slice never waits, later slices share one budget per turn, oldest first.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Pacer, SLICE_BYTES } from '../../src/pacer.ts';

const nextTurn = () => new Promise<void>((r) => setImmediate(r));

describe('pacer', () => {
  it('grants at once while the turn has budget and nobody waits; past it, waiters get slices on later turns, oldest first', async () => {
    const pacer = new Pacer(2 * SLICE_BYTES);
    assert.equal(pacer.take(SLICE_BYTES), undefined);
    assert.equal(pacer.take(SLICE_BYTES), undefined);
    const order: number[] = [];
    const waits = [0, 1, 2, 3, 4].map((i) => pacer.take(SLICE_BYTES)!.then(() => order.push(i)));
    assert.equal(pacer.waiting, 5);
    await nextTurn();
    await Promise.resolve();
    assert.deepEqual(order, [0, 1], 'one turn grants its budget, a slice each, oldest first');
    // A newcomer with budget left queues behind those already waiting.
    const late = pacer.take(SLICE_BYTES);
    assert.ok(late, 'a newcomer waits behind the queue');
    await Promise.all([...waits, late]);
    assert.deepEqual(order, [0, 1, 2, 3, 4]);
    assert.equal(pacer.waiting, 0);
  });

  it('a first slice is charged but never waits, and delays the bulk after it', async () => {
    const pacer = new Pacer(2 * SLICE_BYTES);
    pacer.charge(2 * SLICE_BYTES);
    const w = pacer.take(SLICE_BYTES);
    assert.ok(w, 'the turn is spent by first slices: bulk waits');
    await w;
    assert.equal(pacer.waiting, 0);
  });

  it('charges each waiter what it asked: smaller slices (a disk read of 64 KiB) are granted more per turn', async () => {
    const pacer = new Pacer(2 * SLICE_BYTES);
    pacer.charge(2 * SLICE_BYTES);
    const granted: number[] = [];
    const waits = [0, 1, 2, 3, 4].map((i) => pacer.take(SLICE_BYTES / 2)!.then(() => granted.push(i)));
    await nextTurn();
    await Promise.resolve();
    assert.deepEqual(granted, [0, 1, 2, 3], 'four half slices fill one turn of two slices');
    await Promise.all(waits);
    assert.deepEqual(granted, [0, 1, 2, 3, 4]);
  });
});
