"""OpenAI's answer shapes: the non-streaming answer and the stream chunks of n choices, with
usage, finish reasons, echo and logprobs."""

from __future__ import annotations

import time
from typing import Any

from model.sampling import TokenLogprob
from model.types import Delta, Usage
from protocol.openai_logprobs import TokenTexts, chat_content, completion_block, prompt_block
from protocol.tools import CallStream, ToolCall, split_calls
from session.session import SessionStream


def finish_reason(reason: str | None, called: bool = False) -> str | None:
    """OpenAI knows "stop", "length" and "tool_calls" (an answer that ended in calls); an abort is
    reported as "stop"."""
    if reason is None:
        return None
    return "length" if reason == "length" else ("tool_calls" if called else "stop")


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


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
        tools: the answer may hold tool calls (chat with tools): they go out as ``tool_calls``.
    """

    def __init__(self, chat: bool, model: str, include_usage: bool = False, *,
                 texts: TokenTexts | None = None, echo: str = "", prompt_logprobs: bool = False,
                 tools: bool = False) -> None:
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
        self._readers: dict[int, CallStream] | None = {} if tools else None

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
            if self.chat:
                content, calls = split_calls(s.text) if self._readers is not None else (s.text, [])
                message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
                if calls:
                    message["tool_calls"] = [tool_call_body(c) for c in calls]
                choices.append({"index": i, "message": message, "logprobs": lp,
                                "finish_reason": finish_reason(s.finish_reason, bool(calls))})
            else:
                head = self._prompt_logprobs(s)
                if head is not None:
                    lp = head if lp is None else {k: head[k] + lp[k] for k in head}
                choices.append({"index": i, "text": self.echo + s.text, "logprobs": lp,
                                "finish_reason": finish_reason(s.finish_reason)})
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
        if self._readers is not None:
            return self._tool_chunk(delta, index)
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

    def _tool_chunk(self, delta: Delta, index: int) -> dict[str, Any] | None:
        """A chat chunk of an answer that may call tools: content until a call opens, then
        ``delta.tool_calls`` fragments (the first with id, type and name, arguments "")."""
        reader = self._readers.setdefault(index, CallStream())
        content, parts = reader.feed(delta.text, final=delta.finish_reason is not None)
        d: dict[str, Any] = {}
        if index not in self._sent_role:
            d["role"] = "assistant"
            self._sent_role.add(index)
        if content or ("role" in d and not parts):
            d["content"] = content
        if parts:
            d["tool_calls"] = [
                {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                if header else {"index": i, "function": {"arguments": step}} for i, c, step, header in parts]
        reason = finish_reason(delta.finish_reason, bool(reader.calls))
        if not d and reason is None and not delta.logprobs:
            return None
        return self._wrap({"index": index, "delta": d, "logprobs": self._logprobs(delta.logprobs, index),
                           "finish_reason": reason})

    def _wrap(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": usage(u)}
