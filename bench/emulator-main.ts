// The emulator as a child process of bench/wan.ts (inside a network namespace, or on loopback):
//   node bench/emulator-main.ts '<json of EmulatorChildSpec>'
// It rebuilds the catalog's bodies from the seed (makeCatalog is deterministic), listens, and writes one
// line `{"port":N}` to stdout. It stops on SIGTERM/SIGINT or when its stdin closes (the parent is gone).
import { makeCatalog, startEmulator, type CatalogOptions, type EmulatorOptions } from './emulator.ts';

export type EmulatorChildSpec = Omit<EmulatorOptions, 'repo' | 'bodies' | 'corruptPaths'> & {
  catalog: CatalogOptions;
  corruptPaths?: string[];
  host: string;
  port?: number;
};

const spec = JSON.parse(process.argv[2] ?? '') as EmulatorChildSpec;
const { catalog, corruptPaths, host, port, ...knobs } = spec;
const { bodies } = makeCatalog(catalog);
const emu = await startEmulator({ ...knobs, repo: catalog.repo, bodies, corruptPaths: corruptPaths && new Set(corruptPaths) }, port ?? 0, host);
let stopping = false;
const stop = () => {
  if (stopping) return;
  stopping = true;
  void emu.close().then(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop).on('error', stop).resume();
process.stdout.write(`${JSON.stringify({ port: emu.port })}\n`);
