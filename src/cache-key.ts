// Cache keys. The primary key is the normalised absolute URL: lower-case scheme and host, default port
// dropped, path and query byte-exact. A content-addressed CVMFS object (/cvmfs/<repo>/data/...) is keyed
// by its path alone, so a copy fetched through one Stratum 1 is a hit for a client naming another.
// A response with Vary adds the selected request headers.
import { hash } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import { LRUCache } from 'lru-cache';
import { casObject, type CasObject } from './content-hash.ts';

/** Normalise an absolute http URL, or return undefined if it is not one. */
export function normaliseUrl(target: string): URL | undefined {
  let u: URL;
  try {
    u = new URL(target);
  } catch {
    return undefined;
  }
  if (u.protocol !== 'http:' || !u.hostname) return undefined;
  u.hash = '';
  return u; // WHATWG URL already lower-cases scheme/host and drops the default port
}

/** A parsed target with its primary key. Shared between requests: never mutate `url`. */
export interface Target {
  readonly url: URL;
  readonly primary: string;
  readonly cas: CasObject | undefined;
}

// A herd asks for the same few thousand URLs: parse each once (URL parsing is a visible share of a hit).
const targets = new LRUCache<string, Target>({ max: 16384 });

export function parseTarget(raw: string): Target | undefined {
  let t = targets.get(raw);
  if (t) return t;
  const url = normaliseUrl(raw);
  if (!url) return undefined;
  const cas = casObject(url.pathname, url.search);
  t = { url, primary: cas ? cas.key : primaryKey(url), cas };
  targets.set(raw, t);
  return t;
}

/** The key a URL is stored under before Vary when it names no mirror's content-addressed object. */
export function urlKey(u: URL): string {
  return `${u.protocol}//${u.host}${u.pathname}${u.search}`;
}

/** The key a URL is stored under before Vary: its content hash path, or the URL. */
export function primaryKey(u: URL): string {
  return casObject(u.pathname, u.search)?.key ?? urlKey(u);
}

/** The Vary header names of a response, lower-cased; '*' means never cacheable. */
export function varyNames(vary: string | string[] | undefined): string[] {
  if (!vary) return [];
  const s = Array.isArray(vary) ? vary.join(',') : vary;
  return s.split(',').map((v) => v.trim().toLowerCase()).filter(Boolean).sort();
}

export function variantKey(primary: string, names: readonly string[], reqHeaders: IncomingHttpHeaders): string {
  if (names.length === 0) return primary;
  const parts = names.map((n) => {
    const v = reqHeaders[n];
    const value = Array.isArray(v) ? v.join(',') : (v ?? '');
    const lower = LIST_FIELDS.get(n);
    return `${n}:${lower === undefined ? normaliseCommas(value) : normaliseList(value, lower)}`;
  });
  return `${primary}\n${parts.join('\n')}`;
}

// RFC 9111 §4.1: selecting values match after whitespace is added or removed where the field's syntax
// allows it, and after case-normalising values defined as case-insensitive. These list fields have
// whitespace only as OWS around their separators, outside quoted strings; true: their values
// (language tags, codings, charsets) are case-insensitive. Any other field keeps its case and the
// whitespace inside its members; only OWS around its commas goes, as a list's syntax allows (RFC 9110
// §5.6.1: nearly every field with a comma is a list; a recipient already drops OWS at the ends). The
// order of members is never changed (Accept-Language's order may carry priority, RFC 9110 §12.5.4).
const LIST_FIELDS = new Map([
  ['accept', false],
  ['accept-charset', true],
  ['accept-encoding', true],
  ['accept-language', true],
]);

/** Any other field's value: its members trimmed, joined by ", ". */
function normaliseCommas(v: string): string {
  return v.includes(',') ? members(v, (c) => c).map((m) => m.trim()).join(', ') : v.trim();
}

/** A list field's value in one form: members joined by ", ", no other whitespace, no empty member. */
function normaliseList(v: string, lower: boolean): string {
  return members(v, (c) => (c === ' ' || c === '\t' ? '' : lower ? c.toLowerCase() : c))
    .filter(Boolean)
    .join(', ');
}

/** The members of a comma list, split outside quoted strings; `fold` maps each character outside them. */
function members(v: string, fold: (c: string) => string): string[] {
  const out: string[] = [];
  let cur = '';
  let quoted = false;
  for (let i = 0; i < v.length; i++) {
    const c = v[i]!;
    if (quoted) {
      cur += c;
      if (c === '\\' && i + 1 < v.length) cur += v[++i];
      else if (c === '"') quoted = false;
    } else if (c === '"') {
      quoted = true;
      cur += c;
    } else if (c === ',') {
      out.push(cur);
      cur = '';
    } else cur += fold(c);
  }
  out.push(cur);
  return out;
}

/** Fixed-length file-system name of a key. (One-shot crypto.hash: under half of createHash's cost, and it runs on every memory miss.) */
export function hashKey(key: string): string {
  return hash('sha256', key, 'hex');
}
