"""In-process measurements: memory bandwidth, KV record codec, backend save/load, engine ITL."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import torch

from cache.codec import KVRecord, decode, encode, encoded
from cache.factory import open_backend


def memory_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """Best-of copy bandwidth (bytes read + bytes written per second), in GB/s."""
    src = torch.ones(mb * (1 << 20) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def make_record(num_layers: int, kv_heads: int, head_dim: int, num_tokens: int,
                dtype: torch.dtype = torch.float32) -> KVRecord:
    g = torch.Generator().manual_seed(0)
    shape = (kv_heads, num_tokens - 1, head_dim)
    keys = [torch.randn(shape, generator=g).to(dtype) for _ in range(num_layers)]
    values = [torch.randn(shape, generator=g).to(dtype) for _ in range(num_layers)]
    return KVRecord(list(range(num_tokens)), num_tokens, "bench", keys, values)


def codec_gbs(record: KVRecord, reps: int = 5) -> dict:
    """Median encode (fresh buffer and pooled buffer, the store's path) and decode throughput, GB/s of
    tensor bytes; ``roundtrip_gbs`` is pooled encode + decode, what one save and one load cost."""
    enc, pooled, dec = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        data = encode(record)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        with encoded(record):
            pass
        pooled.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode(data)
        dec.append(time.perf_counter() - t)
        del data
    nb = record.nbytes
    e, p, d = statistics.median(enc), statistics.median(pooled), statistics.median(dec)
    return {"mb": nb / 1e6, "encode_gbs": nb / e / 1e9, "pooled_encode_gbs": nb / p / 1e9,
            "decode_gbs": nb / d / 1e9, "roundtrip_gbs": nb / (p + d) / 1e9}


def block_reads(url: str, num_layers: int, kv_heads: int, head_dim: int, block_tokens: list[int],
                context: int = 1024, reps: int = 3) -> dict:
    """Reading a ``context``-token prefix from Redis as blocks of each size: ms (median) with the
    backend's ranged bulk reader and with plain redis-py GETs, decode included."""
    from cache.redis import RedisBackend

    out: dict = {}
    for b in block_tokens:
        rec = make_record(num_layers, kv_heads, head_dim, b + 1)
        keys = [f"kvbento:bench:blk:{uuid.uuid4().hex}" for _ in range(context // b)]
        backend = RedisBackend(url, timeout=30, namespace=f"bench-{uuid.uuid4().hex[:6]}")
        plain = RedisBackend(url, timeout=30, namespace=f"bench-{uuid.uuid4().hex[:6]}")
        plain._bulk = None  # redis-py's GET path
        try:
            data = encode(rec)
            for k in keys:
                backend.set(k, data)
            row = {"block_mb": len(data) / 1e6, "blocks": len(keys)}
            for name, be in (("bulk_ms", backend), ("redis_py_ms", plain)):
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    for k in keys:
                        decode(be.get(k))
                    times.append(time.perf_counter() - t)
                row[name] = 1000 * statistics.median(times)
            out[str(b)] = row
            for k in keys:
                backend.delete(k)
        finally:
            backend.close()
            plain.close()
    return out


def backend_latency(url: str, record: KVRecord, reps: int = 5) -> dict:
    """Median save (encode + set) and load (get + decode) latency in ms through the backend."""
    backend = open_backend(url, timeout=30)
    key = f"kvbento:bench:{uuid.uuid4().hex}"
    save, load = [], []
    try:
        for _ in range(reps):
            t = time.perf_counter()
            with encoded(record) as data:  # the store's save path
                backend.set(key, data)
            save.append(time.perf_counter() - t)
            t = time.perf_counter()
            decode(backend.get(key))
            load.append(time.perf_counter() - t)
        backend.delete(key)
    finally:
        backend.close()
    return {"save_ms": 1000 * statistics.median(save), "load_ms": 1000 * statistics.median(load)}


class InProcessEngine:
    """The engine driven directly (no HTTP, no store), kept loaded so that its requests can be
    interleaved with the same requests sent through HTTP (the server-overhead ratio)."""

    def __init__(self, model_dir: str, threads: int) -> None:
        from model import loader
        from model.engine import Engine, EngineConfig
        from session import Session

        torch.set_num_threads(threads)
        self.m = loader.load(model_dir, "cpu", "auto", 0)
        self.engine = Engine(self.m, EngineConfig(max_batch_size=32))
        self.session = Session(self.engine, None)
        self._n = 0

    def itls(self, prompt_ids: list[int], n: int) -> list[float]:
        """Inter-token latencies (s) of one request of exactly ``n`` new tokens."""
        from model.types import SamplingParams
        from session.request import GenerateRequest

        self._n += 1

        async def one() -> list[float]:
            req = GenerateRequest(request_id=f"inproc-{self._n}", prompt_ids=list(prompt_ids),
                                  params=SamplingParams(max_new_tokens=n, min_new_tokens=n), use_cache=False)
            times = []
            async for d in await self.session.generate(req):
                if d.token_ids:
                    times.append(time.perf_counter())
            return times

        t = asyncio.run(one())
        return [b - a for a, b in zip(t, t[1:])]

    def summary(self, itls: list[float]) -> dict:
        from model import kernels, native

        mean = statistics.fmean(itls)
        return {"itl_ms_mean": 1000 * mean, "itl_ms_median": 1000 * statistics.median(itls),
                "decode_tok_s": 1 / mean, "model_bytes": self.m.weight_bytes,
                "kernels": {"packed_linears": any(isinstance(x, kernels.PackedLinear) for x in self.m.model.modules()),
                            "native_attention": native.ATTENTION.load() is not None,
                            "lean_decode_step": self.m.decode_step is not None}}

    def close(self) -> None:
        self.engine.close()
