"""One request's state inside the engine: plain data, owned by the model thread once submitted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import torch

from model.detok import IncrementalDetokenizer
from model.scheduler import SeqStatus
from model.types import Finished, SamplingParams


class Sequence:
    """Tokens, progress and stop state of one request; the runner and postprocess act on it.

    ``token_ids`` is the whole sequence (restored + prompt + generated); the KV of its first
    ``num_computed`` positions is in the pool blocks of ``block_table``. A step runs positions
    ``[num_computed, end)``; where ``end`` is the length, the next token is sampled.
    """

    def __init__(self, *, request_id: str, token_ids: list[int], num_cached_tokens: int,
                 params: SamplingParams, prefix: list, kv_from: int,
                 prefix_from: int = 0, block_hashes: list[str] | None = None,
                 hasher: Callable[[list[int], int, list[str]], list[str]] | None = None,
                 on_finish: Callable[[Finished], Awaitable[None]] | None, tokenizer: Any,
                 eos_token_ids: list[int], max_context: int,
                 on_block: Callable[..., None] | None = None, block_tokens: int = 0) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.num_base_tokens = len(token_ids)  # tokens before this request generated anything
        self.num_cached_tokens = num_cached_tokens  # restored, not computed: the prefix's length
        self.params = params
        self.prefix = prefix  # KV chunks of token_ids[prefix_from:num_cached_tokens], until loaded
        self.prefix_from = prefix_from  # the positions before are expected in the pool
        self.kv_from = kv_from  # on finish, the KV from this position on goes to on_finish
        self.on_finish = on_finish
        # Full blocks handed to on_block as they are computed: the next one starts at block_from.
        self.on_block = on_block if block_tokens > 0 else None
        self.block_tokens = block_tokens
        self.block_from = kv_from
        self.max_context = max_context
        self.status = SeqStatus.WAITING
        self.is_aborted = False
        self.num_delivered: int | None = None  # set on abort: generated tokens the client got
        # -- model: where the KV is
        self.block_table: list[int] = []  # pool blocks of positions [0, num_computed)
        self.num_computed = 0
        self.num_cached = num_cached_tokens  # restored positions not yet in the pool
        # Store hashes of the full blocks, as far as known; ``hasher`` extends them.
        self.block_hashes: list[str] = list(block_hashes or [])
        self.hasher = hasher
        self.num_registered = 0  # full blocks named in the pool by their hash
        self.match_prefix = params.prompt_logprobs is None  # those need every position's logits
        self.is_beam = params.num_beams > 1
        # Other choices of the same prompt: they share this one's blocks once it is prefilled.
        self.siblings: list[Sequence] = []
        # Restored positions have no logits: their entries stay None, as does the first token's.
        self.prompt_logprobs: list | None = (
            [None] * (num_cached_tokens + 1) if params.prompt_logprobs is not None else None)
        # -- sampling
        self.num_generated = 0
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.eos_ids = set(eos_token_ids)
        self.eos_tensor = torch.tensor(eos_token_ids, dtype=torch.long) if eos_token_ids else None
        # Ids the repetition penalty applies to (when it is set), and their tensor once built.
        self.seen_ids: set[int] = set(token_ids) if params.repetition_penalty != 1.0 else set()
        self.seen_tensor: torch.Tensor | None = None
        # The output constraint's matcher (model.constraint.Constraint), one per sequence.
        self.constraint = params.grammar.constraint() if params.grammar is not None else None
        # -- output not yet emitted
        self.detok = IncrementalDetokenizer(tokenizer, token_ids)
        self.held_text = ""  # text withheld because it may be the start of a stop string
        self.pending_ids: list[int] = []
        self.pending_logprobs: list | None = None  # model.sampling.TokenLogprob per pending id

    @property
    def num_tokens_to_keep(self) -> int:
        """Tokens the stored record keeps: all, or after an abort only what was delivered."""
        if self.num_delivered is None:
            return len(self.token_ids)
        return min(len(self.token_ids), self.num_base_tokens + self.num_delivered)
