"""The request-id cache API (seed: request-id-cache-api.txt): /api/generate and /api/generate-batch."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.engine import RequestStream
from model.types import GenerateRequest
from protocol.common import Stop, sampling_params, usage_body


class GenerationConfig(BaseModel):
    """Every field of the seed's generation_config; None = the KVBENTO_<FIELD> default."""

    model_config = ConfigDict(extra="forbid")

    num_beams: int | None = Field(default=None, ge=1, le=16)
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    length_penalty: float | None = Field(default=None, ge=-100, le=100)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


RequestId = Field(min_length=1, max_length=256, pattern=r"^[^\s/\\]+$")
Prompt = Field(max_length=1_000_000)


class GenerateBody(BaseModel):
    request_id: str = RequestId
    prompt: str = Field(max_length=1_000_000)
    # The next turn: text added after the stored sequence (after ``prompt`` when nothing is stored).
    append: str | None = Field(default=None, max_length=1_000_000)
    # Start request_id as a fork of this request_id's stored sequence (which stays untouched).
    parent_request_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^\s/\\]+$")
    only_new_tokens: bool = True
    stream_response: bool = True
    generation_config: GenerationConfig = Field(default_factory=GenerationConfig)


class BatchItem(BaseModel):
    request_id: str = RequestId
    prompt: str = Field(max_length=1_000_000)


class BatchBody(BaseModel):
    prompts: list[BatchItem] = Field(min_length=1, max_length=256)
    only_new_tokens: bool = True
    generation_config: GenerationConfig = Field(default_factory=GenerationConfig)


def to_engine(request_id: str, prompt: str, config: GenerationConfig, defaults: dict[str, Any],
              tenant: str, *, append: str | None = None, parent_request_id: str | None = None) -> GenerateRequest:
    """A stored sequence is continued (``prompt`` ignored), as the seed API defines."""
    params = sampling_params(defaults, config.model_dump())
    return GenerateRequest(request_id=request_id, prompt=prompt, params=params, tenant=tenant,
                           continue_stored=True, append=append, parent_request_id=parent_request_id)


def from_engine(stream: RequestStream, only_new_tokens: bool, full_text: str) -> dict[str, Any]:
    """The non-streaming answer for one finished stream: the batch item plus finish reason and usage."""
    out = batch_item(stream, only_new_tokens, full_text)
    out["finish_reason"] = stream.finish_reason
    out["usage"] = usage_body(stream.usage)
    if stream.error:
        out["error"] = {"type": "internal_error", "message": stream.error}
    return out


def batch_item(stream: RequestStream, only_new_tokens: bool, full_text: str) -> dict[str, Any]:
    """One element of the batch answer: exactly the seed's shape (prompt only when asked)."""
    item: dict[str, Any] = {"request_id": stream.request_id}
    if not only_new_tokens:
        item["prompt"] = stream.prompt_text
        item["response"] = full_text
    else:
        item["response"] = stream.text
    return item
