// The overload policy with time passed in: the lag monitor's state from its ticks, which new fills are
// refused and why, the refusal count, and the kernel's accept-queue counters as /proc/net/netstat gives them.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { buildConfig } from '../../src/config.ts';
import { newCounters } from '../../src/counters.ts';
import { acceptHand, connectionCap, fillRefusal, LAG_TICK_MS, LoopLag, parseListenQueue, openFilesLimit, refuse } from '../../src/overload.ts';

describe('LoopLag', () => {
  it('two ticks in a row later than the bound set lagging; one alone does not; the next tick on time clears it', () => {
    const lag = new LoopLag(200);
    const changes: boolean[] = [];
    lag.onChange = (lagging) => changes.push(lagging);
    let now = 1000;
    const after = (lateMs: number) => lag.tick((now += LAG_TICK_MS + lateMs));
    lag.tick(now);
    assert.equal(lag.lagging, false, 'the first tick has nothing to be late against');
    after(150);
    assert.equal(lag.lagging, false, '150 ms late is within 200 ms');
    assert.equal(lag.lastLateMs, 150);
    after(200);
    after(200);
    assert.equal(lag.lagging, false, 'exactly the bound is not past it');
    after(5000);
    assert.equal(lag.lagging, false, 'one long turn alone (a burst of accepts) is not overload');
    assert.equal(lag.lastLateMs, 5000);
    after(3);
    after(201);
    assert.equal(lag.lagging, false, 'an on-time tick between two late ones');
    after(201);
    assert.equal(lag.lagging, true, 'two late ticks in a row');
    assert.equal(lag.lastLateMs, 201);
    after(900);
    assert.equal(lag.lagging, true, 'still late');
    after(3);
    assert.equal(lag.lagging, false, 'on time again');
    assert.deepEqual(changes, [true, false], 'each change is told once');
  });

  it('a tick early (a clock read before the timer was due) is 0 ms late', () => {
    const lag = new LoopLag(200);
    lag.tick(0);
    lag.tick(LAG_TICK_MS - 1);
    assert.equal(lag.lastLateMs, 0);
    assert.equal(lag.lagging, false);
  });

  it('--max-loop-lag 0 never lags and starts no timer', () => {
    const lag = new LoopLag(0);
    lag.tick(0);
    lag.tick(60_000);
    assert.equal(lag.lagging, false);
    lag.start(); // no timer: nothing would keep this test's process alive or leak past stop()
    lag.stop();
  });

  it('stop() ends the timer and forgets the state', () => {
    const lag = new LoopLag(200);
    lag.start();
    lag.tick(performance.now() + 10_000);
    lag.tick(performance.now() + 20_000);
    assert.equal(lag.lagging, true);
    lag.stop();
    assert.equal(lag.lagging, false);
  });
});

describe('fillRefusal', () => {
  const ok = { inFlight: 0, maxFills: 10, usedBytes: 0, limitBytes: 100, windowsBytes: 40, lagging: false };
  it('admits a fill while there are slots, fill memory and a loop on time', () => {
    assert.equal(fillRefusal(ok), undefined);
    assert.equal(fillRefusal({ ...ok, inFlight: 9, usedBytes: 99 }), undefined);
  });
  it('refuses when --max-fills is reached, the fill memory is spent, or the loop lags', () => {
    assert.equal(fillRefusal({ ...ok, inFlight: 10 }), 'fills');
    assert.equal(fillRefusal({ ...ok, usedBytes: 100 }), 'fill_memory');
    assert.equal(fillRefusal({ ...ok, usedBytes: 150 }), 'fill_memory');
    assert.equal(fillRefusal({ ...ok, lagging: true }), 'loop_lag');
  });
  it('fills whose windows hold no more than their own bound refuse nothing: they spill to disk at speed', () => {
    assert.equal(fillRefusal({ ...ok, usedBytes: 128, windowsBytes: 128 }), undefined, '64 fills at a 2 MB window, a 128 MB budget');
    assert.equal(fillRefusal({ ...ok, usedBytes: 129, windowsBytes: 128 }), 'fill_memory');
  });
});

describe('refuse', () => {
  it('counts by reason and answers ERR_OVERLOADED saying why', () => {
    const c = newCounters();
    const err = refuse(c, 'fill_memory');
    refuse(c, 'loop_lag');
    refuse(c, 'loop_lag');
    assert.equal(err.code, 'ERR_OVERLOADED');
    assert.equal(err.status, 503);
    assert.equal(err.detail, 'fill memory is spent');
    assert.deepEqual(c.refused, { connections: 0, fills: 0, passes: 0, fill_memory: 1, loop_lag: 2, background: 0 });
  });
});

describe('parseListenQueue', () => {
  const netstat = [
    'TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPHPHits',
    'TcpExt: 0 0 17 19 12345',
    'IpExt: InNoRoutes InTruncatedPkts',
    'IpExt: 0 0',
    '',
  ].join('\n');
  it('reads ListenOverflows and ListenDrops from the TcpExt lines', () => {
    assert.deepEqual(parseListenQueue(netstat), { overflows: 17, drops: 19 });
  });
  it('has nothing to say of a file without them', () => {
    assert.equal(parseListenQueue(''), undefined);
    assert.equal(parseListenQueue('IpExt: InNoRoutes\nIpExt: 0\n'), undefined);
    assert.equal(parseListenQueue('TcpExt: SyncookiesSent ListenOverflows\nTcpExt: 0 3\n'), undefined, 'no ListenDrops');
    assert.equal(parseListenQueue('TcpExt: ListenOverflows ListenDrops\nTcpExt: x 3\n'), undefined, 'not a number');
  });
});

describe('overload options', () => {
  it('--listen-backlog is deep by default and --max-loop-lag is 1 s (0 disables it)', () => {
    const d = buildConfig({});
    assert.equal(d.listenBacklog, 65535);
    assert.equal(d.maxLoopLagMs, 1000);
    assert.equal(buildConfig({ 'max-loop-lag': '0' }).maxLoopLagMs, 0);
    assert.equal(buildConfig({ 'listen-backlog': 123 }).listenBacklog, 123);
    assert.throws(() => buildConfig({ 'listen-backlog': 0 }), /listen-backlog: expected a positive integer/);
  });
});

describe('connectionCap', () => {
  const cfg = { maxClientConnections: 65536, upstreamConnections: 64, maxFills: 1024 };
  it('keeps descriptors for what is not a client, and caps client connections by what is left', () => {
    assert.deepEqual(connectionCap(cfg, 20_000), { cap: 20_000 - 2560, reserve: 2560, byDescriptors: true });
    assert.deepEqual(connectionCap(cfg, 1_048_576), { cap: 65536, reserve: 2560, byDescriptors: false });
    assert.equal(connectionCap(cfg, undefined).cap, 65536, 'no limit known: the option alone');
    assert.deepEqual(connectionCap(cfg, 1024), { cap: 512, reserve: 512, byDescriptors: true }, 'a low limit keeps at most half for itself');
    assert.equal(connectionCap(cfg, 1).cap, 1, 'never zero');
    assert.deepEqual(connectionCap(cfg, 20_000, 78), { cap: 20_000 - 2560 - 78, reserve: 2560 + 78, byDescriptors: true }, 'the listening sockets are kept too');
  });
  it('reads the soft limit from /proc/self/limits', () => {
    const n = openFilesLimit()?.soft;
    if (n !== undefined) assert.ok(n > 0);
  });
});

describe('acceptHand', () => {
  it('hands the ports to the refuser at the cap or while the loop lags; takes them back on time with a sixteenth of the cap free', () => {
    const at = (hand: 'proxy' | 'refuser', connections: number, lagging = false, cap = 2000) => acceptHand({ hand, connections, cap, lagging });
    assert.equal(at('proxy', 1999), 'proxy');
    assert.equal(at('proxy', 2000), 'refuser', 'the next connection would be refused');
    assert.equal(at('proxy', 10, true), 'refuser', 'a lagging loop');
    assert.equal(at('refuser', 1999), 'refuser', 'one close at the cap is not room');
    assert.equal(at('refuser', 1876), 'refuser');
    assert.equal(at('refuser', 1875), 'proxy', '2000 - 2000/16');
    assert.equal(at('refuser', 0, true), 'refuser', 'still lagging');
    assert.equal(at('refuser', 1, false, 2), 'proxy', 'a cap of 2: one free');
    assert.equal(at('refuser', 0, false, 1), 'proxy');
    assert.equal(at('refuser', 1, false, 1), 'refuser');
    const afterLag = (connections: number, lagging = false) => acceptHand({ hand: 'refuser', connections, cap: 2000, lagging, handedFor: 'loop_lag' });
    assert.equal(afterLag(1999), 'proxy', 'handed over for a lag: back once it is over, with any room');
    assert.equal(afterLag(2000), 'refuser', 'at the cap');
    assert.equal(afterLag(10, true), 'refuser');
  });
});
