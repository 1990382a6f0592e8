"""Wiring: settings -> model -> store -> engine, built once per server process."""

from __future__ import annotations

import gc
import hmac
import logging
from dataclasses import dataclass

import torch

from cache.factory import open_backend
from cache.jobs import JobStore
from cache.entries import tenant_of
from cache.store import KVStore
from config import Settings
from model import bundled, loader
from model.engine import Engine, EngineConfig, EngineObserver
from protocol.common import Unauthorized
from session import Session, SessionObserver
from session.background import BackgroundObserver, BackgroundRunner
from session.resume import ResumableStreams

log = logging.getLogger("kvbento")


@dataclass
class Runtime:
    settings: Settings
    model: loader.LoadedModel
    store: KVStore
    engine: Engine
    session: Session
    background: BackgroundRunner
    resume: ResumableStreams | None = None

    @classmethod
    def start(cls, settings: Settings, observer: EngineObserver | None = None,
              session_observer: SessionObserver | None = None) -> "Runtime":
        """Load the model, open the store and start the engine thread. ``observer`` hears the
        engine's events, ``session_observer`` the store's (one object may be both)."""
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        if settings.model == str(bundled.MODELS_DIR / "kvbento-tiny"):
            bundled.ensure("kvbento-tiny")  # the default works with no set-up at all
        m = loader.load(settings.model, settings.device, settings.dtype, settings.max_context,
                        settings.cpu_kernels)
        backend = open_backend(settings.cache_url, max_bytes=settings.cache_max_bytes,
                               timeout=settings.cache_timeout)
        recent = settings.cache_recent_bytes
        if recent is None:  # a second host copy of what a CPU pool holds pins copy-out buffers (bench/NOTES.md)
            recent = 0 if m.device.type == "cpu" else 512 << 20
        store = KVStore(backend, m.fingerprint, block_tokens=settings.cache_block_tokens,
                        ttl=settings.cache_ttl, timeout=settings.cache_timeout,
                        memory_bytes=recent, lease_seconds=settings.lease_seconds)
        store.prefault_reads(m.kv_bytes_per_token, m.max_context, settings.cache_read_buffer_bytes)
        engine = Engine(
            m,
            EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                         prefill_chunk=settings.prefill_chunk,
                         grammar_compile_timeout=settings.grammar_compile_timeout,
                         max_batch_tokens=settings.max_batch_tokens, step_target_ms=settings.step_target_ms,
                         block_tokens=settings.cache_block_tokens, kv_cache_bytes=settings.kv_cache_bytes,
                         kv_cache_share=settings.kv_cache_share),
            observer,
        )
        log.info("kvbento ready: model %s, cache %s, batch %d, queue %d", settings.model,
                 backend.scheme, settings.max_batch_size, settings.max_queue)
        session = Session(engine, store, observer=session_observer)
        runtime = cls(settings, m, store, engine, session, background_runner(settings, store, session, observer),
                   ResumableStreams(settings.resume_grace_seconds, store, lambda ids: m.tokenizer.decode(
                       ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)))
        # The startup heap (torch, transformers, the tokenizer: ~0.5M objects) out of the cyclic
        # collector's way: a full collection walked it for ~235 ms holding the GIL (bench/NOTES.md).
        gc.collect()
        gc.freeze()
        return runtime

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a request: checks the bearer key when keys are configured.

        Raises:
            Unauthorized: keys are configured and the header is missing or wrong.
        """
        keys = self.settings.api_key_list
        if not keys:
            return tenant_of(None)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <key>'")
        given_b = given.strip().encode()
        match = None
        for key in keys:  # compare against every key, in constant time each
            if hmac.compare_digest(given_b, key.encode()):
                match = key
        if match is None:
            raise Unauthorized("invalid API key")
        return tenant_of(match)

    # Set when shutdown begins, so /health answers 503 before the engine stops.
    is_closing: bool = False

    def close(self) -> None:
        self.is_closing = True
        self.engine.close()
        self.store.close()


def background_runner(settings: Settings, store: KVStore, session: Session,
                      observer: object | None = None) -> BackgroundRunner:
    """The runner of background responses, with every job kind it can resume."""
    from protocol import responses_background
    from session.responses import ResponseStore

    jobs = JobStore(store, ttl=settings.background_ttl, lease_seconds=settings.lease_seconds)
    runner = BackgroundRunner(jobs, poll_seconds=settings.background_poll_seconds,
                              observer=observer if isinstance(observer, BackgroundObserver) else None)
    runner.kinds[responses_background.KIND] = responses_background.resumer(session, ResponseStore(store))
    return runner
