"""The OpenAI dialect: /v1/completions, /v1/chat/completions and /v1/models (the official SDK's
wire format, including stream chunks, ``stream_options.include_usage`` and the error shape)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model.types import EngineError, GenerateRequest, InvalidRequest
from protocol.adapter import OptionalRequestId, engine_request, sampling_switch
from protocol.common import BodyError, Stop
from protocol.openai_framing import Framer, finish_reason, usage  # noqa: F401 (the dialect's names)

# Engine field name -> the OpenAI field a client sent (for error messages).
PARAM_NAMES = {"max_new_tokens": "max_tokens", "top_p": "top_p", "temperature": "temperature",
               "stop": "stop", "seed": "seed", "min_new_tokens": "min_tokens"}

MAX_N = 8  # choices per request: each is one engine sequence of the same prompt
MAX_TOP_LOGPROBS = 20

# OpenAI / vLLM fields that are refused unless they carry their no-op value: ignoring them would
# silently change what the client asked for.
_REFUSED_COMMON = ("logit_bias", "best_of", "min_p", "use_beam_search", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar", "prompt_logprobs")
_REFUSED_CHAT = ("tools", "functions", "function_call", "audio", "prediction")


def _is_noop(name: str, value: Any) -> bool:
    return value in (None, False, 0, "", [], {}) or (name == "best_of" and value == 1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both routes share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    # vLLM's extensions, as benchmark tools send them.
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    request_id: str | None = OptionalRequestId  # kvbento: the conversation's stored sequence
    parent_request_id: str | None = OptionalRequestId  # kvbento: start request_id as a fork of this one
    # Declared only to be refused (see _REFUSED_COMMON).
    logit_bias: Any = None
    best_of: Any = None
    min_p: Any = None
    use_beam_search: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    prompt_logprobs: Any = None

    @field_validator(*_REFUSED_COMMON)
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if not _is_noop(info.field_name, v):
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @model_validator(mode="after")
    def _one_choice_per_cached_sequence(self) -> "_Common":
        if self.n > 1 and self.request_id:
            raise BodyError("n > 1 cannot continue a request_id (one cached sequence per request_id)",
                            param="n")
        return self

    def overrides(self, max_new_tokens: int | None) -> dict[str, Any]:
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature,
                "do_sample": sampling_switch(self.temperature), "top_p": self.top_p,
                "stop": self.stop, "seed": self.seed,
                "top_k": 0 if self.top_k == -1 else self.top_k, "min_new_tokens": self.min_tokens,
                "ignore_eos": self.ignore_eos, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": self.num_logprobs}

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to report; None = no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's documented default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

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

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _no_prompt_logprobs(self) -> "CompletionBody":
        if self.echo and self.logprobs is not None:
            raise BodyError("echo with logprobs is not supported (the prompt's logprobs are not computed)",
                            param="echo")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


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
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Declared only to refuse them: silently ignoring tools or a JSON schema would mislead clients.
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None

    @field_validator(*_REFUSED_CHAT)
    @classmethod
    def _refused_chat(cls, v: Any, info: ValidationInfo) -> Any:
        if not _is_noop(info.field_name, v):
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported (no tools)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: list[str] | None) -> list[str] | None:
        if v and v != ["text"]:
            raise ValueError("modalities other than [\"text\"] are not supported")
        return v

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatBody":
        if self.top_logprobs and not self.logprobs:
            raise BodyError("top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def completion_to_engine(body: CompletionBody, defaults: dict[str, Any], tenant: str) -> GenerateRequest:
    """The engine request of a /v1/completions body (a string prompt or token ids)."""
    prompt_ids = body.prompt if isinstance(body.prompt, list) else None
    prompt = body.prompt if isinstance(body.prompt, str) else None
    return engine_request("cmpl", body.request_id, tenant, defaults, body.overrides(body.max_tokens),
                          prompt=prompt, prompt_ids=prompt_ids)


def chat_to_engine(body: ChatBody, defaults: dict[str, Any], tenant: str,
                   template: Callable[[list[dict[str, str]]], str]) -> GenerateRequest:
    """The engine request of a /v1/chat/completions body.

    Args:
        template: renders messages with the model's chat template (generation prompt added).
    Raises:
        InvalidRequest: the model has no chat template or the template rejects the messages.
    """
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        text = template(messages)
    except Exception as exc:  # jinja / tokenizer errors are the caller's messages, not a crash
        raise InvalidRequest(f"messages: the chat template failed: {exc}", param="messages") from None
    return engine_request("chatcmpl", body.request_id, tenant, defaults,
                          body.overrides(body.max_new_tokens), prompt=text, special_tokens=False,
                          parent_request_id=body.parent_request_id)


def fan_out(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    """``n`` engine requests of one prompt, one per choice: fresh one-off ids, and ``seed + i`` so
    seeded choices differ from each other yet repeat run to run."""
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        params = dataclasses.replace(req.params, stop=list(req.params.stop))
        if params.seed is not None:
            params.seed = (params.seed + i) % 2**63
        out.append(dataclasses.replace(req, request_id=f"{req.request_id}-{i}", params=params))
    return out


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
