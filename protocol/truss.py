"""The Baseten/Truss dialect (seed: baseten-truss-streaming.txt): POST /predict and Truss's local
/v1/models/model:predict with {"prompt", "stream", "max_new_tokens"}; streams raw bytes."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocol.adapter import OptionalRequestId
from protocol.common import body_model, usage_body
from protocol.spec import Dialect, Route


# Engine parameter -> Truss's fields (many Baseten LLM trusses name max_new_tokens max_tokens).
FIELDS = {"max_new_tokens": ("max_new_tokens", "max_tokens"), "temperature": "temperature", "top_p": "top_p",
          "top_k": "top_k", "repetition_penalty": "repetition_penalty", "stop": "stop"}
TrussBody = body_model("TrussBody", FIELDS, prompt=(str, Field(max_length=1_000_000)), stream=(bool, False),
                       request_id=(str | None, OptionalRequestId),
                       parent_request_id=(str | None, OptionalRequestId))


_EXAMPLE = {"prompt": "What is the Mistral wind?", "max_new_tokens": 16}


class Truss(Dialect):
    name = "truss"
    body = TrussBody
    routes = tuple(Route(path, example=_EXAMPLE, answer_example={"output": " A cold northerly wind"},
                         stream_example=" A cold northerly wind")
                   for path in ("/predict", "/v1/models/model:predict"))
    fields = FIELDS
    id_prefix = "truss"

    @staticmethod
    def authorization(header: str | None) -> str | None:
        """Baseten clients send ``Authorization: Api-Key <key>``; read it as a bearer key."""
        scheme, _, key = (header or "").partition(" ")
        if scheme.lower() == "api-key" and key:
            return f"Bearer {key.strip()}"
        return header

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        """``output`` is the generated text."""
        s = streams[0]
        return {"output": s.text, "request_id": s.request_id, "finish_reason": s.finish_reason,
                "usage": usage_body(s.usage)}
