"""The Together dialect (seed: together-streaming.txt): POST /inference; with ``stream_tokens`` SSE
events ``{"choices":[{"text"}],"result_type":"language-model-inference","id"}`` then ``data: [DONE]``."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from model.types import Usage
from protocol.adapter import OptionalRequestId
from protocol.common import body_model
from protocol.spec import Dialect, Route, SseFraming

RESULT_TYPE = "language-model-inference"


# Engine parameter -> Together's field.
FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "repetition_penalty": "repetition_penalty", "stop": "stop", "seed": "seed"}
# ``model`` is accepted (one model is served); ``stream`` is the newer name of ``stream_tokens``.
# Together's legacy Python client sends these as null when unset: taken as null, refused otherwise.
NOOP = ("logprobs", "safety_model")
InferenceBody = body_model("InferenceBody", FIELDS, noop=NOOP, model=(str | None, None),
                           prompt=(str, Field(max_length=1_000_000)), stream_tokens=(bool, False),
                           stream=(bool, False), request_id=(str | None, OptionalRequestId),
                           parent_request_id=(str | None, OptionalRequestId))


def _usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens, "cached_tokens": u.cached_tokens}


class Together(Dialect):
    name = "together"
    body = InferenceBody
    routes = (Route("/inference", example={"prompt": "Alan Turing was", "max_tokens": 16, "stop": ["\n\n"]},
                    answer_example={"id": "1", "choices": [{"text": " a mathematician"}],
                                    "output": {"choices": [{"text": " a mathematician"}]}},
                    stream_example='data: {"choices": [{"text": " a"}]}\n\ndata: [DONE]\n\n'),)
    fields = FIELDS
    id_prefix = "together"
    media_type = "text/event-stream"
    framing = SseFraming

    def is_stream(self, body: InferenceBody) -> bool:
        return body.stream_tokens or body.stream

    def event(self, call, stream, delta, state) -> dict[str, Any] | None:
        """One stream event; the last one also carries ``finish_reason`` and ``usage``."""
        if not delta.text and not delta.finish_reason:
            return None
        choice: dict[str, Any] = {"text": delta.text}
        out: dict[str, Any] = {"choices": [choice], "result_type": RESULT_TYPE,
                               "id": state.setdefault("id", uuid.uuid4().hex)}
        if delta.finish_reason:
            choice["finish_reason"] = delta.finish_reason
            out["usage"] = _usage(stream.usage)
        return out

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        """``choices[0].text`` at the top and, as Together's legacy inference API nested it, under
        ``output``."""
        s = streams[0]
        choices = [{"text": s.text, "finish_reason": s.finish_reason, "index": 0}]
        usage = _usage(s.usage)
        return {"id": uuid.uuid4().hex, "status": "finished", "model": call.model_name,
                "choices": choices, "result_type": RESULT_TYPE, "usage": usage, "request_id": s.request_id,
                "output": {"choices": choices, "result_type": RESULT_TYPE, "usage": usage}}
