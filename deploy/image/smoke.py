"""`make image-test`: run the built image once and prove it serves.

Starts $KVBENTO_IMAGE with podman (runc, cgroupfs, host network, the ulimits this machine needs)
on a free loopback port, waits for /readyz, then sends one non-streaming generate, one streaming
generate and one continuation of the first request_id (which must be a KV-cache hit). Checks the
server runs as a non-root user. Stops and removes the container it started, by name, whatever
happens. Prints the seconds from `podman run` to a ready /readyz.

Environment: KVBENTO_IMAGE (default kvbento:latest); KVBENTO_SMOKE_MODEL_DIR, when set, is
mounted read-only at /models and served through KVBENTO_MODEL=/models instead of the model baked
into the image. Only the standard library is used, so any python3 runs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0


def podman(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run podman as this machine allows it (runc: crun fails here; cgroupfs: no systemd)."""
    cmd = ["podman", "--cgroup-manager", "cgroupfs", "--runtime", "runc", *args]
    return subprocess.run(cmd, check=check, text=True, capture_output=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    """POST JSON; return (status, lower-cased headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_ready(base: str, name: str) -> float:
    """Poll /readyz until 200; fail early if the container exits. Returns seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise RuntimeError(f"container {name} is {state!r} before /readyz answered")
        time.sleep(1.0)
    raise RuntimeError(f"/readyz not ready after {READY_TIMEOUT_S:.0f}s")


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)
    print(f"ok  {what}")


def exercise(base: str, name: str) -> None:
    """The three requests of the smoke test, plus the non-root and playground page checks."""
    uid = podman("exec", name, "id", "-u").stdout.strip()
    check(uid != "0", f"server runs as non-root (uid {uid})")

    with urllib.request.urlopen(f"{base}/playground", timeout=REQUEST_TIMEOUT_S) as resp:
        page = resp.read()
    check(resp.status == 200 and b"kvbento playground" in page, "the image serves the playground page")

    rid = f"smoke-{uuid.uuid4().hex[:12]}"
    config = {"do_sample": False, "max_new_tokens": 8}
    status, headers, body = post(
        f"{base}/api/generate",
        {"request_id": rid, "prompt": "hello from the image", "stream_response": False,
         "generation_config": config},
    )
    check(status == 200, f"generate answers 200 (got {status}: {body[:200]!r})")
    first = json.loads(body)
    check(first["usage"]["completion_tokens"] == 8, "generate returns 8 new tokens")
    check(headers.get("x-kv-cache") == "miss", "a new request_id is a cache miss")

    status, headers, body = post(
        f"{base}/api/generate",
        {"request_id": f"{rid}-stream", "prompt": "stream me", "stream_response": True,
         "generation_config": config},
    )
    check(status == 200 and len(body) > 0, f"streaming generate answers 200 with text ({len(body)} bytes)")
    check(b'"error"' not in body, "the stream carries no error event")

    status, headers, body = post(
        f"{base}/api/generate",
        {"request_id": rid, "prompt": "ignored on a hit", "stream_response": False,
         "generation_config": config},
    )
    check(status == 200, f"continuation answers 200 (got {status})")
    check(headers.get("x-kv-cache") == "hit", "repeating the request_id continues from the KV cache")
    second = json.loads(body)
    check(second["usage"]["cached_tokens"] > 0, f"cached_tokens = {second['usage']['cached_tokens']}")

    logs = podman("logs", name, check=False)
    check("var/kernels/decode_attention-" in logs.stdout + logs.stderr,
          "the image loads the prebuilt native attention kernel (the image has no compiler)")


def main() -> int:
    image = os.environ.get("KVBENTO_IMAGE", "kvbento:latest")
    port = free_port()
    name = f"kvbento-smoke-{os.getpid()}"
    run = ["run", "-d", "--name", name, "--network", "host",
           "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
           "-e", f"BENTOML_PORT={port}", "-e", "BENTOML_HOST=127.0.0.1"]
    model_dir = os.environ.get("KVBENTO_SMOKE_MODEL_DIR")
    if model_dir:
        run += ["-v", f"{os.path.abspath(model_dir)}:/models:ro", "-e", "KVBENTO_MODEL=/models"]
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    podman(*run, image)
    try:
        ready_s = wait_ready(base, name)
        print(f"container {name} on {base}: /readyz after {ready_s:.1f}s "
              f"(podman run to ready: {time.monotonic() - started:.1f}s)")
        exercise(base, name)
    except Exception:
        logs = podman("logs", "--tail", "80", name, check=False)
        print(logs.stdout + logs.stderr, file=sys.stderr)
        raise
    finally:
        podman("stop", "-t", "10", name, check=False, timeout=60)
        podman("rm", "-f", name, check=False, timeout=60)
    print("image smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
