"""The HTTP layer: the app factory. Dialects come from their specs (server/dialects.py); the other
modules here add the record, model-list, stored-response, playground and health routes, the
runtime wiring (runtime.py) and the metrics observer (metrics.py)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.types import ServingError
from protocol.common import BodyError, internal_error
from server.http import error_response

log = logging.getLogger("kvbento.http")


def build_app() -> FastAPI:
    from server import dialects, health, openai, playground, records, responses, resume
    from server.replica import ReplicaHeader

    app = FastAPI(title="kvbento", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(ReplicaHeader)  # X-KV-Replica on every answer
    app.include_router(dialects.router())  # every dialect's POST paths, from its spec
    for extra in (records, openai, responses, resume, playground, health):
        app.include_router(extra.router)

    def background():
        return getattr(getattr(app.state, "runtime", None), "background", None)

    @app.on_event("startup")
    async def _start_background() -> None:  # on the server's loop: take over dead replicas' jobs
        if background() is not None:
            background().start_watching()

    @app.on_event("shutdown")
    async def _stop_background() -> None:  # its jobs go on elsewhere, or after a restart
        if background() is not None:
            await background().close()

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        return error_response(BodyError(f"{loc}: {err.get('msg', 'invalid value')}", param=loc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(internal_error("internal error"), status_code=500)

    return app
