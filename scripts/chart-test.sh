#!/usr/bin/env bash
# Tests the Helm chart helm/proofmesh offline, with no cluster and no helm binary: Helm's own Go
# code through helm-python-sdk (lint, render, values.schema.json) and the Kubernetes OpenAPI
# schemas through kubernetes-validate, both from .venv (scripts/test-tools.sh installs them).
#   (a) helm lint --strict passes, with the default values and with each examples/*.yaml;
#   (b) the chart renders with the defaults, each example, and the central example with
#       keda.enabled=false (HPAs instead of ScaledObjects);
#   (c) every rendered manifest validates strictly against Kubernetes 1.33 (CRDs checked here);
#   (d) the settings that matter render as intended, and bad values are refused.
# Exit 0 when every check passes; each failure is printed as `FAIL <case>: <what>`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-tools.sh
exec .venv/bin/python - <<'PY'
import copy, json, sys
import yaml
import helm_python as helm
from kubernetes_validate import utils as kv

CHART, KUBE = "helm/proofmesh", "1.33.0"
EXAMPLES = {n: yaml.safe_load(open(f"{CHART}/examples/region-{n}.yaml")) for n in ("central", "worker")}
failures = []

def check(ok, case, what):
    if not ok:
        failures.append(f"{case}: {what}")
        print(f"FAIL {case}: {what}")
    return ok

def render(values, case):
    """Rendered documents of the chart with `values` over its defaults (like helm -f)."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="proofmesh", namespace="proofmesh")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    print(f"ok   {case}: rendered {len(docs)} manifests")
    return docs

def refused(values, case, needle):
    try:
        render(values, case)
    except helm.HelmError as e:
        ok = check(needle in str(e), case, f"refused, but the error does not name {needle!r}: {e}")
        ok and print(f"ok   {case}: refused")
        return ok
    return check(False, case, "rendered, but must be refused")

# CRDs have no schema in kubernetes-validate, so their required fields are checked here.
def check_scaled_object(d, case, deployments):
    s = d.get("spec", {})
    check(s.get("scaleTargetRef", {}).get("name") in deployments, case, f"ScaledObject {d['metadata']['name']}: scaleTargetRef is no rendered Deployment")
    check(0 <= s.get("minReplicaCount", -1) <= s.get("maxReplicaCount", -1), case, "ScaledObject: replica bounds")
    for t in s.get("triggers") or [None]:
        m = (t or {}).get("metadata", {})
        check(t and t.get("type") == "prometheus" and all(isinstance(m.get(k), str) and m[k] for k in ("serverAddress", "query", "threshold")),
              case, f"ScaledObject {d['metadata']['name']}: a prometheus trigger needs serverAddress, query and threshold (strings)")

def check_service_monitor(d, case, services):
    s = d.get("spec", {})
    want = s.get("selector", {}).get("matchLabels")
    ports = [e.get("port") for e in s.get("endpoints", [])]
    hits = [v for v in services if want and want.items() <= v["metadata"].get("labels", {}).items()]
    check(len(hits) == 1 and ports == ["metrics"] and all(p["name"] == "metrics" for p in hits[0]["spec"]["ports"]),
          case, "ServiceMonitor must select exactly the metrics Service on its `metrics` port")

def validate(docs, case):
    """(c) core kinds: strict OpenAPI validation, as `kubernetes-validate --strict -k 1.33.0`."""
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    services = [d for d in docs if d["kind"] == "Service"]
    for d in docs:
        key, name = (d.get("apiVersion"), d.get("kind")), f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if key == ("keda.sh/v1alpha1", "ScaledObject"):
            check_scaled_object(d, case, deployments)
        elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            check_service_monitor(d, case, services)
        elif key == ("cert-manager.io/v1", "Certificate"):
            s = d.get("spec", {})
            check(bool(s.get("secretName")) and bool(s.get("commonName")) and bool(s.get("issuerRef", {}).get("name"))
                  and {"server auth", "client auth"} <= set(s.get("usages", [])),
                  case, f"{name}: a Certificate needs secretName, commonName, issuerRef.name and server+client auth")
        else:
            try:
                kv.validate(d, KUBE, strict=True)
            except kv.ValidationError as e:
                check(False, case, f"{name} invalid at {'.'.join(map(str, e.path))}: {e.message}")
            except kv.SchemaNotFoundError as e:
                check(False, case, f"{name}: no Kubernetes {KUBE} schema ({e.message})")
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            check(any(p.get("name") == "metrics" and p.get("containerPort") == 9464 for p in c.get("ports", [])),
                  case, f"{name}: container {c['name']} has no `metrics` port 9464 (the ServiceMonitor would miss it)")

def kinds(docs, kind, component=None):
    return [d for d in docs if d["kind"] == kind and
            (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]

def container(d):
    return d["spec"]["template"]["spec"]["containers"][0]

def env(c, name):
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)

# (a) lint
for label, values in [("defaults", None), *EXAMPLES.items()]:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
    bad = report["errors"] + [m["error"] for m in report["messages"] if m["severity"] >= 2]
    check(not bad, f"lint {label}", "; ".join(bad)) and print(f"ok   lint {label}")

# (b) + (c)
cases = {
    "defaults": {},
    "central": EXAMPLES["central"],
    "worker": EXAMPLES["worker"],
    "central keda.enabled=false": {**copy.deepcopy(EXAMPLES["central"]), "keda": {"enabled": False}},
}
rendered = {case: render(values, case) for case, values in cases.items()}
for case, docs in rendered.items():
    validate(docs, case)

# (d) what matters
for case, docs in rendered.items():
    for d in kinds(docs, "Deployment", "worker"):
        pool, c = d["metadata"]["labels"]["proofmesh.io/pool"], container(d)
        pool_values = next((p for p in (cases[case].get("workerPools") or []) if p["name"] == pool), {})
        if pool_values.get("zone"):
            check(d["spec"]["template"]["spec"]["nodeSelector"].get("topology.kubernetes.io/zone") == pool_values["zone"]
                  and env(c, "PROOFMESH_ZONE") == pool_values["zone"], case, f"pool {pool}: zone not pinned and reported")
        check(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60 + 15, case, f"pool {pool}: grace != drain + 15")
        if "--role=prover" in c["args"]:
            check("--advertise=http://$(POD_IP):50061" in c["args"] and "--listen=0.0.0.0:50061" in c["args"], case, f"pool {pool}: prover --listen/--advertise")
            check(c["readinessProbe"]["grpc"] == {"port": 50061, "service": ""}, case, f"pool {pool}: prover gRPC readiness probe")
        check(not any(a.startswith("--group") for a in c["args"]), case, f"pool {pool}: --group with proverGroup null")
    n_pools = len(kinds(docs, "Deployment", "worker"))
    check(len(kinds(docs, "PodDisruptionBudget")) == n_pools, case, "one PodDisruptionBudget per worker pool")
    dash = json.loads(kinds(docs, "ConfigMap")[0]["data"]["proofmesh.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for want in ('sum by (aggregation_round) (proofmesh_queue_depth{status="queued"})', "proofmesh_oldest_queued_job_age_seconds",
                 'rate(proofmesh_jobs_total{outcome="succeeded"}[5m])', "proofmesh_job_duration_seconds_bucket", "sum by (zone, role) (proofmesh_workers)"):
        check(want in exprs, case, f"dashboard lacks {want}")

central, worker, hpa = rendered["central"], rendered["worker"], rendered["central keda.enabled=false"]
sched = kinds(central, "Deployment", "scheduler")
check(len(sched) == 1 and sched[0]["spec"]["strategy"]["type"] == "Recreate", "central", "one scheduler Deployment, Recreate")
probe = {"port": 50051, "service": "proofmesh.v1.Scheduler"}
check(container(sched[0])["readinessProbe"]["grpc"] == probe == container(sched[0])["livenessProbe"]["grpc"], "central", "scheduler gRPC probes")
check(container(sched[0])["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "proofmesh-database", "key": "url"}, "central", "DATABASE_URL by secretKeyRef")
queries = {d["metadata"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"] for d in kinds(central, "ScaledObject")}
check(queries.get("proofmesh-prover-a") == 'sum(proofmesh_queue_depth{kind="proving",namespace="proofmesh",status="queued"})', "central", f"prover query: {queries.get('proofmesh-prover-a')}")
check(queries.get("proofmesh-witness-generator-a", "").find('kind="witness_generation"') > 0, "central", "witness-generator pool scales on witness_generation")
check(not kinds(worker, "Deployment", "scheduler") and not kinds(worker, "Service", "scheduler"), "worker", "renders no scheduler")
check(all("--scheduler=http://proofmesh-scheduler.central.example:50051" in container(d)["args"] for d in kinds(worker, "Deployment")), "worker", "workers point at the central scheduler")
check(all('aggregation_round=~"0|1"' in d["spec"]["triggers"][0]["metadata"]["query"] for d in kinds(worker, "ScaledObject")), "worker", "rounds narrow the query")
gpu = [d for d in kinds(worker, "Deployment") if "nvidia.com/gpu" in container(d).get("resources", {}).get("limits", {})]
check(len(gpu) == 2 and all(d["spec"]["template"]["spec"].get("tolerations") for d in gpu), "worker", "GPU provers with tolerations")
check(not kinds(hpa, "ScaledObject") and len(kinds(hpa, "HorizontalPodAutoscaler")) == len(kinds(central, "ScaledObject")), "keda=false", "HPAs replace ScaledObjects")
ext = kinds(hpa, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["external"]
check(ext["metric"]["name"] == "proofmesh_queue_depth" and ext["metric"]["selector"]["matchLabels"]["status"] == "queued", "keda=false", "HPA External metric")
grouped = render({"workerPools": [{"name": "p", "role": "prover", "proverGroup": 3}]}, "proverGroup 3")
check("--group=3" in container(kinds(grouped, "Deployment", "worker")[0])["args"], "proverGroup 3", "--group=3 passed")
groups_toml = "[[group]]\nid = 3\ncircuits = [{ aggregation_round = 0, circuit_id = 1 }]\n"
defined = render({"scheduler": {"proverGroups": groups_toml}}, "scheduler.proverGroups")
check("--prover-groups=/etc/proofmesh/prover-groups.toml" in container(kinds(defined, "Deployment", "scheduler")[0])["args"],
      "scheduler.proverGroups", "--prover-groups passed")
check([c["data"]["prover-groups.toml"] for c in kinds(defined, "ConfigMap") if c["metadata"]["name"].endswith("scheduling")] == [groups_toml],
      "scheduler.proverGroups", "groups file in a ConfigMap, verbatim")
weights_toml = "[[weight]]\naggregation_round = 0\ncircuit_id = 1\npeak_mib = 900\n"
policy = render({"scheduler": {"jobWeights": weights_toml, "priorityAgeingSecs": 60},
                 "workerPools": [{"name": "v", "role": "wvg", "protocolVersions": ["0.1.0", "0.1.1"], "memoryBudgetMib": 8000}]},
                "scheduling policy")
sched_args = container(kinds(policy, "Deployment", "scheduler")[0])["args"]
check("--job-weights=/etc/proofmesh/job-weights.toml" in sched_args and "--priority-ageing-secs=60" in sched_args,
      "scheduling policy", "--job-weights and --priority-ageing-secs passed")
check([c["data"].get("job-weights.toml") for c in kinds(policy, "ConfigMap") if c["metadata"]["name"].endswith("scheduling")] == [weights_toml],
      "scheduling policy", "weights file in the scheduling ConfigMap, verbatim")
pool_args = container(kinds(policy, "Deployment", "worker")[0])["args"]
check("--protocol-version=0.1.0" in pool_args and "--protocol-version=0.1.1" in pool_args and "--memory-budget-mib=8000" in pool_args,
      "scheduling policy", "a pool's versions and memory budget passed")
s3_url = "s3://proofs/mainnet?endpoint=https://storage.googleapis.com&region=auto"
stored = render({"artifacts": {"url": s3_url, "credentialsSecret": "gcs-hmac"}}, "artifacts.url")
for d in kinds(stored, "Deployment"):
    c = container(d)
    check(f"--artifacts={s3_url}" in c["args"] and {"secretRef": {"name": "gcs-hmac"}} in c.get("envFrom", []),
          "artifacts.url", f"{d['metadata']['name']}: --artifacts URL and credentials passed")
client = render({"gateway": {"mode": "client", "l2NodeUrl": "http://l2-node.l2:3320"}}, "gateway client mode")
gw_args = container(kinds(client, "Deployment", "gateway")[0])["args"]
check("--mode=client" in gw_args and "--l2-node-url=http://l2-node.l2:3320" in gw_args and not any(a.startswith("--inbox") for a in gw_args),
      "gateway client mode", f"args {gw_args}")
server = render({"gateway": {"mode": "server", "port": 4000}}, "gateway server mode")
validate(server, "gateway server mode")
gw_args = container(kinds(server, "Deployment", "gateway")[0])["args"]
check("--mode=server" in gw_args and "--listen=0.0.0.0:4000" in gw_args, "gateway server mode", f"args {gw_args}")
check([p["port"] for s in kinds(server, "Service", "gateway") for p in s["spec"]["ports"]] == [4000], "gateway server mode", "a Service on the API port")
for d in kinds(rendered["defaults"], "Deployment"):
    check("--artifacts=file:///var/lib/proofmesh/data" in container(d)["args"], "defaults", f"{d['metadata']['name']}: the volume's URL")
    check(not any(e["name"].startswith("PROOFMESH_TLS") for e in container(d).get("env", [])), "defaults", "TLS is off by default")
tls_values = {"tls": {"enabled": True, "certManager": {"issuerRef": {"name": "proofmesh-ca", "kind": "ClusterIssuer"}},
                      "adminSubjects": ["OU=proofmesh-admins"], "operatorSubjects": ["CN=grafana", "OU=sre"]}}
tls = render({**copy.deepcopy(EXAMPLES["central"]), **tls_values}, "tls")
validate(tls, "tls")
certs = {c["spec"]["secretName"]: c for c in kinds(tls, "Certificate")}
for d in kinds(tls, "Deployment"):
    c, name = container(d), d["metadata"]["name"]
    secret = next((v["secret"]["secretName"] for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"), None)
    check(secret in certs and certs[secret]["spec"]["issuerRef"]["kind"] == "ClusterIssuer", "tls", f"{name}: mounts the Secret of its own Certificate ({secret})")
    check({"name": "tls", "mountPath": "/etc/proofmesh/tls", "readOnly": True} in c["volumeMounts"]
          and env(c, "PROOFMESH_TLS_CERT") == "/etc/proofmesh/tls/tls.crt" and env(c, "PROOFMESH_TLS_CA") == "/etc/proofmesh/tls/ca.crt",
          "tls", f"{name}: TLS files mounted (no subPath: rotations appear) and passed")
    check("grpc" not in c.get("readinessProbe", {}) and "grpc" not in c.get("livenessProbe", {}), "tls", f"{name}: no plaintext gRPC probe under TLS")
provers = [d for d in kinds(tls, "Deployment", "worker") if "--role=prover" in container(d)["args"]]
wvgs = [d for d in kinds(tls, "Deployment", "worker") if "--role=wvg" in container(d)["args"]]
prover_names = {n for s, c in certs.items() for n in c["spec"].get("dnsNames", []) if n.endswith(".provers")}
check(provers and all("--advertise=https://$(POD_IP):50061" in container(d)["args"] for d in provers), "tls", "provers advertise https")
check(len(prover_names) == 1 and wvgs and all(f"--prover-tls-name={next(iter(prover_names))}" in container(d)["args"] for d in wvgs),
      "tls", f"WVGs check provers against the provers' certificate name {prover_names}")
sched_args = container(kinds(tls, "Deployment", "scheduler")[0])["args"]
check("--admin-subject=OU=proofmesh-admins" in sched_args and "--operator-subject=CN=grafana" in sched_args and "--operator-subject=OU=sre" in sched_args,
      "tls", "admin and operator subjects passed to the scheduler")
sched_cert = certs["proofmesh-scheduler-tls"]["spec"]
check("proofmesh-scheduler" in sched_cert["dnsNames"] and sched_cert["commonName"] == "scheduler", "tls", "the scheduler's certificate names its Service")

# Bad values are refused (values.schema.json, or the chart's own checks).
with helm.Chart.load(CHART) as chart:
    pools = copy.deepcopy(chart.values["workerPools"])
pools[0]["role"] = "bogus"  # --set workerPools[0].role=bogus on the default pools
refused({"workerPools": pools}, "workerPools[0].role=bogus", "workerPools/0/role")
refused({"scheduler": {"geometry": "huge"}}, "geometry huge", "geometry")
refused({"tls": {"adminSubjects": ["alice"]}}, "admin subject without KEY=", "adminSubjects")
refused({"artifacts": {"url": "gs://bucket"}}, "artifacts.url gs://", "artifacts/url")
refused({"gateway": {"mode": "client"}}, "gateway client mode without l2NodeUrl", "l2NodeUrl")
refused({"gateway": {"mode": "push"}}, "gateway mode push", "gateway/mode")
refused({"workerPools": [{"name": "p", "role": "wvg", "protocolVersions": ["latest"]}]}, "protocol version latest", "protocolVersions")
refused({"scheduler": {"enabled": False}}, "scheduler disabled without address", "address")
refused({"workerPools": [{"name": "p", "role": "wvg", "replicaz": 2}]}, "typo in a pool key", "replicaz")
refused({"workerPools": [{"name": "p", "role": "wvg"}, {"name": "p", "role": "prover"}]}, "duplicate pool name", "used twice")
refused({"keda": {"enabled": False}, "workerPools": [{"name": "p", "role": "wvg", "autoscaling": {"enabled": True, "minReplicas": 0}}]},
        "HPA with minReplicas 0", "cannot scale to zero")

print(f"chart-test: {len(failures)} failure(s)" if failures else "chart-test: all checks passed")
sys.exit(1 if failures else 0)
PY
