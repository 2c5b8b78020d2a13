// An optional SNMP agent (--snmp-listen, off by default; UDP 3401 as Squid's) serving the part of Squid's
// MIB (enterprise 1.3.6.1.4.1.3495) that WLCG's MRTG monitoring polls: request and hit counts, bytes in
// and out, cache size and uptime. v1/v2c with a community string (--snmp-community); packets from
// outside --allow-snmp are dropped unanswered, as Squid's snmp_access deny does. net-snmp does the
// protocol; this file only maps cuttle's counters onto the MIB.
import dgram from 'node:dgram';
import { BlockList, isIP } from 'node:net';
import snmp from 'net-snmp';
import type { Cidr } from './cidr.ts';
import type { ListenAddr } from './config.ts';
import { figureAt, type Figures } from './counters.ts';
import type { Logger } from './log.ts';

const SQUID = '1.3.6.1.4.1.3495'; // enterprises.nlanr; the table's OIDs start with squid(1)

export interface SnmpSources {
  uptimeMs(): number;
  /** The counter table's figures, at their /status paths. */
  figures(): Figures;
  version: string;
}

type Kind = 'counter' | 'gauge' | 'integer' | 'ticks' | 'string';

const KB = (n: number) => Math.floor(n / 1024);
const MB = (n: number) => Math.floor(n / 1024 / 1024);
const C32 = (n: number) => Math.floor(n) % 2 ** 32; // Counter32 wraps, as the MIB says

/** The objects served: OID under the squid subtree, Squid's name, type, value (from the table's figures). */
function table(src: SnmpSources): [string, string, Kind, (f: Figures) => number | string][] {
  const cpu = () => {
    const u = process.cpuUsage();
    return Math.floor((u.user + u.system) / 1e6);
  };
  const n = (f: Figures, ...paths: string[]) => paths.reduce((sum, p) => sum + ((figureAt(f, p) as number | undefined) ?? 0), 0);
  return [
    ['1.1.1.0', 'cacheSysVMsize', 'integer', (f) => KB(n(f, 'tiers.memory.bytes'))],
    ['1.1.2.0', 'cacheSysStorage', 'integer', (f) => KB(n(f, 'tiers.disk.bytes'))],
    ['1.1.3.0', 'cacheUptime', 'ticks', () => Math.floor(src.uptimeMs() / 10)],
    ['1.2.2.0', 'cacheSoftware', 'string', () => 'cuttle'],
    ['1.2.3.0', 'cacheVersionId', 'string', () => src.version],
    ['1.2.5.1.0', 'cacheMemMaxSize', 'integer', (f) => MB(n(f, 'tiers.memory.maxBytes'))],
    ['1.2.5.2.0', 'cacheSwapMaxSize', 'integer', (f) => MB(n(f, 'tiers.disk.maxBytes'))],
    ['1.3.1.3.0', 'cacheMemUsage', 'integer', () => KB(process.memoryUsage.rss())],
    ['1.3.1.4.0', 'cacheCpuTime', 'integer', cpu],
    ['1.3.1.6.0', 'cacheMaxResSize', 'integer', () => process.resourceUsage().maxRSS],
    ['1.3.1.7.0', 'cacheNumObjCount', 'gauge', (f) => n(f, 'tiers.memory.objects', 'tiers.disk.objects')],
    ['1.3.2.1.1.0', 'cacheProtoClientHttpRequests', 'counter', (f) => C32(n(f, 'counters.requests'))],
    ['1.3.2.1.2.0', 'cacheHttpHits', 'counter', (f) => C32(n(f, 'counters.hits'))],
    ['1.3.2.1.3.0', 'cacheHttpErrors', 'counter', (f) => C32(n(f, 'counters.errors', 'counters.denied'))],
    ['1.3.2.1.5.0', 'cacheHttpOutKb', 'counter', (f) => C32(KB(n(f, 'counters.bytesOut')))],
    ['1.3.2.1.10.0', 'cacheServerRequests', 'counter', (f) => C32(n(f, 'upstream.fetches'))],
    ['1.3.2.1.11.0', 'cacheServerErrors', 'counter', (f) => C32(n(f, 'fills.fillsFailed'))],
    ['1.3.2.1.12.0', 'cacheServerInKb', 'counter', (f) => C32(KB(n(f, 'upstream.bytes')))],
    ['1.3.2.1.14.0', 'cacheCurrentSwapSize', 'gauge', (f) => KB(n(f, 'tiers.disk.bytes'))],
    ['1.3.2.1.15.0', 'cacheClients', 'gauge', (f) => n(f, 'clientConnections')],
  ];
}

const TYPES: Record<Kind, number> = {
  counter: snmp.ObjectType.Counter32,
  gauge: snmp.ObjectType.Gauge32,
  integer: snmp.ObjectType.Integer,
  ticks: snmp.ObjectType.TimeTicks,
  string: snmp.ObjectType.OctetString,
};

export interface SnmpAgent {
  port: number;
  /** Packets dropped because the sender is outside --allow-snmp. */
  denied: number;
  close(): Promise<void>;
}

export async function startSnmpAgent(o: { listen: ListenAddr; community: string; allow: readonly Cidr[]; sources: SnmpSources; log: Logger }): Promise<SnmpAgent> {
  const allow = new BlockList();
  for (const c of o.allow) allow.addSubnet(c.address, c.prefix, c.family);
  const allowed = (addr: string) => allow.check(addr.startsWith('::ffff:') ? addr.slice(7) : addr, isIP(addr) === 6 && !addr.startsWith('::ffff:') ? 'ipv6' : 'ipv4');
  const rows = table(o.sources);
  let mib: { setScalarValue(name: string, v: unknown): void } | undefined;
  const refresh = () => {
    const f = o.sources.figures();
    for (const [, name, , read] of rows) mib?.setScalarValue(name, read(f));
  };
  const state = { port: o.listen.port, denied: 0, socket: undefined as dgram.Socket | undefined };
  // net-snmp has no source ACL: its socket is wrapped so that packets from outside --allow-snmp never
  // reach the agent, and the values are read fresh just before each allowed packet is handled.
  const dgramModule = {
    createSocket(type: dgram.SocketType) {
      const sock = dgram.createSocket(type);
      state.socket = sock;
      // net-snmp turns port 0 into 161: bind the configured port ourselves (0 = any, for tests).
      const bind = sock.bind.bind(sock);
      sock.bind = ((_port: number, address?: string) => bind(o.listen.port, address)) as typeof sock.bind;
      // net-snmp reports a reply it could not send with console.error, a raw stderr line per packet
      // (one per spoofed or oversized request): a failed send is the agent's debug log, nothing more.
      const send = sock.send.bind(sock) as (...a: unknown[]) => void;
      sock.send = ((...args: unknown[]) => {
        const done = args.at(-1);
        if (typeof done === 'function') {
          args[args.length - 1] = (err: Error | null, bytes?: number) => {
            if (err) o.log.debug({ err: err.message }, 'snmp reply not sent');
            else (done as (e: null, n?: number) => void)(null, bytes);
          };
        }
        return send(...args);
      }) as typeof sock.send;
      const on = sock.on.bind(sock);
      sock.on = ((event: string, fn: (...a: unknown[]) => void) => {
        if (event !== 'message') return on(event, fn);
        return on('message', (msg: Buffer, rinfo: dgram.RemoteInfo) => {
          if (!allowed(rinfo.address)) {
            state.denied++;
            return;
          }
          refresh();
          // net-snmp decodes and answers the packet within this call: what it throws on a packet it did
          // not foresee would leave the socket's handler and end the process.
          try {
            fn(msg, rinfo);
          } catch (err) {
            o.log.debug({ err: (err as Error).message }, 'snmp request failed');
          }
        });
      }) as typeof sock.on;
      return sock;
    },
  };
  const agent = snmp.createAgent(
    { port: o.listen.port, address: o.listen.host, transport: isIP(o.listen.host) === 6 ? 'udp6' : 'udp4', dgramModule, disableAuthorization: false },
    (err: Error | null) => {
      if (err) o.log.debug({ err: err.message }, 'snmp request failed');
    },
  );
  await new Promise<void>((resolve, reject) => {
    const sock = state.socket!;
    const onErr = (err: Error) => reject(new Error(`cannot listen on snmp ${o.listen.host}:${o.listen.port}: ${err.message}`, { cause: err }));
    sock.once('error', onErr);
    sock.once('listening', () => {
      sock.off('error', onErr);
      resolve();
    });
  });
  state.port = state.socket!.address().port;
  // net-snmp walks a GETBULK as the packet says. It never sees the end of the MIB (the walk goes on
  // with endOfMibView), so max-repetitions 2^31-1 held the event loop until the heap ran out; and a
  // negative non-repeaters indexes the request's varbinds at -1. Both are brought within the request
  // and the MIB (it counts max-repetitions over all the varbinds): an agent may answer fewer (RFC 3416).
  const bulk = agent.getBulkRequest.bind(agent);
  agent.getBulkRequest = (socket: unknown, message: { pdu: { nonRepeaters: number; maxRepetitions: number; varbinds: unknown[] } }, rinfo: unknown) => {
    const pdu = message.pdu;
    pdu.nonRepeaters = Math.min(Math.max(0, pdu.nonRepeaters), pdu.varbinds.length);
    pdu.maxRepetitions = Math.min(Math.max(0, pdu.maxRepetitions), (rows.length + 1) * pdu.varbinds.length);
    bulk(socket, message, rinfo);
  };
  agent.getAuthorizer().addCommunity(o.community);
  mib = agent.getMib();
  for (const [oid, name, kind] of rows) {
    agent.registerProvider({ name, type: snmp.MibProviderType.Scalar, oid: `${SQUID}.${oid.slice(0, -2)}`, scalarType: TYPES[kind], maxAccess: snmp.MaxAccess['read-only'] });
  }
  refresh();
  o.log.info({ snmp: `${o.listen.host}:${state.port}` }, 'snmp agent listening (Squid MIB 1.3.6.1.4.1.3495)');
  return {
    get port() {
      return state.port;
    },
    get denied() {
      return state.denied;
    },
    close: () => new Promise<void>((r) => agent.close(() => r())),
  };
}
