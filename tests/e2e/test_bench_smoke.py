"""The benchmark's quick mode runs end to end and writes a report (timings are never asserted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(700)
def test_quick_bench_writes_report(tmp_path: Path) -> None:
    """Runs kvbento and the naive server (and `transformers serve` when installed) on the tiny model."""
    out = tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)]
    if shutil.which("transformers", path=str(Path(sys.executable).parent)) is None:
        cmd.append("--no-hf")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # a hang guard, not a timing: a busy 2-core machine has needed 480 s
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=40)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    text = out.read_text()
    for heading in ("## Machine and software", "### concurrency 1", "## Continuation", "## KV store",
                    "## Targets (same run)"):
        assert heading in text
    # every contender answered every request of the concurrency-1 run
    section = text.split("### concurrency 1", 1)[1].split("###", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(("| kvbento |", "| naive |", "| kvbento-torch |"))]
    assert len(rows) == 3 and all("| 4/0 |" in r for r in rows), section
    assert "kvbento's CPU kernels in this run:" in text
