"""Which dtype a model runs in, and why: ``KVBENTO_DTYPE=auto`` follows the hardware.

On CUDA ``auto`` is bf16 (fp16 where the GPU lacks bf16). On a CPU it is bf16 only where the CPU
multiplies bf16 natively (AMX-BF16 tiles or AVX512-BF16 dot products): there a bf16 GEMM runs
several times faster than fp32 and reads half the weight bytes. Elsewhere bf16 is converted to
fp32 around every multiply, slower than fp32 itself, so ``auto`` stays fp32. The flags are read
from the CPU (torch's cpuinfo, and /proc/cpuinfo), never guessed from the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU features that make bf16 matmul native, best first (names as /proc/cpuinfo spells them).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")

log = logging.getLogger("kvbento.model")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model is loaded in and the reason, for the log, /health and the metrics."""

    dtype: torch.dtype
    reason: str  # "KVBENTO_DTYPE", "cuda", "cuda without bf16", "amx_bf16", "avx512_bf16", "no cpu bf16"

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo"), names: tuple[str, ...] = BF16_FLAGS) -> set[str]:
    """Which of the CPU feature flags ``names`` (the bf16-relevant ones unless told) this CPU has,
    from torch's cpuinfo and the kernel's /proc/cpuinfo."""
    flags: set[str] = set()
    try:
        caps = torch.cpu.get_capabilities()
        flags |= {name for name in names if caps.get(name)}
    except (AttributeError, RuntimeError):  # an older torch without the capability table
        pass
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split()) & set(names)
                break
    except OSError:  # not Linux: torch's table alone decides
        pass
    return flags


def pick(device: torch.device, dtype: str = "auto", flags: set[str] | None = None) -> DtypeChoice:
    """The dtype for ``device``: ``dtype`` as given, or under ``auto`` the hardware's native one.

    Args:
        flags: the CPU's features (``cpu_flags()`` when None); given by tests.

    Raises:
        ValueError: ``dtype`` is not a floating torch dtype.
    """
    if dtype != "auto":
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"KVBENTO_DTYPE={dtype!r} is not a floating torch dtype "
                             "(auto, float32, bfloat16, float16)")
        if dt == torch.bfloat16 and device.type == "cpu" and not (cpu_flags() if flags is None else flags):
            log.warning("KVBENTO_DTYPE=bfloat16 on a CPU without %s: bf16 matmul is emulated, slower "
                        "than float32", " or ".join(BF16_FLAGS))
        return DtypeChoice(dt, "KVBENTO_DTYPE")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "cuda")
        return DtypeChoice(torch.float16, "cuda without bf16")
    found = cpu_flags() if flags is None else flags
    for flag in BF16_FLAGS:
        if flag in found:
            return DtypeChoice(torch.bfloat16, flag)
    return DtypeChoice(torch.float32, "no cpu bf16")
