"""Shared fixtures: the tiny model, real `bentoml serve` servers (see launcher/), Redis and Redis Cluster."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher import ServeProcess, free_port


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from model import bundled

    return bundled.ensure("kvbento-tiny")


@pytest.fixture(scope="session")
def server_factory(tiny_model_dir, tmp_path_factory):
    """Start servers with extra KVBENTO_* env; all are stopped at the end of the session."""
    started: list[ServeProcess] = []

    def make(env: dict[str, str] | None = None, *, cache_dir: Path | None = None) -> ServeProcess:
        cache_dir = cache_dir or tmp_path_factory.mktemp("kvcache")
        base = {
            "KVBENTO_MODEL": str(tiny_model_dir),
            "KVBENTO_CACHE_URL": f"disk://{cache_dir}",
            "KVBENTO_API_KEYS": "",
            "KVBENTO_NUM_THREADS": "1",
            # bentoml serve wipes $BENTOML_HOME/prometheus_multiproc_dir when it starts: servers
            # sharing a home would erase each other's /metrics. One home per server.
            "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
        }
        server = ServeProcess({**base, **(env or {})})
        started.append(server)
        return server.start()

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(server_factory) -> ServeProcess:
    """One default server per test module."""
    return server_factory()


# --- Redis (issue 3) ---------------------------------------------------------------------------
REDIS_HINT = ("no Redis: run one on 127.0.0.1:6379 or put redis-server on PATH "
              "(apt-get install redis-server / brew install redis)")


def _redis_answers(port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=timeout,
                                socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def _no_redis(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true needs Redis: {reason}")
    pytest.skip(reason)


@dataclass
class RedisServer:
    """A redis-server subprocess of our own (no persistence), killed and restarted by PID."""

    port: int = field(default_factory=free_port)
    password: str | None = None
    unixsocket: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "RedisServer":
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            _no_redis(REDIS_HINT)
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--requirepass", self.password] if self.password else []
        argv += ["--unixsocket", self.unixsocket] if self.unixsocket else []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _redis_answers(self.port, password=self.password):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis URL: 127.0.0.1:6379 when it answers, else a redis-server we start; skips without one
    (fails under CI=true). Shared: tests must use their own key names / namespaces."""
    if _redis_answers(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    own = RedisServer().start()
    try:
        yield own.url
    finally:
        own.kill()


@pytest.fixture(scope="session")
def redis_server_factory():
    """Start private redis-servers (for tests that kill Redis or need a clean budget)."""
    started: list[RedisServer] = []

    def make(port: int | None = None, **options) -> RedisServer:
        server = RedisServer(port, **options) if port else RedisServer(**options)
        started.append(server)
        return server.start()

    yield make
    for s in started:
        s.kill()


# --- Redis Cluster ------------------------------------------------------------------------------
@dataclass
class RedisClusterServer:
    """A local Redis Cluster of ``size`` masters, no replicas, no persistence (nodes.conf only, so
    a killed master restarts on its port with its slots). Nodes are killed and restarted by PID."""

    workdir: Path
    size: int = 3
    ports: list[int] = field(default_factory=list)
    bus_ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen | None] = field(default_factory=list)
    maxmemory: str = "256mb"

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _spawn(self, i: int) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            _no_redis(REDIS_HINT)
        port = self.ports[i]
        d = self.workdir / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        argv = [exe, "--port", str(port), "--cluster-port", str(self.bus_ports[i]), "--bind", "127.0.0.1",
                "--dir", str(d), "--save", "", "--appendonly", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
                # The cluster's byte budget (see cache/redis_cluster.py).
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs[i] = proc
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"cluster node on port {port} did not start")
            time.sleep(0.05)

    def start(self, timeout: float = 30) -> "RedisClusterServer":
        import shutil

        self.ports = [free_port() for _ in range(self.size)]
        self.bus_ports = [free_port() for _ in range(self.size)]
        self.procs = [None] * self.size
        for i in range(self.size):
            self._spawn(i)
        cli = shutil.which("redis-cli")
        if cli is None:
            _no_redis(REDIS_HINT)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def cluster_info(self, i: int) -> dict[str, str]:
        import redis

        raw = redis.Redis(host="127.0.0.1", port=self.ports[i], socket_timeout=1).execute_command("CLUSTER INFO")
        text = raw.decode() if isinstance(raw, bytes) else raw
        if isinstance(text, dict):
            return {k: str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node reports the cluster ok with all slots assigned and known."""
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [self.cluster_info(i) for i in range(self.size) if self.is_alive(i)]
                if infos and all(x.get("cluster_state") == "ok" and x.get("cluster_slots_ok") == "16384"
                                 and x.get("cluster_known_nodes") == str(self.size) for x in infos):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok after {timeout}s")
            time.sleep(0.1)

    def is_alive(self, i: int) -> bool:
        return self.procs[i] is not None and self.procs[i].poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a master: its slots go unserved until it restarts)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, i: int, timeout: float = 30) -> None:
        """Start node ``i`` again on its port; it rejoins with its slots, empty."""
        self.kill(i)
        self._spawn(i)
        self.wait_ok(timeout)

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


@pytest.fixture(scope="session")
def redis_cluster_factory(tmp_path_factory):
    """Start private three-master Redis Clusters (for tests that kill a master)."""
    started: list[RedisClusterServer] = []

    def make(**options) -> RedisClusterServer:
        cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"), **options)
        started.append(cluster)
        return cluster.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster_factory) -> str:
    """A ``redis+cluster://`` URL of a shared local three-master cluster; tests use their own keys."""
    return redis_cluster_factory().url
