// Squid's habits that admins' scripts rely on (issue 33 §2): an exclusive --pid-file (logrotate signals
// the pid in it, so a second instance must never take it over), a clear refusal of an unsupported
// Node before any TypeScript is loaded, Squid's paths and cache directory left to Squid, and a systemd
// unit whose user and writable paths are spelled out.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { parse } from 'yaml';
import { UNIT_WRITABLE } from '../../src/import-squid.ts';
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

describe("Squid's paths and the systemd unit (issue 33 §2)", () => {
  const unit = readFileSync('docker/cuttle.service', 'utf8');
  const directive = (name: string) => [...unit.matchAll(new RegExp(`^${name}=(.*)$`, 'gm'))].map((m) => m[1]!);

  it("a cache dir that holds Squid's files is refused at start (one loop and --workers) and by --check-config, and left untouched; cuttle's own starts", async () => {
    const squid = tmpDir();
    for (const d of ['00', '01', '0F']) mkdirSync(join(squid, d));
    writeFileSync(join(squid, 'swap.state'), '');
    const before = readdirSync(squid).sort();
    for (const workers of ['1', '2']) {
      const why = await refused(['--workers', workers, '--listen', '127.0.0.1:0', '--cache-dir', squid]);
      assert.match(why, /^proxy exited 1:/);
      assert.ok(why.includes(`cache-dir ${squid} is not usable: it holds files that are not cuttle's (00, 01, 0F, swap.state); it looks like Squid's cache directory`), why);
    }
    assert.deepEqual(readdirSync(squid).sort(), before, 'nothing of cuttle was written into it');
    const check = spawnSync(process.execPath, ['src/main.ts', '--listen', '127.0.0.1:0', '--admin-listen', 'none', '--cache-dir', squid, '--check-config'], { encoding: 'utf8' });
    assert.equal(check.status, 1);
    assert.match(check.stderr, /cache-dir: .* can't be used: it holds files that are not cuttle's/);
    // cuttle's own directory, with what may sit beside v1/ (the unit's compile cache, a mount's lost+found), starts again.
    const own = join(tmpDir(), 'c');
    const first = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', own]);
    assert.equal(await first.stop(), 0);
    for (const d of ['.node-compile-cache', 'lost+found']) mkdirSync(join(own, d));
    const again = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', own]);
    assert.equal(await again.stop(), 0);
  });

  it("import-squid maps Squid's paths to cuttle's own, inside the unit's ReadWritePaths, and says what to add for one outside", () => {
    assert.deepEqual(UNIT_WRITABLE, [...directive('ReadWritePaths')[0]!.split(' '), `/run/${directive('RuntimeDirectory')[0]}`]);
    assert.equal(directive('CacheDirectory')[0], 'cuttle');
    assert.equal(directive('LogsDirectory')[0], 'cuttle');
    const run = (fixture: string) => spawnSync(process.execPath, [LAUNCHER, 'import-squid', `test/fixtures/${fixture}`], { encoding: 'utf8' });
    const frontier = run('frontier-squid-default.conf');
    assert.equal(frontier.status, 0, frontier.stderr);
    const yaml = parse(frontier.stdout) as Record<string, string>;
    assert.equal(yaml['cache-dir'], '/var/cache/cuttle');
    assert.equal(yaml['access-log'], '/var/log/cuttle/access.log');
    assert.equal(yaml['pid-file'], '/run/cuttle/cuttle.pid', "the unit's, which logrotate signals");
    assert.match(frontier.stdout, /# Squid's paths, changed to cuttle's own \(3\):\n#   line \d+: cache_dir ufs \/var\/cache\/squid 10000 16 256\n#     cache-dir: \/var\/cache\/cuttle, not Squid's \/var\/cache\/squid;/);
    assert.doesNotMatch(frontier.stdout, /ReadWritePaths/, 'every path is one the unit may write');
    for (const key of ['cache-dir', 'access-log', 'pid-file']) assert.doesNotMatch(yaml[key]!, /squid/, `${key}: no Squid path is kept`);
    // A site whose cache is on a disk of its own (/srv/squid): cuttle's directory beside it, and the line to add to the unit.
    const site = run('site-customized.conf');
    assert.equal((parse(site.stdout) as Record<string, string>)['cache-dir'], '/srv/cuttle');
    assert.match(site.stdout, /cache-dir: \/srv\/cuttle, not Squid's \/srv\/squid;.*add \/srv\/cuttle to ReadWritePaths \(systemctl edit cuttle\)/);
  });

  it('the unit checks its configuration in its sandbox before the start: a path outside ReadWritePaths (read-only there) fails, naming the key', (t) => {
    const start = directive('ExecStart')[0]!.split(' ');
    const check = directive('ExecStartPre').map((l) => l.split(' ')).find((a) => a.includes('--check-config'));
    assert.ok(check, 'an ExecStartPre runs --check-config');
    assert.deepEqual(check, [start[0], ...start.slice(start.findIndex((a) => a.endsWith('/src/cuttle.js'))), '--check-config'], "ExecStart's arguments");
    // ProtectSystem=strict, as far as a mount namespace can show it: the access log's directory is read-only.
    const dir = tmpDir();
    mkdirSync(join(dir, 'ro'));
    const argv = [process.execPath, 'src/cuttle.js', '--listen', '127.0.0.1:0', '--admin-listen', 'none', '--cache-dir', join(dir, 'c'), '--access-log', join(dir, 'ro', 'access.log'), '--check-config'];
    const r = spawnSync('unshare', ['--mount', 'sh', '-c', `mount --bind -o ro "$1" "$1" && shift && exec "$@"`, 'sh', join(dir, 'ro'), ...argv], { encoding: 'utf8' });
    if (r.error || /unshare failed|Operation not permitted/.test(r.stderr)) {
      if (process.env.CI === 'true') throw new Error(`unshare --mount: ${r.stderr || r.error?.message}`);
      return t.skip('no mount namespace for this user');
    }
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`access-log: ${join(dir, 'ro', 'access.log')} can't be written`));
  });

  it('the unit says how its user is made: docker/cuttle.sysusers, applied by the real systemd-sysusers, gives the User and Group it runs as', (t) => {
    assert.equal(directive('User')[0], 'cuttle');
    assert.equal(directive('Group')[0], 'cuttle');
    assert.match(unit, /cp docker\/cuttle\.sysusers \/usr\/lib\/sysusers\.d\/cuttle\.conf && systemd-sysusers/);
    // Installed as the unit's comment says, into an empty root.
    const root = tmpDir();
    mkdirSync(join(root, 'etc'));
    mkdirSync(join(root, 'usr/lib/sysusers.d'), { recursive: true });
    cpSync('docker/cuttle.sysusers', join(root, 'usr/lib/sysusers.d/cuttle.conf'));
    const r = spawnSync('systemd-sysusers', [`--root=${root}`], { encoding: 'utf8' });
    if (r.error) {
      if (process.env.CI === 'true') throw r.error;
      return t.skip('systemd-sysusers is not installed');
    }
    assert.equal(r.status, 0, r.stderr);
    const user = readFileSync(join(root, 'etc/passwd'), 'utf8').split('\n').find((l) => l.startsWith('cuttle:'))?.split(':');
    assert.ok(user, 'the cuttle user exists');
    assert.equal(user[5], '/var/cache/cuttle');
    assert.match(user[6]!, /nologin$/);
    assert.ok(Number(user[2]) < 1000, 'a system user');
    const group = readFileSync(join(root, 'etc/group'), 'utf8').split('\n').find((l) => l.startsWith('cuttle:'))?.split(':');
    assert.equal(group?.[2], user[3], 'its own group');
  });
});
