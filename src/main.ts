// The command line: parse, validate, start, and own the process (signals, exit codes).
import { raiseOpenFilesLimit } from './process-setup.ts';
import { alive } from './store-disk.ts';
import { ConfigError } from './errors.ts';
import { buildConfig, formatSize, helpText, loadConfig, parseCli, rawOptions, type Cli, type Config } from './config.ts';
import { createLogger } from './log.ts';
import { startWorkers, type WorkerSet } from './workers.ts';
import { VERSION } from './version.ts';
import { createProxy } from './server.ts';
import { LOG_CLOSE_MIN_MS } from './shutdown.ts';
import { within } from './clock.ts';
import type { Logger } from './log.ts';
import { checkHost } from './preflight.ts';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { importSquidText } from './import-squid.ts';
import { warmMain } from './warm.ts';
import { health } from './health.ts';

/** How long past --shutdown-timeout (and the log's last write) a stop may take before the process just exits. */
const STOP_GRACE_MS = 5000;

/**
 * --pid-file, exclusive as Squid's pid_filename: created with O_EXCL, so a second cuttle never
 * overwrites a live one's (logrotate's signal would then go nowhere). A file naming another live
 * process refuses the start; one whose process is gone (kill -9, a crash) is taken over, with a note
 * in the log. On exit it is removed only while it still holds our pid. Both start paths (one event
 * loop, --workers) hold it through these three functions.
 */
let heldPidFile: { path: string; stale: string | undefined } | undefined;

/** Take the pid file, or say on stderr why not (false). */
function claimPidFile(path: string): boolean {
  let stale: string | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      writeFileSync(path, `${process.pid}\n`, { flag: 'wx' });
      heldPidFile = { path, stale };
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        process.stderr.write(`cuttle: cannot write pid-file ${path}: ${(err as Error).message}\n`);
        return false;
      }
    }
    let text;
    try {
      text = readFileSync(path, 'utf8').trim();
    } catch {
      continue; // removed meanwhile: create it again
    }
    const pid = Number(text);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) {
      process.stderr.write(`cuttle: pid-file ${path} names pid ${pid}, which is running (another cuttle?); stop it first, or give this one another --pid-file\n`);
      return false;
    }
    stale = text;
    rmSync(path, { force: true });
  }
  process.stderr.write(`cuttle: cannot take pid-file ${path}: it keeps coming back\n`);
  return false;
}

/** Remove our pid file, unless it names another process by now; a failure is reported, never fatal (cuttle is stopping anyway). */
function releasePidFile(log: Logger | undefined): void {
  if (!heldPidFile) return;
  const { path } = heldPidFile;
  heldPidFile = undefined;
  const warn = (fields: Record<string, unknown>, msg: string): void => {
    if (log) log.warn({ pidFile: path, ...fields }, msg);
    else process.stderr.write(`cuttle: ${msg}: ${path}\n`);
  };
  let text;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') warn({ err: (err as Error).message }, 'cannot remove the pid file');
    return;
  }
  if (text !== String(process.pid)) return warn({ holds: text }, 'the pid file names another process now; left in place');
  try {
    rmSync(path, { force: true });
  } catch (err) {
    warn({ err: (err as Error).message }, 'cannot remove the pid file');
  }
}

async function main(argv: string[]): Promise<number> {
  if (argv[0] === 'warm') {
    // A stop (SIGINT, SIGTERM, a unit's stop) ends the walk where it is: completed catalogs are on disk.
    const ac = new AbortController();
    for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => ac.abort());
    return warmMain(argv.slice(1), ac.signal);
  }
  if (argv[0] === 'health') {
    const r = await health(argv.slice(1));
    (r.status === 0 ? process.stdout : process.stderr).write(`${r.line}\n`);
    return r.status;
  }
  if (argv[0] === 'import-squid') {
    const force = argv[1] === '--force';
    const file = argv[force ? 2 : 1];
    if (file === undefined || argv.length !== (force ? 3 : 2)) {
      process.stderr.write('usage: cuttle import-squid [--force] /etc/squid/squid.conf > cuttle.yaml\n');
      return 2;
    }
    let text;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      process.stderr.write(`cuttle: ${(err as Error).message}\n`);
      return 2;
    }
    const out = importSquidText(text, file, force);
    process.stdout.write(out.stdout);
    process.stderr.write(out.stderr);
    return out.status;
  }
  let cli;
  let cfg;
  try {
    cli = parseCli(argv);
    if (cli.help) {
      process.stdout.write(`${helpText()}\n`);
      return 0;
    }
    if (cli.version) {
      process.stdout.write(`cuttle ${VERSION}\n`);
      return 0;
    }
    cfg = loadConfig(cli);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`cuttle: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  if (cli.checkConfig) {
    const host = await checkHost(cfg);
    if (host.problems.length) {
      process.stderr.write(`cuttle: the configuration is valid, but this host can't run it:\n  ${host.problems.join('\n  ')}\n`);
      return 1;
    }
    process.stdout.write(`configuration OK\n${summary(cfg)}${host.notes.map((n) => `  note:      ${n}\n`).join('')}`);
    return 0;
  }
  // Before the listeners read it: they cap client connections by what it leaves (overload.ts), and
  // warn when that is below --max-client-connections.
  raiseOpenFilesLimit();
  // Before anything is opened or bound, as Squid does: a second cuttle stops here, naming the first.
  if (cfg.pidFile !== 'none' && !claimPidFile(cfg.pidFile)) return 1;
  // SO_REUSEPORT spreads connections over the workers' sockets on Linux only (elsewhere one socket of
  // the group would get them all, or the listen fails).
  if (cfg.workers > 1 && process.platform === 'linux') return runWorkers(cfg, cli);
  let proxy;
  try {
    proxy = await createProxy(cfg);
  } catch (err) {
    process.stderr.write(`cuttle: ${(err as Error).message}\n`);
    return 1;
  }
  const p = proxy;
  const c = cli;
  ownProcess({
    log: p.log,
    shutdownTimeoutMs: () => p.config.shutdownTimeoutMs,
    close: () => p.close(),
    reload: () => p.reload(loadConfig(c)),
    reopenLogs: () => p.reopenLogs(),
  });
  // Listening comes last: once a client (or a supervisor reading the log) can see cuttle, its signals
  // are handled.
  try {
    await p.listen();
  } catch (err) {
    // Any listener that can't be bound (the admin or SNMP port, a second --listen) is fatal: close
    // what was opened and exit non-zero, so systemd and the admin see the failure.
    process.stderr.write(`cuttle: ${(err as Error).message}\n`);
    await p.close(0).catch(() => {});
    releasePidFile(p.log);
    return 1;
  }
  return -1; // keep running
}

/** --workers N: the main thread owns the process, the workers serve (src/workers.ts). */
async function runWorkers(cfg: Config, cli: Cli): Promise<number> {
  const log = createLogger(cfg.logLevel, true);
  let set: WorkerSet;
  try {
    set = await startWorkers(cfg, rawOptions(cli), log);
  } catch (err) {
    process.stderr.write(`cuttle: ${(err as Error).message}\n`);
    return 1;
  }
  ownProcess({
    log,
    shutdownTimeoutMs: () => cfg.shutdownTimeoutMs,
    close: () => set.close(cfg.shutdownTimeoutMs),
    reload: () => {
      const next = rawOptions(cli);
      buildConfig(next); // a bad file is rejected here, before any worker sees it
      set.reload(next);
    },
    reopenLogs: () => set.reopenLogs(),
  });
  return -1;
}

/** The signals, and the stop: SIGTERM/SIGINT drain and exit, SIGHUP reloads, SIGUSR1 reopens the access log. */
function ownProcess(o: { log: Logger; shutdownTimeoutMs: () => number; close: () => Promise<void>; reload: () => void; reopenLogs: () => void }): void {
  if (heldPidFile?.stale !== undefined) o.log.warn({ pidFile: heldPidFile.path, stalePid: heldPidFile.stale }, 'took over a stale pid file: the process it names is gone');
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    const timeoutMs = o.shutdownTimeoutMs();
    o.log.info({ signal: sig, timeoutMs }, 'draining, then shutting down');
    // close() is bounded; this is the backstop should anything it waits for (a sink, a socket) never
    // answer: a stop that hangs would leave only SIGKILL.
    setTimeout(() => {
      process.stderr.write(`cuttle: shutdown still not finished ${LOG_CLOSE_MIN_MS + STOP_GRACE_MS} ms past --shutdown-timeout; exiting\n`);
      process.exit(1);
    }, timeoutMs + LOG_CLOSE_MIN_MS + STOP_GRACE_MS).unref();
    void o.close().then(async () => {
      releasePidFile(o.log);
      o.log.info('stopped');
      await within(new Promise<void>((r) => o.log.flush(() => r())), LOG_CLOSE_MIN_MS);
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  // npm (npm start, npx) signals only its own child; a shell between npm and node dies on SIGTERM and
  // leaves cuttle re-parented, still listening. So under npm, the parent's exit stops cuttle too.
  if (process.env.npm_command) {
    const parent = process.ppid;
    setInterval(() => {
      if (process.ppid !== parent) stop('parent exited');
    }, 1000).unref();
  }
  process.on('SIGINT', () => stop('SIGINT'));
  // SIGHUP: reload; a bad file is rejected with its problems and the old configuration stays.
  process.on('SIGHUP', () => {
    try {
      o.reload();
    } catch (err) {
      o.log.error({ problems: err instanceof ConfigError ? err.problems : [(err as Error).message] }, 'reload rejected; keeping the running configuration');
    }
  });
  process.on('SIGUSR1', () => {
    o.reopenLogs();
    o.log.info('access log reopened');
  });
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) releasePidFile(undefined); // a start that failed after the claim
    if (code > 0) process.exit(code);
    if (code === 0) process.exitCode = 0;
  },
  (err) => {
    process.stderr.write(`cuttle: fatal: ${(err as Error).stack ?? err}\n`);
    releasePidFile(undefined);
    process.exit(1);
  },
);

/** What --check-config confirms, one line per concern, so an admin sees what the file means. */
function summary(cfg: Config): string {
  const addr = (a: { host: string; port: number } | 'none') => (a === 'none' ? 'off' : `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`);
  const lines = [
    `  proxy:     ${cfg.listen.map(addr).join(', ')}${cfg.accel ? ' (also accelerator mode)' : ''}`,
    `  admin:     ${addr(cfg.adminListen)}`,
    `  accel:     ${addr(cfg.accelListen)}`,
    `  snmp:      ${addr(cfg.snmpListen)}`,
    `  cache:     ${cfg.cacheDir}, disk ${formatSize(cfg.diskCacheBytes)}, memory ${formatSize(cfg.memoryCacheBytes)}`,
    `  stratum1:  ${cfg.mirrorGroups.length ? cfg.mirrorGroups.map((g) => `${g.name} [${g.mirrors.join(' ')}]`).join('; ') : 'none (every miss goes to the host the client names)'}`,
    `  clients:   ${cfg.allowClient.map((c) => `${c.address}/${c.prefix}`).join(' ')}`,
  ];
  return `${lines.join('\n')}\n`;
}
