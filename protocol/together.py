"""The Together dialect (seed: together-streaming.txt): POST /inference; with ``stream_tokens`` SSE
events ``{"choices":[{"text"}],"result_type":"language-model-inference","id"}`` then ``data: [DONE]``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.engine import RequestStream
from model.types import Delta, GenerateRequest, Usage
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.common import Stop

RESULT_TYPE = "language-model-inference"


class InferenceBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # accepted: this server serves one model
    prompt: str = Field(max_length=1_000_000)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Stop = None
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    stream_tokens: bool = False
    stream: bool = False  # the newer Together name for the same switch
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    request_id: str | None = OptionalRequestId  # kvbento: continue this cached sequence

    @property
    def is_stream(self) -> bool:
        return self.stream_tokens or self.stream


PARAM_NAMES = {"max_new_tokens": "max_tokens"}


def to_engine(body: InferenceBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    overrides = {"max_new_tokens": body.max_tokens, "temperature": body.temperature,
                 "do_sample": sampling_switch(body.temperature), "top_p": body.top_p, "top_k": body.top_k,
                 "repetition_penalty": body.repetition_penalty, "stop": body.stop, "seed": body.seed}
    return engine_request("together", body.request_id, tenant, defaults, overrides, prompt=body.prompt)


def _usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens, "cached_tokens": u.cached_tokens}


def event(answer_id: str, delta: Delta, usage: Usage | None = None) -> dict[str, Any] | None:
    """One stream event; the last one also carries ``finish_reason`` and ``usage``."""
    if not delta.text and not delta.finish_reason:
        return None
    choice: dict[str, Any] = {"text": delta.text}
    out: dict[str, Any] = {"choices": [choice], "result_type": RESULT_TYPE, "id": answer_id}
    if delta.finish_reason:
        choice["finish_reason"] = delta.finish_reason
        if usage is not None:
            out["usage"] = _usage(usage)
    return out


def from_engine(answer_id: str, model: str, s: RequestStream) -> dict[str, Any]:
    """The non-streaming answer: ``choices[0].text`` at the top and, as Together's legacy inference
    API nested it, under ``output``."""
    choices = [{"text": s.text, "finish_reason": s.finish_reason, "index": 0}]
    usage = _usage(s.usage)
    return {"id": answer_id, "status": "finished", "model": model, "choices": choices,
            "result_type": RESULT_TYPE, "usage": usage, "request_id": s.request_id,
            "output": {"choices": choices, "result_type": RESULT_TYPE, "usage": usage}}
