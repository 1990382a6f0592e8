"""The Baseten/Truss dialect (seed: baseten-truss-streaming.txt): POST /predict and Truss's local
/v1/models/model:predict with {"prompt", "stream", "max_new_tokens"}; streams raw bytes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.engine import RequestStream
from model.types import GenerateRequest
from protocol.common import Stop, usage_body
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.takeoff import error_line  # the same raw-text error line

__all__ = ["TrussBody", "to_engine", "from_engine", "error_line", "authorization"]


class TrussBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(max_length=1_000_000)
    stream: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # many Baseten LLM trusses use this name
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    stop: Stop = None
    request_id: str | None = OptionalRequestId  # kvbento: continue this cached sequence


def to_engine(body: TrussBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    overrides = {"max_new_tokens": body.max_new_tokens or body.max_tokens, "temperature": body.temperature,
                 "do_sample": sampling_switch(body.temperature), "top_p": body.top_p, "top_k": body.top_k,
                 "repetition_penalty": body.repetition_penalty, "stop": body.stop}
    return engine_request("truss", body.request_id, tenant, defaults, overrides, prompt=body.prompt)


def from_engine(s: RequestStream) -> dict[str, Any]:
    """The non-streaming answer: ``output`` is the generated text."""
    return {"output": s.text, "request_id": s.request_id, "finish_reason": s.finish_reason,
            "usage": usage_body(s.usage)}


def authorization(header: str | None) -> str | None:
    """Baseten clients send ``Authorization: Api-Key <key>``; read it as a bearer key."""
    scheme, _, key = (header or "").partition(" ")
    if scheme.lower() == "api-key" and key:
        return f"Bearer {key.strip()}"
    return header
