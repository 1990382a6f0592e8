"""Tool calling on the Responses API: flat function tools, ``function_call`` /
``function_call_output`` input items, and answers whose output holds ``function_call`` items
(streamed as ``response.output_item.added``, ``response.function_call_arguments.delta`` / ``.done``,
``response.output_item.done``). The format in the text and its constraint are protocol/tools.py's.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from protocol.common import BodyError
from model.constraint import ConstraintSpec
from model.types import InvalidRequest
from protocol import tools
from protocol.structured import from_response_format
from protocol.tools import CallStream, FunctionDef, ToolCall, split_calls, supports_tools



def functions(tools: list[Any] | None) -> list[FunctionDef]:
    """The function tools of a body's ``tools`` (``{"type": "function", "name", "parameters"}``).

    Raises:
        BodyError: a tool of another type (built-in tools are not served) or a malformed one.
    """
    out = []
    for i, tool in enumerate(tools or []):
        at = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise BodyError(f"{at}.type: only function tools are supported, got {kind!r}", param=f"{at}.type")
        try:
            out.append(FunctionDef.model_validate({k: v for k, v in tool.items() if k != "type"}))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in (at, *err.get("loc", ())))
            raise BodyError(f"{loc}: {err.get('msg')}", param=loc) from None
    return out


def output_constraint(text_format: Any, fns: list[FunctionDef], tool_choice: Any,
                      parallel: bool | None) -> ConstraintSpec | None:
    """The output constraint of a body: ``text.format``'s, or its tool choice's.

    Raises:
        BodyError: a malformed format or tool choice, or a format beside a required call.
    """
    fmt = from_response_format(text_format, "text.format", flat=True)
    mode, picked = tools.chosen(fns, tool_choice, "tool_choice")
    if fmt is not None and mode == "required":
        raise BodyError(f"{fmt.param}: a required tool call leaves no room for a text format", param=fmt.param)
    return fmt or tools.constraint(picked, mode, parallel is not False)


def template_kwargs(fns: list[FunctionDef], messages: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """What the chat template takes besides the messages: the tools in chat's nested form.

    Raises:
        InvalidRequest: tools or calls, and a template without a tool-call format.
    """
    if (fns or any(m.get("tool_calls") for m in messages)) and not supports_tools(tokenizer):
        raise InvalidRequest("tools: the model's chat template has no tool-call format", param="tools")
    return {"tools": [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in fns]} if fns else {}


def tool_item(item: dict[str, Any], at: str) -> dict[str, Any]:
    """A ``function_call`` or ``function_call_output`` input item as a chat-template message."""
    def text(name: str) -> str:
        value = item.get(name)
        if not isinstance(value, str):
            raise BodyError(f"{at}.{name}: must be a string", param=f"{at}.{name}")
        return value

    if item["type"] == "function_call":
        call = {"id": text("call_id"), "type": "function",
                "function": {"name": text("name"), "arguments": text("arguments")}}
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"role": "tool", "content": text("output"), "tool_call_id": text("call_id")}


def merge_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive ``function_call`` items are one assistant turn's calls (and so one message)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        if m.get("tool_calls") and prev is not None and prev.get("tool_calls") and prev["role"] == "assistant":
            prev["tool_calls"] = prev["tool_calls"] + m["tool_calls"]
        else:
            out.append(dict(m))
    return out


def input_item(m: dict[str, Any]) -> list[dict[str, Any]]:
    """``input_items`` entries of a tool message (none for other messages)."""
    if m.get("tool_calls"):
        return [{"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "completed",
                 "call_id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in m["tool_calls"]]
    return [{"id": f"fco_{uuid.uuid4().hex}", "type": "function_call_output", "status": "completed",
             "call_id": m["tool_call_id"], "output": m["content"]}]


def call_item(call: ToolCall, item_id: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments}


def answer_message(text: str) -> dict[str, Any]:
    """The stored assistant message of an answer, its calls as the chat template takes them."""
    content, calls = split_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}


def output(framer: Any, item_status: str, text: str) -> list[dict[str, Any]]:
    """A finished answer's output items: its text (if any) as a message, then its calls."""
    content, calls = split_calls(text)
    items = [framer.message(item_status, content)] if content or not calls else []
    return items + [call_item(c, framer.call_item_id(i)) for i, c in enumerate(calls)]


class Output:
    """The output items of one streamed answer, opened and closed as its text comes."""

    def __init__(self, framer: Any) -> None:
        self.framer = framer
        self.reader = CallStream()
        self.items: list[dict[str, Any]] = []
        self.text_open = False

    def open(self) -> list[dict[str, Any]]:
        return []  # items open as their text shows what they are

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        f, out = self.framer, []
        content, parts = self.reader.feed(text, final=final)
        if content:
            if not self.text_open:
                self.text_open = True
                out += _open_message(f, self.items)
            out.append(f.item_event("response.output_text.delta", delta=content, logprobs=[]))
        for i, call, step, header in parts:
            if not header:
                out.append(f.event("response.function_call_arguments.delta", item_id=self.items[-1]["id"],
                                   output_index=len(self.items) - 1, delta=step))
                continue
            if self.text_open:
                out += _close_message(f, self.items, self.reader)
                self.text_open = False
            out += _close_call(f, self.items, self.reader)
            self.items.append(call_item(call, f.call_item_id(i), "in_progress"))
            out.append(f.event("response.output_item.added", output_index=len(self.items) - 1,
                               item={**self.items[-1], "arguments": ""}))
        return out

    def close(self, status: str) -> list[dict[str, Any]]:
        out = []
        if not self.items:  # neither text nor calls: an empty message, as a plain answer has
            out += _open_message(self.framer, self.items)
            self.text_open = True
        if self.text_open:
            out += _close_message(self.framer, self.items, self.reader, status)
        return out + _close_call(self.framer, self.items, self.reader)


def _open_message(framer: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    framer.output_index = len(items)
    items.append(framer.message("in_progress", None))
    return [framer.event("response.output_item.added", output_index=framer.output_index, item=items[-1]),
            framer.item_event("response.content_part.added", part=framer.part(""))]


def _close_message(framer: Any, items: list[dict[str, Any]], reader: CallStream,
                   status: str = "completed") -> list[dict[str, Any]]:
    text = reader.content
    items[framer.output_index] = framer.message(status, text)
    return [framer.item_event("response.output_text.done", text=text, logprobs=[]),
            framer.item_event("response.content_part.done", part=framer.part(text)),
            framer.event("response.output_item.done", output_index=framer.output_index,
                         item=items[framer.output_index])]


def _close_call(framer: Any, items: list[dict[str, Any]], reader: CallStream) -> list[dict[str, Any]]:
    if not items or items[-1]["type"] != "function_call" or items[-1]["status"] == "completed":
        return []
    call = next(c for c in reader.calls if c.id == items[-1]["call_id"])
    item = items[-1] = {**items[-1], "status": "completed", "arguments": call.arguments}
    at = len(items) - 1
    return [framer.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                         name=item["name"], arguments=item["arguments"]),
            framer.event("response.output_item.done", output_index=at, item=item)]
