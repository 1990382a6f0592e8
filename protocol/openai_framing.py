"""OpenAI's answer shapes: the non-streaming answer and the stream chunks of n choices, with
usage, finish reasons, echo and logprobs."""

from __future__ import annotations

import time
from typing import Any

from model.sampling import TokenLogprob
from model.types import Delta, Usage
from protocol.openai_logprobs import TokenTexts, chat_content, completion_block, prompt_block
from session.session import SessionStream


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; an abort is reported as "stop"."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def total_usage(streams: list[SessionStream]) -> Usage:
    """The usage of n choices of one prompt: the prompt counted once, every choice's tokens."""
    first = streams[0].usage
    return Usage(prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                 completion_tokens=sum(s.usage.completion_tokens for s in streams))


class OpenAIShapes:
    """Builds the answer (or the stream chunks) of one request; ``chat`` picks the route's shapes.

    Args:
        texts: token texts for logprobs; None = the request asked for no logprobs.
        echo: completions' ``echo``: the prompt text put before each choice's text.
        prompt_logprobs: ``echo`` with logprobs: the prompt's tokens lead each choice's logprobs.
    """

    def __init__(self, chat: bool, model: str, include_usage: bool = False, *,
                 texts: TokenTexts | None = None, echo: str = "", prompt_logprobs: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.texts = texts
        self.echo = echo
        self.prompt_logprobs = prompt_logprobs and texts is not None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._sent_role: set[int] = set()
        self._offsets: dict[int, int] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[TokenLogprob | None] | None, index: int) -> dict[str, Any] | None:
        if self.texts is None or not entries:
            return None
        if self.chat:
            return {"content": chat_content(entries, self.texts)}
        block, self._offsets[index] = completion_block(entries, self.texts,
                                                       self._offsets.get(index, len(self.echo)))
        return block

    def response(self, streams: SessionStream | list[SessionStream],
                 entries: list[list[TokenLogprob | None]] | None = None) -> dict[str, Any]:
        """The non-streaming answer of finished streams (one per choice) and their logprob entries."""
        streams = streams if isinstance(streams, list) else [streams]
        choices = []
        for i, s in enumerate(streams):
            lp = self._logprobs(entries[i] if entries else None, i)
            if self.chat and self.texts is not None and lp is None:
                lp = {"content": []}
            reason = finish_reason(s.finish_reason)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": s.text},
                                "logprobs": lp, "finish_reason": reason})
            else:
                head = self._prompt_logprobs(s)
                if head is not None:
                    lp = head if lp is None else {k: head[k] + lp[k] for k in head}
                choices.append({"index": i, "text": self.echo + s.text, "logprobs": lp, "finish_reason": reason})
        return {**self._head(self.object), "choices": choices, "usage": usage(total_usage(streams))}

    def _prompt_logprobs(self, stream: SessionStream) -> dict[str, Any] | None:
        if not self.prompt_logprobs or stream.prompt_logprobs is None:
            return None
        return prompt_block(stream.base_token_ids, stream.prompt_logprobs, self.texts)

    def echo_chunk(self, index: int, stream: SessionStream | None = None) -> dict[str, Any]:
        """The first chunk of a completions choice with ``echo``: the prompt's text (and, once its
        prefill is done, the prompt's logprobs when asked)."""
        lp = self._prompt_logprobs(stream) if stream is not None else None
        return self._wrap({"index": index, "text": self.echo, "logprobs": lp, "finish_reason": None})

    def chunk(self, delta: Delta, index: int = 0) -> dict[str, Any] | None:
        """One stream chunk for ``delta`` of choice ``index`` (None when it carries nothing)."""
        reason = finish_reason(delta.finish_reason)
        if not delta.text and reason is None and not delta.logprobs and (index in self._sent_role or not self.chat):
            return None
        lp = self._logprobs(delta.logprobs, index)
        if self.chat:
            d: dict[str, Any] = {}
            if index not in self._sent_role:
                d["role"] = "assistant"
                self._sent_role.add(index)
            if delta.text or "role" in d:
                d["content"] = delta.text
            return self._wrap({"index": index, "delta": d, "logprobs": lp, "finish_reason": reason})
        return self._wrap({"index": index, "text": delta.text, "logprobs": lp, "finish_reason": reason})

    def _wrap(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": usage(u)}
