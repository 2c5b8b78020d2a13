// The access log is bounded: a file that falls 16 MiB behind drops lines (and says how many) rather
// than holding them in memory. A synchronous burst of lines is such a file: the first write's callback
// cannot run until the burst ends, so everything after it waits in the buffer.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { newTransaction, openAccessLog } from '../../src/access-log.ts';

describe('access log', () => {
  it('drops lines beyond 16 MiB behind its file, counts them, and writes every line it kept', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'cuttle-log-'));
    try {
      const file = join(dir, 'access.log');
      let dropped = 0;
      const log = openAccessLog(file, 'squid', (n) => (dropped += n));
      const tx = newTransaction({ startedAt: Date.now(), client: '10.1.2.3', method: 'GET', url: `http://s1.example:8000/cvmfs/atlas.cern.ch/data/${'a'.repeat(200)}`, status: 200 });
      const lines = 120_000; // ~30 MB of lines
      for (let i = 0; i < lines; i++) log.write(tx, Date.now());
      await log.flush();
      await log.flush(); // the second waits for what the first started
      const written = readFileSync(file, 'utf8').split('\n').length - 1;
      assert.ok(dropped > 0, 'lines were dropped');
      assert.equal(written + dropped, lines, 'every line is either in the file or counted as dropped');
      assert.ok(statSync(file).size <= 16 * 2 ** 20 + 64 * 1024, `the file holds at most ~16 MiB (${statSync(file).size})`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
