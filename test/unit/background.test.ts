// The background gate's policy (background.ts), with time and the loop's utilisation passed in.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BackgroundGate, isBackground } from '../../src/background.ts';

describe('isBackground', () => {
  it('is RFC 9218 urgency 7, the last u winning, whatever else the header says', () => {
    assert.equal(isBackground({ priority: 'u=7' }), true);
    assert.equal(isBackground({ priority: 'i, u=7' }), true);
    assert.equal(isBackground({ priority: 'u=7;x=1' }), true);
    assert.equal(isBackground({ priority: ' u = 7 ' }), true);
    assert.equal(isBackground({ priority: 'u=3, u=7' }), true);
    assert.equal(isBackground({ priority: 'u=7, u=3' }), false);
    assert.equal(isBackground({ priority: 'u=1' }), false);
    assert.equal(isBackground({ priority: 'u=77' }), false);
    assert.equal(isBackground({ priority: 'i' }), false);
    assert.equal(isBackground({}), false);
    assert.equal(isBackground(undefined), false);
  });
});

describe('BackgroundGate', () => {
  it('lets background fills go while the loop has room or serves nobody else, and holds them while clients keep it busy', () => {
    const g = new BackgroundGate(0.5, 1000);
    assert.equal(g.admit(0), 'go', 'before any tick: not busy');
    g.tick(100, 0.9, 0);
    assert.equal(g.busy, false, 'a loop busy with background work alone is not busy');
    g.tick(200, 0.4, 50);
    assert.equal(g.busy, false, 'clients served, but the loop has room');
    g.tick(300, 0.9, 50);
    assert.equal(g.busy, true);
    assert.ok(g.admit(300) instanceof Promise);
    assert.equal(g.waiting, 1);
    assert.equal(g.held, 1);
  });

  it('the first tick with room lets every waiter go', async () => {
    const g = new BackgroundGate(0.5, 1000);
    g.tick(0, 1, 10);
    const a = g.admit(0);
    const b = g.admit(50);
    g.tick(100, 1, 10);
    assert.equal(g.waiting, 2, 'still busy: both wait');
    g.tick(200, 0.1, 10);
    assert.deepEqual(await Promise.all([a, b]), ['go', 'go']);
    assert.equal(g.waiting, 0);
  });

  it('refuses a waiter after the wait bound, oldest first, and at once when the queue is full or the wait is 0', async () => {
    const g = new BackgroundGate(0.5, 1000, 2);
    g.tick(0, 1, 10);
    const a = g.admit(0);
    const b = g.admit(600);
    assert.equal(g.admit(700), 'refused', 'the queue holds 2');
    g.tick(1000, 1, 10);
    assert.equal(await a, 'refused');
    assert.equal(g.waiting, 1);
    g.tick(1600, 1, 10);
    assert.equal(await b, 'refused');
    const none = new BackgroundGate(0.5, 0);
    none.tick(0, 1, 10);
    assert.equal(none.admit(0), 'refused');
  });

  it('at load 1 it never holds; stop() refuses whoever waits, and every background fill after it', async () => {
    const never = new BackgroundGate(1, 1000);
    never.tick(0, 1, 1000);
    assert.equal(never.admit(0), 'go');
    const g = new BackgroundGate(0.5, 1000);
    g.tick(0, 1, 10);
    const a = g.admit(0);
    g.stop();
    assert.equal(await a, 'refused');
    g.tick(100, 0, 0);
    assert.equal(g.admit(100), 'refused', 'the proxy is stopping');
  });

  it('a tick with room lets 8 go, the rest the next; a newcomer queues behind them; a waiter whose client left is gone at once', async () => {
    const g = new BackgroundGate(0.5, 10_000);
    g.tick(0, 1, 10);
    const waiting = Array.from({ length: 10 }, () => g.admit(0) as Promise<string>);
    const answers: string[] = [];
    for (const w of waiting) void w.then((a) => answers.push(a));
    g.tick(25, 0, 0);
    await Promise.resolve();
    await Promise.resolve();
    assert.equal(answers.length, 8);
    assert.equal(g.waiting, 2);
    const late = g.admit(30);
    assert.ok(late instanceof Promise, 'not busy, but others wait: it queues behind them');
    const left = new AbortController();
    g.tick(40, 1, 10);
    const gone = g.admit(40, left.signal);
    assert.equal(g.waiting, 4);
    left.abort();
    assert.equal(await gone, 'gone');
    assert.equal(g.waiting, 3);
    g.tick(50, 0, 0);
    assert.deepEqual(await Promise.all([...waiting.slice(8), late]), ['go', 'go', 'go']);
  });
});
