// One worker thread of --workers (src/workers.ts starts them): a whole proxy on the shared ports, with
// its share of the process's bounds, that owns the keys worker-ring.ts gives it and relays the others
// to their owners. It talks to the main thread only through the messages below.
import { parentPort, workerData } from 'node:worker_threads';
import { buildConfig } from './config.ts';
import { createLogger } from './log.ts';
import { createProxy } from './server.ts';
import { workerShare, type ToMain, type ToWorker, type WorkerData } from './workers.ts';

const data = workerData as WorkerData;
const port = parentPort!;
const post = (m: ToMain) => port.postMessage(m);

async function start(): Promise<void> {
  const cfg = buildConfig(workerShare(data.raw, data.index, data.count));
  const log = createLogger(cfg.logLevel, true).child({ worker: data.index });
  const proxy = await createProxy(cfg, { logger: log, worker: { index: data.index, count: data.count } });
  // A key this worker forgot is forgotten by every other before the request that forgot it is answered.
  let forgetId = 0;
  const forgetting = new Map<number, (found: boolean) => void>();
  proxy.onForget = (key) =>
    new Promise<boolean>((resolve) => {
      const id = ++forgetId;
      forgetting.set(id, resolve);
      post({ type: 'forget', key, id });
    });
  port.on('message', (m: ToWorker) => {
    switch (m.type) {
      case 'workers':
        proxy.hierarchy.setWorkers(data.index, m.relays, data.token);
        break;
      case 'forget':
        void proxy.forget(m.key).then(
          (found) => post({ type: 'forgot', id: m.id, found }),
          () => post({ type: 'forgot', id: m.id, found: false }),
        );
        break;
      case 'forgot':
        forgetting.get(m.id)?.(m.found);
        forgetting.delete(m.id);
        break;
      case 'reload':
        proxy.reload(buildConfig(workerShare(m.raw, data.index, data.count)));
        break;
      case 'reopen':
        proxy.reopenLogs();
        break;
      case 'drain':
        if (m.on) proxy.drain.start();
        else proxy.drain.cancel();
        break;
      case 'report':
        void proxy.report().then(
          (r) => post({ type: 'report', id: m.id, status: { ...r.status, worker: data.index }, metrics: r.metrics }),
          (err: Error) => post({ type: 'report', id: m.id, status: { error: err.message }, metrics: '' }),
        );
        break;
      case 'close':
        void proxy.close(m.timeoutMs).then(() => {
          log.flush();
          post({ type: 'closed' });
          port.close();
        });
        break;
    }
  });
  await proxy.listen();
  const relay = proxy.addresses().at(-1)!;
  post({ type: 'ready', relay: `http://127.0.0.1:${relay.port}` });
}

start().catch((err: Error) => {
  post({ type: 'failed', message: err.message });
  port.close();
});
