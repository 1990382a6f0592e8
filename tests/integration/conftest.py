import asyncio

import pytest


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    """The tiny model in the dtype a server here would pick (KVBENTO_DTYPE, default auto: bf16 on a
    CPU with native bf16 matmul). ``KVBENTO_DTYPE=bfloat16 pytest`` runs the suite as such a CPU would."""
    from config import Settings
    from model.loader import load

    return load(str(tiny_model_dir), dtype=Settings().dtype)


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
    eng = Engine(loaded, EngineConfig(max_batch_size=4, max_queue=64, prefill_chunk=16, block_tokens=8))
    yield Session(eng, store)
    eng.close()
    store.close()
