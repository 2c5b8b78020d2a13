// deploy/kubernetes/ (issue 32 §1), checked offline: every object the base, the burst overlay and the
// ServiceMonitor component render to is valid against the Kubernetes API schemas (kubernetes-models'
// validators, generated from the API's OpenAPI; the operator's CRD for the ServiceMonitor), and holds
// what an admin would otherwise get wrong: probes on local paths of the admin port, a grace period that
// covers the drain, one disruption at a time, one member per host, a locked-down container, memory
// derived from the tiers, the config that cuttle itself accepts, and the bank found through the same
// headless Service the clients use.
//
// kustomize is not installed, so the test renders the kustomizations itself by the subset they use,
// and refuses any other field: resources, components, configMapGenerator (files; the name gets a hash
// of the data and the references follow it, as kustomize does), images, and RFC 6902 JSON patches with
// a kind/name target.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, it } from 'node:test';
import { parse, parseAllDocuments } from 'yaml';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Service } from 'kubernetes-models/v1/Service';
import { StatefulSet } from 'kubernetes-models/apps/v1/StatefulSet';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1/PodDisruptionBudget';
import { NetworkPolicy } from 'kubernetes-models/networking.k8s.io/v1/NetworkPolicy';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { compileAcl } from '../../src/acl.ts';
import { buildConfig, parseCli, rawOptions, type Config } from '../../src/config.ts';
import { tmpDir } from '../helpers/proxy.ts';

const ROOT = 'deploy/kubernetes';
const MiB = 1024 ** 2;

// Any object: the manifests as parsed YAML.
type Obj = Record<string, any>;

/** The schema of each kind the manifests use; any other kind fails the test. */
const MODELS: Record<string, new (data: never) => { validate(): void }> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Service': Service,
  'apps/v1/StatefulSet': StatefulSet,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'networking.k8s.io/v1/NetworkPolicy': NetworkPolicy,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
};

/** RFC 6902 add, remove and replace, on JSON pointers ('-' appends to an array). */
function jsonPatch(doc: Obj, ops: { op: string; path: string; value?: unknown }[]): void {
  for (const { op, path, value } of ops) {
    const keys = path.split('/').slice(1).map((k) => k.replace(/~1/g, '/').replace(/~0/g, '~'));
    const last = keys.pop()!;
    let parent: Obj = doc;
    for (const k of keys) {
      parent = parent[k];
      assert.ok(parent && typeof parent === 'object', `${op} ${path}: no such path`);
    }
    const isArray = Array.isArray(parent);
    if (op === 'add') {
      if (isArray) (parent as unknown[]).splice(last === '-' ? (parent as unknown[]).length : Number(last), 0, value);
      else parent[last] = value;
    } else if (op === 'remove' || op === 'replace') {
      assert.ok(isArray ? Number(last) < (parent as unknown[]).length : Object.hasOwn(parent, last), `${op} ${path}: no such path`);
      if (op === 'replace') parent[last] = value;
      else if (isArray) (parent as unknown[]).splice(Number(last), 1);
      else delete parent[last];
    } else assert.fail(`JSON patch op ${op} is not supported by this test's renderer`);
  }
}

/** The pod templates' containers of the rendered objects. */
const containersOf = (objs: Obj[]): Obj[] => objs.flatMap((o) => (o.spec?.template?.spec?.containers as Obj[] | undefined) ?? []);

/** Render a kustomization directory (a Kustomization, or a Component applied onto `onto`). */
function render(dir: string, onto: Obj[] = []): Obj[] {
  const k = parse(readFileSync(join(dir, 'kustomization.yaml'), 'utf8')) as Obj;
  const known = ['apiVersion', 'kind', 'resources', 'components', 'configMapGenerator', 'images', 'patches'];
  for (const key of Object.keys(k)) assert.ok(known.includes(key), `${dir}: ${key} is not rendered by this test (add it to render())`);
  assert.equal(k.kind, k.apiVersion === 'kustomize.config.k8s.io/v1alpha1' ? 'Component' : 'Kustomization');
  const out: Obj[] = [...onto];
  for (const r of (k.resources ?? []) as string[]) {
    const path = join(dir, r);
    if (existsSync(join(path, 'kustomization.yaml'))) out.push(...render(path));
    else out.push(...parseAllDocuments(readFileSync(path, 'utf8')).map((d) => d.toJS() as Obj));
  }
  for (const c of (k.components ?? []) as string[]) out.splice(0, out.length, ...render(join(dir, c), out));
  for (const g of (k.configMapGenerator ?? []) as Obj[]) {
    for (const key of Object.keys(g)) assert.ok(['name', 'files'].includes(key), `configMapGenerator ${g.name}: ${key} is not rendered by this test`);
    const data = Object.fromEntries((g.files as string[]).map((f) => [basename(f), readFileSync(join(dir, f), 'utf8')]));
    const name = `${g.name}-${createHash('sha256').update(JSON.stringify(data)).digest('hex').slice(0, 10)}`;
    out.push({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name }, data });
    for (const o of out) for (const v of (o.spec?.template?.spec?.volumes ?? []) as Obj[]) if (v.configMap?.name === g.name) v.configMap.name = name;
  }
  for (const i of (k.images ?? []) as Obj[]) {
    for (const c of containersOf(out)) if (String(c.image).split(':')[0] === i.name) c.image = `${i.newName ?? i.name}:${i.newTag}`;
  }
  for (const p of (k.patches ?? []) as Obj[]) {
    const targets = out.filter((o) => o.kind === p.target.kind && o.metadata.name === p.target.name);
    assert.equal(targets.length, 1, `${dir}: patch ${p.path} has one target`);
    jsonPatch(targets[0]!, parse(readFileSync(join(dir, p.path), 'utf8')));
  }
  return out;
}

const one = (objs: Obj[], kind: string) => {
  const all = objs.filter((o) => o.kind === kind);
  assert.equal(all.length, 1, `one ${kind}`);
  return all[0]!;
};

/** The container's cuttle configuration, read as the pod reads it: its ConfigMap's file and its arguments. */
function podConfig(objs: Obj[]): { cfg: Config; args: string[]; file: string } {
  const sts = one(objs, 'StatefulSet');
  const c = sts.spec.template.spec.containers[0] as Obj;
  const mount = (c.volumeMounts as Obj[]).find((m) => m.name === 'config')!;
  const cmName = (sts.spec.template.spec.volumes as Obj[]).find((v) => v.name === 'config')!.configMap.name as string;
  const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === cmName);
  assert.ok(cm, `the ConfigMap ${cmName} the pod mounts is rendered`);
  const args = c.args as string[];
  const at = args.indexOf('--config');
  const inPod = args[at + 1]!;
  assert.ok(inPod.startsWith(`${mount.mountPath}/`), '--config names a file of the mounted ConfigMap');
  const file = join(tmpDir(), basename(inPod));
  writeFileSync(file, cm.data[basename(inPod)]);
  const local = args.map((a, i) => (i === at + 1 ? file : a));
  return { cfg: buildConfig(rawOptions(parseCli(local))), args: local, file };
}

const bytes = (q: string): number => {
  const m = /^(\d+)(Ki|Mi|Gi|Ti)?$/.exec(q);
  assert.ok(m, `a quantity in binary units: ${q}`);
  return Number(m[1]) * 1024 ** ['', 'Ki', 'Mi', 'Gi', 'Ti'].indexOf(m[2] ?? '');
};

/** What every rendering must hold; `cache` checks the cache volume of that variant. */
function checkBank(objs: Obj[], cache: (sts: Obj, cfg: Config) => void) {
  for (const o of objs) {
    const Model = MODELS[`${o.apiVersion}/${o.kind}`];
    assert.ok(Model, `${o.apiVersion} ${o.kind} has a schema here`);
    assert.doesNotThrow(() => new Model(o as never).validate(), `${o.kind} ${o.metadata?.name}`);
  }
  const sts = one(objs, 'StatefulSet');
  const services = objs.filter((o) => o.kind === 'Service');
  const svc = services.find((o) => o.metadata.name === sts.spec.serviceName)!;
  const peers = services.find((o) => o.spec.publishNotReadyAddresses === true)!;
  const pod = sts.spec.template.spec as Obj;
  const c = pod.containers[0] as Obj;
  const labels = sts.spec.template.metadata.labels as Obj;
  const { cfg, args } = podConfig(objs);

  // cuttle itself accepts the pod's configuration (paths and ports pointed at this test's, which the lines below check).
  const check = spawnSync(process.execPath, ['src/cuttle.js', ...args, '--cache-dir', join(tmpDir(), 'c'), '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--snmp-listen', '127.0.0.1:0', '--check-config'], { encoding: 'utf8' });
  assert.equal(check.status, 0, check.stderr);

  // The headless Service, the StatefulSet's, and the bank's name.
  assert.equal(svc.spec.clusterIP, 'None');
  assert.equal(sts.spec.serviceName, svc.metadata.name);
  assert.deepEqual(svc.spec.selector, labels);
  assert.ok(cfg.bankDns !== 'none', 'the bank is found by --bank-dns');
  // Two headless Services over the same pods: the clients' lists the ready ones (a draining member
  // leaves it), the bank's lists every member (a draining member keeps its keys).
  assert.equal(services.length, 2);
  assert.equal(svc.spec.publishNotReadyAddresses ?? false, false, "the clients' Service lists ready pods only");
  assert.equal(peers.spec.clusterIP, 'None');
  assert.deepEqual(peers.spec.selector, labels);
  assert.ok([peers.metadata.name, `${peers.metadata.name}.${peers.metadata.namespace ?? ''}`].includes(cfg.bankDns.host.replace(/\.svc(\.cluster\.local)?$/, '').replace(/\.$/, '')), `--bank-dns ${cfg.bankDns.host} is the peers' headless Service`);

  // Ports: the container's, the Service's and the NetworkPolicy's are cuttle's own.
  const port = (name: string) => (c.ports as Obj[]).find((p) => p.name === name)!;
  assert.equal(cfg.listen.length, 1);
  assert.equal(port('proxy').containerPort, cfg.listen[0]!.port);
  assert.ok(cfg.adminListen !== 'none' && cfg.snmpListen !== 'none');
  assert.equal(port('admin').containerPort, cfg.adminListen.port);
  assert.deepEqual([port('snmp').containerPort, port('snmp').protocol], [cfg.snmpListen.port, 'UDP']);
  assert.equal(cfg.bankDns.port, cfg.listen[0]!.port, 'members are asked on the proxy port');
  for (const sp of svc.spec.ports as Obj[]) {
    const cp = port(sp.targetPort);
    assert.deepEqual([sp.port, sp.protocol], [cp.containerPort, cp.protocol], `Service port ${sp.name}`);
  }
  // The kubelet and Prometheus reach the admin listener on the pod's address, from private ranges.
  assert.ok(['::', '0.0.0.0'].includes(cfg.adminListen.host), 'the admin listener is on the pod address');
  const acl = compileAcl(cfg);
  for (const from of ['10.1.2.3', '127.0.0.1']) assert.ok(acl.allowsAdmin(from), `allow-admin lets ${from} ask`);

  // Probes: local paths of the admin port, never a remote site.
  const probes = { startupProbe: '/readyz', livenessProbe: '/healthz', readinessProbe: '/readyz' } as const;
  for (const [probe, path] of Object.entries(probes)) {
    const p = c[probe] as Obj;
    assert.ok(p?.httpGet, `${probe} is an httpGet`);
    assert.equal(p.httpGet.host, undefined, `${probe} asks the pod itself`);
    assert.equal(p.httpGet.path, path, probe);
    assert.equal(typeof p.httpGet.port === 'string' ? port(p.httpGet.port).containerPort : p.httpGet.port, cfg.adminListen.port, `${probe} on the admin port`);
  }
  const startup = c.startupProbe as Obj;
  assert.ok(startup.periodSeconds * startup.failureThreshold >= 300, 'the disk index gets minutes to load');

  // Drain: preStop POSTs /drain on the admin listener, then waits; the grace period covers that wait,
  // the shutdown timeout and cuttle's own 5 s past it.
  const pre = (c.lifecycle.preStop.exec.command as string[]).join(' ');
  const drain = /fetch\('(http:\/\/[^']+)', \{ method: 'POST'/.exec(pre);
  assert.ok(drain, pre);
  const url = new URL(drain[1]!);
  assert.deepEqual([url.hostname, Number(url.port), url.pathname], ['127.0.0.1', cfg.adminListen.port, '/drain']);
  const waitS = Number(/setTimeout\(\(\) => \{\}, (\d+)\)/.exec(pre)![1]) / 1000;
  assert.ok(waitS * 1000 >= cfg.bankDnsIntervalMs, 'the bank re-resolves within the wait');
  assert.ok(pod.terminationGracePeriodSeconds >= waitS + cfg.shutdownTimeoutMs / 1000 + 5, `grace ${pod.terminationGracePeriodSeconds} s ≥ ${waitS} + ${cfg.shutdownTimeoutMs / 1000} + 5`);
  assert.ok(pod.terminationGracePeriodSeconds >= cfg.shutdownTimeoutMs / 1000);

  // One member down at a time, never two on one host.
  const pdb = one(objs, 'PodDisruptionBudget');
  assert.equal(pdb.spec.maxUnavailable, 1);
  assert.deepEqual(pdb.spec.selector.matchLabels, labels);
  const anti = pod.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution as Obj[];
  assert.ok(anti.some((t) => t.topologyKey === 'kubernetes.io/hostname' && JSON.stringify(t.labelSelector.matchLabels) === JSON.stringify(labels)));
  assert.equal(sts.spec.updateStrategy.type, 'RollingUpdate');

  // Locked down.
  assert.equal(pod.securityContext.runAsNonRoot, true);
  assert.ok(pod.securityContext.runAsUser > 0);
  assert.equal(pod.securityContext.seccompProfile.type, 'RuntimeDefault');
  assert.equal(c.securityContext.readOnlyRootFilesystem, true);
  assert.deepEqual(c.securityContext.capabilities.drop, ['ALL']);
  assert.equal(c.securityContext.allowPrivilegeEscalation, false);
  assert.equal(c.securityContext.capabilities.add, undefined);

  // Memory from the tiers plus the overhead measured for statefulset.yaml's comment: 107 MiB for the
  // process with one worker, 85 MiB for each more, ~110 MiB of disk index, 10% of the tier in slack.
  const overhead = (107 + 85 * (cfg.workers - 1) + 110) * MiB + 0.1 * cfg.memoryCacheBytes;
  const need = cfg.memoryCacheBytes + cfg.fillMemoryBytes + overhead;
  assert.ok(bytes(c.resources.requests.memory) >= need, `memory request ${c.resources.requests.memory} ≥ ${Math.ceil(need / MiB)}Mi`);
  assert.ok(bytes(c.resources.limits.memory) >= bytes(c.resources.requests.memory));
  assert.equal(Number(c.resources.requests.cpu), cfg.workers, 'one CPU per worker');

  // The NetworkPolicy: clients and members on the proxy port, monitoring on admin and SNMP, DNS and the Stratum 1s out.
  const np = one(objs, 'NetworkPolicy');
  assert.deepEqual(np.spec.podSelector.matchLabels, labels);
  const ins = (np.spec.ingress as Obj[]).flatMap((r) => (r.ports as Obj[]).map((p) => `${p.port}/${p.protocol}`));
  assert.deepEqual(ins.sort(), [`${cfg.adminListen.port}/TCP`, `${cfg.listen[0]!.port}/TCP`, `${cfg.snmpListen.port}/UDP`].sort());
  const outs = new Set((np.spec.egress as Obj[]).flatMap((r) => (r.ports as Obj[]).map((p) => `${p.port}/${p.protocol}`)));
  for (const need of ['53/UDP', '53/TCP', `${cfg.bankDns.port}/TCP`, ...cfg.mirrorGroups.flatMap((g) => g.mirrors.map((m) => `${new URL(m).port || 80}/TCP`))]) assert.ok(outs.has(need), `egress ${need}`);
  const members = (np.spec.ingress as Obj[]).find((r) => r.ports.some((p: Obj) => p.port === cfg.listen[0]!.port))!;
  assert.ok(members.from.some((f: Obj) => JSON.stringify(f.podSelector?.matchLabels) === JSON.stringify(labels)), 'members may ask each other');

  // The cache volume holds the configured disk tier.
  const mount = (c.volumeMounts as Obj[]).find((m) => m.name === 'cache')!;
  assert.equal(mount.mountPath, cfg.cacheDir);
  cache(sts, cfg);
}

describe('deploy/kubernetes', () => {
  it('the base: valid objects, a StatefulSet whose claim keeps each member its cache, and every property of the bank', () => {
    const objs = render(join(ROOT, 'base'));
    assert.deepEqual(objs.map((o) => o.kind).sort(), ['ConfigMap', 'NetworkPolicy', 'PodDisruptionBudget', 'Service', 'Service', 'StatefulSet']);
    checkBank(objs, (sts, cfg) => {
      const claim = (sts.spec.volumeClaimTemplates as Obj[]).find((v) => v.metadata.name === 'cache')!;
      assert.ok(bytes(claim.spec.resources.requests.storage) > cfg.diskCacheBytes, 'the claim holds disk-cache');
      assert.equal((sts.spec.template.spec.volumes as Obj[]).some((v) => v.name === 'cache'), false, 'the claim, not a pod volume');
    });
    assert.match(containersOf(objs)[0]!.image, /^cuttle:\d+\.\d+\.\d+$/, 'a tagged image');
  });

  it('the burst overlay: an emptyDir with a sizeLimit above disk-cache instead of the claim, the rest as the base', () => {
    const objs = render(join(ROOT, 'overlays/burst'));
    checkBank(objs, (sts, cfg) => {
      assert.equal(sts.spec.volumeClaimTemplates, undefined);
      const vol = (sts.spec.template.spec.volumes as Obj[]).find((v) => v.name === 'cache')!;
      assert.ok(vol.emptyDir, 'node-local scratch');
      assert.ok(bytes(vol.emptyDir.sizeLimit) > cfg.diskCacheBytes * 1.05, `the kubelet's sizeLimit ${vol.emptyDir.sizeLimit} stays above disk-cache`);
    });
  });

  it('the ServiceMonitor component: valid against the operator CRD, scraping /metrics on the admin port of the headless Service', () => {
    const objs = render(join(ROOT, 'components/servicemonitor'), render(join(ROOT, 'base')));
    checkBank(objs, () => {});
    const sm = one(objs, 'ServiceMonitor');
    // The clients' Service: the one with the admin port (the peers' has only the proxy port).
    const svc = objs.find((o) => o.kind === 'Service' && o.metadata.name === one(objs, 'StatefulSet').spec.serviceName)!;
    assert.deepEqual(sm.spec.selector.matchLabels, svc.metadata.labels);
    assert.deepEqual(sm.spec.endpoints.map((e: Obj) => [e.port, e.path]), [['admin', '/metrics']]);
    assert.ok((svc.spec.ports as Obj[]).some((p) => p.name === 'admin'));
  });

  it('a change of cuttle.yaml renames its ConfigMap, so the pod template changes and the pods roll', () => {
    const dir = tmpDir();
    cpSync(join(ROOT, 'base'), dir, { recursive: true });
    const name = (objs: Obj[]) => (one(objs, 'StatefulSet').spec.template.spec.volumes as Obj[]).find((v) => v.name === 'config')!.configMap.name as string;
    const before = name(render(dir));
    writeFileSync(join(dir, 'cuttle.yaml'), `${readFileSync(join(dir, 'cuttle.yaml'), 'utf8')}negative-ttl: 30s\n`);
    const after = name(render(dir));
    assert.notEqual(after, before);
    assert.match(after, /^cuttle-config-[0-9a-f]{10}$/);
    assert.equal(name(render(join(ROOT, 'base'))), before, 'the same file, the same name');
  });

  it('a broken manifest fails the schema check (the validators are live)', () => {
    const sts = one(render(join(ROOT, 'base')), 'StatefulSet');
    sts.spec.template.spec.containers[0].ports[0].containerPort = '3128';
    assert.throws(() => new StatefulSet(sts as never).validate(), /containerPort must be integer/);
    delete sts.spec.selector;
    assert.throws(() => new StatefulSet(sts as never).validate(), /selector/);
  });
});
