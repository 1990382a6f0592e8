"""Attention over the paged KV pool, for packed steps mixing decode tokens and prefill chunks.

``paged_attention`` computes, for every query token, attention over its own sequence's positions
up to its own (causal), optionally within a sliding window and with logit soft-capping. Two
implementations of the same arithmetic:

- the pure-torch path (the CUDA path, and the CPU path under ``KVBENTO_CPU_KERNELS=torch``):
  per sequence, gather its positions' K/V from the pool and run the scores, softmax and
  weighted sum as batched matmuls;
- the native CPU kernels (``csrc/decode_attention.c``, or AMX tiles for bf16 where the CPU has
  them), which walk the block tables directly; the pool's key layout says which one reads it.

Both compute every sequence on its own, in an order that does not depend on the rest of the
batch: a sequence's attention output is the same alone or in any batch (exactness). The HF forward
reaches it through ``attention``, registered as a transformers attention implementation: the
engine's forward passes its ``StepBatch`` (the block tables are the mask, the forward's mask is a
placeholder); any other caller (``generate`` for beam search, tests) gets plain attention.
"""

from __future__ import annotations

import logging

import torch

from model import kernels
from model.kv import StepBatch

log = logging.getLogger("kvbento.model")

ATTENTION_NAME = "kvbento_paged"
# The engine's forward hands the model this "prepared" 4D mask, so no mask is built for a step.
NO_MASK = torch.zeros(1, 1, 1, 1)


def paged_attention(q: torch.Tensor, layer: int, batch: StepBatch, scaling: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """``q [T, heads, head_dim]`` (the batch's packed query tokens) -> ``[T, heads, head_dim]``."""
    if batch.native and q.device.type == "cpu":
        out = kernels.paged_attention_native(q, layer, batch, scaling, window, softcap)
        if out is not None:
            return out
    return _torch_attention(q, layer, batch, scaling, window, softcap)


def _torch_attention(q: torch.Tensor, layer: int, batch: StepBatch, scaling: float,
                     window: int | None, softcap: float | None) -> torch.Tensor:
    pool = batch.pool
    hkv = pool.kv_heads
    t, h, d = q.shape
    g = h // hkv
    out = torch.empty_like(q)
    at = 0
    for slots, q_len, ctx in zip(batch.gather_slots(), batch.q_lens, batch.ctx_lens):
        k, v = (x.transpose(0, 1) for x in pool.rows(layer, slots))  # [hkv, ctx, d]
        qi = q[at : at + q_len].view(q_len, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * q_len, d)
        scores = torch.bmm(qi.to(k.dtype), k.transpose(1, 2)).float() * scaling  # [hkv, g*q, ctx]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        qpos = torch.arange(ctx - q_len, ctx, device=q.device).view(q_len, 1)
        kpos = torch.arange(ctx, device=q.device).view(1, ctx)
        allowed = kpos <= qpos
        if window:
            allowed &= kpos > qpos - window
        if q_len > 1 or window:
            scores = scores.view(hkv, g, q_len, ctx).masked_fill(~allowed, float("-inf")).view(hkv, g * q_len, ctx)
        probs = torch.softmax(scores, dim=-1)
        o = torch.bmm(probs.to(v.dtype), v)  # [hkv, g*q, d]
        out[at : at + q_len] = o.view(hkv, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, h, d).to(q.dtype)
        at += q_len
    return out


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention function of a packed paged step (``query [1, heads, T, d]``;
    the step's ``StepBatch`` rides in the forward's kwargs as ``kvbento``)."""
    batch: StepBatch | None = kwargs.get("kvbento")
    if batch is None:
        return _dense_attention(query, key, value, attention_mask, scaling, softcap), None
    d = query.shape[-1]
    layer = getattr(module, "layer_idx", None)
    out = paged_attention(query[0].transpose(0, 1), batch.layer if layer is None else layer, batch,
                          d ** -0.5 if scaling is None else scaling, sliding_window, softcap)
    return out.unsqueeze(0), None


def _dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, softcap: float | None) -> torch.Tensor:
    """Plain attention over given K/V ``[b, kv_heads, n, d]`` with the HF-built mask (callers
    without a ``StepBatch``: ``generate`` for beam search, reference runs). Returns ``[b, q, h, d]``."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scores = (query @ k.transpose(-1, -2)).float() * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q, n = scores.shape[-2:]
    if mask is not None:
        mask = mask[..., -n:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif q > 1:  # no mask built: causal, the queries being the last q positions
        causal = torch.ones(q, n, dtype=torch.bool, device=scores.device).tril(n - q)
        scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2)


def install(model: torch.nn.Module) -> bool:
    """Switch ``model`` to ``attention``. False if the model cannot take a custom implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # for the callers without a StepBatch
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError, ImportError) as exc:
        log.warning("the model does not take a custom attention implementation: %s", exc)
        return False
    return model.config._attn_implementation == ATTENTION_NAME
