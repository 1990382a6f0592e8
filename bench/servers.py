"""Start and stop the contenders as subprocesses (each in its own process group, stopped by PID)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    health: str
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "Proc":
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        env = {**os.environ, **self.env, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-3000:] if self.log_path else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def kvbento(model_dir: str, cache_url: str, threads: int, max_batch: int = 32, *, name: str = "kvbento",
            cpu_kernels: str = "onednn", cache_max_bytes: int = 0, extra_env: dict | None = None) -> Proc:
    port = free_port()
    env = {"KVBENTO_MODEL": model_dir, "KVBENTO_CACHE_URL": cache_url, "KVBENTO_NUM_THREADS": str(threads),
           "KVBENTO_MAX_BATCH_SIZE": str(max_batch), "KVBENTO_MAX_QUEUE": "256",
           "KVBENTO_CPU_KERNELS": cpu_kernels, "KVBENTO_CACHE_MAX_BYTES": str(cache_max_bytes),
           "OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    return Proc(name, [str(BIN / "bentoml"), "serve", "--port", str(port), "--host", "127.0.0.1"],
                "/readyz", env, port)


def hf_serve(model_dir: str, num_blocks: int, max_batch_tokens: int, threads: int) -> Proc:
    """`transformers serve --continuous-batching` with a sized paged cache (else it claims most memory).

    Blocks hold 256 tokens (the prefix-reuse page size): 64 blocks = 16k tokens, enough for 32
    requests of 128 tokens and a 2048-token continuation; 2048 blocks asked for ~52 GB and its CB
    worker died on the first request."""
    port = free_port()
    argv = [str(BIN / "transformers"), "serve", model_dir, "--continuous-batching", "--device", "cpu",
            "--cb-block-size", "256", "--cb-num-blocks", str(num_blocks), "--cb-max-batch-tokens", str(max_batch_tokens),
            "--host", "127.0.0.1", "--port", str(port)]
    return Proc("hf-serve", argv, "/health", {"OMP_NUM_THREADS": str(threads)}, port)


def naive(model_dir: str, threads: int) -> Proc:
    port = free_port()
    return Proc("naive", [sys.executable, "-m", "bench.naive_server", model_dir, str(port)], "/health",
                {"OMP_NUM_THREADS": str(threads)}, port)
