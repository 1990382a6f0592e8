"""The BentoML service: serves the FastAPI app of routes/ and owns the runtime's life cycle.

Request path: routes/<dialect>.py -> protocol/<dialect>.py -> model/engine.py -> cache/store.py.
"""

from __future__ import annotations

import logging

import bentoml

from config import get_settings
from routes import build_app

app = build_app()
logging.getLogger("kvbento").setLevel(logging.INFO)


@bentoml.service(
    name="kvbento",
    workers=1,  # one engine per process: replicas scale out, the engine batches within one
    traffic={"timeout": 3600, "max_concurrency": 4096},
    logging={"access": {"enabled": True}},
)
@bentoml.asgi_app(app, path="/")
class KVBento:
    def __init__(self) -> None:
        from routes.metrics import PrometheusObserver
        from routes.runtime import Runtime

        observer = PrometheusObserver()  # here, not at import: see routes/metrics.py
        self.runtime = Runtime.start(get_settings(), observer)
        observer.bind(self.runtime.engine)
        app.state.runtime = self.runtime

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.close()
