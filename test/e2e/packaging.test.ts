// There is no Docker engine here, so check what can be checked: the image's and the compose file's
// commands are valid cuttle command lines, and the HEALTHCHECK command works against a real proxy.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { once } from 'node:events';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { waitFor } from '../helpers/mirrors.ts';
import { startChildProxy, tmpDir } from '../helpers/proxy.ts';

/** Alive and not a zombie (a re-parented child may wait unreaped under a container's init). */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/** The pid of the cuttle (node src/main.ts) that `pid` runs, itself or a descendant. */
function cuttleUnder(pid: number): number | undefined {
  try {
    if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('src/main.ts')) return pid;
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(' ').filter(Boolean).map(Number);
    for (const k of kids) {
      const found = cuttleUnder(k);
      if (found) return found;
    }
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
    if (pid && running(pid)) process.kill(pid, 'SIGKILL');
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
  }
}

const ARGS = ['--listen', '127.0.0.1:0', '--admin-listen', 'none', '--access-log', 'none'];

const dockerfile = readFileSync('docker/Dockerfile', 'utf8');
const jsonArg = (directive: string) => JSON.parse(new RegExp(`^${directive} (\\[.*\\])$`, 'm').exec(dockerfile)![1]!) as string[];

function checkConfig(args: string[]) {
  // The image runs `node src/main.ts ...`; paths inside the image don't exist here, so point them at a temp dir.
  const fixed = args.map((a) => (a === '/var/cache/cuttle' ? join(tmpDir(), 'cache') : a));
  return spawnSync(process.execPath, ['src/main.ts', ...fixed, '--check-config'], { encoding: 'utf8' });
}

describe('packaging', () => {
  it('the Dockerfile ENTRYPOINT + CMD is a valid cuttle command line', () => {
    const entry = jsonArg('ENTRYPOINT');
    assert.deepEqual(entry, ['node', '--max-semi-space-size=16', 'src/main.ts']);
    const r = checkConfig(jsonArg('CMD'));
    assert.equal(r.status, 0, r.stderr);
    assert.match(dockerfile, /^USER node$/m);
    assert.match(dockerfile, /^VOLUME \["\/var\/cache\/cuttle", "\/var\/log\/cuttle"\]$/m);
  });

  it('each compose service command is valid', () => {
    const compose = parse(readFileSync('docker/compose.yaml', 'utf8')) as { services: Record<string, { command?: string[]; entrypoint?: string[] }> };
    for (const name of ['cuttle-a', 'cuttle-b']) {
      const r = checkConfig(compose.services[name]!.command!);
      assert.equal(r.status, 0, `${name}: ${r.stderr}`);
    }
    for (const name of ['stratum1a', 'stratum1b']) assert.deepEqual(compose.services[name]!.entrypoint, ['node', 'bench/emulator.ts']);
  });

  it('the HEALTHCHECK command reports a running proxy healthy, and a stopped one unhealthy', async () => {
    const hc = /HEALTHCHECK[^\n]*\n\s*CMD (\[.*\])/.exec(dockerfile)![1]!;
    const [, , script] = JSON.parse(hc) as string[];
    const proxy = await startChildProxy(['--listen', '127.0.0.1:0', '--cache-dir', join(tmpDir(), 'c'), '--admin-listen', '127.0.0.1:0']);
    const adminPort = /"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]!;
    const probe = () => spawnSync(process.execPath, ['-e', script!.replace('3129', adminPort)]).status;
    assert.equal(probe(), 0);
    assert.equal(await proxy.stop(), 0);
    assert.equal(probe(), 1);
  });

  it('SIGTERM to `npm start` stops the proxy, not only npm', async () => {
    await launched('npm', ['start', '--', ...ARGS, '--cache-dir', join(tmpDir(), 'c')], {}, async (npm, pid) => {
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
