"""The one route function every dialect is served by: auth -> body -> start -> stream or collect ->
errors -> headers, for each path of each spec in ``protocol.dialects.DIALECTS``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cache.base import BackendUnavailable
from model.types import ServingError
from session.errors import StoreUnavailable
from protocol.dialects import DIALECTS
from protocol.spec import Call, Dialect, Route
from server.docs import json_answer, post_doc, stream_answer
from server.http import error_response, read_body, runtime, stream


async def serve(spec: Dialect, route: Route, request: Request):
    """Answer one call of ``spec`` on ``route``."""
    rt = runtime(request)
    body = None
    try:
        tenant = rt.tenant(spec.authorization(request.headers.get("authorization")))
        body = await read_body(request, spec.body)
        call = Call(body, tenant, rt.settings.generation_defaults(), rt.settings.served_model_name, rt.model.tokenizer,
                    rt.store, background=rt.background, resume=rt.resume)
        streams = await spec.start(call, rt.session)
    except BackendUnavailable:
        return error_response(StoreUnavailable(), spec.error_body)
    except ServingError as exc:
        return error_response(spec.renamed(exc, body), spec.error_body)
    headers = spec.headers(streams)
    is_stream = route.stream if route.stream is not None else spec.is_stream(body)
    if is_stream:
        return stream(spec.frames(call, streams), spec.media_type, headers)
    try:
        answer = await spec.collect(call, streams)
    except ServingError as exc:
        return error_response(exc, spec.error_body)
    return JSONResponse(answer, headers=headers)


def _doc(spec: Dialect, route: Route) -> dict:
    answers = []
    if route.stream is not True:
        how = "JSON" if route.stream is False else f"JSON; streamed ({spec.media_type.split(';')[0]}) when asked"
        answers.append(json_answer(route.answer_example, how))
    if route.stream is not False and route.stream_example is not None:
        answers.append(stream_answer(spec.media_type.split(";")[0], route.stream_example))
    return post_doc(spec.body, dict(route.example), *answers, error_example=getattr(spec, "error_example", None))


def _endpoint(spec: Dialect, route: Route):
    async def endpoint(request: Request):
        return await serve(spec, route, request)

    return endpoint


def router() -> APIRouter:
    """Every dialect's POST paths."""
    r = APIRouter()
    for spec in DIALECTS:
        for route in spec.routes:
            endpoint = _endpoint(spec, route)
            endpoint.__name__ = f"{spec.name}_{route.path.strip('/').replace('/', '_').replace(':', '_')}"
            r.add_api_route(route.path, endpoint, methods=["POST"], summary=route.summary or None,
                            **_doc(spec, route))
    return r
