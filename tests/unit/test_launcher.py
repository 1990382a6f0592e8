"""launcher.ServeProcess on a stand-in server (a small HTTP server whose worker runs in a session of
its own, as bentoml's does): readiness, an early exit, and that stop() and kill() leave no worker."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from launcher import ServeProcess, free_port

STAND_IN = textwrap.dedent("""
    import http.server, subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(sys.argv[2], "w") as f:
        f.write(str(worker.pid))

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready).serve_forever()
""")


def gone(pid: int, timeout: float = 10) -> bool:
    """The process has ended (a zombie waiting for a reaper counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def stand_in(tmp_path: Path):
    port = free_port()
    pid_file = tmp_path / "worker.pid"
    server = ServeProcess(port=port, argv=[sys.executable, "-c", STAND_IN, str(port), str(pid_file)],
                          ready_path="/ready", name="stand-in", start_timeout=30)
    server.start()
    worker = int(pid_file.read_text())
    yield server, worker
    server.kill()


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_waits_for_readiness_and_logs_to_a_file(stand_in):
    server, worker = stand_in
    assert server.is_running() and server.url == f"http://127.0.0.1:{server.port}"
    assert server.log_path is not None and server.log_path.exists()
    assert os.getpgid(worker) != os.getpgid(server.proc.pid) != os.getpgid(0)  # sessions of their own


def test_kill_reaches_the_worker_in_its_own_session(stand_in):
    server, worker = stand_in
    server.kill()
    assert not server.is_running() and gone(worker)


def test_stop_ends_a_worker_that_outlives_the_process_group(stand_in):
    server, worker = stand_in
    server.stop(grace=1)  # SIGTERM reaches the group only: the worker is killed after the grace
    assert not server.is_running() and gone(worker)


def test_an_early_exit_is_an_error_with_the_log(tmp_path: Path):
    code = "import sys; print('cannot start: no model'); sys.exit(3)"
    server = ServeProcess(argv=[sys.executable, "-c", code], name="broken", log_file=tmp_path / "broken.log")
    with pytest.raises(RuntimeError, match="broken exited early") as exc:
        server.start(timeout=30)
    assert "cannot start: no model" in str(exc.value)
    assert server.log_path == tmp_path / "broken.log" and "no model" in server.log()
