"""The HTTP layer: one router per dialect, mounted on one FastAPI app that service.py serves."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.types import EngineError
from protocol.common import BodyError
from routes.http import error_response

log = logging.getLogger("kvbento.http")


def build_app() -> FastAPI:
    from routes import request_id

    app = FastAPI(title="kvbento", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    from routes.replica import ReplicaHeader
    app.add_middleware(ReplicaHeader)  # X-KV-Replica on every answer
    app.include_router(request_id.router)
    from routes import playground
    app.include_router(playground.router)
    from routes import health
    app.include_router(health.router)
    from routes import generic_v1, openai, responses, takeoff, together, truss  # the stateless dialects (issue 4)
    for dialect in (openai, responses, takeoff, together, truss, generic_v1):
        app.include_router(dialect.router)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        return error_response(BodyError(f"{loc}: {err.get('msg', 'invalid value')}", param=loc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": {"type": "internal_error", "message": "internal error"}}, status_code=500)

    return app
