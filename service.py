"""The BentoML service: serves the FastAPI app of server/ and owns the runtime's life cycle.

Request path: server/dialects.py -> protocol/<dialect>.py -> session/session.py -> model/engine.py,
and session/ -> cache/store.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml
from pydantic import Field

from config import get_settings
from model.types import ServingError
from protocol.request_id import BatchItem, GenerationConfig, Prompt, RequestId
from server import bentoml_api as api
from server import build_app
from server.front import Front

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
        from server.metrics import PrometheusObserver
        from server.runtime import Runtime

        observer = PrometheusObserver()  # here, not at import: see server/metrics.py
        self.runtime = Runtime.start(get_settings(), observer, observer)
        observer.bind(self.runtime.engine)
        app.state.runtime = self.runtime

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.close()

    # The request-id API as typed BentoML APIs (for bentoml.SyncHTTPClient); see server/bentoml_api.py.
    @bentoml.api(route=api.ROUTE_GENERATE)
    async def generate(self, request_id: Annotated[str, RequestId], prompt: Annotated[str, Prompt],
                       only_new_tokens: bool = True, generation_config: GenerationConfig | None = None,
                       ctx: bentoml.Context = None) -> api.GenerateAnswer:
        """Generate (or continue the cached sequence of ``request_id``) and answer when done."""
        try:
            answer, status = await api.generate(self.runtime, ctx.request.headers.get("authorization"),
                                                request_id, prompt, only_new_tokens, generation_config)
        except ServingError as exc:
            raise api.client_error(exc) from None
        ctx.response.headers["X-KV-Cache"] = status
        return answer

    @bentoml.api(route=api.ROUTE_GENERATE_STREAM)
    async def generate_stream(self, request_id: Annotated[str, RequestId], prompt: Annotated[str, Prompt],
                              only_new_tokens: bool = True, generation_config: GenerationConfig | None = None,
                              ctx: bentoml.Context = None) -> AsyncGenerator[str, None]:
        """Generate and stream the text as it comes (like /api/generate with stream_response)."""
        try:
            s = await api.start_one(self.runtime, ctx.request.headers.get("authorization"), request_id, prompt,
                                    generation_config)
            ctx.response.headers["X-KV-Cache"] = s.cache_status.value
            async for chunk in api.generate_stream(self.runtime, s, only_new_tokens):
                yield chunk
        except ServingError as exc:
            raise api.client_error(exc) from None

    @bentoml.api(route=api.ROUTE_GENERATE_BATCH)
    async def generate_batch(self, prompts: Annotated[list[BatchItem], Field(min_length=1, max_length=256)],
                             only_new_tokens: bool = True, generation_config: GenerationConfig | None = None,
                             ctx: bentoml.Context = None) -> list[api.BatchAnswer]:
        """Generate for every prompt (each its own request_id) and answer in their order."""
        try:
            return await api.generate_batch(self.runtime, ctx.request.headers.get("authorization"), prompts,
                                            only_new_tokens, generation_config)
        except ServingError as exc:
            raise api.client_error(exc) from None


# Around the whole server, BentoML's routes included: our offline docs page at / and JSON routing errors.
KVBento.add_asgi_middleware(Front)
