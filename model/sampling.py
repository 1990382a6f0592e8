"""Batched next-token selection with per-row settings.

One call handles the whole running batch: repetition, presence and frequency penalties and
min_new_tokens are applied per row where they are set, greedy rows take the argmax, sampling rows
go through temperature, top-k and top-p on one sorted tensor. Rows with a seed draw from their own
generator, so a seeded request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.constraint import apply_masks


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (unique ids, their counts) of the tokens this request generated, when a penalty is set.
    counts: tuple[torch.Tensor, torch.Tensor] | None = None
    logprobs: int | None = None  # top alternatives to report (0: the chosen token only)


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the ``top`` most likely (id, logprob) alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def with_request_extras(spec: RowSpec, params, token_ids: list[int], num_base_tokens: int) -> RowSpec:
    """``spec`` plus what the sequence's own spec lacks: OpenAI penalties and logprobs.

    Args:
        params: the request's ``SamplingParams``.
        token_ids: the whole sequence; the penalties count only the tokens this request generated,
            ``token_ids[num_base_tokens:]``.
    """
    spec.presence_penalty = params.presence_penalty
    spec.frequency_penalty = params.frequency_penalty
    spec.logprobs = params.logprobs
    if (params.presence_penalty or params.frequency_penalty) and len(token_ids) > num_base_tokens:
        generated = torch.tensor(token_ids[num_base_tokens:], dtype=torch.long)
        spec.counts = generated.unique(return_counts=True)
    return spec


def apply_presence_frequency(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                             presence: float, frequency: float) -> None:
    """In place, as OpenAI defines them: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""
    logits.index_add_(-1, ids, -(counts.to(logits.dtype) * frequency + presence))


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> None:
    """In place, CTRL-style: positive logits of seen tokens are divided, negative multiplied."""
    picked = logits.index_select(-1, ids)
    logits.index_copy_(-1, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def forbid(logits: torch.Tensor, rows: list[RowSpec]) -> None:
    """-inf at every row's ``block_ids``, in one write: each torch op hands the GIL over and, with
    the event loop busy, waits to take it back (bench/NOTES.md); one op per row paid that per row."""
    blocked = [(i, row.block_ids) for i, row in enumerate(rows) if row.block_ids is not None]
    if blocked:
        ids = torch.cat([b for _, b in blocked]) if len(blocked) > 1 else blocked[0][1]
        at = torch.tensor([i for i, b in blocked for _ in range(b.numel())], dtype=torch.long)
        logits.index_put_((at, ids), torch.tensor(float("-inf"), dtype=logits.dtype))


def sample(logits: torch.Tensor, rows: list[RowSpec],
           logprobs_out: list[TokenLogprob | None] | None = None,
           masks: tuple[list[int], torch.Tensor] | None = None) -> list[int]:
    """Choose one token per row of ``logits`` ([n, vocab], modified in place).

    Args:
        masks: (constrained rows, their token bitmasks): forbidden tokens get -inf before
            anything else reads the logits (greedy, sampling and logprobs all see the mask).
        logprobs_out: when given, filled with one entry per row: a ``TokenLogprob`` for rows whose
            spec asks for logprobs, else None. They are log-softmax of the logits after the
            repetition / presence / frequency penalties, the output constraint, the EOS block and (sampling rows) the
            temperature, before top-k / top-p truncation.
    Returns:
        The chosen token ids, one per row, as Python ints.
    """
    logits = logits.float()
    if masks is not None:
        apply_masks(logits, *masks)
    for i, row in enumerate(rows):
        if row.seen_ids is not None and row.repetition_penalty != 1.0 and row.seen_ids.numel():
            apply_repetition_penalty(logits[i], row.seen_ids, row.repetition_penalty)
        if row.counts is not None:
            apply_presence_frequency(logits[i], *row.counts, row.presence_penalty, row.frequency_penalty)
    forbid(logits, rows)
    scored = {}
    if logprobs_out is not None:
        for i, row in enumerate(rows):
            if row.logprobs is not None:
                scaled = logits[i] / row.temperature if row.do_sample and row.temperature > 0 else logits[i]
                scored[i] = scaled.log_softmax(dim=-1)
    out = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.do_sample and r.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, dtype=torch.long)
        sub = logits.index_select(0, idx)
        temps = torch.tensor([rows[i].temperature for i in sampled], dtype=sub.dtype).unsqueeze(1)
        sub = sub / temps
        # Stable: equal logits (common in bf16) rank by token id as in argmax (top_k=1 is greedy).
        sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True, stable=True)
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
    tokens = out.tolist()
    if logprobs_out is not None:
        logprobs_out[:] = [None] * len(rows)
        for i, lp in scored.items():
            top = lp.topk(rows[i].logprobs) if rows[i].logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs_out[i] = TokenLogprob(tokens[i], float(lp[tokens[i]]), alts)
    return tokens
