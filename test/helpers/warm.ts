// `cuttle warm` as its users run it: a child process of the real command.
import { spawn } from 'node:child_process';

export interface WarmRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Start `cuttle warm ARGS`: its end, a signal to it (SIGKILL unless named), and its output so far. */
export function startWarm(args: string[]): { done: Promise<WarmRun>; kill: (signal?: NodeJS.Signals) => void; stdout: () => string } {
  const child = spawn(process.execPath, ['src/main.ts', 'warm', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const done = new Promise<WarmRun>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  return { done, kill: (signal = 'SIGKILL') => child.kill(signal), stdout: () => stdout };
}
