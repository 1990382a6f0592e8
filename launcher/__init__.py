"""Local servers for the tests, the benchmark and the load test: a free port, a subprocess in a
process group of its own with its own log file, readiness polled over HTTP, stopped by PID.

Not part of the service (bentofile.yaml leaves it out of the bento).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bentoml_serve(port: int) -> list[str]:
    """The command line of `bentoml serve` for the service in the repository root."""
    return [str(BIN / "bentoml"), "serve", "--port", str(port), "--host", "127.0.0.1"]


@dataclass
class ServeProcess:
    """One server subprocess: `bentoml serve` of the repository root unless ``argv`` says otherwise.

    ``env`` is added to this process's environment. A `bentoml serve` without BENTOML_HOME in ``env``
    gets a fresh one: it wipes ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, so servers
    sharing a home would erase each other's /metrics.
    """

    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    argv: list[str] | None = None
    ready_path: str = "/readyz"
    start_timeout: float = 180
    name: str = "kvbento"
    log_file: Path | None = None  # where the output goes; None: a fresh temporary file per start
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    log_path: Path | None = None  # the log of the latest start
    _own_home: str | None = field(default=None, repr=False)
    _retries: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float | None = None) -> "ServeProcess":
        """Start the process and wait until ``ready_path`` answers 200.

        Raises:
            RuntimeError: the process exited first, or was not ready within ``timeout`` seconds
                (default ``start_timeout``; it is stopped then); the message holds the log's tail.
        """
        timeout = self.start_timeout if timeout is None else timeout
        argv = self.argv or bentoml_serve(self.port)
        env = {**os.environ, **self.env, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
        if self.argv is None and "BENTOML_HOME" not in self.env:
            self._own_home = env["BENTOML_HOME"] = tempfile.mkdtemp(prefix=f"{self.name}-bentoml-home-")
        if self.log_file is None:
            fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            self.log_path = Path(path)
        else:
            self.log_path = Path(self.log_file)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=fd, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                if self.argv is None and self._retries < 3 and (
                        "Could not bind" in log or "Address already in use" in log):
                    # A free port was taken before the bind (ours, or the one circus picks for
                    # its controller): start again.
                    self._retries += 1
                    self.port = free_port()
                    if self._own_home is not None:
                        shutil.rmtree(self._own_home, ignore_errors=True)
                        self._own_home = None
                    return self.start(timeout)
                raise RuntimeError(f"{self.name} exited early:\n{self.log()}")
            if self._is_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                return r.status == 200
        except OSError:  # refused, timed out, or an HTTP error status (still loading: 503)
            return False

    def log(self, tail: int = 5000) -> str:
        """The last ``tail`` characters of the process's output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def _tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace: float = 20) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds, the
        workers that run in sessions of their own included."""
        if not self.is_running():
            self._drop_home()
            return
        tree = self._tree()
        deadline = time.monotonic() + grace
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        _, alive = psutil.wait_procs(tree, timeout=max(deadline - time.monotonic(), 0.1))
        if self.proc.poll() is None or alive:
            self._kill(tree)
        self._drop_home()

    def kill(self) -> None:
        """SIGKILL the process group and every descendant's group at once (a crash, not a shutdown)."""
        if self.is_running():
            self._kill(self._tree())

    def _kill(self, tree: list[psutil.Process]) -> None:
        # bentoml's worker runs in a session of its own: killing our group alone would leave it
        # serving on the inherited socket.
        own = os.getpgid(0)
        for pgid in {self.proc.pid, *(_pgid(p) for p in tree)} - {None, own}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(tree, timeout=30)

    def _drop_home(self) -> None:
        if self._own_home is not None:
            shutil.rmtree(self._own_home, ignore_errors=True)
            self._own_home = None


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:
        return None
