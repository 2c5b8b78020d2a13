// There is no Docker engine here, so check what can be checked: the image's and the compose file's
// commands are valid cuttle command lines, and the HEALTHCHECK command works against a real proxy.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { compileAcl } from '../../src/acl.ts';
import { buildConfig, DEFAULTS } from '../../src/config.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { startChildProxy, tmpDir } from '../helpers/proxy.ts';
import { SHIPPED_ENV } from '../../bench/targets.ts';

/** Alive and not a zombie (a re-parented child may wait unreaped under a container's init). */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * The pid of the cuttle (node src/main.ts) that `pid` runs, itself or a descendant. Descendants first:
 * a launcher whose own arguments name src/main.ts (`sh -c '...' sh src/main.ts`) is not the proxy.
 */
function cuttleUnder(pid: number): number | undefined {
  try {
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(' ').filter(Boolean).map(Number);
    for (const k of kids) {
      const found = cuttleUnder(k);
      if (found) return found;
    }
    if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').some((a) => a === 'src/main.ts' || a === 'src/cuttle.js')) return pid;
  } catch {
    // gone meanwhile
  }
  return undefined;
}

/** Run `fn` with `cmd` started and its cuttle listening; the cuttle is killed if `fn` fails. */
async function launched(cmd: string, args: string[], env: NodeJS.ProcessEnv, fn: (launcher: ChildProcess, cuttle: number) => Promise<void>) {
  const child = spawn(cmd, args, { env: { ...process.env, PATH: `${dirname(process.execPath)}:${process.env.PATH}`, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (c) => (out += c));
  child.stderr!.on('data', (c) => (out += c));
  let pid: number | undefined;
  try {
    await waitFor('cuttle listening', () => /"msg":"cuttle listening"/.test(out) || child.exitCode !== null);
    pid = cuttleUnder(child.pid!);
    assert.ok(pid && pid !== child.pid, out);
    await fn(child, pid);
  } finally {
    // Found before a failed assertion or not: a cuttle left running would hold the test file open.
    pid ??= child.pid && cuttleUnder(child.pid);
    if (pid && running(pid)) process.kill(pid, 'SIGKILL');
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
  }
}

const ARGS = ['--listen', '127.0.0.1:0', '--admin-listen', 'none', '--access-log', 'none'];

/** glibc's pinned mmap threshold, as every launcher sets it (README "The C allocator's slack"). */
const PINNED = `GLIBC_TUNABLES=${SHIPPED_ENV.GLIBC_TUNABLES}`;
const runsPinned = (pid: number) => readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(PINNED);

const dockerfile = readFileSync('docker/Dockerfile', 'utf8');
const jsonArg = (directive: string) => JSON.parse(new RegExp(`^${directive} (\\[.*\\])$`, 'm').exec(dockerfile)![1]!) as string[];

function checkConfig(args: string[]) {
  // The image runs `node src/main.ts ...`; paths inside the image don't exist here, so point them at a temp dir.
  const fixed = args.map((a) => (a === '/var/cache/cuttle' ? join(tmpDir(), 'cache') : a));
  return spawnSync(process.execPath, ['src/main.ts', ...fixed, '--check-config'], { encoding: 'utf8' });
}

/** A minimal config file standing in for one mounted into the image. */
function writeConfig(): string {
  const file = join(tmpDir(), 'cuttle.yaml');
  writeFileSync(file, 'allow-client: [10.0.0.0/8]\n');
  return file;
}

/** `--key value` pairs as the raw options object buildConfig takes (repeated keys become lists). */
function cliOptions(args: string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (let i = 0; i < args.length; i += 2) {
    const k = args[i]!.slice(2);
    const v = args[i + 1];
    out[k] = k in out ? [out[k], v].flat() : (DEFAULTS as Record<string, unknown>)[k] instanceof Array ? [v] : v;
  }
  return out;
}

describe('packaging', () => {
  it('the Dockerfile: its own docker run examples are valid, and the cache is the volume whatever the arguments', () => {
    const entry = jsonArg('ENTRYPOINT');
    assert.deepEqual(entry, ['node', '--max-semi-space-size=8', 'src/main.ts']);
    assert.doesNotMatch(dockerfile, /^CMD /m, 'arguments after the image name must not replace a part of the command line that matters');
    // `docker run ... cuttle ARGS`: the ARGS alone must make a working proxy.
    const examples = [...dockerfile.matchAll(/^#\s+docker run .* cuttle (--.*)$/gm)].map((m) => m[1]!.split(/\s+/));
    assert.ok(examples.length >= 2);
    for (const args of examples) {
      const r = checkConfig(args.map((a) => (a.startsWith('/etc/') ? writeConfig() : a)));
      assert.equal(r.status, 0, `${args.join(' ')}: ${r.stderr}`);
    }
    // The default cache dir (./var/cache under WORKDIR /app) is a link to the volume, writable by the image's user.
    assert.equal(DEFAULTS['cache-dir'], './var/cache');
    assert.match(dockerfile, /^WORKDIR \/app$/m);
    assert.match(dockerfile, /ln -s \/var\/cache\/cuttle \/app\/var\/cache/);
    assert.match(dockerfile, /chown -R node:node \/var\/cache\/cuttle/);
    assert.match(dockerfile, /^USER node$/m);
    assert.match(dockerfile, /^VOLUME \["\/var\/cache\/cuttle", "\/var\/log\/cuttle"\]$/m);
    // Only ports that lead somewhere with the image's defaults (the admin listener is on its loopback).
    assert.deepEqual(/^EXPOSE (.*)$/m.exec(dockerfile)![1]!.split(' '), ['3128']);
    assert.equal(DEFAULTS['admin-listen'], '127.0.0.1:3129');
  });

  it('compose: valid commands, no open proxy, ports published on loopback, Prometheus allowed to scrape', () => {
    const compose = parse(readFileSync('docker/compose.yaml', 'utf8')) as { services: Record<string, { command?: string[]; entrypoint?: string[]; ports?: string[] }> };
    const prom = parse(readFileSync('docker/prometheus.yml', 'utf8')) as { scrape_configs: { static_configs: { targets: string[] }[] }[] };
    const targets = prom.scrape_configs.flatMap((c) => c.static_configs.flatMap((s) => s.targets));
    for (const name of ['cuttle-a', 'cuttle-b']) {
      const svc = compose.services[name]!;
      const r = checkConfig(svc.command!);
      assert.equal(r.status, 0, `${name}: ${r.stderr}`);
      const cfg = buildConfig(cliOptions(svc.command!));
      const acl = compileAcl(cfg);
      for (const outsider of ['8.8.8.8', '2001:4860::8888']) assert.equal(acl.allowsClient(outsider), false, `${name}: an open proxy to ${outsider}`);
      assert.ok(cfg.adminListen !== 'none' && targets.includes(`${name}:${cfg.adminListen.port}`), `${name}: Prometheus scrapes its admin port`);
      assert.ok(acl.allowsAdmin('172.18.0.5'), `${name}: the compose network may scrape`);
      for (const p of svc.ports ?? []) assert.match(p, /^127\.0\.0\.1:/, `${name}: ${p} must be published on loopback only`);
    }
    for (const name of ['stratum1a', 'stratum1b']) assert.deepEqual(compose.services[name]!.entrypoint, ['node', 'bench/emulator.ts']);
  });

  it('production install: npm ci --omit=dev, then start (no dev dependency, no build step)', async () => {
    const dir = tmpDir('cuttle-prod-');
    for (const f of ['package.json', 'package-lock.json']) cpSync(f, join(dir, f));
    cpSync('src', join(dir, 'src'), { recursive: true });
    const env = { ...process.env, PATH: `${dirname(process.execPath)}:${process.env.PATH}` };
    const npm = spawnSync('npm', ['ci', '--omit=dev', '--prefer-offline', '--no-audit', '--no-fund'], { cwd: dir, env, encoding: 'utf8' });
    assert.equal(npm.status, 0, npm.stderr);
    assert.equal(existsSync(join(dir, 'node_modules/typescript')), false);
    assert.equal(existsSync(join(dir, 'node_modules/node')), false, 'the dev-only Node is not installed');
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(dir, 'cache')], dir);
    assert.equal((await fetch(`http://127.0.0.1:${/"admin":\{[^}]*"port":(\d+)/.exec(proxy.stderr())![1]}/healthz`)).status, 200);
    assert.equal(await proxy.stop(), 0);
    // The systemd unit runs the system's Node on that install, never the dev-only one.
    const unit = readFileSync('docker/cuttle.service', 'utf8');
    const exec = /^ExecStart=(.*)$/m.exec(unit)![1]!.split(' ');
    assert.equal(exec[0], '/usr/bin/node');
    // Node's compile cache is warmed before the start (the proxy never loads the type stripper): the
    // same Node and sources, and the warming run fills the cache.
    const cacheDir = /^Environment=NODE_COMPILE_CACHE=(\S+)$/m.exec(unit)?.[1];
    assert.ok(cacheDir, 'the unit sets NODE_COMPILE_CACHE');
    const warm = /^ExecStartPre=(.*)$/m.exec(unit)![1]!.split(' ');
    // The unit runs the launcher, so a /usr/bin/node older than 24 says so instead of failing to load .ts.
    assert.deepEqual(warm, [exec[0], exec.find((a) => a.endsWith('/src/cuttle.js')), '--version']);
    const cache = join(dir, 'compile-cache');
    const warmed = spawnSync(process.execPath, ['src/cuttle.js', '--version'], { cwd: dir, env: { ...env, NODE_COMPILE_CACHE: cache }, encoding: 'utf8' });
    assert.equal(warmed.status, 0, warmed.stderr);
    assert.ok(readdirSync(cache, { recursive: true }).length > 0, 'the warming run filled the compile cache');
    assert.match(dockerfile, /^ENV NODE_COMPILE_CACHE=\S+\nRUN node src\/main.ts --version$/m);
    assert.doesNotMatch(unit, /node_modules/);
    assert.match(unit, /npm ci --omit=dev/);
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: Record<string, string>; bin: Record<string, string> };
    assert.equal(pkg.scripts.prepare, undefined, 'no install-time build (it needs dev dependencies)');
    assert.equal(pkg.bin.cuttle, 'src/cuttle.js');
  });

  it("the HEALTHCHECK follows the configured admin listener: run as in a container (cuttle is pid 1), healthy on the configured port, unhealthy when it refuses loopback", async (t) => {
    const cmd = JSON.parse(/HEALTHCHECK[^\n]*\n\s*CMD (\[.*\])/.exec(dockerfile)![1]!) as string[];
    assert.deepEqual(cmd, ['node', 'src/cuttle.js', 'health']);
    assert.doesNotMatch(dockerfile, /127\.0\.0\.1:3129/, 'no admin address is assumed');
    // A port of our choosing (not 3129, not 0): the container's command line names it, in a mounted config file.
    const free = createServer().listen(0, '127.0.0.1');
    await once(free, 'listening');
    const adminPort = (free.address() as AddressInfo).port;
    await new Promise((r) => free.close(r));
    for (const [admin, healthy] of [[`allow-admin: [127.0.0.1]`, true], [`allow-admin: [10.0.0.0/8]`, false]] as const) {
      const dir = tmpDir();
      writeFileSync(join(dir, 'cuttle.yaml'), `admin-listen: ${adminPort}\n${admin}\nlisten: [127.0.0.1:0]\naccess-log: none\nworkers: 1\ncache-dir: ${join(dir, 'c')}\n`);
      // A pid namespace, as Docker gives the entrypoint: cuttle is pid 1 there, and sees no other cuttle.
      const ns = spawn('unshare', ['--pid', '--fork', '--kill-child', '--mount-proc', process.execPath, 'src/main.ts', '--config', join(dir, 'cuttle.yaml')], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      ns.stderr!.on('data', (c) => (err += c));
      try {
        await waitFor('cuttle listening', () => /"msg":"cuttle listening"/.test(err) || ns.exitCode !== null);
        if (ns.exitCode !== null) {
          if (process.env.CI === 'true') throw new Error(`unshare --pid: ${err}`);
          return t.skip('no pid namespace for this user');
        }
        const pid1 = Number(readFileSync(`/proc/${ns.pid}/task/${ns.pid}/children`, 'utf8').trim());
        const r = spawnSync('nsenter', ['--target', String(pid1), '--pid', '--mount', `--wd=${process.cwd()}`, process.execPath, ...cmd.slice(1)], { encoding: 'utf8' });
        assert.equal(r.status, healthy ? 0 : 1, r.stdout + r.stderr);
        if (healthy) assert.equal(r.stdout, `healthy: http://127.0.0.1:${adminPort}/healthz answered 200\n`);
        else assert.match(r.stderr, /answered 403 \(allow-admin must include 127\.0\.0\.1/);
        process.kill(pid1, 'SIGTERM');
        await once(ns, 'exit');
        assert.equal(ns.exitCode, 0);
      } finally {
        if (ns.exitCode === null && ns.signalCode === null) {
          ns.kill('SIGKILL'); // unshare --fork: its child, pid 1 of the namespace, goes with the namespace
          await once(ns, 'exit');
        }
      }
    }
  });

  it("every launcher pins glibc's mmap threshold, and the proxy really runs with it", async () => {
    // README "The C allocator's slack": one value, in the shebang (the `cuttle` bin), `npm start`, the
    // image, the unit, and the bench (which measures what is shipped).
    const shebang = readFileSync('src/cuttle.js', 'utf8').split('\n')[0]!;
    assert.match(shebang, /^#!\/usr\/bin\/env -S /);
    assert.ok(shebang.split(' ').includes(PINNED), shebang);
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: Record<string, string> };
    assert.ok(pkg.scripts.start!.split(' ').includes(PINNED), String(pkg.scripts.start));
    assert.match(dockerfile, new RegExp(`^ENV [^#]*\\s${PINNED}$`, 'm'));
    assert.match(readFileSync('docker/cuttle.service', 'utf8'), new RegExp(`^Environment=${PINNED}$`, 'm'));
    // The kernel runs a shebang as the interpreter, the rest of the line as one argument, then the file
    // (under a shell that stays, so that the launcher and cuttle are two processes, as with npm).
    const rest = shebang.slice('#!/usr/bin/env '.length);
    const cmd = `/usr/bin/env "$1" src/cuttle.js ${[...ARGS, '--cache-dir', join(tmpDir(), 'c')].join(' ')}; true`;
    await launched('sh', ['-c', cmd, 'sh', rest], {}, async (_sh, pid) => {
      assert.ok(runsPinned(pid));
    });
  });

  it('SIGTERM to `npm start` stops the proxy, not only npm', async () => {
    await launched('npm', ['start', '--', ...ARGS, '--cache-dir', join(tmpDir(), 'c')], {}, async (npm, pid) => {
      assert.ok(runsPinned(pid), 'npm start passes the pinned threshold');
      const exited = once(npm, 'exit');
      npm.kill('SIGTERM');
      await waitFor('cuttle stopped', () => !running(pid));
      await exited;
    });
  });

  it('under npm, a shell between npm and cuttle that dies takes cuttle with it (npx)', async () => {
    // `; true` keeps the shell from exec-ing node, as npm exec's shell does.
    const cmd = `"${process.execPath}" src/main.ts ${[...ARGS, '--cache-dir', join(tmpDir(), 'c')].join(' ')}; true`;
    await launched('sh', ['-c', cmd], { npm_command: 'exec' }, async (sh, pid) => {
      const exited = once(sh, 'exit');
      sh.kill('SIGKILL');
      await exited;
      await waitFor('cuttle stopped', () => !running(pid));
    });
  });
});
