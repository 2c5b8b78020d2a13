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

  it('CONNECT is denied unless its port is listed', () => {
    assert.equal(compileAcl(buildConfig({})).allowsConnect('example.org', 443), 'deny-port');
    assert.equal(compileAcl(buildConfig({ 'allow-connect-port': '443' })).allowsConnect('example.org', 443), 'allow');
  });
});
