"""The Takeoff dialect (seed: takeoff-api.txt): POST /generate -> {"message"}, POST /generate_stream
-> the generated text as raw bytes, token by token, with no SSE framing."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocol.adapter import OptionalRequestId
from protocol.common import body_model, usage_body
from protocol.spec import Dialect, Route


# Engine parameter -> Takeoff's field: the body's sampling fields, the overrides and error names.
FIELDS = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "temperature": "sampling_temperature",
          "top_p": "sampling_topp", "top_k": "sampling_topk", "repetition_penalty": "repetition_penalty"}
# ``text`` plus Takeoff's generation parameters; request_id is kvbento's (the stored conversation).
# What Takeoff's clients send besides: its reader group ("primary" by default) picks among the models a
# Takeoff server holds; one model is served here, so every group is that one.
ACCEPTED = {"consumer_group": "the reader group serving the request; one model, so every group is it"}
TakeoffBody = body_model("TakeoffBody", FIELDS, accepted=ACCEPTED, text=(str, Field(max_length=1_000_000)),
                         request_id=(str | None, OptionalRequestId),
                         parent_request_id=(str | None, OptionalRequestId))


_EXAMPLE = {"text": "List 3 things to do in London", "max_new_tokens": 16}


class Takeoff(Dialect):
    name = "takeoff"
    body = TakeoffBody
    routes = (Route("/generate", stream=False, example=_EXAMPLE, answer_example={"message": " 1. The British Museum"}),
              Route("/generate_stream", stream=True, example=_EXAMPLE, stream_example=" 1. The British Museum"))
    fields = {"prompt": "text", **FIELDS}
    prompt_field = "text"
    id_prefix = "takeoff"
    stream_field = None

    async def answer(self, call, streams, logprobs) -> dict[str, Any]:
        """The seed reads ``message``; the rest is kvbento's extra."""
        s = streams[0]
        return {"message": s.text, "request_id": s.request_id, "finish_reason": s.finish_reason,
                "usage": usage_body(s.usage)}
