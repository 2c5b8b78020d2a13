// The host's TCP buffer memory during a run. A herd of 1,000 nodes on one host keeps both ends of every
// connection in this kernel: the nodes' receive queues grow while the generator reads slowly, and past
// net.ipv4.tcp_mem the kernel prunes and drops segments. Connections then recover by retransmission
// timeouts, and wall time, latency and even the proxy's CPU measure that, not the proxy. The bench
// reports it beside the figures it spoils. Linux only; elsewhere every figure is undefined.
import { readFileSync } from 'node:fs';
import { readSomaxconn } from '../src/overload.ts';

export interface KernelTcp {
  /** Peak of the TCP memory in use on the host (all sockets), MiB. */
  peakMemMiB: number;
  /** Times the host entered TCP memory pressure. */
  memoryPressures: number;
  /** Segments dropped by receivers (queue full or pruned, in order or not). */
  receiveDrops: number;
  /** Retransmission timeouts. */
  timeouts: number;
  /** Segments sent again. */
  retransmits: number;
  /** Connections the kernel could not queue for accept (the listen backlog was full), and all drops there. */
  listenOverflows: number;
  listenDrops: number;
}

type Counters = Omit<KernelTcp, 'peakMemMiB'>;

/** "Prefix: name name ...\nPrefix: value value ..." pairs, as in /proc/net/netstat and /proc/net/snmp. */
function readPairs(path: string): Map<string, number> {
  const out = new Map<string, number>();
  const lines = readFileSync(path, 'utf8').trim().split('\n');
  for (let i = 0; i + 1 < lines.length; i += 2) {
    const names = lines[i]!.split(/\s+/);
    const values = lines[i + 1]!.split(/\s+/);
    for (let j = 1; j < names.length; j++) out.set(`${names[0]}${names[j]}`, Number(values[j]));
  }
  return out;
}

function counters(): Counters | undefined {
  try {
    const c = new Map([...readPairs('/proc/net/netstat'), ...readPairs('/proc/net/snmp')]);
    const get = (k: string) => c.get(k) ?? 0;
    return {
      memoryPressures: get('TcpExt:TCPMemoryPressures'),
      receiveDrops: get('TcpExt:TCPRcvQDrop') + get('TcpExt:TCPOFODrop') + get('TcpExt:TCPBacklogDrop'),
      timeouts: get('TcpExt:TCPTimeouts'),
      retransmits: get('Tcp:RetransSegs'),
      listenOverflows: get('TcpExt:ListenOverflows'),
      listenDrops: get('TcpExt:ListenDrops'),
    };
  } catch {
    return undefined;
  }
}

const PAGE_BYTES = 4096;

/** TCP memory in use on the host now, MiB (/proc/net/sockstat counts it in pages). */
function memMiB(): number {
  try {
    const m = /^TCP:.*\bmem (\d+)/m.exec(readFileSync('/proc/net/sockstat', 'utf8'));
    return m ? (Number(m[1]) * PAGE_BYTES) / 2 ** 20 : NaN;
  } catch {
    return NaN;
  }
}

/** Start watching; stop() returns what happened since. Sampled every 250 ms for the peak. */
export function watchKernelTcp(): { stop(): KernelTcp | undefined } {
  const before = counters();
  let peak = memMiB();
  const timer = setInterval(() => (peak = Math.max(peak, memMiB())), 250);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
      const after = counters();
      if (!before || !after) return undefined;
      peak = Math.max(peak, memMiB());
      return {
        peakMemMiB: peak,
        memoryPressures: after.memoryPressures - before.memoryPressures,
        receiveDrops: after.receiveDrops - before.receiveDrops,
        timeouts: after.timeouts - before.timeouts,
        retransmits: after.retransmits - before.retransmits,
        listenOverflows: after.listenOverflows - before.listenOverflows,
        listenDrops: after.listenDrops - before.listenDrops,
      };
    },
  };
}

/** A line for stderr when the kernel dropped segments or ran short of TCP memory during the run. */
export function kernelTcpWarning(k: KernelTcp | undefined): string | undefined {
  if (!k) return undefined;
  const out: string[] = [];
  if (k.memoryPressures > 0 || k.receiveDrops > 0) out.push(`  kernel TCP: ${k.memoryPressures} memory-pressure episodes, ${k.receiveDrops} segments dropped by receivers, ${k.timeouts} retransmission timeouts (peak ${k.peakMemMiB.toFixed(0)} MiB of TCP memory against net.ipv4.tcp_mem): wall time and latency include loss recovery\n`);
  // A connection the accept queue had no room for looks connected to its client, whose request then
  // waits for the kernel's SYN-ACK retries (1 s, 3 s, 7 s): watchdog trips that are the host's doing.
  if (k.listenOverflows > 0) out.push(`  kernel TCP: ${k.listenOverflows} connections overflowed a listen queue (net.core.somaxconn is ${somaxconn()}): their first bytes waited for SYN-ACK retries; raise it for herds this large\n`);
  return out.length ? out.join('') : undefined;
}

/** The kernel's cap on every listen backlog (NaN where it can't be read). */
export function somaxconn(): number {
  return readSomaxconn() ?? NaN;
}
