"""What every dialect shares: body parsing with named errors, the default error shape, SSE framing."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError

from model.types import EngineError, InvalidRequest, SamplingParams, Usage

M = TypeVar("M", bound=BaseModel)

# A ``stop`` field as every dialect sends it: one string or a list of strings.
Stop = Annotated[list[str] | None, BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


def usage_body(u: Usage) -> dict[str, int]:
    """Token counts as the request-id, Takeoff and Truss answers report them."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens}


class BodyError(InvalidRequest):
    """The request body is not valid JSON of the expected shape."""


class PayloadTooLarge(InvalidRequest):
    status = 413
    type = "payload_too_large"


class Unauthorized(EngineError):
    status = 401
    type = "authentication_error"


class NotFound(EngineError):
    status = 404
    type = "not_found_error"


def parse_json(raw: bytes, model: type[M]) -> M:
    """Decode ``raw`` as JSON and validate it as ``model``.

    Raises:
        BodyError: malformed JSON or a field that is missing, of the wrong type or out of range;
            the message names the field.
    """
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BodyError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = err.get("msg", "invalid value")
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise BodyError(f"{loc}: {msg}{more}", param=loc) from None


def error_body(exc: EngineError) -> dict[str, Any]:
    """The default error shape: ``{"error": {"type", "message", "param"}}``."""
    body: dict[str, Any] = {"type": exc.type, "message": exc.message}
    if exc.param:
        body["param"] = exc.param
    return {"error": body}


def sse(data: Any) -> bytes:
    """One Server-Sent Event carrying ``data`` (JSON-encoded unless already a string)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def sampling_params(defaults: dict[str, Any], overrides: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the configured defaults with the request's non-None overrides."""
    merged = dict(defaults)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    fields = SamplingParams.__dataclass_fields__
    return SamplingParams(**{k: v for k, v in merged.items() if k in fields})
