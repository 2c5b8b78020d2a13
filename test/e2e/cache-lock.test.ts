// The cache directory's lock after a kill -9 of a cuttle that comes back under the same pid, as a
// container's cuttle does (pid 1 of its pid namespace in every life of the container).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { describe, it } from 'node:test';
import { lockPath } from '../../src/store-disk.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, startProxy, tmpDir, withProxy, type TestProxy } from '../helpers/proxy.ts';

describe('the cache lock and a pid that comes back', () => {
  it('a cuttle that is pid 1 of its namespace, killed with -9, starts again on its cache (its lock names pid 1: itself, not another cuttle)', async (t) => {
    const dir = tmpDir();
    const cacheDir = join(dir, 'c');
    writeFileSync(join(dir, 'cuttle.yaml'), `listen: [127.0.0.1:0]\nadmin-listen: none\naccess-log: none\nworkers: 1\ncache-dir: ${cacheDir}\n`);
    const life = async (kill: boolean): Promise<{ code: number | null; err: string }> => {
      const ns = spawn('unshare', ['--pid', '--fork', '--kill-child', '--mount-proc', process.execPath, 'src/main.ts', '--config', join(dir, 'cuttle.yaml')], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      ns.stderr!.on('data', (c) => (err += c));
      const exited = once(ns, 'exit');
      try {
        await waitFor('cuttle listening or gone', () => /"msg":"cuttle listening"/.test(err) || ns.exitCode !== null);
        if (ns.exitCode === null) {
          const pid1 = Number(readFileSync(`/proc/${ns.pid}/task/${ns.pid}/children`, 'utf8').trim());
          process.kill(pid1, kill ? 'SIGKILL' : 'SIGTERM');
        }
        await exited;
        return { code: ns.exitCode, err };
      } finally {
        if (ns.exitCode === null && ns.signalCode === null) {
          ns.kill('SIGKILL');
          await exited;
        }
      }
    };
    const first = await life(true);
    if (!/"msg":"cuttle listening"/.test(first.err)) {
      if (process.env.CI === 'true') throw new Error(`unshare --pid: ${first.err}`);
      return t.skip('no pid namespace for this user');
    }
    assert.equal(readFileSync(lockPath(cacheDir), 'utf8').split('\n')[0], '1', 'the killed cuttle left its lock, naming pid 1');
    const second = await life(false);
    assert.match(second.err, /"msg":"cuttle listening"/, `the second life started: ${second.err.slice(-400)}`);
    assert.equal(second.code, 0);
  });

  it("a lock left under this process's own pid is taken over; one this process holds still refuses a second proxy", async () => {
    const cacheDir = join(tmpDir(), 'c');
    mkdirSync(join(cacheDir, 'v1'), { recursive: true });
    writeFileSync(lockPath(cacheDir), `${process.pid}\n`); // an earlier life of this pid, killed
    await withProxy({ 'cache-dir': cacheDir }, async ({ origin, pool }) => {
      origin.route('/x', { headers: { 'cache-control': 'max-age=600' }, body: 'stored' });
      assert.equal((await get(pool, `${origin.url}/x`)).status, 200);
      await assert.rejects(startProxy({ 'cache-dir': cacheDir }), /in use by another cuttle/, 'the lock this process holds is still a lock');
      assert.equal(origin.count('/x'), 1);
    });
  });

  it('a lock written in an earlier boot is stale, although its pid is alive now (another daemon after a power loss); one of this boot is not', async () => {
    const bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    const cacheDir = join(tmpDir(), 'c');
    mkdirSync(join(cacheDir, 'v1'), { recursive: true });
    // pid 1 is alive on any host: a lock of this boot naming it is held, as far as cuttle can tell.
    writeFileSync(lockPath(cacheDir), `1\n${bootId}\n`);
    const held = await startProxy({ 'cache-dir': cacheDir }).catch((err: unknown) => err);
    if (!(held instanceof Error)) {
      await (held as TestProxy).close();
      assert.fail('a lock of this boot naming a live pid is taken over');
    }
    assert.match(held.message, /in use by another cuttle \(pid 1,/);
    writeFileSync(lockPath(cacheDir), `1\n${bootId.replace(/^./, (c) => (c === '0' ? '1' : '0'))}\n`);
    await withProxy({ 'cache-dir': cacheDir }, async ({ origin, pool }) => {
      origin.route('/x', { headers: { 'cache-control': 'max-age=600' }, body: 'stored' });
      assert.equal((await get(pool, `${origin.url}/x`)).status, 200);
      assert.equal(origin.count('/x'), 1);
      assert.equal(readFileSync(lockPath(cacheDir), 'utf8'), `${process.pid}\n${bootId}\n`, 'the lock names this process and this boot');
    });
  });
});
