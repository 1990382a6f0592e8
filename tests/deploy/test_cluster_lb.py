"""Scale-out with real parts: HAProxy (the distribution's package) hashing ``X-KV-Request-Id``
over three `bentoml serve` replicas that share a local three-master Redis Cluster.

- a conversation's turns stay on one replica (``X-KV-Replica``);
- SIGKILL that replica between two turns: the next turn continues exactly on another replica, from
  the cluster (greedy 12 + 12 tokens = one 24-token run);
- SIGKILL a Redis master: requests keep answering (no 5xx), and after it restarts turns are
  continued from the cluster again.

The tests run in file order on one deployment. Minutes, and it needs haproxy and redis-server, so
it is not part of `make test`: `make test-deploy` installs them and sets KVBENTO_DEPLOY_TEST=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from launcher import ServeProcess, free_port

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.e2e,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("KVBENTO_DEPLOY_TEST") != "1",
                       reason="the deployment test runs with `make test-deploy` (KVBENTO_DEPLOY_TEST=1)"),
]

PROMPT = "[INST] Write a long story about a lighthouse keeper [/INST]\n\n"
HAPROXY_CFG = """\
global
    maxconn 512

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    # A refused connection (a dead replica not yet marked down) is retried on another server.
    retries 2
    option redispatch

frontend kvbento
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    # One conversation, one replica: hash the header (no header: round robin).
    balance hdr(X-KV-Request-Id)
    hash-type consistent
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
"""


class HAProxy:
    """An haproxy process in the foreground of its own process group, stopped by PID."""

    def __init__(self, backends: list[ServeProcess], workdir: Path) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            pytest.fail("haproxy is not installed: run `make test-deploy`, which installs it")
        self.port = free_port()
        servers = "\n".join(f"    server r{i} 127.0.0.1:{s.port} check" for i, s in enumerate(backends))
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(HAPROXY_CFG.format(port=self.port, servers=servers))
        subprocess.run([exe, "-c", "-f", str(self.cfg)], check=True, capture_output=True)
        self.log = workdir / "haproxy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"haproxy did not answer:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(redis_cluster_factory):
    return redis_cluster_factory()


@pytest.fixture(scope="module")
def replicas(cluster, tiny_model_dir, tmp_path_factory):
    env = {"KVBENTO_MODEL": str(tiny_model_dir), "KVBENTO_CACHE_URL": cluster.url,
           "KVBENTO_CACHE_TIMEOUT": "1", "KVBENTO_API_KEYS": "", "KVBENTO_NUM_THREADS": "1"}
    homes = [str(tmp_path_factory.mktemp("bentoml_home")) for _ in range(3)]  # one per server
    servers = [ServeProcess({**env, "BENTOML_HOME": home}) for home in homes]
    errors: list[BaseException] = []

    def start(s: ServeProcess) -> None:
        try:
            s.start(timeout=300)
        except BaseException as exc:  # reported below, after every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def lb(replicas, tmp_path_factory):
    proxy = HAProxy(replicas, tmp_path_factory.mktemp("haproxy"))
    yield proxy
    proxy.stop()


def replica_of(server: ServeProcess) -> str:
    """A replica's X-KV-Replica, asked directly (a 404 of the cache API answers without generating)."""
    return requests.get(f"{server.url}/api/cache/{uuid.uuid4().hex}", timeout=30).headers["X-KV-Replica"]


def reuse(servers: list[ServeProcess]) -> dict[str, float]:
    """kvbento_kv_reuse_total by source, summed over the live replicas' /metrics."""
    out = {"local": 0.0, "store": 0.0}
    for s in servers:
        if s.proc is None or s.proc.poll() is not None:
            continue
        text = requests.get(s.url + "/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "kvbento_kv_reuse_total":
                    out[sample.labels["source"]] += sample.value
    return out


def turn(url: str, rid: str, n: int, prompt: str = PROMPT) -> requests.Response:
    """One greedy turn of exactly n tokens, request_id in the header only (as an LB client sends it);
    the answer holds the whole text so far."""
    body = {"prompt": prompt, "stream_response": False, "only_new_tokens": False,
            "generation_config": {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}}
    return requests.post(url + "/api/generate", json=body, headers={"X-KV-Request-Id": rid}, timeout=120)


def ok(r: requests.Response) -> requests.Response:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return r


def sigkill_replica(server: ServeProcess) -> None:
    """SIGKILL a replica: the `bentoml serve` process group and its workers, which circus starts in
    sessions of their own (a worker left alive would keep serving on the inherited socket)."""
    server.kill()


def wait_stored(servers: list[ServeProcess], rid: str, tokens: int, timeout: float = 30) -> None:
    """Until the conversation's record with ``tokens`` tokens is readable from the cluster (saves
    complete after the answer), asked of replicas other than the one that wrote it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [requests.get(f"{s.url}/api/cache/{rid}", timeout=30) for s in servers]
        if all(i.status_code == 200 and i.json()["tokens"] >= tokens for i in infos):
            return
        time.sleep(0.2)
    raise AssertionError(f"{rid} with {tokens} tokens never reached the cluster")


def test_a_conversation_stays_on_one_replica(lb, replicas):
    ids = {replica_of(s) for s in replicas}
    assert len(ids) == 3, "each replica has its own id"
    used = set()
    before = reuse(replicas)
    for i in range(9):
        rid = f"sticky-{i}"
        seen = {ok(turn(lb.url, rid, 4)).headers["X-KV-Replica"]}
        for _ in range(2):
            r = ok(turn(lb.url, rid, 4))
            assert r.headers["X-KV-Cache"] == "hit"
            seen.add(r.headers["X-KV-Replica"])
        assert len(seen) == 1, f"{rid} moved between replicas: {seen}"
        used |= seen
    assert used <= ids and len(used) >= 2, "the hash spreads conversations over the replicas"
    after = reuse(replicas)  # each continued turn reused KV once (local or store: the session decides)
    assert sum(after.values()) - sum(before.values()) == 18


def test_killing_the_conversations_replica_continues_it_exactly_elsewhere(lb, replicas):
    rid = "failover-" + uuid.uuid4().hex
    # A prompt of its own: blocks are shared by content, and other conversations' turns left the
    # blocks of the common prompt in every replica's memory.
    prompt = f"[{rid}] {PROMPT}"
    first = ok(turn(lb.url, rid, 12, prompt))
    owner_id = first.headers["X-KV-Replica"]
    owner = next(s for s in replicas if replica_of(s) == owner_id)
    others = [s for s in replicas if s is not owner]
    usage = first.json()["usage"]
    wait_stored(others, rid, usage["prompt_tokens"] + usage["completion_tokens"])
    sigkill_replica(owner)

    before = reuse(others)
    second = ok(turn(lb.url, rid, 12, prompt))
    after = reuse(others)
    # The new replica never held this conversation: its KV was read from the cluster.
    assert after["store"] - before["store"] == 1 and after["local"] == before["local"]
    assert second.headers["X-KV-Replica"] != owner_id
    assert second.headers["X-KV-Replica"] in {replica_of(s) for s in others}
    assert second.headers["X-KV-Cache"] == "hit", "continued from the cluster, not recomputed"
    assert second.json()["usage"]["completion_tokens"] == 12
    reference = ok(turn(lb.url, "failover-ref-" + uuid.uuid4().hex, 24, prompt))
    assert second.json()["response"] == reference.json()["response"]
    # The conversation now lives on its new replica.
    third = ok(turn(lb.url, rid, 2, prompt))
    assert third.headers["X-KV-Replica"] == second.headers["X-KV-Replica"]


def test_a_dead_redis_master_costs_misses_not_errors_and_its_return_restores_hits(lb, cluster):
    cluster.kill(0)
    statuses = []
    for i in range(12):
        rid = f"master-down-{i}-{uuid.uuid4().hex[:6]}"
        for _ in range(2):
            r = turn(lb.url, rid, 3)
            assert r.status_code == 200, (r.status_code, r.text[:300])  # never a 5xx
            statuses.append(r.headers["X-KV-Cache"])
    assert set(statuses) <= {"hit", "miss", "unavailable"}
    assert {"miss", "unavailable"} & set(statuses), "the dead master's slots cannot all hit"

    cluster.restart(0)
    deadline = time.monotonic() + 30
    while True:  # each replica's client picks the node up on its next calls
        rids = [f"master-back-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
        for rid in rids:
            ok(turn(lb.url, rid, 3))
        time.sleep(0.3)  # saves land after the answer
        again = [ok(turn(lb.url, rid, 3)).headers["X-KV-Cache"] for rid in rids]
        if again == ["hit"] * len(rids):
            break
        assert time.monotonic() < deadline, f"no full recovery after the master returned: {again}"
