// --fill-memory is a hard bound: once it is spent, a fill whose bytes are not on disk yet (its spill
// file lags) pauses its upstream when its window reaches twice --fill-window, instead of holding up to
// 32 MiB of unflushed bytes beyond the budget. The spill here is a file whose flushing the test drives,
// so the lag is a state the test sets, not a race with a disk.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Fill, type SpillFile } from '../../src/fill.ts';

/** A spill file that has flushed exactly what the test says. */
class HeldSpill implements SpillFile {
  flushed = 0;
  failed = undefined;
  onFlush: (() => void) | undefined;
  #appended = 0;
  append(chunk: Buffer): void {
    this.#appended += chunk.length;
  }
  retain(): void {}
  release(): void {}
  readAt(): Promise<Buffer> {
    return Promise.resolve(Buffer.alloc(0));
  }
  /** Everything appended so far is on disk now. */
  flushAll(): void {
    this.flushed = this.#appended;
    this.onFlush?.();
  }
}

describe('Fill: --fill-memory as a hard bound', () => {
  it('a fill whose disk lags pauses its upstream once the budget is spent, and resumes when the disk catches up', () => {
    const KiB = 1024;
    const budget = { limitBytes: 1024 * KiB, usedBytes: 0 };
    const window = 256 * KiB;
    const fill = new Fill('k', 0, window, budget);
    const spill = new HeldSpill();
    let paused = false;
    fill.upstream = { pause: () => void (paused = true), resume: () => void (paused = false), abort() {} };
    fill.addReader();
    fill.respond({ head: { status: 200, headers: {}, contentLength: undefined }, shared: true }, spill, true);
    const chunk = Buffer.alloc(64 * KiB);
    let pushed = 0;
    // The upstream sends while it is not paused (up to 40 MiB, past the old 32 MiB disk-lag mark).
    while (!paused && pushed < 40 * 1024 * KiB) {
      fill.push(chunk);
      pushed += chunk.length;
    }
    assert.ok(paused, 'the upstream was paused');
    assert.ok(budget.usedBytes <= budget.limitBytes + chunk.length, `fill memory ${budget.usedBytes} within --fill-memory (${budget.limitBytes}) and one chunk`);
    fill.push(chunk); // a chunk already in flight when the pause came: taken, still bounded
    spill.flushAll();
    assert.equal(paused, false, 'resumed once its bytes are on disk');
    assert.ok(budget.usedBytes <= budget.limitBytes, 'the window trimmed back within the budget');
    fill.fail(undefined);
  });
});
