// There is no Docker engine here, so check what can be checked: the image's and the compose file's
// commands are valid cuttle command lines, and the HEALTHCHECK command works against a real proxy.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { startChildProxy, tmpDir } from '../helpers/proxy.ts';

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
});
