"""Per-request state inside the engine: tokens, stop handling, where its KV lives, its output sink."""

from __future__ import annotations

import asyncio

import torch

from model.detok import IncrementalDetokenizer
from model.sampling import RowSpec, TokenLogprob
from model.scheduler import SeqStatus
from model.types import Delta, SamplingParams


class Sequence:
    """One request's life in the engine (owned by the engine thread once submitted).

    ``token_ids`` is the whole sequence (restored + prompt + generated); the KV of
    ``token_ids[:-1]`` is computed (in the batch slab once RUNNING) and the last token is the next
    decode step's input.
    """

    def __init__(self, *, request_id: str, token_ids: list[int], num_prompt_tokens: int,
                 num_cached_tokens: int, params: SamplingParams, prefix: list, kv_from: int,
                 on_finish, tokenizer, eos_token_ids: list[int], max_context: int,
                 loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.num_base_tokens = len(token_ids)  # tokens before this request generated anything
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = num_cached_tokens  # restored, not computed: the prefix's length
        self.params = params
        self.prefix = prefix  # KV chunks of token_ids[:num_cached_tokens], until prefilled
        self.kv_from = kv_from  # on finish, the KV from this position on goes to on_finish
        self.on_finish = on_finish
        self.max_context = max_context
        self.loop = loop
        self.queue = queue
        self.status = SeqStatus.WAITING
        self.is_aborted = False
        self.num_delivered: int | None = None  # set on abort: generated tokens the client got
        self.row: int | None = None
        self.num_computed = 0  # prefill progress over token_ids[:-1]
        self.prefill_cache = None
        self.num_generated = 0
        self.detok = IncrementalDetokenizer(tokenizer, token_ids)
        self._held = ""  # emitted text withheld because it may be the start of a stop string
        self._pending_ids: list[int] = []
        self._eos = torch.tensor(eos_token_ids, dtype=torch.long) if eos_token_ids else None
        self._eos_set = set(eos_token_ids)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._seen: set[int] = set(token_ids) if params.repetition_penalty != 1.0 else set()
        self._seen_tensor: torch.Tensor | None = None

    # -- sampling --------------------------------------------------------------------------
    def row_spec(self) -> RowSpec:
        p = self.params
        seen = None
        if p.repetition_penalty != 1.0:
            if self._seen_tensor is None or self._seen_tensor.numel() != len(self._seen):
                self._seen_tensor = torch.tensor(sorted(self._seen), dtype=torch.long)
            seen = self._seen_tensor
        block = None
        if self._eos is not None and (p.ignore_eos or self.num_generated < p.min_new_tokens):
            block = self._eos
        return RowSpec(p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, seen, block,
                       self.generator)

    # -- output ----------------------------------------------------------------------------
    def append(self, token: int, logprob: TokenLogprob | None = None) -> tuple[Delta | None, str | None]:
        """Record a generated token (and its logprob, when asked). Returns (delta to emit or None,
        finish reason or None)."""
        self.token_ids.append(token)
        self.num_generated += 1
        if self._seen is not None and self.params.repetition_penalty != 1.0:
            self._seen.add(token)
        self._pending_ids.append(token)
        if logprob is not None:  # rides with the token ids of the same delta
            self._pending_logprobs = [*(getattr(self, "_pending_logprobs", None) or []), logprob]
        finish = None
        if token in self._eos_set and not self.params.ignore_eos:
            finish = "stop"
        text = self.detok.push(token)
        text, hit_stop = self._apply_stop(text)
        if hit_stop:
            finish = "stop"
        elif finish is None and (self.num_generated >= self.params.max_new_tokens
                                 or len(self.token_ids) >= self.max_context):
            finish = "length"
        if finish and not hit_stop:
            tail, _ = self._apply_stop(self.detok.flush(), final=True)
            text += tail
        if not text and not finish:
            return None, None
        delta = Delta(text=text, token_ids=self._pending_ids, logprobs=getattr(self, "_pending_logprobs", None))
        self._pending_ids = []
        self._pending_logprobs = None
        return delta, finish

    def _apply_stop(self, text: str, final: bool = False) -> tuple[str, bool]:
        stops = self.params.stop
        if not stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        if final:
            self._held = ""
            return buf, False
        keep = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def emit(self, delta: Delta) -> None:
        """Hand a delta to the request's asyncio queue (thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    # -- record ----------------------------------------------------------------------------
    @property
    def num_tokens_to_keep(self) -> int:
        """Tokens the stored record keeps: all, or after an abort only what was delivered."""
        if self.num_delivered is None:
            return len(self.token_ids)
        return min(len(self.token_ids), self.num_base_tokens + self.num_delivered)
