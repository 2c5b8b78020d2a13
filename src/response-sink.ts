// The response side of a request, as the request path writes it. node's ServerResponse is one; the hit
// lane's LaneResponse (hit-lane.ts) is another, with node's framing on the lane's own socket. The request
// path's steps that both reach (busy, deliverFill, synth, and delivery) use this and nothing more.
import type { OutgoingHttpHeaders } from 'node:http';

export interface ResponseSink {
  readonly destroyed: boolean;
  /** writeHead was called: a status can no longer be chosen. */
  readonly headersSent: boolean;
  readonly writableLength: number;
  readonly writableEnded: boolean;
  /** All of it handed to the kernel. */
  readonly writableFinished: boolean;
  /** The body goes out in chunks (no Content-Length): each write is framed. */
  readonly chunkedEncoding: boolean;
  writeHead(status: number, headers: OutgoingHttpHeaders): unknown;
  flushHeaders(): void;
  write(chunk: Buffer, cb?: (err?: Error | null) => void): boolean;
  end(chunk?: Buffer | string): unknown;
  destroy(): unknown;
  on(event: 'drain' | 'close', fn: () => void): unknown;
  once(event: 'close', fn: () => void): unknown;
  off(event: 'drain' | 'close', fn: () => void): unknown;
}

/**
 * Bytes of the response head written (the access log's bytes field counts them): the lane's response
 * counts its own, node's ServerResponse keeps its serialized head (`_header`, written as latin1), so
 * neither costs a serialization.
 */
/**
 * Bytes of chunked framing (the access log's bytes field counts them, as Squid's): a body write of `n`
 * bytes adds its hex size and two CRLFs, the end the last chunk (`0` CRLF CRLF); nothing unless chunked.
 */
export function framingOf(res: ResponseSink, n: number | 'end'): number {
  if (!res.chunkedEncoding) return 0;
  return n === 'end' ? 5 : n === 0 ? 0 : n.toString(16).length + 4;
}

export function headBytesOf(res: ResponseSink): number {
  const r = res as ResponseSink & { headBytes?: number; _header?: unknown };
  return r.headBytes ?? (typeof r._header === 'string' ? r._header.length : 0);
}
