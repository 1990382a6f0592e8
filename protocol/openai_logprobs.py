"""OpenAI's logprobs shapes, from the engine's per-token ``TokenLogprob`` entries.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
led by the prompt's tokens with ``echo``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from model.sampling import TokenLogprob


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """The printable-character alias of each byte that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """Each token's own bytes and text (a token may hold part of a UTF-8 character: its text then
    shows U+FFFD, its bytes are exact)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @functools.lru_cache(maxsize=65536)
    def bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in set(self.tokenizer.all_special_ids):
            return piece.encode()
        m = _BYTE_TOKEN.match(piece)
        if m:  # sentencepiece byte fallback
            return bytes([int(m.group(1), 16)])
        table = _byte_level_table()
        if all(c in table for c in piece) and "▁" not in piece:
            return bytes(table[c] for c in piece)
        return piece.replace("▁", " ").encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def _finite(x: float) -> float:
    """JSON has no -inf: a token the request's transforms forbid (EOS under min_tokens) reports
    the lowest finite float instead."""
    return x if math.isfinite(x) else -9999.0


def chat_content(entries: list[TokenLogprob | None], texts: TokenTexts) -> list[dict[str, Any]]:
    """The ``logprobs.content`` list of a chat choice (or chunk)."""
    def one(token_id: int, lp: float) -> dict[str, Any]:
        return {"token": texts.text_of(token_id), "logprob": _finite(lp), "bytes": list(texts.bytes_of(token_id))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries if e is not None]


def completion_block(entries: list[TokenLogprob | None], texts: TokenTexts, offset: int) -> tuple[dict[str, Any], int]:
    """The ``logprobs`` object of a completions choice (or chunk) whose text starts at ``offset``;
    returns it and the offset after its tokens."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        if e is None:
            continue
        text = texts.text_of(e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(e.logprob))
        out["top_logprobs"].append({texts.text_of(t): _finite(lp) for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def prompt_block(token_ids: list[int], entries: list[TokenLogprob | None],
                 texts: TokenTexts) -> dict[str, Any]:
    """The ``logprobs`` of an echoed prompt: every prompt token, with ``None`` where it has no
    logprob (the first one); offsets into the echoed text, where special tokens (a BOS) take no room."""
    special = set(texts.tokenizer.all_special_ids)
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token_id, e in zip(token_ids, entries):
        text = texts.text_of(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else _finite(e.logprob))
        out["top_logprobs"].append(None if e is None else {texts.text_of(t): _finite(lp) for t, lp in e.top})
        out["text_offset"].append(offset)
        if token_id not in special:
            offset += len(text)
    return out
