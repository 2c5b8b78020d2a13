import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { compileAcl } from '../../src/acl.ts';
import { buildConfig } from '../../src/config.ts';

describe('acl', () => {
  it('matches clients by CIDR, including IPv4-mapped IPv6', () => {
    const acl = compileAcl(buildConfig({}));
    assert.equal(acl.allowsClient('10.1.2.3'), true);
    assert.equal(acl.allowsClient('::ffff:192.168.1.1'), true);
    assert.equal(acl.allowsClient('fd00::1'), true);
    assert.equal(acl.allowsClient('8.8.8.8'), false);
    assert.equal(acl.allowsClient('2001:db8::1'), false);
  });

  it('denies loopback and link-local destinations unless allow-local-dest names them; applies port rules', () => {
    const open = compileAcl(buildConfig({}));
    assert.equal(open.checkDestination('cvmfs-s1.example.org', 8000), 'allow');
    assert.equal(open.checkDestination('127.0.0.1', 8000), 'deny-local');
    assert.equal(open.checkDestination('169.254.169.254', 80), 'deny-local');
    assert.equal(open.checkDestination('[::1]', 8000), 'deny-local');
    assert.equal(open.checkDestination('localhost', 8000), 'deny-local');
    assert.equal(open.allowsResolved('sneaky.example.org', '127.0.0.1', 80), false);
    assert.equal(open.checkDestination('example.org', 25), 'deny-port');
    const named = compileAcl(buildConfig({ 'allow-dest': ['.cern.ch'] }));
    assert.equal(named.checkDestination('cvmfs-stratum-one.cern.ch', 8000), 'allow');
    assert.equal(named.checkDestination('cern.ch', 8000), 'allow');
    assert.equal(named.checkDestination('example.org', 8000), 'deny-dest');
    assert.equal(named.allowsResolved('evilcern.ch', '192.0.2.10', 80), false);
    assert.equal(named.allowsResolved('example.org', '192.0.2.10', 80), false);
  });

  it('allow-local-dest opens exactly what it names and never narrows the public default', () => {
    const one = compileAcl(buildConfig({ 'allow-local-dest': ['127.0.0.1:8080', 'origin.localhost'] }));
    assert.equal(one.checkDestination('127.0.0.1', 8080), 'allow');
    assert.equal(one.checkDestination('127.0.0.1', 3129), 'deny-local', 'the admin port stays closed');
    assert.equal(one.checkDestination('127.0.0.2', 8080), 'deny-local');
    assert.equal(one.checkDestination('origin.localhost', 8000), 'allow');
    assert.equal(one.allowsResolved('origin.localhost', '127.0.0.1', 8000), true);
    assert.equal(one.checkDestination('cvmfs-s1.example.org', 8000), 'allow', 'public destinations stay open');
    const range = compileAcl(buildConfig({ 'allow-local-dest': ['127.0.0.0/8', '[::1]:8000'] }));
    assert.equal(range.checkDestination('127.9.9.9', 3129), 'allow');
    assert.equal(range.checkDestination('[::1]', 8000), 'allow');
    assert.equal(range.checkDestination('[::1]', 8001), 'deny-local');
    assert.equal(range.checkDestination('169.254.169.254', 80), 'deny-local');
  });

  it('a CIDR that merely covers loopback or link-local never opens them', () => {
    const wide = compileAcl(buildConfig({ 'allow-dest': ['0.0.0.0/0', '::/0'] }));
    assert.equal(wide.checkDestination('192.0.2.1', 80), 'allow');
    for (const local of ['127.0.0.1', '169.254.169.254', '[::1]', '[fe80::1]']) assert.equal(wide.checkDestination(local, 80), 'deny-local', local);
    assert.equal(wide.allowsResolved('x.example.org', '169.254.169.254', 80), false);
    for (const bad of ['0.0.0.0/0', '10.0.0.0/8', '169.0.0.0/8', '::/0'])
      assert.throws(() => buildConfig({ 'allow-local-dest': [bad] }), /allow-local-dest: expected an address or CIDR inside the loopback or link-local ranges/, bad);
    assert.throws(() => buildConfig({ 'allow-dest': ['127.0.0.1'] }), /allow-dest: expected a public destination: loopback and link-local ones go in allow-local-dest/);
    assert.throws(() => buildConfig({ 'allow-dest': ['localhost'] }), /allow-local-dest/);
    assert.throws(() => buildConfig({ 'allow-local-dest': ['127.0.0.1:99999'] }), /a port from 1 to 65535/);
  });

  it('the admin listener is open to loopback by default, and to --allow-admin', () => {
    assert.equal(compileAcl(buildConfig({})).allowsAdmin('127.0.0.1'), true);
    assert.equal(compileAcl(buildConfig({})).allowsAdmin('::1'), true);
    assert.equal(compileAcl(buildConfig({})).allowsAdmin('10.1.2.3'), false);
    const prom = compileAcl(buildConfig({ 'allow-admin': ['10.1.2.0/24'] }));
    assert.equal(prom.allowsAdmin('10.1.2.3'), true);
    assert.equal(prom.allowsAdmin('127.0.0.1'), false, 'the list replaces the default');
  });

  it('denies every IPv6 spelling of loopback and link-local: mapped, IPv4-compatible, SIIT', () => {
    const open = compileAcl(buildConfig({}));
    for (const a of ['[::ffff:127.0.0.1]', '[::ffff:7f00:1]', '[::7f00:1]', '[::127.0.0.1]', '[::ffff:0:7f00:1]', '[::ffff:0:127.0.0.1]', '[::ffff:a9fe:a9fe]', '[::a9fe:a9fe]', '[0:0:0:0:0:0:0:1]', '[::]'])
      assert.equal(open.checkDestination(a, 8000), 'deny-local', a);
    assert.equal(open.allowsResolved('x.example.org', '::7f00:1', 80), false);
    assert.equal(open.checkDestination('[2001:db8::1]', 8000), 'allow');
    assert.equal(open.checkDestination('[::ffff:192.0.2.1]', 8000), 'allow', 'a mapped public address is still allowed');
  });

  it('a loopback Stratum 1 mirror opens exactly its own host and port', () => {
    const acl = compileAcl({ ...buildConfig({}), mirrorGroups: [{ name: 'default', mirrors: ['http://127.0.0.1:8000', 'http://localhost:8001'] }] });
    assert.equal(acl.checkDestination('127.0.0.1', 8000), 'allow');
    assert.equal(acl.checkDestination('127.0.0.1', 3129), 'deny-local');
    assert.equal(acl.checkDestination('localhost', 8001), 'allow');
    assert.equal(acl.checkDestination('localhost', 8000), 'deny-local');
    assert.equal(acl.allowsResolved('localhost', '127.0.0.1', 8001), true);
    assert.equal(acl.allowsResolved('localhost', '127.0.0.1', 3129), false);
  });

  it('CONNECT is denied unless its port is listed', () => {
    assert.equal(compileAcl(buildConfig({})).allowsConnect('example.org', 443), 'deny-port');
    assert.equal(compileAcl(buildConfig({ 'allow-connect-port': '443' })).allowsConnect('example.org', 443), 'allow');
  });
});
