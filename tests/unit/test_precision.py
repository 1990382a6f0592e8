"""KVBENTO_DTYPE=auto follows the hardware: bf16 on a CPU with native bf16 matmul, fp32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, dtype, reason", [
    ({"amx_bf16", "avx512_bf16"}, torch.bfloat16, "amx_bf16"),
    ({"avx512_bf16"}, torch.bfloat16, "avx512_bf16"),
    (set(), torch.float32, "no cpu bf16"),
])
def test_auto_on_cpu_follows_the_bf16_flags(flags, dtype, reason):
    choice = precision.pick(CPU, "auto", flags=flags)
    assert (choice.dtype, choice.reason) == (dtype, reason)


def test_an_explicit_dtype_wins_and_a_bad_one_is_refused():
    assert precision.pick(CPU, "float32", flags={"amx_bf16"}).dtype == torch.float32
    choice = precision.pick(CPU, "bfloat16", flags=set())
    assert (choice.dtype, choice.reason, choice.name) == (torch.bfloat16, "KVBENTO_DTYPE", "bfloat16")
    with pytest.raises(ValueError, match="int8"):
        precision.pick(CPU, "int8")


def test_flags_are_read_from_cpuinfo(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})  # /proc/cpuinfo alone decides
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16 avx512f\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 amx_tile amx_bf16 avx512f\n")
    assert precision.cpu_flags(info) == {"amx_bf16"}
    info.write_text("flags\t\t: fpu avx2 fma\n")
    assert precision.cpu_flags(info) == set()


def test_this_machine_agrees_with_its_own_cpuinfo():
    """Detection on the machine running the tests: /proc/cpuinfo and torch's table are read, and
    auto's choice follows them (bf16 on an AMX/AVX512-BF16 runner, fp32 on any other)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    listed = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                       if ln.startswith("flags")), []))
    found = precision.cpu_flags()
    assert found >= listed & set(precision.BF16_FLAGS)
    want = torch.bfloat16 if found else torch.float32
    assert precision.pick(CPU).dtype == want
