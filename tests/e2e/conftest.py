"""Servers shared across e2e modules (each `bentoml serve` costs a model load and seconds of start-up):
one per set of settings that changes no other module's answers. A module that kills, restarts or
overloads its server, or needs a store of its own, starts a private one and stops it when done."""

from __future__ import annotations

import pytest

from launcher import ServeProcess

# The API key of every module on the keyed server: each module is a tenant of its own there.
SHARED_KEYS = ("sk-dialects-openai", "truss-dialect-key", "together-generic-key", "sk-eco-bento",
               "playground-key")
# The Responses modules' two tenants on the shared Redis replica pair.
PAIR_KEYS = ("resp-key-alpha", "resp-key-bravo")


@pytest.fixture(scope="session")
def keyed_server(server_factory) -> ServeProcess:
    """A server that requires one of SHARED_KEYS (a disk store)."""
    return server_factory({"KVBENTO_API_KEYS": ",".join(SHARED_KEYS)})


@pytest.fixture(scope="session")
def tuned_server(server_factory) -> ServeProcess:
    """An open server with a served-model name, a replica id and a 1 s grammar compile timeout: the
    settings test_newcomer, test_request_id_header and test_structured_outputs each check (none of
    them reads another's)."""
    return server_factory({"KVBENTO_MODEL_NAME": "acme/tiny-chat", "KVBENTO_REPLICA_ID": "replica-a.1",
                           "KVBENTO_GRAMMAR_COMPILE_TIMEOUT": "1"})


@pytest.fixture(scope="session")
def redis_pair(server_factory, redis_url) -> list[ServeProcess]:
    """Two replicas on the shared Redis with 16-token blocks, keyed with PAIR_KEYS."""
    env = {"KVBENTO_CACHE_URL": redis_url, "KVBENTO_API_KEYS": ",".join(PAIR_KEYS),
           "KVBENTO_CACHE_BLOCK_TOKENS": "16"}
    return [server_factory(env), server_factory(env)]
