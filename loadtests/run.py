"""`make loadtest`: start a server (or target LOADTEST_HOST), run locust headless, print a summary.

Environment (besides the locustfile's LOADTEST_* variables):
  LOADTEST_HOST        target this server instead of starting one
  LOADTEST_USERS       concurrent users (16)
  LOADTEST_SPAWN_RATE  users started per second (8)
  LOADTEST_DURATION    seconds of load (30)
  LOADTEST_CLASSES     space-separated user classes (default: all by weight)
  LOADTEST_PORT        port of the server started here (3999)
  LOADTEST_REPORTS     report folder (loadtests/reports)
A server started here uses the KVBENTO_* environment as `make serve` would, with a fresh
temporary disk cache unless KVBENTO_CACHE_URL is set; it is stopped by PID at the end.

Reports go to loadtests/reports/<UTC stamp>_{stats,stats_history,failures,exceptions}.csv and
<stamp>.html. Exit status: locust's (non-zero when any request failed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from launcher import BIN, ROOT, ServeProcess

REPORTS = Path(os.environ.get("LOADTEST_REPORTS", ROOT / "loadtests" / "reports"))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def start_server(port: int, timeout: float = 300) -> ServeProcess:
    """Start `bentoml serve` in its own process group and wait for /readyz (bounded)."""
    env = {"KVBENTO_CACHE_URL": os.environ.get("KVBENTO_CACHE_URL")
           or "disk://" + tempfile.mkdtemp(prefix="kvbento-loadtest-")}
    if os.environ.get("BENTOML_HOME"):  # else the launcher gives the server a home of its own
        env["BENTOML_HOME"] = os.environ["BENTOML_HOME"]
    server = ServeProcess(env, port, name="loadtest-server", log_file=REPORTS / "server.log")
    try:
        return server.start(timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{str(exc).splitlines()[0]}; see {REPORTS / 'server.log'}") from None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


SERVER_SAMPLES = ("kvbento_time_to_first_token_seconds_sum", "kvbento_time_to_first_token_seconds_count",
                  "kvbento_inter_token_latency_seconds_sum", "kvbento_inter_token_latency_seconds_count",
                  "kvbento_generation_tokens_total", "kvbento_request_rejected_total")


def scrape(host: str) -> dict[str, float]:
    """The server's own counters from /metrics (empty when it cannot be read)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(host + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in SERVER_SAMPLES and not s.labels}


def server_side(before: dict[str, float], after: dict[str, float]) -> str:
    """What the server measured during the run: its TTFT/ITL means exclude client-side delays."""
    if not after:
        return "server /metrics     unavailable"
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SERVER_SAMPLES}
    ttft = d["kvbento_time_to_first_token_seconds_sum"] / max(d["kvbento_time_to_first_token_seconds_count"], 1)
    itl = d["kvbento_inter_token_latency_seconds_sum"] / max(d["kvbento_inter_token_latency_seconds_count"], 1)
    return (f"server mean TTFT    {ttft * 1000:.0f} ms (from /metrics)\n"
            f"server mean ITL     {itl * 1000:.1f} ms\n"
            f"server 429s         {d['kvbento_request_rejected_total']:.0f}")


def summarize(summary: dict, users: int) -> str:
    ttft = summary["ttft_ms"]
    secs = summary["seconds"] or float("nan")
    lines = [
        f"users               {users}",
        f"duration            {secs:.1f} s",
        f"requests            {summary['num_requests']}",
        f"failures            {summary['num_failures']}",
        f"generations         {summary['generations']}",
        f"TTFT p50 / p99      {percentile(ttft, 50):.0f} / {percentile(ttft, 99):.0f} ms",
        f"output tokens       {summary['output_tokens']}",
        f"aggregate tok/s     {summary['output_tokens'] / secs:.1f}",
    ]
    lines += [f"  failure: {f}" for f in summary.get("failures", [])]
    return "\n".join(lines)


def main() -> int:
    REPORTS.mkdir(parents=True, exist_ok=True)
    users = _env_int("LOADTEST_USERS", 16)
    spawn = _env_int("LOADTEST_SPAWN_RATE", 8)
    duration = _env_int("LOADTEST_DURATION", 30)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = REPORTS / stamp
    host = os.environ.get("LOADTEST_HOST", "")
    server = None
    if not host:
        port = _env_int("LOADTEST_PORT", 3999)
        print(f"starting a server on 127.0.0.1:{port} ...", flush=True)
        server = start_server(port)
        host = server.url
    try:
        summary_path = Path(f"{prefix}_summary.json")
        env = {**os.environ, "LOADTEST_HOST": host, "LOADTEST_SUMMARY": str(summary_path)}
        cmd = [str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "--host", host, "-u", str(users), "-r", str(spawn), "-t", f"{duration}s",
               "--stop-timeout", "30", "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
               *os.environ.get("LOADTEST_CLASSES", "").split()]
        print(f"locust: {users} users for {duration}s against {host}", flush=True)
        # Bounded: locust stops itself after -t plus --stop-timeout; the timeout is a backstop.
        before = scrape(host)
        rc = subprocess.run(cmd, env=env, timeout=duration + 180).returncode
        after = scrape(host)
        summary = json.loads(summary_path.read_text())
    finally:
        if server is not None:
            server.stop(grace=30)
    print("\n=== kvbento load test ===")
    print(summarize(summary, users))
    print(server_side(before, after))
    print(f"reports: {prefix}_stats.csv, {prefix}.html")
    return rc


if __name__ == "__main__":
    sys.exit(main())
