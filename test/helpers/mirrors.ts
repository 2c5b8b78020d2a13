// Loopback Stratum 1 mirrors for the mirror tests: emulators serving the same content-addressed objects,
// each with its own latency, that can be stopped and started again on the same port.
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { startEmulator, type Emulator, type EmulatorOptions } from '../../bench/emulator.ts';
import type { Proxy } from '../../src/server.ts';

export const REPO = 'test.cern.ch';

/** Content-addressed bodies: their SHA-1 is their name, as on a real Stratum 1. */
export function casBodies(sizes: number[], suffix = ''): Map<string, Buffer> {
  const m = new Map<string, Buffer>();
  for (const size of sizes) {
    const b = randomBytes(size);
    const h = createHash('sha1').update(b).digest('hex');
    m.set(`/cvmfs/${REPO}/data/${h.slice(0, 2)}/${h.slice(2)}${suffix}`, b);
  }
  return m;
}

export class TestMirror {
  emu!: Emulator;
  port = 0;
  readonly opts: EmulatorOptions;
  constructor(opts: EmulatorOptions) {
    this.opts = opts;
  }
  async start(): Promise<this> {
    this.emu = await startEmulator(this.opts, this.port);
    this.port = this.emu.port;
    return this;
  }
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }
  /** Requests for a path, over every life of this mirror. */
  count(path: string): number {
    return (this.#past[path] ?? 0) + (this.emu.stats.perPath[path] ?? 0);
  }
  #past: Record<string, number> = {};
  async stop(): Promise<void> {
    for (const [p, n] of Object.entries(this.emu.stats.perPath)) this.#past[p] = (this.#past[p] ?? 0) + n;
    this.emu.stats.perPath = {};
    await this.emu.close();
  }
}

export async function startMirrors(bodies: Map<string, Buffer>, latencies: number[], extra: Partial<EmulatorOptions>[] = []): Promise<TestMirror[]> {
  return Promise.all(latencies.map((latencyMs, i) => new TestMirror({ repo: REPO, bodies, latencyMs, ...extra[i] }).start()));
}

/** Poll a condition on the proxy's state, in process or asked over /status (bounded; tests never time, they wait for states). */
export async function waitFor(what: string, cond: () => boolean | Promise<boolean>, limitMs = 15_000): Promise<void> {
  const until = Date.now() + limitMs;
  while (!(await cond())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

export function healthy(proxy: Proxy, url: string): boolean {
  return proxy.mirrors.snapshot().find((m) => m.mirror === url)?.healthy ?? false;
}
