"""launcher.ServeProcess on a real `bentoml serve`: a BENTOML_HOME of its own when none is given, and
stop() leaves neither bentoml's worker (which runs in a session of its own) nor that home behind."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from launcher import ServeProcess

pytestmark = pytest.mark.e2e


def test_stop_ends_bentomls_worker_and_removes_the_home_it_made(tiny_model_dir, tmp_path):
    server = ServeProcess({"KVBENTO_MODEL": str(tiny_model_dir), "KVBENTO_CACHE_URL": f"disk://{tmp_path}",
                           "KVBENTO_API_KEYS": "", "KVBENTO_NUM_THREADS": "1"})
    server.start()
    try:
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p for p in tree if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        assert workers and all(os.getsid(w.pid) != os.getsid(server.proc.pid) for w in workers)
        home = Path(psutil.Process(server.proc.pid).environ()["BENTOML_HOME"])
        assert home.is_dir() and home.name.startswith("kvbento-bentoml-home-")
    finally:
        server.stop()
    assert not server.is_running()
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not home.exists()
