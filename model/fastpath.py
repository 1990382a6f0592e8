"""A lean decode step for Llama-family models on CPU, over the HF modules' own weights.

The HF forward of one decode step is ~50 tensor ops and a dozen module calls per layer; on CPU
each costs microseconds of Python and dispatch, a sizeable share of a step on a small model
(bench/NOTES.md). ``LlamaDecodeStep`` runs the same arithmetic with ~12 calls per layer: fused
RMSNorm, the oneDNN linears with their activation and residual add fused as post-ops, RoPE on q
and k together, the new K/V column written straight into the slab, and the native attention
kernel over each row's live span.

It is used only where it is exact to the HF forward up to float rounding: a Llama, Mistral or
Qwen2 architecture with the plain pre-norm block (checked structurally), no sliding window
shorter than the context, on CPU. ``build`` also compares its logits with the HF forward's on
a small batch and keeps the HF path if they differ; prefill always uses the HF forward.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from model import kernels
from model.kv import BatchKV

log = logging.getLogger("kvbento.model")

SUPPORTED = {"llama", "mistral", "qwen2"}
_ATTN_ATTRS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_ATTRS = {"gate_proj", "up_proj", "down_proj"}


def _linear(mod: torch.nn.Module, act: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(mod, kernels.PackedLinear):
        op, w, b = torch.ops.mkldnn._linear_pointwise, mod.packed, mod.bias
        return lambda x: op(x, w, b, act, [], "")
    w, b = mod.weight, mod.bias
    if act == "swish":
        return lambda x: F.silu(F.linear(x, w, b))
    return lambda x: F.linear(x, w, b)


def _linear_add(mod: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, residual) -> residual + x W^T + b``, the add fused into the GEMM where packed."""
    if isinstance(mod, kernels.PackedLinear):
        op, w, b = torch.ops.mkldnn._linear_pointwise.binary, mod.packed, mod.bias
        return lambda x, r: op(x, r, w, b, "add")
    w, b = mod.weight, mod.bias
    return lambda x, r: r + F.linear(x, w, b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "q", "k", "v", "o", "gate", "up", "down")


class LlamaDecodeStep:
    """One decode step: ``logits = step(ids [B], positions [B], slab, lo)`` for the slab's first B rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        inner = model.model
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.scaling = self.head_dim ** -0.5
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = _linear(model.lm_head)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            x = _Layer()
            x.ln1, x.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
            x.ln2, x.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
            x.q, x.k, x.v = _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj)
            x.o = _linear_add(a.o_proj)
            x.gate, x.up, x.down = _linear(m.gate_proj, "swish"), _linear(m.up_proj), _linear_add(m.down_proj)
            self.layers.append(x)

    @classmethod
    def supports(cls, model: torch.nn.Module, max_context: int) -> str | None:
        """None if the fast step applies to ``model``, else why not."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            return f"model_type {cfg.model_type!r}"
        if next(model.parameters()).device.type != "cpu":
            return "not on CPU"
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
            return "activation or MLP bias"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp"
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if window and window < max_context:
            return "sliding window"
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
            return "module layout"
        for layer in inner.layers:
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if a is None or m is None or not all(hasattr(a, n) for n in _ATTN_ATTRS) \
                    or not all(hasattr(m, n) for n in _MLP_ATTRS):
                return "module layout"
            extra = {n for n, _ in a.named_children()} - _ATTN_ATTRS
            if extra:  # q_norm / k_norm (Qwen3-style) and the like: not this block
                return f"attention has {sorted(extra)}"
            for ln in (layer.input_layernorm, layer.post_attention_layernorm):
                if not hasattr(ln, "variance_epsilon") or set(ln.state_dict()) != {"weight"}:
                    return "norm layout"
        return None

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slab: BatchKV, lo: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)  # [b, hidden]
        cos, sin = self.rotary(x, positions.view(b, 1))  # [b, 1, d]
        col, start, end = slab.end, slab.start, slab.end + 1
        for i, L in enumerate(self.layers):
            y = F.rms_norm(x, (self.hidden,), L.ln1, L.eps1)
            q = L.q(y).view(b, h, d)
            k = L.k(y).view(b, hkv, d)
            v = L.v(y).view(b, hkv, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = slab.keys[i], slab.values[i]
            keys[:b, :, col] = k
            values[:b, :, col] = v
            attn = kernels.decode_attention(q, keys[:b, :, start:end], values[:b, :, start:end], lo, bias,
                                            self.scaling)
            x = L.o(attn.reshape(b, h * d), x)
            y = F.rms_norm(x, (self.hidden,), L.ln2, L.eps2)
            x = L.down(L.gate(y) * L.up(y), x)
        return self.lm_head(F.rms_norm(x, (self.hidden,), self.norm, self.norm_eps))


def build(model: torch.nn.Module, dtype: torch.dtype, max_context: int) -> LlamaDecodeStep | None:
    """The fast step for ``model`` if it applies and agrees with the HF forward, else None."""
    why = LlamaDecodeStep.supports(model, max_context)
    if why is not None:
        log.info("decode step: HF forward (%s)", why)
        return None
    step = LlamaDecodeStep(model)
    try:
        err, scale = _self_check(model, step, dtype)
    except Exception as exc:  # a layout the structural check missed
        log.warning("decode step: HF forward (self-check failed: %s: %s)", type(exc).__name__, exc)
        return None
    # A layout mistake moves logits wholesale; rounding moves them by a few units of the dtype's
    # precision per layer. Half types get 64 machine epsilons of the largest logit (fp16 ~0.06,
    # bf16 ~0.5 at |logit| ~1): bf16 rounds 8x coarser than fp16, and on the tiny model the two
    # orders of the same bf16 arithmetic already differ by more than fp16's bound.
    tol = 1e-3 if dtype == torch.float32 else 64 * torch.finfo(dtype).eps * max(1.0, scale)
    if not err <= tol:
        log.warning("decode step: HF forward (fast step differs from it by %.3g)", err)
        return None
    log.info("decode step: lean Llama step (max |logit diff| vs HF forward %.2g)", err)
    return step


@torch.inference_mode()
def _self_check(model: torch.nn.Module, step: LlamaDecodeStep, dtype: torch.dtype) -> tuple[float, float]:
    """Decode 2 rows of unequal length both ways; return the largest logit difference and the
    largest logit magnitude of the HF forward."""
    from model.kv import SlabCache

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lens = [5, 3]
    slabs = []
    for _ in range(2):
        kv = BatchKV(cfg.num_hidden_layers, step.kv_heads, step.head_dim, dtype, torch.device("cpu"), 2, 8)
        for n in lens:
            shape = (step.kv_heads, n, step.head_dim)
            gk = torch.Generator().manual_seed(n)
            kv.insert([torch.randn(shape, generator=gk, dtype=torch.float32).to(dtype) for _ in range(cfg.num_hidden_layers)],
                      [torch.randn(shape, generator=gk, dtype=torch.float32).to(dtype) for _ in range(cfg.num_hidden_layers)])
        slabs.append(kv)
    ids = torch.randint(0, cfg.vocab_size, (2,), generator=g)
    pos = torch.tensor(lens)
    cache, bias, rows, lo = slabs[0].prepare_step()
    want = model(input_ids=ids.view(2, 1), position_ids=pos.view(2, 1), attention_mask=bias,
                 past_key_values=cache, use_cache=True).logits[:, -1].float()
    assert isinstance(cache, SlabCache)
    _, bias2, _, lo2 = slabs[1].prepare_step()
    got = step(ids, pos, slabs[1], lo2, bias2).float()
    return float((want - got).abs().max()), float(want.abs().max())
