"""Prometheus metrics of the engine and the KV store, served by BentoML's own ``/metrics``.

BentoML runs prometheus_client in multiprocess mode: each worker writes its samples to files under
``PROMETHEUS_MULTIPROC_DIR``, which BentoML sets while the worker starts, and ``/metrics`` merges
them. prometheus_client picks its value class when it is first imported, so this module imports it
only inside ``PrometheusObserver.__init__`` (called from the service's ``__init__``, after the
variable is set); importing it at module import time would leave the metrics invisible.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``kvbento_time_to_first_token_seconds``)
with an underscore: a colon is legal but reserved by Prometheus for recording rules.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

from cache.entries import CacheStatus
from model.engine import EngineObserver
from model.types import Delta
from session.observer import SessionObserver
from session.background import BackgroundObserver

if TYPE_CHECKING:
    from model.engine import Engine, RequestStream

PREFIX = "kvbento_"
# Latency buckets (seconds) shaped like vLLM's: fine below a second, coarse up to minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0)
REUSE_SOURCES = ("local", "store")
INFO_KERNELS = ("linears", "attention", "decode_step", "batch_invariant")  # model.loader.LoadedModel.kernels' keys
BACKGROUND_EVENTS = ("queued", "taken_over", "cancelled", "done")
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Timing:
    """Per-stream timing state: when its last token arrived, and whether one has yet."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: float | None = None


class PrometheusObserver(EngineObserver, SessionObserver, BackgroundObserver):
    """The engine's, the session's and the background runner's observer: records vLLM-style
    metrics with prometheus_client.

    Create one per process (metric names are registered once); call ``bind(engine)`` after the
    engine exists so the running/waiting gauges can be read from its scheduler.
    """

    def __init__(self) -> None:
        # Deferred on purpose: see the module docstring.
        from prometheus_client import Counter, Gauge, Histogram

        self._engine: Engine | None = None
        self._timings: weakref.WeakKeyDictionary[RequestStream, _Timing] = weakref.WeakKeyDictionary()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Seconds from accepting a request to its first generated token.",
                              buckets=TTFT_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Seconds between consecutive generated tokens of one request.",
                             buckets=ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Seconds from accepting a request to its last token.", buckets=E2E_BUCKETS)
        # One worker per process: the live process's latest value is the truth.
        self.running = Gauge(PREFIX + "num_requests_running",
                             "Requests prefilling or decoding in the running batch.",
                             multiprocess_mode="livemostrecent")
        self.waiting = Gauge(PREFIX + "num_requests_waiting",
                             "Requests waiting for a place in the running batch.",
                             multiprocess_mode="livemostrecent")
        # Constant 1, the labels carry the value (as Prometheus' *_info / build_info metrics do).
        self.info = Gauge(PREFIX + "engine_info", "What the engine runs: device, dtype, why that dtype "
                          "(KVBENTO_DTYPE or the CPU flag auto found) and the kernels in use.",
                          ["device", "dtype", "dtype_reason", *INFO_KERNELS], multiprocess_mode="livemostrecent")
        # The paged KV pool: vLLM's cache-usage gauge, by block state (cached = a reusable prefix).
        self.kv_blocks = Gauge(PREFIX + "kv_blocks", "Blocks of the KV pool by state: used (held by a "
                               "running request), cached (a prefix kept for reuse, evicted when "
                               "needed) and free.", ["state"], multiprocess_mode="livemostrecent")
        self.kv_pool_bytes = Gauge(PREFIX + "kv_pool_bytes", "Bytes of the KV pool (all its blocks).",
                                   multiprocess_mode="livemostrecent")
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens",
                                     "Prompt tokens of finished requests (cached ones included).")
        self.cached_tokens = Counter(PREFIX + "cached_prompt_tokens",
                                     "Prompt tokens restored from the KV store instead of prefilled.")
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens of finished requests.")
        self.finished = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["finished_reason"])
        self.rejected = Counter(PREFIX + "request_rejected",
                                "Requests answered 429 because the waiting queue was full.")
        self._store_metrics(Counter, Histogram)
        self._background_metrics(Counter, Gauge)

    def _store_metrics(self, Counter, Histogram) -> None:  # noqa: N803 (prometheus_client's classes)
        """The session's: lookups, reuse, prefix hits, store reads and writes."""
        self.lookups = Counter(PREFIX + "kv_store_lookups",
                               "KV store lookups by result: hit, miss or unavailable.", ["result"])
        for status in CacheStatus:  # every series exists from the start, at zero
            self.lookups.labels(result=status.value)
        # Same-replica reuse vs KV read back from the store: what conversation-affine routing saves.
        self.reuse = Counter(PREFIX + "kv_reuse", "Requests that reused stored KV, by where it came "
                             "from: local (this replica's memory) or store (read back).", ["source"])
        self.reuse_tokens = Counter(PREFIX + "kv_reuse_tokens", "Tokens of KV reused, by source "
                                    "(local or store).", ["source"])
        for source in REUSE_SOURCES:
            self.reuse.labels(source=source)
            self.reuse_tokens.labels(source=source)
        self.prefix_hits = Counter(PREFIX + "kv_prefix_hits", "Requests that restored a stored prefix, by how "
                                   "it was found: head (the request_id's or its parent's), anchor (the "
                                   "previous turn of a client without request_id) or blocks (content only).",
                                   ["found_by"])
        for found_by in ("head", "anchor", "blocks"):
            self.prefix_hits.labels(found_by=found_by)
        self.read_seconds = Histogram(PREFIX + "kv_store_read_seconds", "Seconds to read one KV record.",
                                      buckets=STORE_BUCKETS)
        self.write_seconds = Histogram(PREFIX + "kv_store_write_seconds",
                                       "Seconds to encode and write one KV record.", buckets=STORE_BUCKETS)
        self.read_bytes = Counter(PREFIX + "kv_store_read_bytes", "Bytes of KV records read.")
        self.write_bytes = Counter(PREFIX + "kv_store_write_bytes", "Bytes of KV records written.")
        self.write_failures = Counter(PREFIX + "kv_store_write_failures",
                                      "KV record writes lost because the store was unavailable.")

    def _background_metrics(self, Counter, Gauge) -> None:  # noqa: N803 (prometheus_client's classes)
        """The background runner's: responses by event, and those running here."""
        self.background = Counter(PREFIX + "background_responses", "Background responses by event: queued "
                                  "(created), taken_over (resumed from a dead replica's store), cancelled, done.",
                                  ["event"])
        for event in BACKGROUND_EVENTS:
            self.background.labels(event=event)
        self.background_running = Gauge(PREFIX + "background_responses_running",
                                        "Background responses running on this replica.",
                                        multiprocess_mode="livesum")

    def bind(self, engine: "Engine") -> None:
        """Read the running/waiting gauges from ``engine`` from now on; publish what it runs in."""
        self._engine = engine
        m = engine.m
        self.info.labels(device=m.device.type, dtype=str(m.dtype).removeprefix("torch."),
                         dtype_reason=m.dtype_reason, **{k: m.kernels.get(k, "") for k in INFO_KERNELS}).set(1)
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self._engine is not None:
            self.running.set(self._engine.num_running)
            self.waiting.set(self._engine.num_waiting)
            for state, n in self._engine.kv_blocks().items():
                self.kv_blocks.labels(state=state).set(n)
            self.kv_pool_bytes.set(self._engine.kv_pool_bytes)

    # -- BackgroundObserver hook ------------------------------------------------------------
    def on_background(self, event: str) -> None:
        if event == "running":
            self.background_running.inc()
            return
        if event in ("cancelled", "done"):
            self.background_running.dec()
        self.background.labels(event=event).inc()

    # -- EngineObserver hooks (event loop thread) -------------------------------------------
    def on_rejected(self) -> None:
        self.rejected.inc()
        self._update_gauges()

    def on_delta(self, stream: "RequestStream", delta: Delta, now: float) -> None:
        n = len(delta.token_ids)
        if n:
            timing = self._timings.get(stream)
            if timing is None:
                timing = self._timings[stream] = _Timing()
            if timing.last is None:
                self.ttft.observe(now - stream.arrival)
            else:
                # Several tokens can arrive in one delta (held back until a character completes):
                # spread the gap over them, one sample per token, as vLLM counts per token.
                gap = (now - timing.last) / n
                for _ in range(n):
                    self.itl.observe(gap)
            timing.last = now
        self._update_gauges()

    def on_finished(self, stream: "RequestStream") -> None:
        self.e2e.observe(time.perf_counter() - stream.arrival)
        usage = stream.usage
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.finished.labels(finished_reason=stream.finish_reason or "unknown").inc()
        self._timings.pop(stream, None)
        self._update_gauges()

    # -- SessionObserver hooks (event loop thread) ------------------------------------------
    def on_cache(self, status: CacheStatus, seconds: float, nbytes: int) -> None:
        self.lookups.labels(result=status.value).inc()
        if status is not CacheStatus.UNAVAILABLE:
            self.read_seconds.observe(seconds)
            self.read_bytes.inc(nbytes)

    def on_prefix(self, found_by: str) -> None:
        self.prefix_hits.labels(found_by=found_by).inc()

    def on_reuse(self, source: str, tokens: int) -> None:
        self.reuse.labels(source=source).inc()
        self.reuse_tokens.labels(source=source).inc(tokens)

    def on_store_write(self, seconds: float, nbytes: int, ok: bool) -> None:
        if ok:
            self.write_seconds.observe(seconds)
            self.write_bytes.inc(nbytes)
        else:
            self.write_failures.inc()
