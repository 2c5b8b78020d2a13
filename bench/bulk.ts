// Large-hit throughput with a bulk reader. wrk reads its sockets 8 KiB at a time (RECVBUF in its
// source), so on a 1 MiB object it spends a core on read calls at 1-3 GB/s and measures itself, not the
// proxy. This client reads each socket into one reused 64 KiB buffer (net's `onread`, no allocation per
// read), counts the bytes a Content-Length promised and sends the next request: about a third of the
// core wrk needs for the same bytes. It runs in its own process, pinned like wrk, and reports its own
// CPU share, so a saturated generator is still caught. Same output as wrk's: one summary line.
//
//   node bench/bulk.ts --proxy http://127.0.0.1:3128 --url http://origin/object --connections 64 --seconds 10
import { connect, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { build } from 'hdr-histogram-js';
import { hasTaskset } from './targets.ts';
import { outputOf, type WrkResult } from './wrk.ts';

const READ_BUFFER_BYTES = 64 * 1024;
const HEAD_LIMIT = 64 * 1024;
const END_OF_HEAD = Buffer.from('\r\n\r\n');

interface BulkOptions {
  proxy: string;
  url: string;
  connections: number;
  seconds: number;
}

/** Drive `connections` keep-alive connections for `seconds`; only whole 200 answers count as requests. */
export function bulkLoad(o: BulkOptions): Promise<Omit<WrkResult, 'connections'>> {
  const proxy = new URL(o.proxy);
  const target = new URL(o.url);
  const request = Buffer.from(`GET ${target.href} HTTP/1.1\r\nHost: ${target.host}\r\nUser-Agent: cuttle-bench-bulk\r\n\r\n`, 'latin1');
  // One buffer for every socket: each read is consumed before the next callback runs.
  const buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  const latencyUs = build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: 3 });
  let requests = 0;
  let bytes = 0;
  let errors = 0;
  let measuring = true;
  const sockets = new Set<Socket>();

  const open = (): void => {
    let head = '';
    let left = -1; // body bytes still due; -1 while reading a head
    let sentAt = 0;
    let failed = false;
    const send = (): void => {
      sentAt = performance.now();
      socket.write(request);
    };
    const fail = (): void => {
      failed = true;
      socket.destroy();
    };
    // Count a read's bytes against the head or the body due, and ask again when an answer is whole.
    const consume = (n: number): void => {
      if (measuring) bytes += n;
      let off = 0;
      while (off < n) {
        if (left < 0) {
          // Only the head becomes a string; a head split across reads is joined before parsing.
          const rest = buffer.subarray(off, n);
          const at = (head ? Buffer.concat([Buffer.from(head, 'latin1'), rest]) : rest).indexOf(END_OF_HEAD);
          if (at < 0) {
            head += rest.toString('latin1');
            if (head.length > HEAD_LIMIT) return void fail();
            break;
          }
          const used = at + END_OF_HEAD.length - head.length;
          head += rest.toString('latin1', 0, used);
          const status = /^HTTP\/1\.[01] (\d{3})/.exec(head);
          const length = /\r\ncontent-length:[ \t]*(\d+)/i.exec(head);
          // A body without a length (chunked, or up to close) is not what a cached object is sent as.
          if (status?.[1] !== '200' || !length) return void fail();
          off += used;
          left = Number(length[1]);
          head = '';
        }
        const take = Math.min(left, n - off);
        left -= take;
        off += take;
        if (left === 0) {
          left = -1;
          if (!measuring) return void socket.destroy();
          requests++;
          latencyUs.recordValue(Math.max(1, Math.round((performance.now() - sentAt) * 1000)));
          send();
        }
      }
    };
    const socket = connect({ host: proxy.hostname, port: Number(proxy.port), onread: { buffer, callback: (n) => (consume(n), true) } });
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('connect', send);
    socket.on('error', () => {});
    socket.on('close', () => {
      sockets.delete(socket);
      if (!measuring) return;
      if (failed || left !== -1 || head !== '') errors++; // a bad answer, or one cut short
      open(); // as wrk does: a closed connection is replaced
    });
  };

  return new Promise((resolve) => {
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    for (let i = 0; i < o.connections; i++) open();
    setTimeout(() => {
      measuring = false;
      const wallS = (performance.now() - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      for (const s of sockets) s.destroy();
      resolve({
        reqPerSec: requests / wallS,
        mibPerSec: bytes / 2 ** 20 / wallS,
        errors,
        latencyP50Ms: latencyUs.getValueAtPercentile(50) / 1000,
        latencyP99Ms: latencyUs.getValueAtPercentile(99) / 1000,
        generatorShare: (cpu.user + cpu.system) / 1e6 / wallS,
      });
    }, o.seconds * 1000);
  });
}

/** Run the bulk reader in its own process (pinned to `core` if possible), like runWrk. */
export async function runBulk(o: BulkOptions & { core?: number }): Promise<WrkResult> {
  const args = [fileURLToPath(import.meta.url), '--proxy', o.proxy, '--url', o.url, '--connections', String(o.connections), '--seconds', String(o.seconds)];
  const [cmd, argv]: [string, string[]] = hasTaskset && o.core !== undefined ? ['taskset', ['-c', String(o.core), process.execPath, ...args]] : [process.execPath, args];
  const out = await outputOf('the bulk reader', cmd, argv);
  const json = /BULKJSON (\{.*\})/.exec(out)?.[1];
  if (!json) throw new Error(`no summary from the bulk reader: ${out}`);
  return { connections: o.connections, ...(JSON.parse(json) as Omit<WrkResult, 'connections'>) };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { proxy: { type: 'string' }, url: { type: 'string' }, connections: { type: 'string', default: '64' }, seconds: { type: 'string', default: '10' } } });
  if (!values.proxy || !values.url) throw new Error('usage: node bench/bulk.ts --proxy URL --url URL [--connections N] [--seconds S]');
  const r = await bulkLoad({ proxy: values.proxy, url: values.url, connections: Number(values.connections), seconds: Number(values.seconds) });
  process.stdout.write(`BULKJSON ${JSON.stringify(r)}\n`);
}
