// System tools that some tests drive (curl, chromium, snmpwalk). `.ci/run` installs them; under CI=true a
// missing tool fails the test, elsewhere the test is skipped and names what is missing.
import { spawnSync } from 'node:child_process';
import type { TestContext } from 'node:test';

export function findTool(names: string[]): string | undefined {
  for (const n of names) {
    const r = spawnSync('sh', ['-c', `command -v ${n}`], { encoding: 'utf8' });
    if (r.status === 0 && r.stdout.trim()) return r.stdout.trim();
  }
  return undefined;
}

/** The tool's path, or undefined after skipping the test (outside CI). Throws under CI=true. */
export function requireTool(t: TestContext, names: string[], apt: string): string | undefined {
  const found = findTool(names);
  if (found) return found;
  const why = `${names[0]} is not installed (apt-get install ${apt})`;
  if (process.env.CI === 'true') throw new Error(`${why}; .ci/run should have installed it`);
  t.skip(why);
  return undefined;
}
