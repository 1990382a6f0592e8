"""The load test itself runs: loadtests/run.py drives locust headless for a few seconds against a
live server, every user class does its work, and nothing fails."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_locustfile_runs_headless_with_zero_failures(server, tmp_path):
    env = {
        **os.environ,
        "LOADTEST_HOST": server.url,
        "LOADTEST_REPORTS": str(tmp_path),
        "LOADTEST_USERS": "6",  # weights 3/1/2: three streaming, one batch, two multi-turn users
        "LOADTEST_SPAWN_RATE": "6",
        "LOADTEST_DURATION": "8",
        "LOADTEST_MAX_NEW_TOKENS": "8",
        "LOADTEST_TURNS": "2",
        "LOADTEST_WAIT_MIN": "0.1",
        "LOADTEST_WAIT_MAX": "0.3",
    }
    run = subprocess.run([sys.executable, str(ROOT / "loadtests" / "run.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "=== kvbento load test ===" in run.stdout and "TTFT p50 / p99" in run.stdout

    summary = json.loads(next(tmp_path.glob("*_summary.json")).read_text())
    assert summary["num_failures"] == 0, summary["failures"]
    assert summary["num_requests"] > 0 and summary["generations"] > 0
    assert summary["output_tokens"] >= 8 * summary["generations"]
    assert len(summary["ttft_ms"]) == summary["generations"]

    rows = list(csv.DictReader(next(tmp_path.glob("*_stats.csv")).open()))
    seen = {(r["Type"], r["Name"]) for r in rows if int(r["Request Count"]) > 0}
    for name in ("/api/generate stream", "/v1/chat/completions stream", "/api/generate-batch",
                 "/api/generate multi-turn"):
        for kind in ("TTFT", "TOK/S", "E2E"):
            assert (kind, name) in seen, (kind, name, sorted(seen))
    assert all(int(r["Failure Count"]) == 0 for r in rows)
    assert list(tmp_path.glob("*.html")), "an HTML report"
