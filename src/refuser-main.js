// The refuser's thread (src/refuser.ts starts it): while the proxy is full, it holds the client ports
// in the proxy's place and answers each new connection with the proxy's labelled 503 at once. Its loop
// does nothing else, so a refusal never waits behind the proxy's own turns. It starts when the proxy is
// full, so it must listen within milliseconds: plain JavaScript and node:net only (a .ts file costs a
// new thread 70 ms of type-stripping set-up; this one listens 40 ms after it is asked). tsc checks it
// (checkJs) against refuser.ts's ToRefuser and FromRefuser.
import { createServer } from 'node:net';
import { parentPort } from 'node:worker_threads';

const port = /** @type {import('node:worker_threads').MessagePort} */ (parentPort);
/** @param {import('./refuser.ts').FromRefuser} m */
const post = (m) => port.postMessage(m);

/** Refusals logged per report (every REPORT_MS); past it they are counted, not logged one by one. */
const MAX_RECORDS = 4096;
const REPORT_MS = 100;

/** @type {import('node:net').Server[]} */
let servers = [];
let answer = Buffer.alloc(0);
/** Connections open at once (each until its 503 is written): past it, reset. */
let maxOpen = 0;
let open = 0;
let refused = 0;
/** @type {[string, number][]} */
let records = [];

/** @param {import('node:net').Socket} sock */
function take(sock) {
  // A peer that reset before the connection was taken has no address, as in the proxy (listeners.ts).
  if (open >= maxOpen || sock.remoteAddress === undefined) return void sock.destroy();
  open++;
  refused++;
  if (records.length < MAX_RECORDS) records.push([sock.remoteAddress, Date.now()]);
  sock.once('close', () => open--);
  sock.on('error', () => sock.destroy());
  // As the proxy's own refusals (forward.ts endWithError): the answer, then the close once it is written;
  // what the client sent is read and dropped meanwhile.
  sock.once('finish', () => sock.destroy());
  sock.end(answer);
  sock.resume();
}

function report() {
  if (refused === 0) return;
  post({ type: 'refused', count: refused, records });
  refused = 0;
  records = [];
}

setInterval(report, REPORT_MS);

/** @returns {Promise<import('node:net').Server>} */
function listen(/** @type {string} */ host, /** @type {number} */ portNo, /** @type {number} */ backlog) {
  return new Promise((resolve, reject) => {
    const srv = createServer(take);
    srv.once('error', reject);
    srv.listen({ host, port: portNo, backlog, reusePort: true }, () => {
      srv.off('error', reject);
      // A failed accept (EMFILE) is an 'error' of a server that goes on listening: not the thread's end.
      srv.on('error', () => {});
      resolve(srv);
    });
  });
}

port.on('message', (/** @type {import('./refuser.ts').ToRefuser} */ m) => {
  switch (m.type) {
    case 'open':
      answer = Buffer.from(m.answer);
      maxOpen = m.maxOpen;
      void Promise.allSettled(m.addrs.flatMap(({ host, port: p }) => Array.from({ length: m.sockets }, () => listen(host, p, m.backlog)))).then((all) => {
        const failed = all.find((r) => r.status === 'rejected');
        const ok = all.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
        if (!failed) return void ((servers = ok), post({ type: 'listening' }));
        for (const s of ok) s.close();
        post({ type: 'failed', message: String(failed.reason?.message ?? failed.reason) });
      });
      break;
    case 'answer':
      answer = Buffer.from(m.answer);
      break;
    case 'close':
      // Its accept queues: with net.ipv4.tcp_migrate_req=1 the kernel moves them to the proxy's sockets.
      for (const s of servers) s.close();
      servers = [];
      report();
      post({ type: 'closed' });
      break;
  }
});
