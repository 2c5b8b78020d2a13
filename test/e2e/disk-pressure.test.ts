// The disk tier under resource pressure: a stored record that can't be opened for want of a file
// descriptor is a 503 for that request (cuttle's own failure, labelled), never a miss that drops the
// record. The pressure is real: this process's descriptor limit is lowered (prlimit on our own pid) and
// the table filled with /dev/null, so the proxy's open() of the record fails with EMFILE; the request
// goes on a connection opened before, and needs no descriptor.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { hashKey } from '../../src/cache-key.ts';
import { waitFor } from '../helpers/mirrors.ts';
import { get, withProxy } from '../helpers/proxy.ts';
import { requireTool } from '../helpers/tools.ts';

/** One response read off a raw keep-alive connection (Content-Length framed, as cuttle answers here). */
function response(sock: Socket): Promise<{ status: number; headers: Record<string, string>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const [statusLine, ...lines] = buf.subarray(0, end).toString('latin1').split('\r\n');
      const headers: Record<string, string> = {};
      for (const l of lines) headers[l.slice(0, l.indexOf(':')).toLowerCase()] = l.slice(l.indexOf(':') + 1).trim();
      const length = Number(headers['content-length']);
      if (buf.length < end + 4 + length) return;
      sock.off('data', onData);
      sock.off('close', onClose);
      resolve({ status: Number(statusLine!.split(' ')[1]), headers, body: buf.subarray(end + 4, end + 4 + length) });
    };
    const onClose = () => reject(new Error(`connection closed after ${buf.length} bytes`));
    sock.on('data', onData);
    sock.on('close', onClose);
  });
}

/** Set this process's soft descriptor limit (the hard one stays). */
function setSoftLimit(prlimit: string, soft: number, hard: number): void {
  const r = spawnSync(prlimit, ['--pid', String(process.pid), `--nofile=${soft}:${hard}`], { stdio: 'ignore' });
  assert.equal(r.status, 0, 'prlimit failed');
}

/**
 * Run `body` with no file descriptor left to open: the limit just above the highest one in use, every
 * free one below it taken by /dev/null. Everything is given back after, whatever `body` does.
 */
async function withoutDescriptors(prlimit: string, body: () => Promise<void>): Promise<void> {
  const limits = /Max open files\s+(\d+)\s+(\d+)/.exec(readFileSync('/proc/self/limits', 'utf8'))!;
  const [soft, hard] = [Number(limits[1]), Number(limits[2])];
  const highest = Math.max(...readdirSync('/proc/self/fd').map(Number));
  setSoftLimit(prlimit, highest + 1 + 16, hard);
  const held: number[] = [];
  try {
    for (;;) {
      try {
        held.push(openSync('/dev/null', 'r'));
      } catch (err) {
        assert.equal((err as NodeJS.ErrnoException).code, 'EMFILE');
        break;
      }
    }
    await body();
  } finally {
    for (const fd of held) closeSync(fd);
    setSoftLimit(prlimit, soft, hard);
  }
}

describe('the disk tier under descriptor exhaustion', () => {
  it('a disk hit that cannot open its record is a labelled 503, and the record stays: the next request is a TCP_HIT', async (t) => {
    const prlimit = requireTool(t, ['prlimit'], 'util-linux');
    if (!prlimit) return;
    // Larger than --max-memory-object-size: the object lives on disk only.
    await withProxy({ 'max-memory-object-size': '64KB' }, async ({ origin, p, pool }) => {
      const body = randomBytes(256 * 1024);
      const url = `${origin.url}/stored`;
      origin.route('/stored', { body, headers: { 'cache-control': 'max-age=600' } });
      assert.ok((await get(pool, url)).body.equals(body));
      await waitFor('stored on disk, its fill gone', () => p.proxy.coalescer.stats.fillsCommitted === 1 && p.proxy.coalescer.running === 0);
      const record = join(p.cacheDir, 'v1', 'objects', hashKey(url).slice(0, 2), hashKey(url));
      assert.ok(existsSync(record));

      const sock = connect(p.port, '127.0.0.1');
      await once(sock, 'connect');
      const request = `GET ${url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`;
      let pressed: Awaited<ReturnType<typeof response>> | undefined;
      await withoutDescriptors(prlimit, async () => {
        const answer = response(sock);
        sock.write(request);
        pressed = await answer;
      });
      assert.equal(pressed!.status, 503);
      assert.match(pressed!.headers['proxy-status'] ?? '', /^cuttle; error=proxy_internal_error/);
      assert.match(pressed!.headers['x-squid-error'] ?? '', /^ERR_READ_ERROR/);
      assert.ok(existsSync(record), 'the record is still on disk');
      assert.equal(p.proxy.counters.corruptRecords, 0, 'not counted as corrupt');

      // The pressure gone, the same record answers on the same connection.
      const answer = response(sock);
      sock.write(request);
      const after = await answer;
      assert.equal(after.status, 200);
      assert.ok(after.body.equals(body));
      assert.equal(origin.count('/stored'), 1, 'one upstream fetch in all');
      await waitFor('both requests logged', () => p.logLines.length === 3);
      assert.match(p.logLines[1]!, / TCP_MISS\/503 /);
      assert.match(p.logLines[2]!, /TCP_HIT\/200/);
      assert.equal(p.logs.filter((l) => /unreadable now/.test(String(l.msg))).length, 1, 'one warning, not an internal error');
      sock.destroy();
    });
  });
});
