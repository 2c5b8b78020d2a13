// Which upstream a fill asks, and in what order it fails over.
//   forward, content-addressed object of a mirror group -> every mirror of the group, nearest healthy first,
//                                                         failing over on errors, 5xx and 404
//   anything else (manifests, API, info)                -> only the mirror the URL names; in accelerator
//                                                         mode that is the repository's sticky mirror, and
//                                                         a failure moves the repository on (the request
//                                                         is then retried under the new mirror's key, so a
//                                                         manifest is never stored under another's URL)
//   a host that is no configured mirror                 -> that host only
// In accelerator mode a content-addressed object tries the sticky mirror first.
// Each mirror is tried at most once per fill, including the Range resumes of a body that broke off.
import type { CasObject } from './content-hash.ts';
import type { Mirror, MirrorGroup, Mirrors } from './mirrors.ts';

export interface Attempt {
  url: URL;
  mirror: Mirror | undefined;
}

export class FetchPlan {
  readonly cas: CasObject | undefined;
  /** The group of the mirror the URL names. */
  readonly group: MirrorGroup | undefined;
  /** Can a failed attempt be followed by another mirror? */
  readonly failover: boolean;
  /** Accelerator mode: the repository whose sticky mirror this is. */
  readonly accelRepo: string | undefined;
  /** A 404 from one mirror is not the answer: another mirror may have the object. */
  readonly retry404: boolean;
  readonly #queue: Attempt[];
  #next = 0;

  constructor(o: { url: URL; cas: CasObject | undefined; mirrors: Mirrors; accelRepo?: string; avoid?: ReadonlySet<string> }) {
    this.cas = o.cas;
    this.accelRepo = o.accelRepo;
    const named = o.mirrors.byHost(o.url.host);
    this.group = named?.group;
    this.failover = named !== undefined && o.cas !== undefined;
    this.retry404 = this.failover;
    if (!this.failover || !named) {
      this.#queue = [{ url: o.url, mirror: named }];
      return;
    }
    let order = named.group.ranked();
    // Accelerator mode sticks to one mirror per repository; the URL already names it.
    if (o.accelRepo !== undefined) order = [named, ...order.filter((m) => m !== named)];
    // Mirrors that just served corrupt bytes for this object go last.
    if (o.avoid?.size) order = [...order.filter((m) => !o.avoid!.has(m.origin)), ...order.filter((m) => o.avoid!.has(m.origin))];
    const rel = `${o.url.pathname}${o.url.search}`;
    this.#queue = order.map((m) => ({ url: m === named ? o.url : new URL(rel, m.origin), mirror: m }));
  }

  /** The next mirror to try, or undefined when every one has been tried. */
  next(): Attempt | undefined {
    return this.#queue[this.#next++];
  }

  get hasMore(): boolean {
    return this.#next < this.#queue.length;
  }
}
