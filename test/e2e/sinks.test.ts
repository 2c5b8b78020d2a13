// Every external sink fails safe: a full access-log disk, a pid file that can't be removed, a cache disk
// that fills up under a fill's spill file. The proxy keeps serving, counts what it drops, picks up again
// when space returns, and stops on SIGTERM. Full disks are real: /dev/full, and (as root) a small tmpfs.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, memoryLogger, assertNoInternalErrors, proxyClient, startChildProxy, startProxy, tmpDir, type ChildProxy } from '../helpers/proxy.ts';
import { ManualClock } from '../../src/clock.ts';
import { buildConfig } from '../../src/config.ts';
import { createProxy } from '../../src/server.ts';

const isRoot = process.getuid?.() === 0;

/** A tmpfs of `size` mounted on a fresh directory (root only); unmounted by the returned function. */
function smallDisk(size: string): { dir: string; unmount: () => void } | undefined {
  if (!isRoot) return undefined;
  const dir = tmpDir('tmpfs-');
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]).status !== 0) return undefined;
  return { dir, unmount: () => void (spawnSync('umount', [dir]).status === 0 || spawnSync('umount', ['-l', dir])) };
}

/** Fill the file system of `dir` to the last byte. */
function fillUp(dir: string): string {
  const filler = join(dir, 'filler');
  try {
    writeFileSync(filler, Buffer.alloc(64 * 2 ** 20));
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  }
  return filler;
}

async function status(adminPort: number): Promise<{ accessLog: { droppedLines: number }; counters: { requests: number } }> {
  return (await (await fetch(`http://127.0.0.1:${adminPort}/status`)).json()) as never;
}

async function metric(adminPort: number, name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ').pop()) : NaN;
}

/** Wait for a state read over the admin listener (each look is a request: no timer between them). */
async function until(what: string, cond: () => Promise<boolean>, limitMs = 15_000): Promise<void> {
  const limit = Date.now() + limitMs;
  while (!(await cond())) if (Date.now() > limit) throw new Error(`timed out waiting for ${what}`);
}

/** SIGTERM, and the exit code; a child still running `limitMs` later is killed and the test fails. */
async function terminate(proxy: ChildProxy, limitMs: number): Promise<number | null> {
  const exited = once(proxy.child, 'exit');
  proxy.child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const wedged = new Promise<'wedged'>((r) => (timer = setTimeout(() => r('wedged'), limitMs)));
  const first = await Promise.race([exited, wedged]);
  clearTimeout(timer);
  if (first === 'wedged') {
    proxy.child.kill('SIGKILL');
    await exited;
    assert.fail(`SIGTERM did not stop cuttle within ${limitMs} ms: ${proxy.stderr().slice(-2000)}`);
  }
  return (first as [number | null])[0];
}

describe('sinks', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin();
    for (let i = 0; i < 40; i++) origin.route(`/o${i}`, { headers: { 'cache-control': 'max-age=60' }, body: `object ${i}` });
  });
  after(() => origin.close());

  it('an access log on a full disk (/dev/full): cuttle keeps serving, counts the dropped lines, and SIGTERM stops it within --shutdown-timeout', { timeout: 60_000 }, async () => {
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--allow-local-dest', '127.0.0.1', '--access-log', '/dev/full', '--shutdown-timeout', '2s']);
    const admin = Number(/"admin":\{[^}]*"port":(\d+)/.exec(proxy.stderr())![1]);
    const pool = proxyClient(proxy.url);
    let failed: unknown;
    try {
      for (let round = 0; round < 2; round++) {
        for (let i = round * 20; i < round * 20 + 20; i++) {
          const res = await get(pool, `${origin.url}/o${i}`);
          assert.equal(res.status, 200);
          assert.equal(res.body.toString(), `object ${i}`);
        }
        // The batch leaves within a second; every write fails, so every line is counted as dropped.
        await until('the lines to be dropped', async () => (await status(admin)).accessLog.droppedLines >= (round + 1) * 20);
        assert.equal((await status(admin)).accessLog.droppedLines, (round + 1) * 20, 'each line that could not be written is counted once');
        assert.equal((await fetch(`http://127.0.0.1:${admin}/healthz`)).status, 200);
      }
      for (let i = 0; i < 40; i++) assert.equal(origin.count(`/o${i}`), 1, 'one upstream fetch each');
      assert.equal(await metric(admin, 'cuttle_access_log_dropped_lines_total'), 40);
      const warnings = proxy.stderr().split('\n').filter((l) => l.includes('access log lines dropped'));
      assert.ok(warnings.length >= 1, 'the loss is reported');
      assert.match(warnings[0]!, /ENOSPC/);
    } catch (err) {
      failed = err;
    } finally {
      await pool.close();
    }
    // Stopped whatever happened above: 2 s of --shutdown-timeout, 1 s for the log, and a few for the
    // process to start and stop. A wedged cuttle never exits at all.
    const code = await terminate(proxy, 15_000);
    if (failed) throw failed;
    assert.equal(code, 0, proxy.stderr().slice(-2000));
    assert.match(proxy.stderr(), /"msg":"stopped"/);
  });

  it('a full log disk drops and counts lines (one warning a minute), and writing picks up again when space returns', { skip: !isRoot && 'needs root to mount a tmpfs' }, async () => {
    const disk = smallDisk('256k');
    if (!disk) return;
    const clock = new ManualClock();
    const { logger, logs } = memoryLogger();
    const file = join(disk.dir, 'access.log');
    const cfg = buildConfig({ listen: ['127.0.0.1:0'], 'cache-dir': join(tmpDir(), 'cache'), 'allow-local-dest': ['127.0.0.1'], 'access-log': file, 'admin-listen': '127.0.0.1:0' });
    const proxy = await createProxy(cfg, { clock, logger });
    await proxy.listen();
    const admin = proxy.adminAddress()!.port;
    const pool = proxyClient(`http://127.0.0.1:${proxy.addresses()[0]!.port}`);
    const warnings = () => logs.filter((l) => String(l.msg).startsWith('access log lines dropped')).length;
    // Five requests, then their lines handed to the file at once (reopenLogs hands over the batch).
    let n = 0;
    const five = async () => {
      for (let i = 0; i < 5; i++) assert.equal((await get(pool, `${origin.url}/o${n++}`)).status, 200);
      proxy.reopenLogs();
    };
    try {
      const filler = fillUp(disk.dir);
      await five();
      await until('5 dropped lines', async () => (await status(admin)).accessLog.droppedLines === 5);
      assert.equal(warnings(), 1);
      await five();
      await until('10 dropped lines', async () => (await status(admin)).accessLog.droppedLines === 10);
      assert.equal(warnings(), 1, 'one warning a minute, not one per batch');
      clock.advance(60_000);
      await five();
      await until('15 dropped lines', async () => (await status(admin)).accessLog.droppedLines === 15);
      assert.equal(warnings(), 2, 'a minute later, the next warning');
      assert.equal(readFileSync(file, 'utf8'), '', 'nothing written while the disk is full');
      // Space returns: the next lines are written, and nothing more is dropped.
      rmSync(filler);
      await five();
      await waitFor('the lines to reach the file', () => readFileSync(file, 'utf8').split('\n').length - 1 === 5);
      assert.equal((await status(admin)).accessLog.droppedLines, 15);
      assert.deepEqual(readFileSync(file, 'utf8').split('\n').slice(0, -1).map((l) => l.split(/ +/)[6]), [15, 16, 17, 18, 19].map((i) => `${origin.url}/o${i}`));
      assert.equal(proxy.upstream.fetches, 20, 'one upstream fetch a request');
    } finally {
      await pool.close();
      await proxy.close(1000);
      disk.unmount();
    }
    assertNoInternalErrors(logs);
  });

  it('a pid file that cannot be removed at stop is reported, and cuttle still exits 0', async () => {
    const pidFile = join(tmpDir(), 'cuttle.pid');
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]);
    // Something else took the name: a directory with a file in it, which rm without recursion refuses.
    rmSync(pidFile);
    mkdirSync(pidFile);
    writeFileSync(join(pidFile, 'keep'), 'x');
    assert.equal(await terminate(proxy, 15_000), 0, proxy.stderr().slice(-2000));
    assert.match(proxy.stderr(), /cannot remove the pid file/);
    assert.match(proxy.stderr(), /"msg":"stopped"/);
  });

  it('a cache disk that fills under a fill: the client gets the whole body, nothing is stored, no temp record stays', { skip: !isRoot && 'needs root to mount a tmpfs' }, async () => {
    const disk = smallDisk('512k');
    if (!disk) return;
    const body = Buffer.alloc(2 * 2 ** 20, 7);
    origin.route('/big', { headers: { 'cache-control': 'max-age=60' }, body });
    const p = await startProxy({ 'cache-dir': join(disk.dir, 'cache'), 'memory-cache': '1MB', 'max-memory-object-size': '64KB' });
    const pool = proxyClient(p.url);
    try {
      for (let i = 1; i <= 2; i++) {
        const res = await get(pool, `${origin.url}/big`);
        assert.equal(res.status, 200);
        assert.ok(res.body.equals(body), 'the whole body, from memory');
        assert.equal(origin.count('/big'), i, 'not stored: the second request goes upstream again');
      }
      await p.proxy.coalescer.settle();
      assert.equal(p.proxy.disk.stats().objects, 0);
      const files = spawnSync('find', [join(disk.dir, 'cache'), '-type', 'f'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
      assert.deepEqual(files.filter((f) => !f.endsWith('cuttle.lock')), [], 'no record, partial or temporary, is left');
      assert.ok(p.logs.some((l) => String(l.msg).startsWith('disk write failed')), 'the failed write is logged');
    } finally {
      await pool.close();
      await p.close();
      disk.unmount();
    }
  });
});
