"""The OpenAI dialect: /v1/completions, /v1/chat/completions and /v1/models (the official SDK's
wire format, including stream chunks, ``stream_options.include_usage`` and the error shape)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from model.types import Delta, EngineError, InvalidRequest, ServingError
from protocol.adapter import OptionalRequestId, engine_request
from model.params import wire
from protocol.common import NOOP_VALUES, SSE_DONE, STRICT, BodyError, OpenAISampling, accept, refuse, sse
from protocol.openai_framing import OpenAIShapes, finish_reason, total_usage  # noqa: F401 (finish_reason: the dialect's name)
from protocol.openai_logprobs import TokenTexts
from protocol.spec import Call, Dialect, Framing, Route
from session.request import GenerateRequest
from session.session import SessionStream
from protocol import tools
from protocol.structured import GUIDED_FIELDS, from_response_format, from_vllm, one_constraint
from protocol.tools import ChatTool
from model.constraint import ConstraintSpec

MAX_N = 8  # choices per request: engine sequences of one prompt, prefilled once
MAX_TOP_LOGPROBS = 20

# OpenAI / vLLM fields that are refused unless they carry their no-op value: ignoring them would
# silently change what the client asked for.
_REFUSED_COMMON = ("logit_bias", "min_p", "use_beam_search", "prompt_logprobs")
_REFUSED_CHAT = ("functions", "function_call", "audio", "prediction")
# Fields OpenAI's clients send that change nothing this server answers, by OpenAI's own definition
# of them: accepted and dropped. Any other undeclared field is refused with a 400 naming it.
ACCEPTED = {
    "metadata": "tags for completions stored on OpenAI's side (store is refused), not read by the model",
    "service_tier": "which processing tier serves the request (latency and price); one tier here",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache; kvbento's reuse needs none",
    "safety_identifier": "an end user's id for abuse monitoring, like user",
}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding OpenAI adds to stream events; none here


class _Common(OpenAISampling):
    """Fields both routes share. Any other field is refused (400), except ``ACCEPTED``."""

    model_config = STRICT

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = wire("max_new_tokens")
    user: str | None = None
    request_id: str | None = OptionalRequestId  # kvbento: the conversation's stored sequence
    parent_request_id: str | None = OptionalRequestId  # kvbento: start request_id as a fork of this one
    # Output constraints: OpenAI's (chat's response_format, also taken on completions as vLLM
    # does), vLLM's structured_outputs and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    _refused = refuse(*_REFUSED_COMMON)
    _one_candidate = refuse("best_of", allowed=(*NOOP_VALUES, 1))
    _not_stored = refuse("store", why="is not supported (completions are not kept for retrieval)")
    _accepted = accept(ACCEPTED)

    @model_validator(mode="after")
    def _constraint_is_well_formed(self) -> "_Common":
        self.constraint()  # raises BodyError naming the field; compiled later, off the event loop
        return self

    @model_validator(mode="after")
    def _one_choice_per_cached_sequence(self) -> "_Common":
        if self.n > 1 and self.request_id:
            raise BodyError("n > 1 cannot continue a request_id (one cached sequence per request_id)",
                            param="n")
        if self.parent_request_id and not self.request_id:
            raise BodyError("parent_request_id forks into a request_id: send request_id too",
                            param="parent_request_id")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to report; None = no logprobs."""
        return None

    def constraint(self) -> ConstraintSpec | None:
        """The output constraint the body asks for (at most one).

        Raises:
            BodyError: a malformed constraint field, or two of them.
        """
        guided = {name: getattr(self, name) for name in GUIDED_FIELDS}
        return one_constraint(from_response_format(self.response_format), from_vllm(self.structured_outputs, guided))

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token to report; None = no prompt logprobs."""
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

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

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None  # OpenAI's echo with logprobs


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class CallFunction(BaseModel):
    model_config = STRICT

    name: str
    arguments: str


class MessageToolCall(BaseModel):
    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: CallFunction


class Message(BaseModel):
    """A chat message. A client that sends back the SDK's own message object also sends its empty
    fields (refusal, audio, tool_calls...): taken when empty, refused when they hold something."""

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: None = None
    annotations: list[Any] | None = None  # citations of an answer's text: not read by the model
    audio: None = None
    function_call: None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def rendered(self) -> dict[str, Any]:
        """The message as the chat template takes it."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    modalities: list[str] | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    _refused_chat = refuse(*_REFUSED_CHAT)

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

    def tool_mode(self) -> str:
        """"none", "auto" or "required" (a named function too)."""
        return tools.chosen([t.function for t in self.tools or []], self.tool_choice, "tool_choice")[0]

    def constraint(self) -> ConstraintSpec | None:
        """The output constraint: the body's structured output, or its tool choice's."""
        functions = [t.function for t in self.tools or []]
        mode, picked = tools.chosen(functions, self.tool_choice, "tool_choice")
        calls = tools.constraint(picked, mode, self.parallel_tool_calls is not False)
        own = super().constraint()
        if own is not None and mode == "required":
            raise BodyError(f"{own.param}: a required tool call leaves no room for a response format",
                            param=own.param)
        return own if own is not None else calls

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def fan_out(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    """``n`` engine requests of one prompt, one per choice (the engine prefills it once): fresh
    one-off ids, and ``seed + i`` so seeded choices differ from each other yet repeat run to run."""
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        params = dataclasses.replace(req.params, stop=list(req.params.stop))
        if params.seed is not None:
            params.seed = (params.seed + i) % 2**63
        out.append(dataclasses.replace(req, request_id=f"{req.request_id}-{i}", params=params))
    return out


def error_body(exc: ServingError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": getattr(exc, "code", None) or exc.type}}


def models(model_id: str, created: int) -> dict[str, Any]:
    """The /v1/models list: the one model this server serves."""
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kvbento"}]}


# Engine sampling parameter -> OpenAI's field (vLLM's names for its extensions), for every OpenAI
# route (the Responses API's too, protocol/responses.py).
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed", "top_k": "top_k",
           "min_new_tokens": "min_tokens", "ignore_eos": "ignore_eos", "repetition_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def openai_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A body's sampling overrides (``Dialect.overrides``) with OpenAI's rules: vLLM's top_k -1 is
    "off"."""
    if overrides.get("top_k") == -1:
        overrides["top_k"] = 0
    return overrides


class _OpenAIFraming(Framing):
    """Chunks of ``chat.completion.chunk`` / ``text_completion``, the usage chunk, ``[DONE]``."""

    def __init__(self, spec: "_OpenAI", call: Call, streams) -> None:
        super().__init__(spec, call, streams)
        self.shapes = spec.shapes(call)

    def head(self) -> list[bytes]:
        if not self.shapes.echo or self.shapes.prompt_logprobs:  # those wait for the prefill's delta
            return []
        return [sse(self.shapes.echo_chunk(i)) for i in range(len(self.streams))]

    def chunk(self, index: int, delta: Delta) -> bytes | None:
        if delta.prompt_logprobs is not None and self.shapes.prompt_logprobs:
            return sse(self.shapes.echo_chunk(index, self.streams[index]))
        chunk = self.shapes.chunk(delta, index)
        return sse(chunk) if chunk else None

    def error(self, message: str) -> bytes:
        return sse(error_body(EngineError(message)))

    async def tail(self, failed: bool) -> list[bytes]:
        usage = self.shapes.include_usage and not failed
        return ([sse(self.shapes.usage_chunk(total_usage(self.streams)))] if usage else []) + [SSE_DONE]


class _OpenAI(Dialect):
    chat: bool = False
    media_type = "text/event-stream"
    framing = _OpenAIFraming

    def overrides(self, body) -> dict[str, Any]:
        out = openai_overrides(super().overrides(body))
        out["max_new_tokens"] = body.max_new_tokens
        out["logprobs"] = body.num_logprobs
        out["prompt_logprobs"] = body.num_prompt_logprobs
        out["constraint"] = body.constraint()
        return out

    def shapes(self, call: Call) -> OpenAIShapes:
        body = call.body
        echo = ""
        if not self.chat and body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else call.decode(body.prompt)
        texts = TokenTexts(call.tokenizer) if body.num_logprobs is not None else None
        return OpenAIShapes(self.chat, call.model_name, body.include_usage, texts=texts, echo=echo,
                            prompt_logprobs=body.num_prompt_logprobs is not None,
                            tools=self.chat and body.tool_mode() != "none")

    async def start(self, call: Call, session) -> list[SessionStream]:
        """The ``n`` choices start together, all or none: the engine prefills their prompt once."""
        return await session.generate_choices(await self.requests(call))

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        return self.shapes(call).response(streams, logprobs)

    def error_body(self, exc: ServingError) -> dict[str, Any]:
        return error_body(exc)


class Completions(_OpenAI):
    name = "openai_completions"
    body = CompletionBody
    routes = (Route("/v1/completions",
                    example={"model": "kvbento", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
                    answer_example={"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "kvbento",
                                    "choices": [{"index": 0, "text": " there was", "logprobs": None,
                                                 "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}},
                    stream_example='data: {"choices": [{"index": 0, "text": " there"}]}\n\ndata: [DONE]\n\n'),)
    error_example = {"error": {"message": "logit_bias: Value error, logit_bias is not supported",
                               "type": "invalid_request_error", "param": "logit_bias", "code": "invalid_request_error"}}
    fields = {"max_new_tokens": "max_tokens", **SAMPLING_FIELDS}
    id_prefix = "cmpl"

    async def requests(self, call: Call) -> list[GenerateRequest]:
        """A string prompt or token ids; ``n`` choices are ``n`` engine requests of it."""
        body = call.body
        prompt_ids = body.prompt if isinstance(body.prompt, list) else None
        prompt = body.prompt if isinstance(body.prompt, str) else None
        req = engine_request("cmpl", body.request_id, call.tenant, call.defaults, self.overrides(body),
                             prompt=prompt, prompt_ids=prompt_ids, parent_request_id=body.parent_request_id)
        return fan_out(req, body.n)


class Chat(_OpenAI):
    name = "openai_chat"
    chat = True
    body = ChatBody
    routes = (Route("/v1/chat/completions",
                    example={"model": "kvbento", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16},
                    answer_example={"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "kvbento",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                                 "logprobs": None, "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
                    stream_example='data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\n'
                                   "data: [DONE]\n\n"),)
    error_example = {"error": {"message": "tools: Value error, tools is not supported",
                               "type": "invalid_request_error", "param": "tools", "code": "invalid_request_error"}}
    fields = {"max_new_tokens": ("max_completion_tokens", "max_tokens"), **SAMPLING_FIELDS}
    id_prefix = "chatcmpl"

    async def requests(self, call: Call) -> list[GenerateRequest]:
        """The model's chat template renders the messages (as text: the session matches it against a
        stored conversation's own tokens); ``n`` choices are ``n`` engine requests.

        Raises:
            InvalidRequest: the model has no chat template or the template rejects the messages.
        """
        body = call.body
        messages = [m.rendered() for m in body.messages]
        uses_tools = bool(body.tools) or any(m.tool_calls for m in body.messages)
        if uses_tools and not tools.supports_tools(call.tokenizer):
            raise InvalidRequest("tools: the model's chat template has no tool-call format", param="tools")
        extra = {"tools": [t.model_dump(exclude_none=True) for t in body.tools]} if body.tools else {}
        try:
            text = call.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception as exc:  # jinja / tokenizer errors are the caller's messages, not a crash
            raise InvalidRequest(f"messages: the chat template failed: {exc}", param="messages") from None
        req = engine_request("chatcmpl", body.request_id, call.tenant, call.defaults, self.overrides(body),
                             prompt=text, special_tokens=False, parent_request_id=body.parent_request_id)
        return fan_out(req, body.n)
