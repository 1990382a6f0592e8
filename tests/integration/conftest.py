import asyncio

import pytest


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    from model.loader import load

    return load(str(tiny_model_dir))


@pytest.fixture(scope="session")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(loaded, tmp_path_factory):
    """The session over an in-process engine on the tiny model with a disk store (batch 4 to force
    joins/leaves; 8-token blocks so short prompts span several)."""
    from cache.factory import open_backend
    from cache.store import KVStore
    from model.engine import Engine, EngineConfig
    from session import Session

    store = KVStore(open_backend(f"disk://{tmp_path_factory.mktemp('kv')}"), loaded.fingerprint, block_tokens=8)
    eng = Engine(loaded, EngineConfig(max_batch_size=4, max_queue=64, prefill_chunk=16))
    yield Session(eng, store)
    eng.close()
    store.close()
