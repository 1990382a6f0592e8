"""Shared fixtures: the tiny model, real `bentoml serve` servers (see launcher/), Redis and Redis Cluster."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher import ServeProcess
from launcher.redis import RedisClusterServer, RedisMissing, RedisServer, answers


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
    stop_all(started)


def stop_all(servers: list[ServeProcess]) -> None:
    """Stop servers at once: each stop waits up to its grace for the process tree to exit."""
    if servers:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.stop(), servers))


@pytest.fixture(scope="session")
def server(server_factory) -> ServeProcess:
    """The default server (no API keys, a disk store), shared by every module that needs no other
    settings: each `bentoml serve` costs a model load and seconds of start-up. Tests name their own
    request_ids; its cache directory is ``server.env["KVBENTO_CACHE_URL"]``."""
    return server_factory()


# --- Redis ------------------------------------------------------------------------------------
def _started(server):
    """``server.start()``; without redis-server a skip (a failure under CI=true, which needs Redis)."""
    try:
        return server.start()
    except RedisMissing as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true needs Redis: {exc}")
        pytest.skip(f"no Redis: run one on 127.0.0.1:6379 or {exc}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis URL: 127.0.0.1:6379 when it answers, else a redis-server we start; skips without one
    (fails under CI=true). Shared: tests must use their own key names / namespaces."""
    if answers(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    own = _started(RedisServer())
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
        return _started(server)

    yield make
    for s in started:
        s.kill()


# --- Redis Cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_cluster_factory(tmp_path_factory):
    """Start private three-master Redis Clusters (for tests that kill a master)."""
    started: list[RedisClusterServer] = []

    def make(**options) -> RedisClusterServer:
        cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"), **options)
        started.append(cluster)
        return _started(cluster)

    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster_factory) -> str:
    """A ``redis+cluster://`` URL of a shared local three-master cluster; tests use their own keys."""
    return redis_cluster_factory().url
