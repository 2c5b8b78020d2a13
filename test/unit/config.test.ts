import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { buildConfig, OPTIONS, parseCli, parseDurationMs, parseSize, loadConfig } from '../../src/config.ts';
import { ConfigError } from '../../src/errors.ts';
import { tmpDir } from '../helpers/proxy.ts';

function problems(raw: Record<string, unknown>): string[] {
  try {
    buildConfig(raw);
  } catch (err) {
    assert.ok(err instanceof ConfigError);
    return [...err.problems];
  }
  assert.fail('expected a ConfigError');
}

function cuttle(args: string[]) {
  return spawnSync(process.execPath, ['src/main.ts', ...args], { encoding: 'utf8', timeout: 20_000 });
}

describe('config', () => {
  it('has working defaults (Squid port, NET_LOCAL clients, CVMFS ports)', () => {
    const c = buildConfig({});
    assert.deepEqual(c.listen, [{ host: '::', port: 3128 }], 'a bare port is dual-stack');
    assert.equal(c.diskCacheBytes, 10 * 1024 ** 3);
    assert.equal(c.memoryCacheBytes, 256 * 1024 ** 2);
    assert.equal(c.maxObjectBytes, 1024 ** 3);
    assert.equal(c.maxMemoryObjectBytes, 1024 ** 2);
    assert.equal(c.allowClient.length, 7);
    assert.deepEqual(c.allowPorts, [{ from: 80, to: 80 }, { from: 8000, to: 8000 }, { from: 8080, to: 8080 }, { from: 1025, to: 65535 }]);
    assert.deepEqual(c.allowConnectPorts, []);
    assert.equal(c.negativeTtlMs, 60_000);
    assert.ok(Object.isFrozen(c) && Object.isFrozen(c.listen));
  });

  it('parses sizes and durations in powers of 1024', () => {
    assert.equal(parseSize('512KB'), 512 * 1024);
    assert.equal(parseSize('1.5GB'), 1.5 * 1024 ** 3);
    assert.equal(parseSize('12 parsecs'), undefined);
    assert.equal(parseSize('4096'), undefined);
    assert.equal(parseSize('4096B'), 4096);
    assert.equal(parseDurationMs('61s'), 61_000);
    assert.equal(parseDurationMs('5m'), 300_000);
    assert.equal(parseDurationMs('250ms'), 250);
  });

  it('names the key of an unknown option, a bad size and a bad CIDR', () => {
    assert.match(problems({ 'cache-sise': '1GB' }).join('\n'), /unknown key "cache-sise"/);
    assert.match(problems({ 'disk-cache': 'lots' }).join('\n'), /^disk-cache: expected a size with its unit \(B, KB, MB, GB or TB, 1024-based\).*got "lots"/m);
    // A bare number is not bytes: Squid's cache_dir reads it as MB. It is refused, under its own key.
    assert.match(problems({ 'disk-cache': '200000' }).join('\n'), /^disk-cache: expected a size with its unit/m);
    assert.match(problems({ 'memory-cache': 1024 }).join('\n'), /^memory-cache: expected a size with its unit/m);
    assert.match(problems({ 'allow-client': ['10.0.0.0/33'] }).join('\n'), /^allow-client: expected an IP address or CIDR/m);
    assert.match(problems({ 'allow-port': '80,http' }).join('\n'), /^allow-port: expected ports/m);
    assert.match(problems({ listen: 'nowhere' }).join('\n'), /^listen: expected \[HOST:\]PORT/m);
  });

  it('reports every problem at once', () => {
    const p = problems({ 'disk-cache': 'x', 'memory-cache': 'y', 'negative-ttl': 'soon' });
    assert.equal(p.length, 3);
  });

  it('command line wins over the YAML file', () => {
    const dir = tmpDir();
    const file = join(dir, 'cuttle.yaml');
    writeFileSync(file, 'memory-cache: 64MB\ndisk-cache: 2GB\nallow-dest:\n  - .cern.ch\n');
    const c = loadConfig(parseCli(['--config', file, '--memory-cache', '32MB']));
    assert.equal(c.memoryCacheBytes, 32 * 1024 ** 2);
    assert.equal(c.diskCacheBytes, 2 * 1024 ** 3);
    assert.deepEqual(c.allowDest, [{ kind: 'domain', suffix: '.cern.ch' }]);
  });

  it('cuttle --check-config prints each problem with its key and exits non-zero', () => {
    const dir = tmpDir();
    const file = join(dir, 'bad.yaml');
    writeFileSync(file, 'disk-cache: huge\nallow-client: [300.1.1.1/8]\nfrobnicate: 1\n');
    const r = cuttle(['--config', file, '--check-config']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /disk-cache: expected a size/);
    assert.match(r.stderr, /allow-client: expected an IP address or CIDR/);
    assert.match(r.stderr, /unknown key "frobnicate"/);
    const ok = cuttle(['--check-config', '--memory-cache', '64MB', '--stratum1', 'http://s1a.example:8000', '--stratum1', 'http://s1b.example:8000/cvmfs/@fqrn@']);
    assert.equal(ok.status, 0);
    assert.match(ok.stdout, /configuration OK/);
    assert.match(ok.stdout, /memory 64 MiB/);
    assert.match(ok.stdout, /stratum1: +default \[http:\/\/s1a\.example:8000 http:\/\/s1b\.example:8000\]/);
  });

  it('--check-config also checks this host: cache and log paths usable, listen addresses local; it changes nothing', () => {
    const dir = tmpDir();
    const file = join(dir, 'a-file');
    writeFileSync(file, '');
    const r = cuttle(['--check-config', '--cache-dir', join(file, 'cache'), '--access-log', join(file, 'access.log'), '--pid-file', join(file, 'cuttle.pid'), '--listen', '203.0.113.77:3128', '--admin-listen', '127.0.0.1:3129']);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /the configuration is valid, but this host can't run it/);
    assert.match(r.stderr, /cache-dir: .* can't be used: .*a-file is not a directory/);
    assert.match(r.stderr, /access-log: .* can't be written: .*a-file is not a directory/);
    assert.match(r.stderr, /pid-file: .* can't be written/);
    assert.match(r.stderr, /listen: 203\.0\.113\.77 is not an address of this host/);
    assert.doesNotMatch(r.stderr, /admin-listen/);
    const fresh = join(dir, 'new', 'cache');
    const ok = cuttle(['--check-config', '--cache-dir', fresh, '--access-log', join(dir, 'logs', 'access.log'), '--listen', '127.0.0.1:3128', '--listen', '[::]:3128']);
    assert.equal(ok.status, 0, ok.stderr);
    assert.equal(existsSync(join(dir, 'new')), false, 'nothing created');
    assert.equal(existsSync(join(dir, 'logs')), false, 'nothing created');
  });

  it('--check-config says which --bank member this cuttle is, by its listen address (any of 127.0.0.0/8 is this host)', () => {
    const dir = tmpDir();
    const me = cuttle(['--check-config', '--cache-dir', join(dir, 'c'), '--listen', '127.0.0.2:3128', '--bank', 'http://127.0.0.1:3128', '--bank', 'http://127.0.0.2:3128']);
    assert.equal(me.status, 0, me.stderr);
    assert.match(me.stdout, /bank: this cuttle is http:\/\/127\.0\.0\.2:3128, one of 2 members/);
    const none = cuttle(['--check-config', '--cache-dir', join(dir, 'c'), '--listen', '127.0.0.3:3128', '--bank', 'http://127.0.0.1:3128', '--bank', 'http://127.0.0.2:3128']);
    assert.match(none.stdout, /bank: no member is this cuttle/);
  });

  it('the README documents every option of the table, and only those', () => {
    const readme = readFileSync('README.md', 'utf8');
    const documented = new Set([...readme.matchAll(/^\| `--([a-z0-9-]+)/gm)].map((m) => m[1]!));
    for (const k of Object.keys(OPTIONS)) assert.ok(documented.has(k), `README lacks --${k}`);
    for (const k of documented) assert.ok(k in OPTIONS || k === 'check-config', `README documents --${k}, which does not exist`);
  });

  it('an unknown command-line option is an error that names it', () => {
    const r = cuttle(['--memory-cahce', '1GB']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--memory-cahce/);
  });

  it('--version and --help', () => {
    assert.match(cuttle(['--version']).stdout, /^cuttle \d+\.\d+\.\d+/);
    assert.match(cuttle(['--help']).stdout, /--allow-connect-port/);
  });

  it('fails loudly when the port is taken or the cache dir is unwritable', async () => {
    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const port = (blocker.address() as AddressInfo).port;
    const r = cuttle(['--listen', `127.0.0.1:${port}`, '--cache-dir', join(tmpDir(), 'c')]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /cannot listen on 127\.0\.0\.1:\d+: .*EADDRINUSE/);
    blocker.close();
    const file = join(tmpDir(), 'a-file');
    writeFileSync(file, 'not a dir');
    const u = cuttle(['--listen', '127.0.0.1:0', '--cache-dir', join(file, 'cache')]);
    assert.equal(u.status, 1);
    assert.match(u.stderr, /cache-dir .* is not usable/);
  });
});
