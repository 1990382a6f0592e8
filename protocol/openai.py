"""The OpenAI dialect: /v1/completions, /v1/chat/completions and /v1/models (the official SDK's
wire format, including stream chunks, ``stream_options.include_usage`` and the error shape)."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.engine import RequestStream
from model.types import Delta, EngineError, GenerateRequest, InvalidRequest, Usage
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.common import Stop

# Engine field name -> the OpenAI field a client sent (for error messages).
PARAM_NAMES = {"max_new_tokens": "max_tokens", "top_p": "top_p", "temperature": "temperature",
               "stop": "stop", "seed": "seed"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both routes share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: Any = None
    user: str | None = None
    request_id: str | None = OptionalRequestId  # kvbento: continue this cached sequence

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> "_Common":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs is not supported")
        return self

    def overrides(self, max_new_tokens: int | None) -> dict[str, Any]:
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature,
                "do_sample": sampling_switch(self.temperature), "top_p": self.top_p,
                "stop": self.stop, "seed": self.seed}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's documented default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if len(v) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(v)}")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Declared only to refuse them: silently ignoring tools or a JSON schema would mislead clients.
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> "ChatBody":
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_to_engine(body: CompletionBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    """The engine request of a /v1/completions body (a string prompt or token ids)."""
    prompt_ids = body.prompt if isinstance(body.prompt, list) else None
    prompt = body.prompt if isinstance(body.prompt, str) else None
    return engine_request("cmpl", body.request_id, tenant, defaults, body.overrides(body.max_tokens),
                          prompt=prompt, prompt_ids=prompt_ids)


def chat_to_engine(body: ChatBody, defaults: dict[str, Any], tenant: str,
                   template: Callable[[list[dict[str, str]]], list[int]]) -> GenerateRequest:
    """The engine request of a /v1/chat/completions body.

    Args:
        template: renders messages with the model's chat template (generation prompt added).
    Raises:
        InvalidRequest: the model has no chat template or the template rejects the messages.
    """
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        ids = template(messages)
    except Exception as exc:  # jinja / tokenizer errors are the caller's messages, not a crash
        raise InvalidRequest(f"messages: the chat template failed: {exc}", param="messages") from None
    return engine_request("chatcmpl", body.request_id, tenant, defaults,
                          body.overrides(body.max_new_tokens), prompt_ids=ids)


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; an abort is reported as "stop"."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class Framer:
    """Builds the answer (or the stream chunks) of one request; ``chat`` picks the route's shapes."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._sent_role = False

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, s: RequestStream) -> dict[str, Any]:
        """The non-streaming answer of a finished stream."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": s.text},
                      "logprobs": None, "finish_reason": finish_reason(s.finish_reason)}
        else:
            choice = {"index": 0, "text": s.text, "logprobs": None,
                      "finish_reason": finish_reason(s.finish_reason)}
        return {**self._head(self.object), "choices": [choice], "usage": usage(s.usage)}

    def chunk(self, delta: Delta) -> dict[str, Any] | None:
        """One stream chunk for ``delta`` (None when it carries nothing)."""
        reason = finish_reason(delta.finish_reason)
        if not delta.text and reason is None and (self._sent_role or not self.chat):
            return None
        if self.chat:
            d: dict[str, Any] = {}
            if not self._sent_role:
                d["role"] = "assistant"
                self._sent_role = True
            if delta.text or "role" in d:
                d["content"] = delta.text
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        out = {**self._head(obj), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": usage(u)}


def error_body(exc: EngineError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": getattr(exc, "code", None) or exc.type}}


def model_id(name: str) -> str:
    """The id clients see: a local model directory's own name (no server paths), else the hub id."""
    path = Path(name)
    return path.name if path.is_dir() else name


def models(model_id: str, created: int) -> dict[str, Any]:
    """The /v1/models list: the one model this server serves."""
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kvbento"}]}
