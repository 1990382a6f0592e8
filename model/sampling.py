"""Batched next-token selection with per-row settings.

One call handles the whole running batch: repetition penalty and min_new_tokens are applied per
row where they are set, greedy rows take the argmax, sampling rows go through temperature, top-k
and top-p on one sorted tensor. Rows with a seed draw from their own generator, so a seeded
request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSpec:
    """What the sampler needs to know about one row."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float = 1.0
    seen_ids: torch.Tensor | None = None  # token ids to penalize (unique), when penalty != 1
    block_ids: torch.Tensor | None = None  # token ids forbidden this step (EOS under min_new_tokens)
    generator: torch.Generator | None = None


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> None:
    """In place, CTRL-style: positive logits of seen tokens are divided, negative multiplied."""
    picked = logits.index_select(-1, ids)
    logits.index_copy_(-1, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def sample(logits: torch.Tensor, rows: list[RowSpec]) -> list[int]:
    """Choose one token per row of ``logits`` ([n, vocab], modified in place).

    Returns:
        The chosen token ids, one per row, as Python ints.
    """
    logits = logits.float()
    for i, row in enumerate(rows):
        if row.seen_ids is not None and row.repetition_penalty != 1.0 and row.seen_ids.numel():
            apply_repetition_penalty(logits[i], row.seen_ids, row.repetition_penalty)
        if row.block_ids is not None:
            logits[i].index_fill_(0, row.block_ids, float("-inf"))
    out = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.do_sample and r.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, dtype=torch.long)
        sub = logits.index_select(0, idx)
        temps = torch.tensor([rows[i].temperature for i in sampled], dtype=sub.dtype).unsqueeze(1)
        sub = sub / temps
        sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True)
        vocab = sub.shape[-1]
        ranks = torch.arange(vocab).unsqueeze(0)
        top_k = torch.tensor([rows[i].top_k or vocab for i in sampled]).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        top_p = torch.tensor([rows[i].top_p for i in sampled], dtype=probs.dtype).unsqueeze(1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
        for j, i in enumerate(sampled):
            choice = torch.multinomial(probs[j], 1, generator=rows[i].generator)
            out[i] = sorted_ids[j, choice[0]]
    return out.tolist()
