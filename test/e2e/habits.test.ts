// Squid's habits that admins' scripts rely on (issue 33 §2): an exclusive --pid-file (logrotate signals
// the pid in it, so a second instance must never take it over), and a clear refusal of an unsupported
// Node before any TypeScript is loaded.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { waitFor } from '../helpers/mirrors.ts';
import { startOrigin, type Origin } from '../helpers/origin.ts';
import { get, proxyClient, startChildProxy, tmpDir } from '../helpers/proxy.ts';

const LAUNCHER = 'src/cuttle.js'; // package.json "bin"

/** Start a cuttle that must refuse to start: its stderr. One that starts anyway is stopped, and fails the test. */
async function refused(args: string[]): Promise<string> {
  const started = await startChildProxy(args).then(
    (p) => p,
    (err: Error) => err,
  );
  if (started instanceof Error) return started.message;
  await started.stop();
  throw new Error('the second cuttle started');
}

describe('--pid-file is exclusive, as Squid keeps it', () => {
  let origin: Origin;
  before(async () => {
    origin = await startOrigin();
    origin.route('/a', { headers: { 'cache-control': 'max-age=60' }, body: 'a' });
  });
  after(() => origin.close());

  it('a second cuttle on a live pid file is refused, naming the pid and the file; the first keeps it, its signals and its traffic', async () => {
    const pidFile = join(tmpDir(), 'cuttle.pid');
    const first = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--allow-local-dest', '127.0.0.1', '--pid-file', pidFile]);
    try {
      assert.equal(readFileSync(pidFile, 'utf8'), `${first.child.pid}\n`);
      // Another cache dir and port: only the pid file is shared.
      const why = await refused(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]);
      assert.match(why, /^proxy exited 1:/);
      assert.ok(why.includes(`pid-file ${pidFile} names pid ${first.child.pid}, which is running`), why);
      assert.equal(readFileSync(pidFile, 'utf8'), `${first.child.pid}\n`, 'the first still holds the file');
      // logrotate's signal, sent to the pid in the file, reaches the running cuttle.
      process.kill(Number(readFileSync(pidFile, 'utf8')), 'SIGUSR1');
      await waitFor('the first reopened its log', () => first.stderr().includes('access log reopened'));
      const pool = proxyClient(first.url);
      try {
        assert.equal((await get(pool, `${origin.url}/a`)).status, 200);
      } finally {
        await pool.close();
      }
      assert.equal(origin.count('/a'), 1, 'the first serves, one upstream fetch');
    } finally {
      assert.equal(await first.stop(), 0);
    }
    assert.equal(existsSync(pidFile), false, 'removed when its owner stops');
  });

  it('with --workers too; and at stop the file is removed only while it holds our pid', async () => {
    const pidFile = join(tmpDir(), 'cuttle.pid');
    const first = await startChildProxy(['--workers', '2', '--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]);
    try {
      assert.match(await refused(['--workers', '2', '--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]), new RegExp(`names pid ${first.child.pid}, which is running`));
      assert.equal(readFileSync(pidFile, 'utf8'), `${first.child.pid}\n`);
      // Someone else's pid by now (an admin's hand, another program): not ours to delete.
      writeFileSync(pidFile, `${process.pid}\n`);
    } finally {
      assert.equal(await first.stop(), 0);
    }
    assert.equal(readFileSync(pidFile, 'utf8'), `${process.pid}\n`);
    assert.match(first.stderr(), /the pid file names another process now; left in place/);
  });

  it('a stale pid file (its process is gone) is taken over, with a note in the log', async () => {
    const pidFile = join(tmpDir(), 'cuttle.pid');
    const gone = spawnSync(process.execPath, ['-e', '']);
    assert.equal(gone.status, 0);
    writeFileSync(pidFile, `${gone.pid}\n`);
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--pid-file', pidFile]);
    try {
      assert.equal(readFileSync(pidFile, 'utf8'), `${proxy.child.pid}\n`);
      assert.match(proxy.stderr(), new RegExp(`"stalePid":"${gone.pid}".*took over a stale pid file`));
    } finally {
      assert.equal(await proxy.stop(), 0);
    }
    assert.equal(existsSync(pidFile), false);
  });
});

/** A Node older than 24 on this machine (the system's, outside node_modules), or undefined after skipping (outside CI). */
function oldNode(t: TestContext): string | undefined {
  const which = spawnSync('which', ['-a', 'node'], { encoding: 'utf8' }).stdout.split('\n');
  for (const path of new Set(['/usr/bin/node', '/usr/local/bin/node', ...which].filter((p) => p && existsSync(p)).map((p) => realpathSync(p)))) {
    if (path.includes('node_modules')) continue;
    const v = spawnSync(path, ['--version'], { encoding: 'utf8' }).stdout.trim();
    if (Number(/^v(\d+)\./.exec(v)?.[1]) < 24) return path;
  }
  const why = 'no Node older than 24 outside node_modules (the machine Node of CI is 20)';
  if (process.env.CI === 'true') throw new Error(why);
  t.skip(why);
  return undefined;
}

describe('the cuttle command and the Node it runs on', () => {
  it('an unsupported Node says "cuttle needs Node ≥ 24" and exits non-zero, before loading any TypeScript', (t) => {
    const node = oldNode(t);
    if (!node) return;
    const version = spawnSync(node, ['--version'], { encoding: 'utf8' }).stdout.trim();
    for (const args of [['--version'], ['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c')]]) {
      const r: SpawnSyncReturns<string> = spawnSync(node, [LAUNCHER, ...args], { encoding: 'utf8' });
      assert.equal(r.status, 1);
      assert.equal(r.stderr, `cuttle needs Node ≥ 24 (this is ${version})\n`);
      assert.equal(r.stdout, '');
    }
  });

  it('Node 24 runs the proxy through the same command', () => {
    const r = spawnSync(process.execPath, [LAUNCHER, '--version'], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^cuttle \d+\.\d+\.\d+\n$/);
    const bad = spawnSync(process.execPath, [LAUNCHER, '--no-such-option'], { encoding: 'utf8' });
    assert.equal(bad.status, 2, 'main.ts runs and owns the exit code');
  });
});
