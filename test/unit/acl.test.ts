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

  it('denies loopback and link-local destinations unless named; applies port rules', () => {
    const open = compileAcl(buildConfig({}));
    assert.equal(open.checkDestination('cvmfs-s1.example.org', 8000), 'allow');
    assert.equal(open.checkDestination('127.0.0.1', 8000), 'deny-dest');
    assert.equal(open.checkDestination('169.254.169.254', 80), 'deny-dest');
    assert.equal(open.checkDestination('[::1]', 8000), 'deny-dest');
    assert.equal(open.checkDestination('localhost', 8000), 'deny-dest');
    assert.equal(open.allowsResolved('sneaky.example.org', '127.0.0.1', 80), false);
    assert.equal(open.checkDestination('example.org', 25), 'deny-port');
    const named = compileAcl(buildConfig({ 'allow-dest': ['127.0.0.1', '.cern.ch'] }));
    assert.equal(named.checkDestination('127.0.0.1', 8000), 'allow');
    assert.equal(named.checkDestination('cvmfs-stratum-one.cern.ch', 8000), 'allow');
    assert.equal(named.checkDestination('cern.ch', 8000), 'allow');
    assert.equal(named.allowsResolved('evilcern.ch', '192.0.2.10', 80), false);
    // A name outside the list may still resolve into an allowed CIDR: that is decided at connect time.
    assert.equal(named.allowsResolved('example.org', '192.0.2.10', 80), false);
    assert.equal(compileAcl(buildConfig({ 'allow-dest': ['.cern.ch'] })).checkDestination('example.org', 8000), 'deny-dest');
  });

  it('denies every IPv6 spelling of loopback and link-local: mapped, IPv4-compatible, SIIT', () => {
    const open = compileAcl(buildConfig({}));
    for (const a of ['[::ffff:127.0.0.1]', '[::ffff:7f00:1]', '[::7f00:1]', '[::127.0.0.1]', '[::ffff:0:7f00:1]', '[::ffff:0:127.0.0.1]', '[::ffff:a9fe:a9fe]', '[::a9fe:a9fe]', '[0:0:0:0:0:0:0:1]', '[::]'])
      assert.equal(open.checkDestination(a, 8000), 'deny-dest', a);
    assert.equal(open.allowsResolved('x.example.org', '::7f00:1', 80), false);
    assert.equal(open.checkDestination('[2001:db8::1]', 8000), 'allow');
    assert.equal(open.checkDestination('[::ffff:192.0.2.1]', 8000), 'allow', 'a mapped public address is still allowed');
  });

  it('a loopback Stratum 1 mirror opens exactly its own host and port', () => {
    const acl = compileAcl({ ...buildConfig({}), mirrorGroups: [{ name: 'default', mirrors: ['http://127.0.0.1:8000', 'http://localhost:8001'] }] });
    assert.equal(acl.checkDestination('127.0.0.1', 8000), 'allow');
    assert.equal(acl.checkDestination('127.0.0.1', 3129), 'deny-dest');
    assert.equal(acl.checkDestination('localhost', 8001), 'allow');
    assert.equal(acl.checkDestination('localhost', 8000), 'deny-dest');
    assert.equal(acl.allowsResolved('localhost', '127.0.0.1', 8001), true);
    assert.equal(acl.allowsResolved('localhost', '127.0.0.1', 3129), false);
  });

  it('CONNECT is denied unless its port is listed', () => {
    assert.equal(compileAcl(buildConfig({})).allowsConnect('example.org', 443), 'deny-port');
    assert.equal(compileAcl(buildConfig({ 'allow-connect-port': '443' })).allowsConnect('example.org', 443), 'allow');
  });
});
