"""The model runner: every call into the model and every touch of the KV pool.

``step`` runs one scheduled step as one forward over packed tokens (decode tokens and prefill
chunks of any number of sequences), writing their K/V into the pool and returning the logits of
the positions that sample (and of every prompt position of a request for prompt logprobs).
``beam_search`` runs a beam request outside the batch and ``recompute`` rebuilds the chosen
beam's KV. ``extract`` copies a sequence's KV out when it retires. Owned by the model thread.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from model import kernels
from model.attention import NO_MASK
from model.kv import KV, KVPool, PagedCache, StepBatch
from model.loader import LoadedModel
from model.sampling import TokenLogprob
from model.scheduler import Schedule
from model.sequence import Sequence


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.m = loaded
        self.kv_geometry = self.geometry(loaded)
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self.pool = self.new_pool(loaded, num_blocks, block_size)
        self.num_prefilled_tokens = 0  # prompt positions (but the last) run through a forward, ever

    @classmethod
    def new_pool(cls, loaded: LoadedModel, num_blocks: int, block_size: int) -> KVPool:
        """A KV pool for ``loaded``, its keys laid out for the attention kernel that will read it."""
        native = loaded.kernels.get("attention") == "native" and loaded.device.type == "cpu"
        layers, kv_heads, head_dim = cls.geometry(loaded)
        by_dim = native and kernels.keys_by_dim(loaded.dtype, loaded.model.config.num_attention_heads, kv_heads,
                                                head_dim, block_size)
        return KVPool(layers, kv_heads, head_dim, loaded.dtype, loaded.device, num_blocks, block_size,
                      native_copy=native, keys_by_dim=by_dim)

    @staticmethod
    def geometry(loaded: LoadedModel) -> tuple[int, int, int]:
        """(layers, KV heads, head size) of ``loaded``'s KV."""
        cfg = loaded.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return loaded.num_layers, kv_heads, head_dim

    # -- the step --------------------------------------------------------------------------
    def step(self, sched: Schedule) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run ``sched`` (block copies, restored KV, then one forward).

        Returns:
            The sequences whose chunk ended at their length (they sample now) and their
            next-token logits ``[n, vocab]`` on the CPU, in that order.
        """
        for src, dst in sched.copies:
            self.pool.copy_block(src, dst)
        for seq, matched in sched.admitted:
            if seq.num_cached > matched and seq.prefix:
                self.pool.load(seq.block_table, matched, seq.prefix, seq.prefix_from)
            seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed)
            seq.prefix = []
        if not sched.chunks:
            return [], None
        ids, keep, sampling, scored = [], [], [], []
        for seq, start, end in sched.chunks:
            at = len(ids)
            ids += seq.token_ids[start:end]
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == start + 1:
                hi = min(end, len(seq.token_ids) - 1)  # positions scoring a prompt token
                scored.append((seq, start, hi, len(keep)))
                keep += range(at, at + hi - start)
            if end == len(seq.token_ids):
                sampling.append((seq, len(keep)))
                keep.append(at + end - start - 1)
            if start < seq.num_base_tokens - 1:  # the prompt before its last position, as stored
                self.num_prefilled_tokens += min(end, seq.num_base_tokens - 1) - start
        native = self.m.kernels.get("attention") == "native"
        batch = StepBatch(self.pool, [s.block_table for s, _, _ in sched.chunks],
                          [e - s for _, s, e in sched.chunks], [e for _, _, e in sched.chunks], native)
        logits = self._forward(ids, batch, keep)
        for seq, start, end in sched.chunks:
            seq.num_computed = end
        for seq, start, hi, at in scored:
            self._score_prompt(seq, logits[at : at + hi - start], start, hi)
        rows = torch.tensor([r for _, r in sampling], dtype=torch.long)
        out = logits.index_select(0, rows.to(logits.device)) if sampling else None
        if out is not None and out.device.type != "cpu":
            out = out.cpu()
        return [s for s, _ in sampling], out

    def _forward(self, ids: list[int], batch: StepBatch, keep: list[int]) -> torch.Tensor:
        """Logits ``[len(keep), vocab]`` of packed positions ``keep`` of the tokens ``ids``."""
        dev = self.m.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = batch.positions.to(dev)
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
        if batch.slot_mapping.device != dev:
            batch.slot_mapping = batch.slot_mapping.to(dev)
        if not keep:
            keep_t = torch.tensor([len(ids) - 1], dtype=torch.long, device=dev)
        if self.m.decode_step is not None:
            return self.m.decode_step(ids_t, pos_t, batch, keep_t)
        out = self.m.model(input_ids=ids_t.unsqueeze(0), position_ids=pos_t.unsqueeze(0),
                           attention_mask=NO_MASK, past_key_values=PagedCache(batch), use_cache=True,
                           logits_to_keep=keep_t, kvbento=batch)
        return out.logits[0]

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, lo: int, hi: int) -> None:
        """Append the logprobs of prompt tokens ``lo + 1 .. hi`` (log-softmax of the raw logits of
        positions ``lo .. hi - 1``, no sampling transforms) to ``seq.prompt_logprobs``."""
        if hi <= lo:
            return
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

    # -- beam search (outside the continuous batch) ----------------------------------------
    def _restored_cache(self, seq: Sequence) -> DynamicCache:
        """A DynamicCache holding the restored prefix (beam search goes on from there)."""
        cache = DynamicCache()
        chunks, seq.prefix = seq.prefix, []
        if chunks:
            dev = self.m.device
            for i in range(len(chunks[0][0])):
                k = torch.cat([c[0][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][0][i]
                v = torch.cat([c[1][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][1][i]
                cache.update(k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0), i)
        return cache

    def beam_search(self, seq: Sequence) -> list[int]:
        """Run ``seq`` as a beam search with HF ``generate``; return the chosen beam's new tokens."""
        p = seq.params
        dev = self.m.device
        past = self._restored_cache(seq) if seq.num_cached and seq.prefix_from == 0 else None
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
        """The KV of ``seq.token_ids[:-1]`` computed afresh in a scratch cache (beam search keeps
        every beam's cache, so the chosen beam's is rebuilt for ``on_finish``)."""
        n = len(seq.token_ids) - 1
        if n <= 0:
            return self.empty_kv()
        ids = torch.tensor([seq.token_ids[:n]], dtype=torch.long, device=self.m.device)
        cache = DynamicCache()
        self.m.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return ([layer.keys[0].cpu() for layer in cache.layers], [layer.values[0].cpu() for layer in cache.layers])

    # -- retirement ------------------------------------------------------------------------
    def extract(self, seq: Sequence, start: int, end: int) -> KV:
        """Copy KV positions ``[start, end)`` of ``seq`` to host memory."""
        return self.pool.extract(seq.block_table, start, end)

    def empty_kv(self) -> KV:
        """A zero-length KV (for a sequence with nothing new to store)."""
        layers, heads, dim = self.kv_geometry
        return ([torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)],
                [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)])
