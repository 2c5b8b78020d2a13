// npm runs on the machine's Node (20 here), not on the Node 24 it installs: a locked package that asks
// for a newer Node prints EBADENGINE lines on every `npm ci` (issue 33 §2: noise). The lock file says.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { it } from 'node:test';

it('no locked package asks for a Node newer than the npm that installs them (devEngines: Node ≥ 20.17)', () => {
  const lock = JSON.parse(readFileSync('package-lock.json', 'utf8')) as { packages: Record<string, { engines?: { node?: string } | string[] }> };
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { devEngines: { runtime: { version: string } } };
  const npmNode = Number(/(\d+)/.exec(pkg.devEngines.runtime.version)![1]);
  const above: string[] = [];
  for (const [path, p] of Object.entries(lock.packages)) {
    // The root package runs on Node 24 (engines); the node package is Node itself.
    if (path === '' || path === 'node_modules/node') continue;
    const range = !p.engines || Array.isArray(p.engines) ? undefined : p.engines.node;
    const least = range && /^\s*>=?\s*v?(\d+)/.exec(range);
    if (least && Number(least[1]) > npmNode) above.push(`${path} (${range})`);
  }
  assert.deepEqual(above, []);
});
