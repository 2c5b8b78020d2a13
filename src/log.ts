// Operational logs: pino JSON on stderr. Access lines are not written here (see access-log.ts).
// stderr is a sink like any other: a full disk or a closed pipe behind it loses log lines, never the
// process (line-sink.ts), and nothing at exit retries a write that fails.
import { pino, type Logger } from 'pino';
import { LineSink } from './line-sink.ts';

export type { Logger };

/** What stderr may fall behind by before log lines are dropped. */
const MAX_BEHIND_BYTES = 4 * 2 ** 20;

/** `shared`: other workers of this process log to the same stderr (--workers): writes stay within PIPE_BUF. */
export function createLogger(level: string, shared = false): Logger {
  const sink = new LineSink(2, { maxBehindBytes: MAX_BEHIND_BYTES, atomicBytes: shared ? 4096 : undefined });
  // pino's logger.flush(cb) calls the stream's flush(cb).
  const stream = { write: (line: string) => sink.write(line), flush: (cb: () => void) => void sink.flush().then(cb) };
  return pino({ level, base: { name: 'cuttle' } }, stream);
}
