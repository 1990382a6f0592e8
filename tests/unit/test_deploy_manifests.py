"""The deployment files are wired together: Kubernetes manifests validated against the Kubernetes
OpenAPI schemas (kubernetes-validate), then the references between them checked by hand; and
bentofile.yaml kept in step with pyproject.toml, config.py and the image scripts.

No cluster and no server are needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # an old-enough cluster: the manifests must not need newer fields


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of deploy/k8s by (kind, name)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifests():
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_is_valid_against_kubernetes_schema(path: Path) -> None:
    for doc in load_docs(path):
        # strict: unknown fields (typos such as `readinesProbe`) fail too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifests())


def test_deployment_probes_resources_and_replicas(resources: dict) -> None:
    dep = resources[("Deployment", "kvbento")]
    assert dep["spec"]["replicas"] >= 2, "the point of the shared store is several replicas"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    c = container(dep)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names.get("http") == 3000, "bentoml serves on 3000 in the image"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    pod_security = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0


def test_service_routes_to_the_replicas(resources: dict) -> None:
    svc = resources[("Service", "kvbento")]
    dep = resources[("Deployment", "kvbento")]
    assert selects(svc, dep)
    names = {p["name"] for p in container(dep)["ports"]}
    assert all(p["targetPort"] in names for p in svc["spec"]["ports"])


def test_replicas_share_the_redis_service(resources: dict) -> None:
    env = env_of(container(resources[("Deployment", "kvbento")]))
    url = urlsplit(env["KVBENTO_CACHE_URL"]["value"])
    assert url.scheme == "redis"
    svc = resources[("Service", url.hostname)]
    redis_dep = resources[("Deployment", url.hostname)]
    assert selects(svc, redis_dep), "the Redis Service must select the Redis pods"
    svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == (url.port or 6379))
    redis_ports = {p["name"]: p["containerPort"] for p in container(redis_dep)["ports"]}
    assert redis_ports[svc_port["targetPort"]] == 6379
    assert redis_dep["spec"]["replicas"] == 1, "one Redis: replicas must see the same records"
    # kvbento keeps its own LRU budget; Redis must not evict keys behind its index.
    args = container(redis_dep)["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_api_keys_come_from_the_secret(resources: dict) -> None:
    env = env_of(container(resources[("Deployment", "kvbento")]))
    ref = env["KVBENTO_API_KEYS"]["valueFrom"]["secretKeyRef"]
    secret = resources[("Secret", ref["name"])]
    assert ref["key"] in secret.get("stringData", {}) or ref["key"] in secret.get("data", {})
    assert "value" not in env["KVBENTO_API_KEYS"], "keys never in the Deployment itself"


def test_every_kvbento_env_var_is_a_setting(resources: dict) -> None:
    """A misspelled KVBENTO_* name would be ignored silently by pydantic-settings."""
    fields = {f"KVBENTO_{name.upper()}" for name in Settings.model_fields}
    bento_envs = [e["name"] for e in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["envs"]]
    k8s_envs = [n for n in env_of(container(resources[("Deployment", "kvbento")]))]
    for name in bento_envs + k8s_envs:
        if name.startswith("KVBENTO_"):
            assert name in fields, name


def _requirement_pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", line.strip())
        assert m, line
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_bentofile_packages_match_pyproject() -> None:
    """The image installs what the tests ran against (torch as its CPU build)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    want = _requirement_pins(deps)
    got = _requirement_pins(bento["python"]["packages"])
    want.pop("bentoml")  # bentoml adds its own running version to the bento's requirements
    torch = want.pop("torch")
    assert got.pop("torch") == f"{torch}+cpu"
    assert got == want
    wheel = Path(bento["python"]["wheels"][0]).name
    assert wheel.startswith(f"torch-{torch.removeprefix('==')}+cpu-cp311-"), wheel
    assert bento["python"]["lock_packages"] is False


def test_bentofile_matches_image_scripts() -> None:
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    env_sh = (ROOT / "deploy" / "image" / "env.sh").read_text()
    build_sh = (ROOT / "deploy" / "image" / "build.sh").read_text()
    assert f'KVBENTO_BASE_IMAGE:-{bento["docker"]["base_image"]}}}' in env_sh
    assert bento["python"]["wheels"][0] in build_sh, "build.sh downloads the wheel the bento ships"
    envs = {e["name"]: e["value"] for e in bento["envs"]}
    # The bento's src/ lands in /home/bentoml/bento/src; the included model dir must be the default.
    model = envs["KVBENTO_MODEL"].removeprefix("/home/bentoml/bento/src/")
    assert f"{model}/*" in bento["include"]


# --- scale-out: the hashing front, the autoscaler, the Redis Cluster option ---------------------
CLUSTER = K8S / "redis-cluster"


def haproxy_cfg(resources: dict) -> str:
    return resources[("ConfigMap", "kvbento-haproxy")]["data"]["haproxy.cfg"]


def test_haproxy_hashes_conversations_on_the_request_id_header(resources: dict, tmp_path: Path) -> None:
    from server.http import REQUEST_ID_HEADER

    cfg = haproxy_cfg(resources)
    backend = cfg.split("backend replicas", 1)[1]
    assert f"balance hdr({REQUEST_ID_HEADER})" in backend and "hash-type consistent" in backend
    assert "option httpchk GET /readyz" in backend
    # The servers are the kvbento pods, through a headless Service selecting them, on their http port.
    target = re.search(
        r'server-template \S+ (\d+) "([^".]+)\.\$\{POD_NAMESPACE\}\.svc\.cluster\.local:(\d+)"', backend)
    assert target, "server-template over the pods' headless Service"
    slots, svc_name, port = int(target[1]), target[2], int(target[3])
    pods_svc = resources[("Service", svc_name)]
    assert pods_svc["spec"]["clusterIP"] == "None"
    kvbento = resources[("Deployment", "kvbento")]
    assert selects(pods_svc, kvbento)
    assert port == 3000 and {p["containerPort"] for p in container(kvbento)["ports"]} == {3000}
    assert slots >= resources[("HorizontalPodAutoscaler", "kvbento")]["spec"]["maxReplicas"]
    # The HAProxy pods: the ConfigMap mounted where the image reads it, POD_NAMESPACE set, fronted.
    lb = resources[("Deployment", "kvbento-haproxy")]
    c = container(lb)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in lb["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "kvbento-haproxy"
    assert f'{mount["mountPath"]}/haproxy.cfg' in c["args"]
    assert env_of(c)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    bind = int(re.search(r"bind :(\d+)", cfg)[1])
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == bind
    assert selects(resources[("Service", "kvbento-lb")], lb)
    # The real parser, when haproxy is installed (`make test-deploy` installs it).
    import os
    import shutil
    import subprocess

    if shutil.which("haproxy"):
        path = tmp_path / "haproxy.cfg"
        path.write_text(cfg)
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True,
                               env={**os.environ, "POD_NAMESPACE": "default"})
        assert check.returncode == 0, check.stdout + check.stderr


def test_replicas_name_themselves_and_are_scraped(resources: dict) -> None:
    tmpl = resources[("Deployment", "kvbento")]["spec"]["template"]
    env = env_of(container(resources[("Deployment", "kvbento")]))
    assert env["KVBENTO_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    notes = tmpl["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == 3000


def test_autoscaler_follows_the_queue_metric(resources: dict) -> None:
    hpa = resources[("HorizontalPodAutoscaler", "kvbento")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvbento"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == "kvbento_num_requests_waiting"
    # The gauge the pods export under that name.
    source = (ROOT / "server" / "metrics.py").read_text()
    assert 'PREFIX = "kvbento_"' in source and 'PREFIX + "num_requests_waiting"' in source


def cluster_overlay() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    return kustomization, [yaml.safe_load(p["patch"]) for p in kustomization["patches"]]


@pytest.mark.parametrize("doc", load_docs(CLUSTER / "redis-cluster.yaml"), ids=lambda d: d["kind"])
def test_redis_cluster_manifest_is_valid_against_kubernetes_schema(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_redis_cluster_overlay_replaces_the_one_redis(resources: dict) -> None:
    """What `kubectl apply -k deploy/k8s/redis-cluster` builds, checked without kustomize: the
    patches name resources of the base, the one Redis goes, the URL seeds the StatefulSet's pods."""
    from cache.redis_cluster import parse_url

    kustomization, patches = cluster_overlay()
    assert kustomization["resources"] == ["../", "redis-cluster.yaml"]
    deleted = {(p["kind"], p["metadata"]["name"]) for p in patches if p.get("$patch") == "delete"}
    assert deleted == {("Deployment", "kvbento-redis"), ("Service", "kvbento-redis")}
    assert deleted <= set(resources)
    (env_patch,) = [p for p in patches if p.get("$patch") != "delete"]
    assert (env_patch["kind"], env_patch["metadata"]["name"]) in resources
    (c,) = env_patch["spec"]["template"]["spec"]["containers"]
    assert c["name"] == container(resources[("Deployment", "kvbento")])["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KVBENTO_CACHE_MAX_BYTES"] == {"name": "KVBENTO_CACHE_MAX_BYTES", "$patch": "delete"}, \
        "a cluster's budget is each node's maxmemory; kvbento refuses its own with redis+cluster://"
    url = env["KVBENTO_CACHE_URL"]["value"]
    Settings(cache_url=url)
    seeds = parse_url(url)["startup_nodes"]

    cluster = {(d["kind"], d["metadata"]["name"]): d for d in load_docs(CLUSTER / "redis-cluster.yaml")}
    sts = cluster[("StatefulSet", "kvbento-redis-cluster")]
    svc = cluster[("Service", sts["spec"]["serviceName"])]
    assert svc["spec"]["clusterIP"] == "None" and selects(svc, sts)
    pod = f'{sts["metadata"]["name"]}-{{}}.{svc["metadata"]["name"]}'
    pod_names = {pod.format(i) for i in range(sts["spec"]["replicas"])}
    assert seeds and all(n.host in pod_names and n.port == 6379 for n in seeds)
    # The create Job covers every pod, with replicas that fit the StatefulSet.
    job = cluster[("Job", "kvbento-redis-cluster-create")]
    job_env = {e["name"]: e["value"] for e in container(job)["env"]}
    nodes, per_master = int(job_env["NODES"]), int(job_env["REPLICAS_PER_MASTER"])
    assert nodes == sts["spec"]["replicas"] and nodes % (1 + per_master) == 0
    assert nodes // (1 + per_master) >= 3, "three masters at least"
    script = container(job)["command"][-1]
    assert "redis-cli --cluster create" in script and pod.format("$i") in script
    # Redis' own eviction is the budget; a dead master must not take the other slots down.
    conf = dict(line.split(None, 1) for line in
                cluster[("ConfigMap", "kvbento-redis-cluster")]["data"]["redis.conf"].splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["cluster-enabled"] == "yes" and conf["maxmemory-policy"] == "allkeys-lru"
    assert conf["cluster-require-full-coverage"] == "no" and conf["cluster-config-file"].startswith("/data/")
    mounts = {m["mountPath"] for m in container(sts)["volumeMounts"]}
    assert "/data" in mounts and "/etc/redis" in mounts
