// What is in force and what a reload changes live: the access rules, the mirror groups (with their
// probe settings and prober), and the options. The rest (listeners, tiers, sizes) needs a restart.
import { compileAcl, type Acl } from './acl.ts';
import { reloaded, type Config } from './config.ts';
import type { Logger } from './log.ts';
import { Mirrors, Prober, type ProbeFn } from './mirrors.ts';

export class LiveConfig {
  /** The start configuration, with what reloads changed live. */
  #config: Config;
  #acl: Acl;
  #mirrors: Mirrors;
  #prober: Prober;
  readonly #probe: ProbeFn;
  readonly #log: Logger;
  /** Told of the new mirror groups when a reload replaces them. */
  onMirrors: (fresh: Mirrors) => void = () => {};

  constructor(cfg: Config, log: Logger, probe: ProbeFn) {
    this.#config = cfg;
    this.#acl = compileAcl(cfg);
    this.#log = log;
    this.#probe = probe;
    this.#mirrors = new Mirrors(cfg.mirrorGroups, cfg.probe, log);
    this.#prober = new Prober(this.#mirrors, probe);
  }

  /** The access rules in force (a function, so holders see each reload's). */
  readonly acl = (): Acl => this.#acl;

  /** The mirror groups in force. */
  get mirrors(): Mirrors {
    return this.#mirrors;
  }

  startProbing(): void {
    this.#prober.start();
  }

  stopProbing(): void {
    this.#prober.stop();
  }

  /** Apply a new, already validated configuration; `probing`: whether the new groups' prober starts now. */
  reload(next: Config, probing: boolean): void {
    const log = this.#log;
    this.#acl = compileAcl(next);
    const current = this.#config;
    if (JSON.stringify(next.mirrorGroups) !== JSON.stringify(current.mirrorGroups) || JSON.stringify(next.probe) !== JSON.stringify(current.probe)) {
      const fresh = new Mirrors(next.mirrorGroups, next.probe, log);
      fresh.carryOver(this.#mirrors); // a mirror that stays keeps its health, RTT and sticky repositories
      this.#prober.stop();
      this.#mirrors = fresh;
      this.onMirrors(fresh);
      this.#prober = new Prober(fresh, this.#probe);
      if (probing) this.#prober.start();
      log.info({ groups: next.mirrorGroups }, 'reload: mirror groups replaced');
    }
    const r = reloaded(current, next);
    if (r.needRestart.length) log.warn({ options: r.needRestart }, `reload: ${r.needRestart.join(', ')} take${r.needRestart.length === 1 ? 's' : ''} effect only after a restart`);
    this.#config = r.config;
    log.info('configuration reloaded');
  }
}
