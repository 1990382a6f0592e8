"""Shared fixtures: the tiny model, an in-process engine, and real `bentoml serve` servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENTOML = str(Path(sys.executable).parent / "bentoml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from model import bundled

    return bundled.ensure("kvbento-tiny")


@dataclass
class Server:
    """A real `bentoml serve` subprocess (its own process group, stopped by PID)."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    password: str | None = None
    unixsocket: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "Server":
        import requests

        fd, path = tempfile.mkstemp(prefix="kvbento-serve-", suffix=".log")
        self.log_path = Path(path)
        env = {**os.environ, **self.env, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [BENTOML, "serve", "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True,
        )
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we started: bentoml and its workers
            self.proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server_factory(tiny_model_dir, tmp_path_factory):
    """Start servers with extra KVBENTO_* env; all are stopped at the end of the session."""
    started: list[Server] = []

    def make(env: dict[str, str] | None = None, *, cache_dir: Path | None = None) -> Server:
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
        server = Server({**base, **(env or {})})
        started.append(server)
        return server.start()

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(server_factory) -> Server:
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
