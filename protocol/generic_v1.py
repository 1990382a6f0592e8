"""The generic v1 dialect (seed: generic-v1-stream-api.txt): POST /v1/generate -> {id, text,
finishReason}; POST /v1/generate/stream -> SSE ``{"id","text","delta"}``, ``finishReason`` in the final
event only, then ``data: [DONE]``; errors inside a stream as ``{"error": {"type","message"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.engine import RequestStream
from model.types import Delta, EngineError, GenerateRequest
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.common import Stop

PARAM_NAMES = {"max_new_tokens": "maxTokens", "temperature": "temperature", "top_p": "topP",
               "top_k": "topK", "stop": "stop"}


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(max_length=1_000_000)
    maxTokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=100)
    topP: float | None = Field(default=None, gt=0, le=1)
    topK: int | None = Field(default=None, ge=0)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    request_id: str | None = OptionalRequestId  # kvbento: continue this cached sequence


def to_engine(body: GenerateBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    overrides = {"max_new_tokens": body.maxTokens, "temperature": body.temperature,
                 "do_sample": sampling_switch(body.temperature), "top_p": body.topP, "top_k": body.topK,
                 "stop": body.stop, "seed": body.seed}
    return engine_request("gen", body.request_id, tenant, defaults, overrides, prompt=body.prompt)


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


class Framer:
    """Tracks the text so far of one stream and frames its events."""

    def __init__(self, answer_id: str) -> None:
        self.id = answer_id
        self.text = ""

    def event(self, delta: Delta) -> dict[str, Any] | None:
        if not delta.text and not delta.finish_reason:
            return None
        self.text += delta.text
        out: dict[str, Any] = {"id": self.id, "text": self.text, "delta": delta.text}
        if delta.finish_reason:
            out["finishReason"] = finish_reason(delta.finish_reason)
        return out


def from_engine(answer_id: str, s: RequestStream) -> dict[str, Any]:
    u = s.usage
    return {"id": answer_id, "text": s.text, "finishReason": finish_reason(s.finish_reason),
            "usage": {"promptTokens": u.prompt_tokens, "completionTokens": u.completion_tokens,
                      "cachedTokens": u.cached_tokens}}


def error_body(exc: EngineError) -> dict[str, Any]:
    """The seed's error shape ``{"error": {"type", "message"}}`` (+ ``param`` when one is named)."""
    body: dict[str, Any] = {"type": exc.type, "message": exc.message}
    if exc.param:
        body["param"] = exc.param
    return {"error": body}


def stream_error(message: str) -> dict[str, Any]:
    return {"error": {"type": "internal_error", "message": message}}
