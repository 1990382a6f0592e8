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
