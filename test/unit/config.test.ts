import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { buildConfig, OPTIONS, parseCli, parseDurationMs, parseSize, loadConfig } from '../../src/config.ts';
import { ConfigError } from '../../src/errors.ts';
import { blockList, parseCidr } from '../../src/cidr.ts';
import { startProxy, tmpDir } from '../helpers/proxy.ts';

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

  it('an unknown key or option suggests the nearest known one, not a list of all; --help when none is close', () => {
    assert.deepEqual(problems({ 'memory-cahce': '1GB' }), ['unknown key "memory-cahce"; did you mean "memory-cache"?']);
    assert.deepEqual(problems({ cache_dir: '/tmp/x' }), ['unknown key "cache_dir"; did you mean "cache-dir"?'], "Squid's underscores");
    assert.deepEqual(problems({ frobnicate: 1 }), ['unknown key "frobnicate"; run cuttle --help for every option']);
    const cli = (args: string[]) => {
      const r = cuttle([...args, '--check-config']);
      assert.equal(r.status, 2, r.stderr);
      assert.doesNotMatch(r.stderr, /Unknown option|known keys/);
      return r.stderr;
    };
    assert.match(cli(['--memory-cahce', '1GB']), /unknown option "--memory-cahce"; did you mean "--memory-cache"\?/);
    assert.match(cli(['--no-acel']), /unknown option "--no-acel"; did you mean "--no-accel"\?/);
    assert.match(cli(['--stratum-1', 'http://s1.example:8000']), /did you mean "--stratum1"\?/);
    assert.match(cli(['--zzzzqqq']), /unknown option "--zzzzqqq"; run cuttle --help for every option/);
  });

  it('a switch given yes/no/on/off or another type says it expects true or false, for every switch', () => {
    const switches = (Object.keys(OPTIONS) as (keyof typeof OPTIONS)[]).filter((k) => typeof OPTIONS[k].default === 'boolean');
    assert.ok(switches.length >= 3, switches.join());
    for (const k of switches) {
      assert.match(problems({ [k]: 'yes' }).join('\n'), new RegExp(`^${k}: expected true or false, got "yes" \\(yes/no/on/off are strings in YAML 1\\.2`, 'm'));
      assert.deepEqual(problems({ [k]: 1 }), [`${k}: expected true or false, got 1`]);
      const r = cuttle([`--${k}=yes`, '--check-config']);
      assert.equal(r.status, 2);
      assert.match(r.stderr, new RegExp(`${k}: expected --${k} or --no-${k} \\(a switch takes no value\\), got "--${k}=yes"`));
      assert.equal(buildConfig({ [k]: 'false' }).options[k], false);
    }
    // The YAML file as an admin writes it; and a value of the wrong type for a size says what it expected too.
    const file = join(tmpDir(), 'switch.yaml');
    writeFileSync(file, 'accel: yes\nstratum1: [http://s1.example:8000]\ndisk-cache: true\n');
    const r = cuttle(['--config', file, '--check-config']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /accel: expected true or false, got "yes"/);
    assert.match(r.stderr, /disk-cache: expected a size with its unit .*, got true/);
    assert.doesNotMatch(r.stderr, /Invalid input/);
  });

  it('a size error names the key the admin wrote: a tier of 0 bytes is refused as such, a tier below its largest object names the tier', () => {
    const zero = cuttle(['--check-config', '--memory-cache', '0B']);
    assert.equal(zero.status, 2);
    assert.match(zero.stderr, /memory-cache: expected a size above 0 \(the memory tier holds nothing in 0 bytes\), got "0B"/);
    assert.doesNotMatch(zero.stderr, /max-memory-object-size/);
    // 0B for both passed the file, then the memory tier refused it at start.
    assert.match(problems({ 'memory-cache': '0B', 'max-memory-object-size': '0B' }).join('\n'), /^memory-cache: expected a size above 0/m);
    assert.match(problems({ 'disk-cache': '0KB', 'max-object-size': '0B' }).join('\n'), /^disk-cache: expected a size above 0 \(the disk tier/m);
    assert.deepEqual(problems({ 'memory-cache': '512KB' }), ['memory-cache: 512KB is below max-memory-object-size (1MB, its default): raise memory-cache or lower max-memory-object-size']);
    assert.deepEqual(problems({ 'disk-cache': '512MB' }), ['disk-cache: 512MB is below max-object-size (1GB, its default): raise disk-cache or lower max-object-size']);
    assert.deepEqual(problems({ 'max-memory-object-size': '1GB' }), ['max-memory-object-size: must not exceed memory-cache (256MB, its default)']);
    assert.deepEqual(problems({ 'memory-cache': '512KB', 'max-memory-object-size': '1MB' }), ['max-memory-object-size: must not exceed memory-cache (512KB)']);
    assert.equal(buildConfig({ 'memory-cache': '1B', 'max-memory-object-size': '0B', 'range-offset-limit': '0B' }).memoryCacheBytes, 1, 'the smallest tier, and sizes where 0 means something');
  });

  it('--check-config reports a listen port already taken (TCP and UDP), and only notes one the running cuttle on this cache-dir holds', async () => {
    const tcp = createServer();
    await new Promise<void>((r) => tcp.listen(0, '127.0.0.1', () => r()));
    const udp = createSocket('udp4');
    await new Promise<void>((r) => udp.bind(0, '127.0.0.1', () => r()));
    const tcpPort = (tcp.address() as AddressInfo).port;
    const udpPort = udp.address().port;
    const dir = tmpDir();
    try {
      const r = cuttle(['--check-config', '--cache-dir', join(dir, 'c'), '--listen', `127.0.0.1:${tcpPort}`, '--admin-listen', `${tcpPort}`, '--snmp-listen', `127.0.0.1:${udpPort}`]);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`listen: 127\\.0\\.0\\.1:${tcpPort} is already in use by another process`));
      assert.match(r.stderr, new RegExp(`admin-listen: \\[::\\]:${tcpPort} is already in use`), 'the wildcard overlaps 127.0.0.1');
      assert.match(r.stderr, new RegExp(`snmp-listen: 127\\.0\\.0\\.1:${udpPort} \\(UDP\\) is already in use`));
    } finally {
      tcp.close();
      udp.close();
    }
    // The running cuttle on the same cache dir (a check before a reload): a note. Another process on its port: a problem.
    const p = await startProxy();
    const other = spawn(process.execPath, ['-e', "const s = require('node:net').createServer().listen(0, '127.0.0.1', () => console.log(s.address().port)); process.stdin.on('end', () => s.close()).resume()"], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      const [line] = (await once(other.stdout!, 'data')) as [Buffer];
      const otherPort = Number(line.toString().trim());
      const reload = cuttle(['--check-config', '--cache-dir', p.cacheDir, '--listen', `127.0.0.1:${p.port}`, '--admin-listen', 'none']);
      assert.equal(reload.status, 0, reload.stderr);
      assert.match(reload.stdout, new RegExp(`note: +listen: 127\\.0\\.0\\.1:${p.port} is taken by the running cuttle pid ${process.pid} on this cache-dir \\(fine before a reload\\)`));
      const clash = cuttle(['--check-config', '--cache-dir', p.cacheDir, '--listen', `127.0.0.1:${otherPort}`, '--admin-listen', 'none']);
      assert.equal(clash.status, 1, clash.stderr);
      assert.match(clash.stderr, new RegExp(`listen: 127\\.0\\.0\\.1:${otherPort} is already in use by another process \\(not the cuttle pid ${process.pid} on this cache-dir\\)`));
      // Nothing changed: the proxy still takes connections on its port.
      const s = connect(p.port, '127.0.0.1');
      await once(s, 'connect');
      s.destroy();
      assert.equal(p.proxy.counters.refused.connections, 0);
    } finally {
      other.stdin!.end();
      await once(other, 'exit');
      await p.close();
    }
  });

  it("the README's SNMP example keeps loopback allowed, since --allow-snmp replaces the default", () => {
    const readme = readFileSync('README.md', 'utf8');
    const start = readme.indexOf('--snmp-listen 3401 --allow-snmp');
    assert.ok(start > 0, 'the example is in the README');
    const command = readme.slice(start, readme.indexOf('\n```', start)).replace(/\\\n/g, ' ');
    const allowed = [...command.matchAll(/--allow-snmp (\S+)/g)].map((m) => parseCidr(m[1]!));
    assert.ok(allowed.length >= 2 && allowed.every(Boolean), command);
    assert.ok(blockList(allowed.map((c) => c!)).check('127.0.0.1', 'ipv4'), `no loopback in: ${command}`);
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
