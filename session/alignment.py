"""Text to token ids, matched against a stored sequence so its own ids (and their KV) are kept."""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Aligner:
    """The model's tokenizer, and the matching of a conversation's text against stored token ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens).input_ids)

    def text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def align(self, text: str, stored: list[int], special_tokens: bool = False) -> tuple[list[int], int]:
        """Tokens for ``text`` that start with the longest run of ``stored`` whose text begins
        ``text`` (the stored answer's own ids, not a re-tokenization of it), and that run's length.

        With ``special_tokens`` the tokenizer's own leading tokens (a BOS) come first, as they do
        when ``text`` is tokenized alone."""
        if special_tokens:
            lead = self.tokenize("", special_tokens=True)
            if stored[: len(lead)] != lead:
                return self.tokenize(text, special_tokens=True), 0
            ids, matched = self.align(text, stored[len(lead):])
            return lead + ids, matched + len(lead) if matched else 0
        # A special token the client's copy of an answer skipped (a <pad> or <|im_start|> a random
        # model emitted: answers are decoded without special tokens) stays in the stored run but is
        # left out of its text: never shown anywhere in the text, or skipped where the match stops.
        specials = set(self.tokenizer.all_special_ids)
        unseen = {i for i in set(stored) & specials if self.tokenizer.convert_ids_to_tokens(i) not in text}
        shown = (lambda ids: self.text_of([i for i in ids if i not in unseen])) if unseen else self.text_of
        matched = self._longest_matching_run(text, stored, shown)
        used = len(shown(stored[:matched]))
        while matched < len(stored) and stored[matched] in specials and not text.startswith(shown(stored[matched:matched + 1]), used):
            more = self._longest_matching_run(text[used:], stored[matched + 1:], shown)
            used += len(shown(stored[matched + 1:matched + 1 + more]))
            matched += 1 + more
        if matched == 0:
            return self.tokenize(text, special_tokens=False), 0
        rest = text[used:]
        return stored[:matched] + (self.tokenize(rest, special_tokens=False) if rest else []), matched

    @staticmethod
    def _longest_matching_run(text: str, stored: list[int], text_of) -> int:
        """The longest k with the text of ``stored[:k]`` a prefix of ``text`` (binary search).

        A cut inside a character's bytes decodes to a trailing U+FFFD that the full text does not
        have; the search ignores it (a longer run may complete the character), then steps back to
        a cut whose text is an exact prefix."""
        lo, hi = 0, len(stored)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(text_of(stored[:mid]).rstrip("\ufffd")):
                lo = mid
            else:
                hi = mid - 1
        while lo and not text.startswith(text_of(stored[:lo])):
            lo -= 1
        return lo
