"""The OCI image builds from the bento and serves: `make image` then `make image-test`.

Slow (minutes, CPU-heavy) and it installs system packages, so it is not part of `make test`: it
runs when KVBENTO_IMAGE_TEST=1, which `.ci/run` sets for its image step after `make test`
(`make image-check` does the same by hand).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KVBENTO_IMAGE_TEST") != "1",
        reason="image build runs in .ci/run's image step (KVBENTO_IMAGE_TEST=1)",
    ),
]


def make(target: str, timeout_s: int) -> str:
    """Run a make target; fail with its output's tail when it fails."""
    proc = subprocess.run(
        ["make", target], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"make {target} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.mark.timeout(2400)
def test_image_builds_and_serves() -> None:
    make("image", timeout_s=1800)
    out = make("image-test", timeout_s=600)
    # smoke.py prints one "ok" line per check; all of them must have run.
    for check in ("non-root", "cache miss", "streaming generate answers 200", "continues from the KV cache"):
        assert check in out, f"missing check {check!r}:\n{out}"
    assert "image smoke test passed" in out
