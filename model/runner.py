"""The model runner: every call into the model and every touch of the batch's KV slab.

``prefill`` runs one chunk of a sequence on top of its restored prefix and places the finished KV
in a slab row; ``decode`` runs one step for the whole running batch and returns its logits;
``beam_search`` runs a beam request outside the batch and ``recompute`` rebuilds the chosen
beam's KV. ``fork`` gives a sibling choice a copy of a prefilled row. ``extract`` / ``release``
copy a row's KV out and free it when a sequence retires.
Owned by the model thread.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from model import kernels
from model.kv import BatchKV, PrefillBuffer
from model.loader import LoadedModel
from model.sampling import TokenLogprob
from model.sequence import Sequence

KV = tuple[list[torch.Tensor], list[torch.Tensor]]  # per layer [kv_heads, n, head_dim]
# Positions the prefill buffer holds from the start (longer prefills grow it once).
PREFILL_RESERVE_TOKENS = 4096


class ModelRunner:
    def __init__(self, loaded: LoadedModel, max_batch_size: int, prefill_chunk: int) -> None:
        self.m = loaded
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        cfg = loaded.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.kv_geometry = (loaded.num_layers, kv_heads, head_dim)
        # model.kernels.attention reads each row's first live column from the forward's kwargs.
        self._native_attention = getattr(cfg, "_attn_implementation", None) == kernels.ATTENTION_NAME
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self.kv = self._new_kv()
        self.prefill_buffer = PrefillBuffer(*self.kv_geometry, loaded.dtype, loaded.device)
        self.prefill_buffer.reserve(min(loaded.max_context, PREFILL_RESERVE_TOKENS))
        self.num_prefilled_tokens = 0  # positions run through a prefill forward, ever

    def _new_kv(self) -> BatchKV:
        layers, heads, dim = self.kv_geometry
        kv = BatchKV(layers, heads, dim, self.m.dtype, self.m.device, self.max_batch_size)
        # Rows for a full batch and two column chunks, touched now rather than by the first burst.
        kv.reserve(self.max_batch_size, 2 * kv.chunk)
        return kv

    def reset(self) -> None:
        """Start over with an empty slab (after a failed step, whose rows are forgotten)."""
        self.kv = self._new_kv()

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, seq: Sequence) -> bool:
        """Run the next prefill chunk of ``seq``.

        Returns:
            True once the KV of ``token_ids[:-1]`` is complete and in slab row ``seq.row``.
        """
        if seq.forked_kv is not None:  # a sibling choice: the KV its first choice computed
            seq.row = self.kv.insert(*seq.forked_kv)
            seq.forked_kv, seq.prefix = None, []
            return True
        if seq.prefix and seq.num_cached_tokens == len(seq.token_ids) - 1:
            # Everything but the last token is restored: the chunks go straight into the row.
            chunks, seq.prefix = seq.prefix, []
            seq.row = self.kv.insert_chunks(chunks)
            return True
        if seq.prefill_cache is None:
            chunks, seq.prefix = seq.prefix, []
            seq.prefill_cache = self.prefill_buffer.cache(len(seq.token_ids) - 1, chunks)
            seq.num_computed = seq.num_cached_tokens if chunks else 0
        kv = self._prefill_chunk(seq)
        if kv is None:
            return False  # more chunks to go
        seq.row = self.kv.insert(*kv)
        return True

    def _restored_cache(self, seq: Sequence) -> DynamicCache:
        """A DynamicCache holding the restored prefix (the chunked prefill goes on from there)."""
        cache = DynamicCache()
        chunks, seq.prefix = seq.prefix, []
        if chunks:
            dev = self.m.device
            for i in range(len(chunks[0][0])):
                k = torch.cat([c[0][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][0][i]
                v = torch.cat([c[1][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][1][i]
                cache.update(k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0), i)
        seq.num_computed = seq.num_cached_tokens
        return cache

    def _prefill_chunk(self, seq: Sequence) -> KV | None:
        """One chunk over ``token_ids[num_computed:-1]`` into ``seq.prefill_cache``; the whole KV
        when that was the last chunk, else None."""
        todo = len(seq.token_ids) - 1
        lo, hi = seq.num_computed, min(todo, seq.num_computed + self.prefill_chunk)
        if hi > lo:
            if seq.prefill_cache is None:
                seq.prefill_cache = DynamicCache()
            dev = self.m.device
            ids = torch.tensor([seq.token_ids[lo:hi]], dtype=torch.long, device=dev)
            pos = torch.arange(lo, hi, dtype=torch.long, device=dev).unsqueeze(0)
            # Only a request for the prompt's logprobs pays for every position's logits.
            score = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == lo + 1
            out = self.m.model(input_ids=ids, position_ids=pos, past_key_values=seq.prefill_cache,
                               use_cache=True, logits_to_keep=0 if score else 1)
            if score:
                self._score_prompt(seq, out.logits[0], lo, hi)
            seq.num_computed = hi
            self.num_prefilled_tokens += hi - lo
        if seq.num_computed < todo:
            return None
        if seq.prefill_cache is None:
            return [], []
        layers = seq.prefill_cache.layers
        keys = [layer.keys[0] for layer in layers]
        values = [layer.values[0] for layer in layers]
        seq.prefill_cache = None
        return keys, values

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, lo: int, hi: int) -> None:
        """Append the logprobs of prompt tokens ``lo + 1 .. hi`` (log-softmax of the raw logits of
        positions ``lo .. hi - 1``, no sampling transforms) to ``seq.prompt_logprobs``."""
        lp = logits.float().log_softmax(dim=-1)
        targets = torch.tensor(seq.token_ids[lo + 1 : hi + 1], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = seq.params.prompt_logprobs
        if k:
            top = lp.topk(k, dim=-1)
            alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            alts = [[] for _ in chosen]
        seq.prompt_logprobs.extend(TokenLogprob(t, x, a) for t, x, a in zip(targets.tolist(), chosen, alts))

    def fork(self, seq: Sequence, sibling: Sequence) -> None:
        """Give ``sibling`` (the same tokens) a slab row holding a copy of prefilled ``seq``'s KV."""
        sibling.row = self.kv.copy_row(seq.row)
        sibling.prefix = []

    # -- decode ----------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode step for the running batch ``seqs``.

        Returns:
            The next-token logits ``[len(seqs), vocab]`` on the CPU, in the order of ``seqs``.
        """
        cache, mask, rows, lo = self.kv.prepare_step()
        ids = [self.pad_id] * rows
        pos = [0] * rows
        for seq in seqs:
            ids[seq.row] = seq.token_ids[-1]
            pos[seq.row] = self.kv.row_len[seq.row]
        dev = self.m.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        if self.m.decode_step is not None:
            logits = self.m.decode_step(ids_t, pos_t, self.kv, lo, mask)
        else:
            extra = {"kvbento_lo": lo} if self._native_attention else {}
            out = self.m.model(input_ids=ids_t.unsqueeze(1), position_ids=pos_t.unsqueeze(1),
                               attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
            logits = out.logits[:, -1, :]
        self.kv.finish_step()
        order = [s.row for s in seqs]
        if order != list(range(rows)):
            logits = logits.index_select(0, torch.tensor(order, device=logits.device))
        return logits.cpu() if logits.device.type != "cpu" else logits

    # -- beam search (outside the continuous batch) ----------------------------------------
    def beam_search(self, seq: Sequence) -> list[int]:
        """Run ``seq`` as a beam search with HF ``generate``; return the chosen beam's new tokens."""
        p = seq.params
        dev = self.m.device
        past = self._restored_cache(seq) if seq.num_cached_tokens else None
        if past is not None:
            past.batch_repeat_interleave(p.num_beams)  # generate expands the inputs, not a given cache
        ids = torch.tensor([seq.token_ids], dtype=torch.long, device=dev)
        budget = min(p.max_new_tokens, self.m.max_context - len(seq.token_ids))
        out = self.m.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=past,
            num_beams=p.num_beams, length_penalty=p.length_penalty, max_new_tokens=budget,
            min_new_tokens=min(p.min_new_tokens, budget), repetition_penalty=p.repetition_penalty,
            do_sample=False, early_stopping=True, eos_token_id=self.m.eos_token_ids,
            pad_token_id=self.pad_id,
        )
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] == self.pad_id and self.pad_id not in self.m.eos_token_ids:
            new.pop()
        return new

    def recompute(self, seq: Sequence) -> KV:
        """The KV of ``seq.token_ids[:-1]`` computed afresh (beam search keeps every beam's cache,
        so the chosen beam's is rebuilt for ``on_finish``)."""
        seq.num_computed = 0
        seq.prefill_cache = None
        kv = None
        while kv is None:
            kv = self._prefill_chunk(seq)
        return kv

    # -- retirement ------------------------------------------------------------------------
    def extract(self, seq: Sequence, start: int, end: int) -> KV:
        """Copy KV positions ``[start, end)`` of ``seq``'s slab row to host memory."""
        return self.kv.extract(seq.row, end, start)

    def empty_kv(self) -> KV:
        """A zero-length KV (for a sequence with nothing new to store)."""
        layers, heads, dim = self.kv_geometry
        return ([torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)],
                [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)])

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s slab row, if it has one, and any prefill in progress."""
        if seq.row is not None:
            self.kv.remove(seq.row)
            seq.row = None
        seq.prefill_cache = None
        seq.prefix = []
        seq.forked_kv = None
