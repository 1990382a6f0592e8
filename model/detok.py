"""Incremental detokenization: text deltas that never split a UTF-8 character.

Decodes a short window of tokens instead of the whole sequence each step. A window whose decoded
text ends in U+FFFD is held back until the next token completes the character.
"""

from __future__ import annotations

# Tokens decoded before the new ones so byte-level merges and leading spaces come out right.
_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prefix_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prefix_ids[-_CONTEXT:])
        # _prefix: start of the window we decode; _read: tokens before it were already emitted.
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        new = after[len(before):]
        self._prefix = self._read
        self._read = len(self._ids)
        # Keep the buffer short: everything before _prefix is no longer needed.
        if self._prefix > 64:
            drop = self._prefix - _CONTEXT
            self._ids = self._ids[drop:]
            self._prefix -= drop
            self._read -= drop
        return new

    def flush(self) -> str:
        """Text still held back at the end of a sequence (a truly broken tail decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""
