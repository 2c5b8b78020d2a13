// Bank membership (src/bank.ts) without sockets: --bank-dns re-resolved, the ring re-formed, only the
// keys of a member that came or went move; self by listen address; names expanded as the client does.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { Bank, listensOn } from '../../src/bank.ts';
import { buildConfig } from '../../src/config.ts';
import { PeerProber } from '../../src/peer.ts';
import { Hierarchy } from '../../src/hierarchy.ts';
import { ProxyError } from '../../src/errors.ts';
import { workerOf } from '../../src/worker-ring.ts';
import { memoryLogger } from '../helpers/proxy.ts';
import { waitFor } from '../helpers/mirrors.ts';

const paths = Array.from({ length: 400 }, (_, i) => {
  const h = createHash('sha1').update(String(i)).digest('hex');
  return `/cvmfs/x.cern.ch/data/${h.slice(0, 2)}/${h.slice(2)}`;
});

function ownerMap(bank: Bank): Map<string, string> {
  return new Map(paths.map((p) => [p, bank.owner(new URL(`http://s1.example:8000${p}`), undefined)?.spec.url ?? 'self']));
}

describe('bank membership', () => {
  it('--bank-dns: a new address re-forms the ring and takes only keys for itself; one that leaves gives back only its own', async () => {
    let answer = ['10.0.0.1', '10.0.0.2'];
    const cfg = buildConfig({ listen: ['10.0.0.1:3128'], 'bank-dns': 'bank.example:3128', 'bank-dns-interval': '10ms' });
    const { logger } = memoryLogger();
    const prober = new PeerProber(async () => ({ ok: true }), 60_000, logger);
    const bank = new Bank(cfg, prober, logger, async () => answer);
    await bank.start();
    try {
      assert.deepEqual(bank.snapshot().map((p) => [p.url, p.self]), [['http://10.0.0.1:3128', true], ['http://10.0.0.2:3128', false]]);
      const two = ownerMap(bank);
      answer = ['10.0.0.3', '10.0.0.2', '10.0.0.1']; // any order: the list is sorted
      await waitFor('the third member', () => bank.snapshot().length === 3);
      const three = ownerMap(bank);
      let moved = 0;
      for (const p of paths) {
        if (two.get(p) !== three.get(p)) {
          moved++;
          assert.equal(three.get(p), 'http://10.0.0.3:3128', 'a key moves only to the newcomer');
        }
      }
      assert.ok(moved > 40 && moved < 250, `about a third of the keys move (${moved})`);
      answer = ['10.0.0.1', '10.0.0.2'];
      await waitFor('the third member to leave', () => bank.snapshot().length === 2);
      assert.deepEqual(ownerMap(bank), two, 'back to the same owners');
    } finally {
      bank.stop();
      prober.stop();
    }
  });

  it('a name in --bank is expanded into its addresses for the ring; squid-carp keeps the name as spelled', async () => {
    const { logger } = memoryLogger();
    const prober = new PeerProber(async () => ({ ok: true }), 60_000, logger);
    const resolve = async (h: string) => (h === 'Squids.example' ? ['10.1.0.1', '10.1.0.2'] : [h]);
    const ring = new Bank(buildConfig({ listen: ['3128'], bank: ['http://Squids.example:3128', 'http://10.1.0.9:3128'] }), prober, logger, resolve);
    const carp = new Bank(buildConfig({ listen: ['3128'], bank: ['http://Squids.example:3128', 'http://10.1.0.9:3128'], 'bank-hash': 'squid-carp' }), prober, logger, resolve);
    await ring.start();
    await carp.start();
    try {
      assert.deepEqual(ring.snapshot().map((p) => p.url), ['http://10.1.0.1:3128', 'http://10.1.0.2:3128', 'http://10.1.0.9:3128']);
      assert.deepEqual(carp.snapshot().map((p) => p.name), ['Squids.example', '10.1.0.9']);
      assert.ok(ring.isMember('10.1.0.2') && ring.isMember('::ffff:10.1.0.9') && !ring.isMember('10.1.0.3'));
    } finally {
      ring.stop();
      carp.stop();
      prober.stop();
    }
  });

  it('a member is this cuttle when it listens there: the exact address, or a wildcard and one of its own', () => {
    assert.ok(listensOn([{ host: '10.0.0.1', port: 3128 }], '10.0.0.1', 3128));
    assert.ok(!listensOn([{ host: '10.0.0.1', port: 3128 }], '10.0.0.1', 3129));
    assert.ok(listensOn([{ host: '::', port: 3128 }], '127.0.0.2', 3128), 'loopback is this host');
    assert.ok(!listensOn([{ host: '::', port: 3128 }], '192.0.2.77', 3128), 'not an address of this host');
  });
});

describe('worker peers (--workers)', () => {
  it('a worker that exits while it is down is probed no more (one probe timer per crash would pile up)', async () => {
    const cfg = buildConfig({ listen: ['127.0.0.1:3128'] });
    const { logger } = memoryLogger();
    let probes = 0;
    const h = new Hierarchy(cfg, async () => ({ ok: false, why: `refused ${++probes}` }), logger);
    try {
      h.setWorkers(0, [undefined, 'http://127.0.0.1:40001'], 'secret');
      // A key the other worker owns, and its route: that worker.
      const key = Array.from({ length: 64 }, (_, i) => `http://s1.example/cvmfs/x/${i}`).find((k) => workerOf(k, 2, () => true) === 1)!;
      const route = h.routes(new URL(key), undefined, 'client', key)[0]!;
      assert.ok(route.peer, 'the owner worker is the first route');
      h.peerFailed(route.peer, new ProxyError('ERR_CONNECT_REFUSED', 'refused'));
      assert.equal(route.peer.up, false);
      assert.equal(h.prober.probing, 1, 'a down worker is probed');
      h.setWorkers(0, [undefined, undefined], 'secret'); // it exited
      assert.equal(h.prober.probing, 0, 'a worker that exited is probed no more');
      assert.equal(probes, 0);
    } finally {
      h.stop();
    }
  });
});
