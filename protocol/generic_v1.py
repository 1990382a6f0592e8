"""The generic v1 dialect (seed: generic-v1-stream-api.txt): POST /v1/generate -> {id, text,
finishReason}; POST /v1/generate/stream -> SSE ``{"id","text","delta"}``, ``finishReason`` in the final
event only, then ``data: [DONE]``; errors inside a stream as ``{"error": {"type","message"}}``."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from protocol.adapter import OptionalRequestId
from protocol.common import body_model
from protocol.spec import Dialect, Route, SseFraming


# Engine parameter -> the generic v1 field.
FIELDS = {"max_new_tokens": "maxTokens", "temperature": "temperature", "top_p": "topP", "top_k": "topK",
          "stop": "stop", "seed": "seed"}
GenerateBody = body_model("GenerateBody", FIELDS, prompt=(str, Field(max_length=1_000_000)),
                          request_id=(str | None, OptionalRequestId),
                          parent_request_id=(str | None, OptionalRequestId))


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _answer_id() -> str:
    return f"gen_{uuid.uuid4().hex[:24]}"


_ERROR = {"error": {"type": "invalid_request_error", "message": "maxTokens: ..."}}


class GenericV1(Dialect):
    name = "generic_v1"
    body = GenerateBody
    routes = (Route("/v1/generate", stream=False, example={"prompt": "Tell me a story", "maxTokens": 16},
                    answer_example={"id": "gen_1", "text": "Once upon a time", "finishReason": "length"}),
              Route("/v1/generate/stream", stream=True,
                    example={"prompt": "Tell me a story", "maxTokens": 16, "temperature": 0.8},
                    stream_example='data: {"id": "gen_1", "text": "Once", "delta": "Once"}\n\ndata: [DONE]\n\n'))
    error_example = _ERROR
    fields = FIELDS
    id_prefix = "gen"
    media_type = "text/event-stream"
    framing = SseFraming
    stream_field = None

    def event(self, call, stream, delta, state) -> dict[str, Any] | None:
        """``text`` is everything so far, ``delta`` the new part; ``finishReason`` in the last only."""
        if not delta.text and not delta.finish_reason:
            return None
        state["text"] = state.get("text", "") + delta.text
        out: dict[str, Any] = {"id": state.setdefault("id", _answer_id()), "text": state["text"], "delta": delta.text}
        if delta.finish_reason:
            out["finishReason"] = finish_reason(delta.finish_reason)
        return out

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        s = streams[0]
        u = s.usage
        return {"id": _answer_id(), "text": s.text, "finishReason": finish_reason(s.finish_reason),
                "usage": {"promptTokens": u.prompt_tokens, "completionTokens": u.completion_tokens,
                          "cachedTokens": u.cached_tokens}}
