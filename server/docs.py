"""OpenAPI declarations of the hand-parsed POST bodies: each route reads its body itself (for the
dialect's own errors and limits), so its schema, example and answers are declared here instead.

Schemas are inlined (``$defs`` resolved): BentoML's docs page builds its document from the routes
alone, where ``#/components`` references to these models would dangle.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "type": {"type": "string"}, "message": {"type": "string"}, "param": {"type": "string"}}}},
    "required": ["error"],
}
_ERROR_EXAMPLE = {"error": {"type": "invalid_request_error", "param": "max_tokens",
                            "message": "max_tokens: Input should be greater than or equal to 1"}}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with every ``$ref`` to its ``$defs`` replaced by the definition."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**resolve(copy.deepcopy(defs[ref.split("/")[-1]])), **resolve(rest)}
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def json_answer(example: Any, description: str = "The answer") -> dict[str, Any]:
    kind = "array" if isinstance(example, list) else "object"
    return {"description": description, "content": {"application/json": {"schema": {"type": kind},
                                                                          "example": example}}}


def stream_answer(media_type: str, example: str, description: str = "The answer, streamed") -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}, "example": example}}}


def post_doc(model: type[BaseModel], example: dict[str, Any], *answers: dict[str, Any],
             error_example: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``router.post``: the JSON request body (schema + example) and the answers.

    Args:
        answers: the 200 answers (``json_answer`` / ``stream_answer``); several are merged, for a
            route that streams when the body asks it to.
        error_example: the dialect's error shape, when it is not the default one.
    """
    content: dict[str, Any] = {}
    for a in answers:
        content.update(a["content"])
    error = {"description": "Bad input (400), unknown key (401), body too large (413), "
                            "another media type (415), server busy (429)",
             "content": {"application/json": {"schema": {"type": "object"} if error_example else _ERROR,
                                              "example": error_example or _ERROR_EXAMPLE}}}
    doc: dict[str, Any] = {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
            "schema": inline_schema(model), "example": example}}}},
        "responses": {200: {"description": answers[0]["description"], "content": content},
                      400: error, 401: error, 413: error, 415: error, 429: error},
    }
    if "application/json" not in content:  # a stream-only route: no JSON 200 answer to document
        doc["response_class"] = StreamingResponse
    return doc
