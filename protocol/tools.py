"""Tool calling: what ``tools`` / ``tool_choice`` ask of the output, and the calls read back out.

Calls are written in the chat template's tool-call format, Hermes-style (the bundled model's, and
Qwen's): ``<tool_call>\\n{"name":"f","arguments":{...}}\\n</tool_call>``, one block per call. A
template without ``<tool_call>`` has no known format and tools are refused for it.
``required`` and a named function constrain the whole answer to such blocks; ``auto`` leaves the
model free until it opens a block, and from there constrains the call to the tools' schemas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.constraint import JSON_OPTIONS, ConstraintSpec
from protocol.common import BodyError

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*')
_TAIL = "}\n" + TOOL_CLOSE  # what follows a call's arguments, as the grammar writes it


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    """Chat's ``{"type": "function", "function": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDef


def supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template writes and reads tool calls in the format above."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and TOOL_OPEN in template and "tool_calls" in template


def chosen(functions: list[FunctionDef], choice: Any, param: str) -> tuple[str, list[FunctionDef]]:
    """(mode, the functions a call may name) for ``tool_choice`` given as a string or a named
    function; mode is "none", "auto" or "required" (a named function is "required" of one).

    Raises:
        BodyError: an unknown mode, a function not in ``tools``, or a call required without tools.
    """
    if choice is None:
        return ("auto" if functions else "none"), functions
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BodyError(f"{param}: must be none, auto, required or a named function", param=param)
        if choice == "required" and not functions:
            raise BodyError(f"{param}: required needs tools", param=param)
        return choice, functions
    name = choice.get("name") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):  # chat's nested form
        name = choice["function"].get("name")
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise BodyError(f"{param}: must be none, auto, required or a named function", param=param)
    picked = [f for f in functions if f.name == name]
    if not picked:
        raise BodyError(f"{param}: function {name!r} is not in tools", param=param)
    return "required", picked


def _call_schema(fn: FunctionDef) -> dict[str, Any]:
    params = fn.parameters if fn.parameters else {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}


def constraint(functions: list[FunctionDef], mode: str, parallel: bool, param: str = "tools") -> ConstraintSpec | None:
    """The output constraint of a tool choice (None for "none")."""
    if mode == "none" or not functions:
        return None
    rules = [f"fn{i}: %json {json.dumps(_call_schema(f))}" for i, f in enumerate(functions)]
    body = f'{json.dumps(chr(10))} ({" | ".join(f"fn{i}" for i in range(len(functions)))}) {json.dumps(chr(10) + TOOL_CLOSE)}'
    more = f' ({json.dumps(chr(10) + TOOL_OPEN)} call)*' if parallel else ""
    if mode == "auto":  # free text until the model opens a call; the grammar starts after the tag
        grammar = "\n".join([f"start: call{more}", f"call: {body}", *rules])
        return ConstraintSpec("grammar", grammar, param=param, trigger=TOOL_OPEN)
    grammar = "\n".join([f"start: {json.dumps(TOOL_OPEN)} call{more}", f"call: {body}", *rules])
    return ConstraintSpec("grammar", grammar, param=param)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object's JSON text, as generated


def split_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text before the first call, the calls) of a finished answer; an answer whose blocks do
    not parse as calls is all text."""
    at = text.find(TOOL_OPEN)
    if at < 0:
        return text, []
    calls = []
    for block in re.finditer(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), text[at:], re.DOTALL):
        call = _parse(block.group(1))
        if call is None:
            return text, []
        calls.append(call)
    return (text[:at], calls) if calls else (text, [])


def _parse(block: str) -> ToolCall | None:
    head = _HEAD.match(block)
    if head is None:
        return None
    args = block[head.end():].rstrip()
    if not args.endswith("}"):
        return None
    args = args[:-1].rstrip()
    try:
        if not isinstance(json.loads(args), dict):
            return None
    except ValueError:
        return None
    return ToolCall(new_call_id(), head.group(1), args)


@dataclass
class CallStream:
    """Reads one streamed answer: text before the first call goes out as content; each call goes
    out as a header (id, name) once its name is known, then its arguments as they come."""

    buf: str = ""
    content: str = ""  # all content sent so far
    in_calls: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    _open: ToolCall | None = None  # the call whose arguments are streaming
    _sent: int = 0  # of the open call's arguments text

    def feed(self, text: str, final: bool = False) -> tuple[str, list[tuple[int, ToolCall, str, bool]]]:
        """(content to send, [(call index, call, arguments increment, is the header)])."""
        self.buf += text
        content = ""
        if not self.in_calls:
            at = self.buf.find(TOOL_OPEN)
            if at < 0:
                keep = 0 if final else _partial_suffix(self.buf, TOOL_OPEN)
                content, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                self.content += content
                return content, []
            content, self.buf, self.in_calls = self.buf[:at], self.buf[at:], True
            self.content += content
        return content, self._read_calls(final)

    def _read_calls(self, final: bool) -> list[tuple[int, ToolCall, str, bool]]:
        out = []
        while True:
            if self._open is None:
                self.buf = self.buf.lstrip()  # the newline between calls
                if not self.buf.startswith(TOOL_OPEN):
                    return out
                head = _HEAD.match(self.buf, len(TOOL_OPEN))
                if head is None:
                    return out
                self._open = ToolCall(new_call_id(), head.group(1), "")
                self.calls.append(self._open)
                self.buf, self._sent = self.buf[head.end():], 0
                out.append((len(self.calls) - 1, self._open, "", True))
            end = self.buf.find(TOOL_CLOSE)
            args = self.buf if end < 0 else self.buf[:end].rstrip()
            if end >= 0:
                args = args[:-1] if args.endswith("}") else args
            elif not final:
                args = args[: max(0, len(args) - len(_TAIL))]
            step = args[self._sent:]
            if step:
                self._open.arguments += step
                self._sent = len(args)
                out.append((len(self.calls) - 1, self._open, step, False))
            if end < 0:
                return out
            self.buf = self.buf[end + len(TOOL_CLOSE):]
            self._open = None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
