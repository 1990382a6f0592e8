"""This repo's C kernels (``csrc/``): built with the machine's C compiler at first use, cached on
disk per source, flags, architecture and libc, and loaded with ctypes (which releases the GIL
during a call). ``make image`` prebuilds them into ``var/kernels`` (the image has no compiler).

``python -m model.native --build DIR`` builds every kernel this CPU can run into DIR.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger("kvbento.model")

CSRC = Path(__file__).with_name("csrc")
# Prebuilt kernels shipped with the bundle, looked up before the per-user cache.
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "var" / "kernels"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "kvbento" / "kernels"


class Native:
    """One C source built into a shared object: ``load()`` is the library (set up by ``setup``)
    or None where it cannot build or load here (the caller then runs its torch path)."""

    def __init__(self, source: str, variants: tuple, setup: Callable[[ctypes.CDLL], bool],
                 runs_here: Callable[[], bool] = lambda: True) -> None:
        # variants: (compile flags, link flags), best first; the first that builds and loads wins
        self.source, self.variants, self.setup, self.runs_here = CSRC / source, variants, setup, runs_here
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def name(self) -> str:
        """File name of the built kernel: one per source (with the shared headers), flags, CPU
        architecture and libc (it is part of the model fingerprint: another build may sum in
        another order)."""
        headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
        key = hashlib.sha256(self.source.read_bytes() + headers + repr(self.variants).encode() + platform.machine().encode()
                             + "-".join(platform.libc_ver()).encode()).hexdigest()[:16]
        return f"{self.source.stem}-{key}.so"

    def load(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if self._tried:
                return self._lib
            try:
                self._lib = self._load()
            finally:
                self._tried = True
            return self._lib

    def _load(self) -> ctypes.CDLL | None:
        if not self.runs_here():
            return None
        name = self.name()
        path = next((d / name for d in (BUNDLED_DIR, _cache_dir()) if (d / name).exists()), None)
        if path is None:
            path = _cache_dir() / name
            if not self.build(path):
                return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            log.warning("%s unavailable, using the torch path: %s", self.source.name, exc)
            return None
        if not self.setup(lib):
            log.info("%s loaded but does not run here: using the torch path", self.source.name)
            return None
        log.info("native kernel %s", path)
        return lib

    def build(self, out: Path) -> bool:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            log.info("no C compiler: %s not built, the torch path runs", self.source.name)
            return False
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        obj = out.with_suffix(f".{os.getpid()}.o")
        for flags in self.variants:
            # Compile and link apart: linked with -ffast-math, gcc < 13 adds crtfastmath.o even to a
            # shared object, whose constructor would switch the loading process to flush-to-zero.
            try:
                r = subprocess.run([cc, "-c", *flags[0], str(self.source), "-o", str(obj)],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode == 0:
                    link = [cc, "-shared", str(obj), "-o", str(tmp), *flags[1]]
                    link[2:2] = ["-fopenmp"] if "-fopenmp" in flags[0] else []
                    r = subprocess.run(link, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("compiling %s failed: %s", self.source.name, exc)
                return False
            finally:
                obj.unlink(missing_ok=True)
            if r.returncode == 0:
                try:
                    ctypes.CDLL(str(tmp))  # links and resolves here, or try the next variant
                except OSError as exc:
                    log.info("%s built with %s does not load: %s", self.source.name, flags, exc)
                    continue
                os.replace(tmp, out)  # atomic: concurrent servers may build the same kernel
                return True
            log.info("compiling %s with %s failed: %s", self.source.name, flags, r.stderr.strip()[-500:])
        tmp.unlink(missing_ok=True)
        return False


def _setup_attention(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.kvb_paged_attention, lib.kvb_paged_attention_bf16):
        fn.argtypes = [ptr] * 7 + [i64] * 7 + [ctypes.c_float, ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.kvb_attention_wide.argtypes, lib.kvb_attention_wide.restype = [ctypes.c_int], ctypes.c_int
    return True


def _setup_gemm(lib: ctypes.CDLL, name: str, pack_args: int) -> None:
    """Our GEMM ``kvb_<name>_pack`` / ``kvb_<name>_linear``, with the RMSNorm and RoPE built beside it."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    pack, linear = getattr(lib, f"kvb_{name}_pack"), getattr(lib, f"kvb_{name}_linear")
    pack.argtypes, pack.restype = [ptr] + [i64] * (pack_args - 2) + [ptr], None
    linear.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int, ptr, i64, ctypes.c_int]
    linear.restype = ctypes.c_int
    _setup_rowops(lib)


def _setup_amx(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    _setup_gemm(lib, "amx", 5)
    lib.kvb_amx_attention.argtypes = [ptr] * 7 + [i64] * 7 + [ctypes.c_float, ctypes.c_float, ctypes.c_int]
    lib.kvb_amx_attention.restype = ctypes.c_int
    lib.kvb_amx_layers.argtypes = [i64, ptr, ptr, ptr, ptr] + [i64] * 6 + [ptr] * 6 + [i64, i64, ctypes.c_float,
                                                                                     ctypes.c_int]
    lib.kvb_amx_layers.restype = ctypes.c_int
    return lib.kvb_amx_init() == 0  # the kernel grants the process AMX state, or not


# kvb_f32_layers / kvb_bf16_layers: layers, their weights, the attention kernel, the pools, x, shapes,
# cos/sin, slots, seq, pos, tables, max_blocks, block size, scale, threads.
_STACK_ARGS = [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 6 + [
    ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]


def _setup_f32(lib: ctypes.CDLL) -> bool:
    _setup_gemm(lib, "f32", 4)  # its RMSNorm and RoPE in fp32: the same signatures, float rows
    lib.kvb_f32_isa.restype = lib.kvb_f32_panel.restype = ctypes.c_int
    lib.kvb_f32_layers.argtypes, lib.kvb_f32_layers.restype = _STACK_ARGS, ctypes.c_int
    return True


def _setup_bf16(lib: ctypes.CDLL) -> bool:
    _setup_gemm(lib, "bf16", 5)
    lib.kvb_bf16_panel.restype = ctypes.c_int
    lib.kvb_bf16_layers.argtypes, lib.kvb_bf16_layers.restype = _STACK_ARGS, ctypes.c_int
    return True


def _setup_rowops(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kvb_rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.kvb_rms_norm.restype = None
    lib.kvb_rope.argtypes = [ptr, i64, i64, i64, ptr, ptr]
    lib.kvb_rope.restype = None
    return True


def _setup_copy(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kvb_copy_out.argtypes = [i64, ptr, ptr, ptr] + [i64] * 6 + [ctypes.c_int, ptr]
    lib.kvb_copy_out.restype = None
    lib.kvb_write_rows.argtypes = [ptr, ptr, ptr, i64, ptr, ptr] + [i64] * 4 + [ctypes.c_int]
    lib.kvb_write_rows.restype = None
    return True


def _has_avx512() -> bool:
    from model.precision import cpu_flags

    return platform.machine() in ("x86_64", "AMD64") and "avx512f" in cpu_flags(names=("avx512f",))


def _has_avx2_only() -> bool:
    from model.precision import cpu_flags

    names = ("avx2", "fma", "avx512f")
    return platform.machine() in ("x86_64", "AMD64") and cpu_flags(names=names) == {"avx2", "fma"}


def _has_avx512_bf16() -> bool:
    from model.precision import cpu_flags

    return platform.machine() in ("x86_64", "AMD64") and "avx512_bf16" in cpu_flags()


def _has_amx() -> bool:
    from model.precision import cpu_flags

    return platform.machine() in ("x86_64", "AMD64") and "amx_bf16" in cpu_flags()


# No fast-math: the kernel's vector code fixes every operation's order itself. OpenMP resolves to
# the libgomp torch already loaded.
ATTENTION = Native("decode_attention.c", (
    (("-O3", "-fPIC", "-fno-math-errno", "-fopenmp"), ("-lm",)),
    (("-O3", "-fPIC", "-fno-math-errno"), ("-lm",)),
), _setup_attention)
# No fast-math: the GEMM's epilogue must be the same instructions for every element.
AMX = Native("amx.c", (
    (("-O3", "-fPIC", "-fopenmp", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl",
      "-mavx512bf16"), ("-lm",)),
), _setup_amx, _has_amx)
# One source, one build per ISA (the panel width follows the vector width): AVX-512, else AVX2+FMA.
F32 = Native("gemm_f32.c", ((("-O3", "-fPIC", "-fopenmp", "-mavx512f"), ("-lm",)),), _setup_f32, _has_avx512)
F32_AVX2 = Native("gemm_f32.c", ((("-O3", "-fPIC", "-fopenmp", "-mavx2", "-mfma"), ("-lm",)),), _setup_f32,
                  _has_avx2_only)
# bf16 where there is AVX512-BF16 but no AMX: our GEMM (VDPBF16PS), RMSNorm, RoPE, the layer stack.
BF16 = Native("gemm_bf16.c", (
    (("-O3", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"), ("-lm",)),
), _setup_bf16, _has_avx512_bf16)
# Byte copies only: not part of the model fingerprint (the result has the same bits either way).
COPY = Native("kvcopy.c", ((("-O3", "-fPIC"), ()),), _setup_copy)
KERNELS = (ATTENTION, AMX, BF16, F32, F32_AVX2, COPY)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build this repo's native kernels into a directory")
    ap.add_argument("--build", type=Path, default=BUNDLED_DIR)
    args = ap.parse_args()
    for k in KERNELS:  # the AMX/AVX-512 GEMMs too where this CPU lacks them: the image may run on one that has them
        target = args.build / k.name()
        if not target.exists() and not k.build(target):
            if k is ATTENTION:
                raise SystemExit(f"building {k.source.name} failed (see the log above)")
            continue
        print(target)
