"""OpenAI's GET /v1/models (its POST routes are the protocol specs, served by server/dialects.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import ServingError
from protocol import openai as oa
from server.http import authenticate, error_response, runtime

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request):
    try:
        authenticate(request)
    except ServingError as exc:
        return error_response(exc, oa.error_body)
    return JSONResponse(oa.models(runtime(request).settings.served_model_name, _STARTED))
