"""Structured outputs as clients ask for them: OpenAI's ``response_format`` (Responses:
``text.format``), vLLM's ``structured_outputs`` and its older ``guided_*`` fields, each turned into
one ``ConstraintSpec`` the engine enforces token by token. A shape the server cannot honour is
refused by name (a 400), never dropped.
"""

from __future__ import annotations

import json
from typing import Any

from model.constraint import JSON_OBJECT, ConstraintSpec
from protocol.common import BodyError

# vLLM's structured_outputs keys (and the guided_* fields before them) -> constraint kinds.
_VLLM_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}
GUIDED_FIELDS = tuple(f"guided_{k}" for k in _VLLM_KINDS)


def from_response_format(fmt: Any, param: str = "response_format", *, flat: bool = False) -> ConstraintSpec | None:
    """OpenAI's ``response_format`` ({"type": "text" | "json_object" | "json_schema", ...}); with
    ``flat`` the Responses API's ``text.format``, whose json_schema fields sit beside ``type``."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BodyError(f"{param}: must be an object with a type", param=param)
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json", JSON_OBJECT, param=param)
    if kind != "json_schema":
        raise BodyError(f"{param}.type: must be text, json_object or json_schema, got {kind!r}",
                        param=f"{param}.type")
    inner = fmt if flat else fmt.get("json_schema")
    where = param if flat else f"{param}.json_schema"
    if not isinstance(inner, dict):
        raise BodyError(f"{where}: must be an object with name and schema", param=where)
    schema = inner.get("schema")
    if not isinstance(schema, dict):
        raise BodyError(f"{where}.schema: must be a JSON schema (an object)", param=f"{where}.schema")
    return ConstraintSpec("json", schema, param=f"{where}.schema")


def _vllm(kind: str, value: Any, param: str) -> ConstraintSpec:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise BodyError(f"{param}: not valid JSON: {exc}", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise BodyError(f"{param}: must be a JSON schema (an object)", param=param)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise BodyError(f"{param}: must be a non-empty list of non-empty strings", param=param)
    elif not isinstance(value, str) or not value:
        raise BodyError(f"{param}: must be a non-empty string", param=param)
    return ConstraintSpec(_VLLM_KINDS[kind], value, param=param)


def from_vllm(structured: Any, guided: dict[str, Any]) -> ConstraintSpec | None:
    """vLLM's ``structured_outputs`` object, or one of its ``guided_*`` fields."""
    specs = []
    if structured is not None:
        if not isinstance(structured, dict):
            raise BodyError("structured_outputs: must be an object", param="structured_outputs")
        for key, value in structured.items():
            if value in (None, False, "", [], {}) and key != "json":
                continue
            if key == "json_object" and value is True:
                specs.append(ConstraintSpec("json", JSON_OBJECT, param="structured_outputs.json_object"))
            elif key in _VLLM_KINDS:
                specs.append(_vllm(key, value, f"structured_outputs.{key}"))
            else:
                raise BodyError(f"structured_outputs.{key} is not supported (json, regex, choice, grammar, "
                                "json_object)", param=f"structured_outputs.{key}")
    for name, value in guided.items():
        if value is not None:
            specs.append(_vllm(name.removeprefix("guided_"), value, name))
    return one_constraint(*specs)


def one_constraint(*specs: ConstraintSpec | None) -> ConstraintSpec | None:
    """The one constraint a request carries; two are a 400 naming the second."""
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        raise BodyError(f"{given[1].param}: only one output constraint per request (also {given[0].param})",
                        param=given[1].param)
    return given[0] if given else None
