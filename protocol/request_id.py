"""The request-id cache API (seed: request-id-cache-api.txt): /api/generate and /api/generate-batch,
and kvbento's resume of a stream whose client went away (``ResumeBody``, session/resume.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field, model_validator

from model.constraint import ConstraintSpec
from model.params import wire
from model.types import ServingError
from protocol.common import (
    MAX_REQUEST_ID_CHARS, REQUEST_ID_PATTERN, STRICT, BodyError, Stop, internal_error, sampling_params, usage_body,
)
from protocol.spec import Call, Dialect, Framing, Route
from session.request import GenerateRequest
from session.session import SessionStream


class GenerationConfig(BaseModel):
    """Every field of the seed's generation_config; None = the KVBENTO_<FIELD> default."""

    model_config = STRICT

    num_beams: int | None = wire("num_beams")
    do_sample: bool | None = wire("do_sample")
    temperature: float | None = wire("temperature")
    top_p: float | None = wire("top_p")
    top_k: int | None = wire("top_k")
    max_new_tokens: int | None = wire("max_new_tokens")
    min_new_tokens: int | None = wire("min_new_tokens")
    repetition_penalty: float | None = wire("repetition_penalty")
    length_penalty: float | None = wire("length_penalty")
    stop: Stop = None
    seed: int | None = wire("seed")
    # The output must match this JSON schema, or this regex (enforced token by token).
    json_schema: dict[str, Any] | None = Field(default=None, description="JSON schema the output must match")
    regex: str | None = Field(default=None, min_length=1, description="regex the whole output must match")

    @model_validator(mode="after")
    def _one_constraint(self) -> "GenerationConfig":
        self.constraint()
        return self

    def constraint(self) -> ConstraintSpec | None:
        """The output constraint (at most one of json_schema and regex)."""
        if self.json_schema is not None and self.regex is not None:
            raise BodyError("generation_config.regex: only one of json_schema and regex",
                            param="generation_config.regex")
        if self.json_schema is not None:
            return ConstraintSpec("json", self.json_schema, param="generation_config.json_schema")
        if self.regex is not None:
            return ConstraintSpec("regex", self.regex, param="generation_config.regex")
        return None


RequestId = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS, pattern=REQUEST_ID_PATTERN)
Prompt = Field(max_length=1_000_000)


# The seed's bodies, field for field (plus kvbento's append and parent_request_id); its clients send
# nothing else, so every other field is refused.
class GenerateBody(BaseModel):
    model_config = STRICT

    request_id: str = RequestId
    prompt: str = Field(max_length=1_000_000)
    # The next turn: text added after the stored sequence (after ``prompt`` when nothing is stored).
    append: str | None = Field(default=None, max_length=1_000_000)
    # Start request_id as a fork of this request_id's stored sequence (which stays untouched).
    parent_request_id: str | None = Field(default=None, min_length=1, max_length=MAX_REQUEST_ID_CHARS,
                                           pattern=REQUEST_ID_PATTERN)
    only_new_tokens: bool = True
    stream_response: bool = True
    generation_config: GenerationConfig = Field(default_factory=GenerationConfig)


class ResumeBody(BaseModel):
    """``POST /api/generate/resume``: the text of request_id's stream from character ``offset`` on."""

    model_config = STRICT

    request_id: str = RequestId
    offset: int = Field(default=0, ge=0, description="characters of the streamed text the client already has")


class BatchItem(BaseModel):
    model_config = STRICT

    request_id: str = RequestId
    prompt: str = Field(max_length=1_000_000)


class BatchBody(BaseModel):
    model_config = STRICT

    prompts: list[BatchItem] = Field(min_length=1, max_length=256)
    only_new_tokens: bool = True
    generation_config: GenerationConfig = Field(default_factory=GenerationConfig)


def to_engine(request_id: str, prompt: str, config: GenerationConfig, defaults: dict[str, Any],
              tenant: str, *, append: str | None = None, parent_request_id: str | None = None) -> GenerateRequest:
    """A stored sequence is continued (``prompt`` ignored), as the seed API defines."""
    params = sampling_params(defaults, config.model_dump())
    params.constraint = config.constraint()
    return GenerateRequest(request_id=request_id, prompt=prompt, params=params, tenant=tenant,
                           continue_stored=True, append=append, parent_request_id=parent_request_id)


def from_engine(stream: SessionStream, only_new_tokens: bool, full_text: str) -> dict[str, Any]:
    """The non-streaming answer for one finished stream: the batch item plus finish reason and usage."""
    out = batch_item(stream, only_new_tokens, full_text)
    out["finish_reason"] = stream.finish_reason
    out["usage"] = usage_body(stream.usage)
    if stream.error:
        out["error"] = internal_error(stream.error)["error"]
    return out


def batch_item(stream: SessionStream, only_new_tokens: bool, full_text: str) -> dict[str, Any]:
    """One element of the batch answer: exactly the seed's shape (prompt only when asked)."""
    item: dict[str, Any] = {"request_id": stream.request_id}
    if not only_new_tokens:
        item["prompt"] = stream.prompt_text
        item["response"] = full_text
    else:
        item["response"] = stream.text
    return item


class _TextFraming(Framing):
    """The streamed text, after the whole sequence so far when ``only_new_tokens`` is false."""

    def head(self) -> list[bytes]:
        if self.call.body.only_new_tokens:
            return []
        return [self.call.decode(self.streams[0].base_token_ids).encode()]


class RequestIdApi(Dialect):
    """POST /api/generate: a stored sequence is continued (``prompt`` ignored), as the seed defines."""

    name = "request_id"
    body = GenerateBody
    routes = (Route("/api/generate",
                    example={"request_id": "chat-42", "prompt": "[INST] Write a poem about cats [/INST]\n\n",
                             "only_new_tokens": True, "stream_response": False,
                             "generation_config": {"do_sample": False, "max_new_tokens": 16}},
                    answer_example={"request_id": "chat-42", "response": "Soft paws ...", "finish_reason": "length",
                                    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "cached_tokens": 0}},
                    stream_example="Soft paws ..."),)
    framing = _TextFraming
    stream_field = "stream_response"

    def renamed(self, exc: ServingError, body: Any = None) -> ServingError:
        """The engine's parameter names are generation_config's own: named with its path."""
        if exc.param in GenerationConfig.model_fields and exc.message.startswith("generation_config."):
            exc.param = f"generation_config.{exc.param}"
        return exc

    async def requests(self, call: Call) -> list[GenerateRequest]:
        b = call.body
        req = to_engine(b.request_id, b.prompt, b.generation_config, call.defaults, call.tenant,
                        append=b.append, parent_request_id=b.parent_request_id)
        if "resumable" in call.state:
            req.finish_gate = call.state["resumable"].gate
        return [req]

    async def start(self, call: Call, session: Any) -> list[SessionStream]:
        """A streamed call is resumable (when resuming is on): its text is kept for a client that
        comes back, and a new call on the request_id ends the previous one's grace window."""
        resume = call.resume
        if resume is None or not resume.is_enabled or not self.is_stream(call.body):
            return await super().start(call, session)
        entry = call.state["resumable"] = await resume.open(call.tenant, call.body.request_id)
        try:
            return await super().start(call, session)
        except BaseException:
            resume.forget(entry)
            raise

    async def frames(self, call: Call, streams: list[SessionStream]) -> AsyncIterator[bytes]:
        entry = call.state.get("resumable")
        if entry is None:
            async for frame in super().frames(call, streams):
                yield frame
            return
        framing = self.framing(self, call, streams)
        entry.begin(streams[0], b"".join(framing.head()).decode(), lambda d: d.text,
                    lambda message: framing.error(message).decode())
        async for text in entry.follow(0):
            yield text.encode()

    async def collect(self, call: Call, streams: list[SessionStream]) -> Any:
        """An engine error is part of the answer here (``error`` beside what was generated)."""
        for s in streams:
            await s.collect()
        return await self.answer(call, streams, [])

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        s = streams[0]
        full = call.decode(s.token_ids) if not call.body.only_new_tokens else ""
        return from_engine(s, call.body.only_new_tokens, full)


class Batch(RequestIdApi):
    """POST /api/generate-batch: one request per prompt (each its own request_id), answered in order."""

    name = "request_id_batch"
    body = BatchBody
    routes = (Route("/api/generate-batch", stream=False,
                    example={"prompts": [{"request_id": "a", "prompt": "cats"}, {"request_id": "b", "prompt": "dogs"}],
                             "only_new_tokens": True, "generation_config": {"max_new_tokens": 16}},
                    answer_example=[{"request_id": "a", "response": "..."}, {"request_id": "b", "response": "..."}],
                    summary="One item per prompt, in their order"),)
    stream_field = None

    async def requests(self, call: Call) -> list[GenerateRequest]:
        b = call.body
        ids = [p.request_id for p in b.prompts]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise BodyError(f"prompts: request_id {dupes[0]!r} appears more than once", param="prompts")
        return [to_engine(p.request_id, p.prompt, b.generation_config, call.defaults, call.tenant) for p in b.prompts]

    async def answer(self, call, streams, logprobs) -> list[dict[str, Any]]:
        only_new = call.body.only_new_tokens
        return [batch_item(s, only_new, call.decode(s.token_ids) if not only_new else "") for s in streams]

    def headers(self, streams: list[SessionStream]) -> dict[str, str]:
        statuses = [s.cache_status.value for s in streams]
        overall = "hit" if all(x == "hit" for x in statuses) else (
            "unavailable" if "unavailable" in statuses else "miss")
        return {"X-KV-Cache": overall, "X-KV-Cache-Items": ",".join(statuses)}
