// Operational logs: pino JSON on stderr. Access lines are not written here (see access-log.ts).
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string): Logger {
  return pino({ level, base: { name: 'cuttle' } }, pino.destination({ dest: 2, sync: false }));
}
