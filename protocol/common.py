"""What every dialect shares: body parsing with named errors, the default error shape, SSE framing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model, model_validator

from model.params import PARAMS, wire
from model.types import EngineError, InvalidRequest, ServingError, SamplingParams, Usage

# A request_id (the request-id API's, and the optional one of every other dialect): it is part of
# store keys and URLs, so no whitespace or slashes.
REQUEST_ID_CHARS = r"[^\s/\\]"
REQUEST_ID_PATTERN = rf"^{REQUEST_ID_CHARS}+$"
MAX_REQUEST_ID_CHARS = 256

M = TypeVar("M", bound=BaseModel)
NOOP_VALUES = (None, False, 0, "", [], {})

# A ``stop`` field as every dialect sends it: one string or a list of strings.
Stop = Annotated[list[str] | None, BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


class OpenAISampling(BaseModel):
    """The sampling fields of OpenAI's APIs and vLLM's extensions to them (as benchmark tools
    send them), shared by chat/completions and Responses; ranges from model/params.py."""

    temperature: float | None = wire("temperature", le=2)
    top_p: float | None = wire("top_p")
    stop: Stop = None
    seed: int | None = wire("seed")
    presence_penalty: float | None = wire("presence_penalty")
    frequency_penalty: float | None = wire("frequency_penalty")
    top_k: int | None = wire("top_k", ge=-1)  # vLLM's -1 = off
    min_tokens: int | None = wire("min_new_tokens")
    ignore_eos: bool | None = None
    repetition_penalty: float | None = wire("repetition_penalty")


def body_model(name: str, fields: dict[str, str | tuple[str, ...]], accepted: Mapping[str, str] | None = None,
               noop: tuple[str, ...] = (), **others: Any) -> type[BaseModel]:
    """A dialect's body model whose sampling fields come from its field table (engine parameter ->
    the dialect's field names), typed and ranged by model/params.py; ``others`` are the rest of the
    body as pydantic field definitions. Any other field is refused (a 400 naming it), except the
    ``accepted`` ones (see ``accept``) and the ``noop`` ones sent with their no-op value (``refuse``)."""
    defs: dict[str, Any] = {}
    for engine, names in fields.items():
        for wire_name in (names,) if isinstance(names, str) else names:
            if engine in PARAMS:
                defs[wire_name] = (PARAMS[engine].type | None, wire(engine))
            elif engine == "stop":
                defs[wire_name] = (Stop, None)
            elif engine == "ignore_eos":
                defs[wire_name] = (bool | None, None)
    validators = {**({"_accepted": accept(accepted)} if accepted else {}), **({"_noop": refuse(*noop)} if noop else {})}
    return create_model(name, __config__=STRICT, __validators__=validators or None, **defs, **others)


# Every body model refuses fields it does not declare: a field the server cannot honour is refused
# by name, never silently dropped. Extend a body by declaring the field (or listing it in ``accept``).
STRICT = ConfigDict(extra="forbid")


def accept(fields: Mapping[str, str]) -> Any:
    """A body-model validator for fields a dialect's real clients send that the body does not
    declare, because by the API's own definition ignoring them changes nothing the server answers:
    they are dropped before the unknown-field check. ``fields``: name -> why it is harmless (the
    spec's record of the reason). Use as a class attribute: ``_accepted = accept(ACCEPTED)``."""
    def drop(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in fields for k in data):
            return {k: v for k, v in data.items() if k not in fields}
        return data

    return model_validator(mode="before")(classmethod(drop))


def refuse(*names: str, allowed: tuple = NOOP_VALUES, why: str = "is not supported") -> Any:
    """A body-model validator refusing ``names`` unless they carry one of the ``allowed`` values (their
    no-op, which is then dropped): a field the server cannot honour is refused by name, never
    silently dropped. The fields need no declaration. Use as a class attribute:
    ``_no_tools = refuse("tools", "functions")``."""
    def check(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(name in data for name in names):
            for name in names:
                if data.get(name) not in allowed:
                    raise BodyError(f"{name} {why}", param=name)
            return {k: v for k, v in data.items() if k not in names or k in cls.model_fields}
        return data

    return model_validator(mode="before")(classmethod(check))


def usage_body(u: Usage) -> dict[str, int]:
    """Token counts as the request-id, Takeoff and Truss answers report them."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens}


class BodyError(InvalidRequest):
    """The request body is not valid JSON of the expected shape."""


class PayloadTooLarge(InvalidRequest):
    kind = "too_large"
    type = "payload_too_large"


class Unauthorized(ServingError):
    kind = "unauthorized"
    type = "authentication_error"


class UnsupportedMediaType(InvalidRequest):
    kind = "unsupported_media_type"
    type = "unsupported_media_type"


# Limits on the shape of any body, checked before validation: no field of any dialect nests deeper
# than a few levels or holds more items than a prompt of token ids for a long context.
MAX_DEPTH = 32
MAX_ARRAY_ITEMS = 1 << 20

# Bodies are JSON whatever the header says: seed clients post JSON as text/plain (fetch's default
# for a string body) and curl -d as a form; anything naming another format is refused.
_JSON_LIKE = {"application/json", "text/plain", "application/x-www-form-urlencoded", "application/octet-stream"}


def check_content_type(header: str | None) -> None:
    """Refuse a Content-Type that names a format other than JSON, or a charset other than UTF-8.

    Raises:
        UnsupportedMediaType: the message names the media type or charset.
    """
    if not header:
        return
    media, _, params = header.partition(";")
    media = media.strip().lower()
    if media not in _JSON_LIKE and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported: send application/json",
                                   param="Content-Type")
    for p in params.split(";"):
        key, _, value = p.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8", "us-ascii"):
            raise UnsupportedMediaType(f"charset {charset!r} is not supported: JSON bodies are UTF-8",
                                       param="Content-Type")


def check_shape(data: Any) -> None:
    """Bound a decoded body's nesting depth and array lengths, and refuse lone surrogates
    (valid JSON escapes that are not text: tokenizers cannot encode them).

    Raises:
        BodyError: naming the path of the offending value.
    """
    todo: list[tuple[Any, str, int]] = [(data, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise BodyError(f"{path or 'body'}: string holds an unpaired surrogate escape",
                                    param=path or None) from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise BodyError(f"{path or 'body'}: nested deeper than {MAX_DEPTH} levels", param=path or None)
        if isinstance(value, list):
            if len(value) > MAX_ARRAY_ITEMS:
                raise BodyError(f"{path or 'body'}: array of {len(value)} items, at most {MAX_ARRAY_ITEMS}",
                                param=path or None)
            todo.extend((v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(value)
                        if isinstance(v, (dict, list, str)))
        else:
            for k, v in value.items():
                if isinstance(v, (dict, list, str)) or not k.isascii():
                    todo.append((k, path, depth + 1))
                    todo.append((v, f"{path}.{k}" if path else k, depth + 1))


def parse_json(raw: bytes, model: type[M], fallbacks: dict[str, str] | None = None) -> M:
    """Decode ``raw`` as JSON and validate it as ``model``.

    ``fallbacks`` are top-level fields sent outside the body (headers): each fills its field when
    the body has none, is validated like a body value, and must equal the body's value if both
    are given.

    Raises:
        BodyError: malformed JSON (non-UTF-8 bytes included), nesting deeper than MAX_DEPTH, an
            array longer than MAX_ARRAY_ITEMS, or a field that is missing, of the wrong type or out
            of range; the message names the field. Also a fallback that differs from the body.
    """
    try:
        text = raw.decode("utf-8") if raw else "null"
    except UnicodeDecodeError as exc:
        raise BodyError(f"request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder recurses per level: thousands of levels hit the limit
        raise BodyError(f"request body: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BodyError("request body must be a JSON object")
    check_shape(data)
    for name, value in (fallbacks or {}).items():
        if data.get(name) is None:
            data[name] = value
        elif data[name] != value:
            raise BodyError(f"{name}: the body says {data[name]!r} but the header says {value!r}", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            raise BodyError(unknown_fields(model, unknown), param=unknown[0]) from None
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = err.get("msg", "invalid value")
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise BodyError(f"{loc}: {msg}{more}", param=loc) from None


def unknown_fields(model: type[BaseModel], names: list[str]) -> str:
    """The message refusing fields ``model`` does not take; a top-level one that a nested part of the
    body takes (the request-id API's ``max_new_tokens``, of ``generation_config``) is pointed there."""
    hints = [f"{name} belongs in {field}" for name in names for field, info in model.model_fields.items()
             if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
             and name in info.annotation.model_fields]
    which = f"{names[0]}: unknown field" if len(names) == 1 else f"{', '.join(names)}: unknown fields"
    return f"{which}, not taken by this route" + (f" ({'; '.join(hints)})" if hints else "")


def error_body(exc: ServingError) -> dict[str, Any]:
    """The default error shape: ``{"error": {"type", "message", "param"}}``."""
    body: dict[str, Any] = {"type": exc.type, "message": exc.message}
    if exc.param:
        body["param"] = exc.param
    return {"error": body}


def internal_error(message: str) -> dict[str, Any]:
    """The default error shape of a failure that is not the client's (a generation that failed)."""
    return error_body(EngineError(message))


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
