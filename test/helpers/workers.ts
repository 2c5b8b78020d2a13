// A cuttle with --workers 2 as a child process, and what the worker tests aim at: each worker's own
// port (its relay listener: a client sent there reaches that worker), and keys a given worker owns.
import { urlKey } from '../../src/cache-key.ts';
import { workerOf } from '../../src/worker-ring.ts';
import { waitFor } from './mirrors.ts';
import { join } from 'node:path';
import { startChildProxy, tmpDir, type ChildProxy } from './proxy.ts';

export interface Workers2 {
  proxy: ChildProxy;
  /** Each worker's own port (its relay listener), by index. */
  ports: number[];
  admin: string;
  cache: string;
}

/** cuttle with --workers 2 as a child process on a cache dir of its own, named `hostname`; `extra` are more options. */
export async function startWorkers2(extra: string[] = [], hostname = 'w-review'): Promise<Workers2> {
  const cache = join(tmpDir(), 'cache');
  const proxy = await startChildProxy(['--workers', '2', '--listen', '127.0.0.1:0', '--cache-dir', cache, '--log-level', 'info', '--allow-local-dest', '127.0.0.1', '--visible-hostname', hostname, ...extra]);
  return { proxy, ports: await workerPorts(proxy), admin: adminUrl(proxy), cache };
}

/** Each worker's own port, by index (each worker says where it listens; its line may come after the process's). */
export async function workerPorts(proxy: ChildProxy, count = 2): Promise<number[]> {
  const ports: number[] = [];
  await waitFor('every worker to say where it listens', () => {
    for (const line of proxy.stderr().split('\n')) {
      if (!line.includes('"msg":"worker listening"')) continue;
      const j = JSON.parse(line) as { worker: number; listen: { port: number }[] };
      ports[j.worker] = j.listen.at(-1)!.port;
    }
    return ports.filter(Boolean).length === count;
  });
  return ports;
}

/** The admin listener's URL of a child proxy. */
export function adminUrl(proxy: ChildProxy): string {
  return `http://127.0.0.1:${/"admin":\{"address":"127\.0\.0\.1","family":"IPv4","port":(\d+)\}/.exec(proxy.stderr())![1]}`;
}

/** The first path `${base}N` whose key worker `owner` owns (of `count`). */
export function ownedBy(owner: number, originUrl: string, base: string, count = 2): string {
  for (let i = 0; ; i++) {
    const p = `${base}${i}`;
    if (workerOf(urlKey(new URL(`${originUrl}${p}`)), count) === owner) return p;
  }
}
