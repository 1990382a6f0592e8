"""Start and stop the contenders as subprocesses (each in its own process group, stopped by PID)."""

from __future__ import annotations

import sys

from launcher import BIN, ServeProcess, free_port

# A contender loading the ~100M-parameter model on a busy machine can take minutes to be ready.
START_TIMEOUT = 300


def kvbento(model_dir: str, cache_url: str, threads: int, max_batch: int = 32, *, name: str = "kvbento",
            cpu_kernels: str = "onednn", cache_max_bytes: int = 0, dtype: str = "auto",
            extra_env: dict | None = None) -> ServeProcess:
    port = free_port()
    env = {"KVBENTO_DTYPE": dtype, "KVBENTO_MODEL": model_dir, "KVBENTO_CACHE_URL": cache_url, "KVBENTO_NUM_THREADS": str(threads),
           "KVBENTO_MAX_BATCH_SIZE": str(max_batch), "KVBENTO_MAX_QUEUE": "256",
           "KVBENTO_CPU_KERNELS": cpu_kernels, "KVBENTO_CACHE_MAX_BYTES": str(cache_max_bytes),
           "OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    return ServeProcess(env, port, name=name, start_timeout=START_TIMEOUT)


def hf_serve(model_dir: str, num_blocks: int, max_batch_tokens: int, threads: int, dtype: str = "auto",
             name: str = "hf-serve") -> ServeProcess:
    """`transformers serve --continuous-batching` with a sized paged cache (else it claims most memory).

    Blocks hold 256 tokens (the prefix-reuse page size): 64 blocks = 16k tokens, enough for 32
    requests of 128 tokens and a 2048-token continuation; 2048 blocks asked for ~52 GB and its CB
    worker died on the first request. ``dtype="auto"`` is its default: the weights' own dtype."""
    port = free_port()
    argv = [str(BIN / "transformers"), "serve", model_dir, "--continuous-batching", "--device", "cpu",
            "--cb-block-size", "256", "--cb-num-blocks", str(num_blocks), "--cb-max-batch-tokens", str(max_batch_tokens),
            "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    return ServeProcess({"OMP_NUM_THREADS": str(threads)}, port, argv=argv, ready_path="/health",
                        start_timeout=START_TIMEOUT, name=name)


def naive(model_dir: str, threads: int, dtype: str = "auto", name: str = "naive") -> ServeProcess:
    """The naive server; ``dtype="auto"`` is from_pretrained's default (float32)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.naive_server", model_dir, str(port), dtype]
    return ServeProcess({"OMP_NUM_THREADS": str(threads)}, port, argv=argv, ready_path="/health",
                        start_timeout=START_TIMEOUT, name=name)
