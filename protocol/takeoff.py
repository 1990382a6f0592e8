"""The Takeoff dialect (seed: takeoff-api.txt): POST /generate -> {"message"}, POST /generate_stream
-> the generated text as raw bytes, token by token, with no SSE framing."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.engine import RequestStream
from model.types import GenerateRequest
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.common import usage_body

# Engine field name -> Takeoff's name (for error messages).
PARAM_NAMES = {"prompt": "text", "temperature": "sampling_temperature",
               "top_p": "sampling_topp", "top_k": "sampling_topk"}


class TakeoffBody(BaseModel):
    """``text`` plus Takeoff's generation parameters; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(max_length=1_000_000)
    max_new_tokens: int | None = Field(default=None, ge=1)
    sampling_temperature: float | None = Field(default=None, ge=0, le=100)
    sampling_topp: float | None = Field(default=None, gt=0, le=1)
    sampling_topk: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    request_id: str | None = OptionalRequestId  # kvbento: continue this cached sequence


def to_engine(body: TakeoffBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    overrides = {"max_new_tokens": body.max_new_tokens, "temperature": body.sampling_temperature,
                 "do_sample": sampling_switch(body.sampling_temperature), "top_p": body.sampling_topp,
                 "top_k": body.sampling_topk, "repetition_penalty": body.repetition_penalty}
    return engine_request("takeoff", body.request_id, tenant, defaults, overrides, prompt=body.text)


def from_engine(s: RequestStream) -> dict[str, Any]:
    """The /generate answer: the seed reads ``message``; the rest is kvbento's extra."""
    return {"message": s.text, "request_id": s.request_id, "finish_reason": s.finish_reason,
            "usage": usage_body(s.usage)}


def error_line(message: str) -> bytes:
    """An error after a raw text stream started: a JSON line of its own, then the stream ends."""
    return ("\n" + json.dumps({"error": {"type": "internal_error", "message": message}}) + "\n").encode()
