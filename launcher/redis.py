"""Local redis-server processes for the tests and the benchmark: one server, or a Redis Cluster of
several masters, on free ports, without persistence, killed and restarted by PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher import free_port

HINT = "apt-get install redis-server (redis-server and redis-cli on PATH)"


class RedisMissing(RuntimeError):
    """redis-server or redis-cli is not installed."""


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RedisMissing(f"no {name}: {HINT}")
    return path


def answers(port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=timeout,
                                socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


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
        exe = _exe("redis-server")
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--requirepass", self.password] if self.password else []
        argv += ["--unixsocket", self.unixsocket] if self.unixsocket else []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers(self.port, password=self.password):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


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
        exe = _exe("redis-server")
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
        while not answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"cluster node on port {port} did not start")
            time.sleep(0.05)

    def start(self, timeout: float = 30) -> "RedisClusterServer":
        self.ports = [free_port() for _ in range(self.size)]
        self.bus_ports = [free_port() for _ in range(self.size)]
        self.procs = [None] * self.size
        for i in range(self.size):
            self._spawn(i)
        cli = _exe("redis-cli")
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
