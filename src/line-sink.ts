// An append-only text sink (the access log file, stdout or stderr) that nothing it meets can turn
// against the process. A write that fails (a full disk, EIO, a pipe nobody reads) or a path that can't
// be opened drops the lines it carried and counts them; the next write tries again, so writing resumes
// by itself when space returns. Memory is bounded (maxBehindBytes), nothing retries in a loop, and
// close() returns within its timeout whatever the file does.
// (pino.destination, SonicBoom, had no 'error' handler here: a full disk threw, and its exit hook then
// retried a failing flushSync forever, so the process ignored SIGTERM and only SIGKILL ended it.)
import fs from 'node:fs';
import { dirname } from 'node:path';
import { within } from './clock.ts';

/** A non-blocking pipe or FIFO that is full (EAGAIN) is tried again after this long. */
const BUSY_RETRY_MS = 100;
// O_NONBLOCK: opening a FIFO nobody reads fails (ENXIO) rather than holding a thread-pool thread,
// which would also hold process.exit (libuv joins its threads at exit). Regular files ignore it.
const OPEN_FLAGS = fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NONBLOCK;

export interface LineSinkOptions {
  /** Bytes that may wait for the file (a stalled disk) before new lines are dropped instead. */
  maxBehindBytes: number;
  /** Called with each group of lines dropped, and why: the error that lost them, or 'behind'. */
  onDrop?: (lines: number, why: Error | 'behind' | 'closed') => void;
  /**
   * Write at most this many bytes at a time (whole lines; a longer line alone). Several writers on one
   * pipe (--workers on stdout or stderr) then never interleave inside a line: a pipe write of up to
   * PIPE_BUF (4096) bytes is atomic.
   */
  atomicBytes?: number;
}

export class LineSink {
  readonly #target: string | number;
  readonly #o: LineSinkOptions;
  #fd: number;
  #pending: string[] = [];
  /** Bytes handed and not yet written or dropped (pending and in flight). */
  #behind = 0;
  /** An open or a write is in flight: one at a time, so lines stay in order. */
  #busy = false;
  #retry: NodeJS.Timeout | undefined;
  /** The unwritten part of the buffer being written, while a busy pipe is retried. */
  #inFlight: Buffer | undefined;
  /** A write failed part-way: the file ends in a cut line, which the next write terminates. */
  #torn = false;
  #reopen = false;
  #closed = false;
  #idle: (() => void)[] = [];
  /** Lines dropped since start. */
  droppedLines = 0;

  /** `target`: a file path (opened for append, created with its directory), or an open fd (1, 2). */
  constructor(target: string | number, o: LineSinkOptions) {
    this.#target = target;
    this.#o = o;
    this.#fd = typeof target === 'number' ? target : -1;
    if (this.#fd < 0) this.#open();
    process.once('exit', this.#atExit);
  }

  /** An exit that skipped close() (a fatal error) still gets what waits: one attempt, never a retry. */
  readonly #atExit = () => {
    if (this.#busy || this.#closed || this.#fd < 0 || this.#pending.length === 0) return;
    try {
      fs.writeSync(this.#fd, (this.#torn ? '\n' : '') + this.#pending.join(''));
    } catch {
      // lost with the process
    }
  };

  /** Hand whole lines (each ending in '\n') to the file. Never throws. */
  write(text: string): void {
    if (this.#closed) return this.#drop(countLines(text), 'closed');
    const bytes = Buffer.byteLength(text);
    if (this.#behind + bytes > this.#o.maxBehindBytes) return this.#drop(countLines(text), 'behind');
    this.#pending.push(text);
    this.#behind += bytes;
    this.#pump();
  }

  /** Write the next lines to a file of the same name (log rotation). Lines handed before may go to either. */
  reopen(): void {
    if (typeof this.#target !== 'number') this.#reopen = true;
    this.#pump();
  }

  /** Resolves once every line handed before it is written or dropped. */
  flush(): Promise<void> {
    if (this.#settled()) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /** Flush for at most `timeoutMs`, then drop what is left and close the file. Later lines are dropped. */
  async close(timeoutMs: number): Promise<void> {
    await within(this.flush(), timeoutMs);
    this.#closed = true;
    process.off('exit', this.#atExit);
    clearTimeout(this.#retry);
    if (this.#inFlight) {
      // A busy pipe being retried: its lines won't be written now.
      this.#drop(countLines(this.#inFlight), 'closed');
      this.#inFlight = undefined;
      this.#busy = false;
    }
    this.#dropPending('closed');
    // A write still in the thread pool (a hung file system) closes its file when it returns.
    if (!this.#busy) this.#closeFd();
    for (const r of this.#idle.splice(0)) r();
  }

  #settled(): boolean {
    return this.#closed || (!this.#busy && this.#pending.length === 0);
  }

  #pump(): void {
    if (this.#busy || this.#closed) return;
    if (this.#reopen) {
      this.#reopen = false;
      this.#closeFd();
    }
    if (this.#pending.length === 0) {
      for (const r of this.#idle.splice(0)) r();
      return;
    }
    if (this.#fd < 0) return this.#open();
    let text: string;
    const cap = this.#o.atomicBytes;
    if (cap === undefined) {
      text = this.#pending.join('');
      this.#pending = [];
    } else {
      let n = 0;
      let bytes = 0;
      // Bytes, not characters: PIPE_BUF counts bytes (a torn line's newline is one more).
      const room = cap - (this.#torn ? 1 : 0);
      while (n < this.#pending.length && (n === 0 || bytes + Buffer.byteLength(this.#pending[n]!) <= room)) bytes += Buffer.byteLength(this.#pending[n++]!);
      text = this.#pending.slice(0, n).join('');
      this.#pending = this.#pending.slice(n);
    }
    const lead = this.#torn ? '\n' : '';
    this.#busy = true;
    this.#writeOut(Buffer.from(lead + text), 0, lead.length);
  }

  #open(): void {
    const path = this.#target as string;
    this.#busy = true;
    fs.mkdir(dirname(path), { recursive: true }, () => {
      fs.open(path, OPEN_FLAGS, 0o644, (err, fd) => {
        this.#busy = false;
        if (this.#closed) {
          if (!err) fs.close(fd, () => {});
          return;
        }
        if (err) {
          // Unopenable (no such directory, no permission): what waits is lost; the next lines try again.
          this.#dropPending(err);
          for (const r of this.#idle.splice(0)) r();
          return;
        }
        this.#fd = fd;
        this.#pump();
      });
    });
  }

  /** Write `buf` from `off`; its first `lead` bytes terminate a line a failed write cut. */
  #writeOut(buf: Buffer, off: number, lead: number): void {
    fs.write(this.#fd, buf, off, buf.length - off, null, (err, n) => {
      if (!err && n > 0) {
        off += n;
        if (off < buf.length) return this.#writeOut(buf, off, lead);
        this.#torn = false;
        return this.#written(buf.length - lead);
      }
      if (err?.code === 'EAGAIN' && !this.#closed) {
        this.#inFlight = buf.subarray(off);
        this.#retry = setTimeout(() => {
          this.#inFlight = undefined;
          this.#writeOut(buf, off, lead);
        }, BUSY_RETRY_MS);
        return;
      }
      // Lost: the rest of this buffer. A line cut part-way counts as lost, and the next write ends it.
      if (off > 0) this.#torn = true;
      this.#drop(countLines(buf.subarray(Math.max(off, lead))), err ?? new Error('write returned 0 bytes'));
      // A path is opened afresh for the next write (a file replaced or a stale handle); an fd is kept.
      if (typeof this.#target !== 'number') this.#closeFd();
      this.#written(buf.length - lead);
    });
  }

  #written(bytes: number): void {
    this.#behind = Math.max(0, this.#behind - bytes);
    this.#busy = false;
    if (this.#closed) return this.#closeFd();
    this.#pump();
  }

  #closeFd(): void {
    if (this.#fd >= 0 && typeof this.#target !== 'number') fs.close(this.#fd, () => {});
    if (typeof this.#target !== 'number') this.#fd = -1;
  }

  /** Drop every line that waits (none is in flight). */
  #dropPending(why: Error | 'closed'): void {
    this.#drop(countLines(this.#pending.join('')), why);
    this.#pending = [];
    this.#behind = 0;
  }

  #drop(lines: number, why: Error | 'behind' | 'closed'): void {
    if (lines === 0) return;
    this.droppedLines += lines;
    this.#o.onDrop?.(lines, why);
  }
}

function countLines(text: string | Buffer): number {
  let n = 0;
  if (typeof text === 'string') for (let i = text.indexOf('\n'); i >= 0; i = text.indexOf('\n', i + 1)) n++;
  else for (let i = text.indexOf(10); i >= 0; i = text.indexOf(10, i + 1)) n++;
  return n;
}
