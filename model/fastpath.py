"""A lean forward for Llama-family models on CPU, over the HF modules' own weights.

The HF forward is ~50 tensor ops and a dozen module calls per layer; on CPU each costs
microseconds of Python and dispatch, a sizeable share of a decode step on a small model
(bench/NOTES.md). ``LlamaStep`` runs the same arithmetic over a step's packed tokens (decode
tokens and prefill chunks alike) with ~12 calls per layer: fused RMSNorm, the oneDNN linears with
their activation and residual add fused as post-ops, RoPE on q and k together, the new K/V written
straight into their pool slots, and paged attention (``model.attention``) over each sequence's
blocks. Where the linears run on our own GEMMs (bf16 on AMX or AVX512-BF16, fp32 on AVX-512 or
AVX2) the whole layer stack is one native call (``kvb_amx_layers`` / ``kvb_bf16_layers`` /
``kvb_f32_layers``: the same kernels in the
same order, so the same bits): a step returns to Python, and waits for the GIL the server's event
loop may hold, once instead of ~12 times a layer.

It is used only where it is exact to the HF forward up to float rounding: a Llama, Mistral or
Qwen2 architecture with the plain pre-norm block (checked structurally), no sliding window
shorter than the context, on CPU. ``build`` also compares its logits with the HF forward's on
a small mixed step and keeps the HF forward if they differ.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from model import kernels, native
from model.attention import NO_MASK, paged_attention
from model.kv import KVPool, PagedCache, StepBatch

log = logging.getLogger("kvbento.model")

SUPPORTED = {"llama", "mistral", "qwen2"}
_ATTN_ATTRS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_ATTRS = {"gate_proj", "up_proj", "down_proj"}


def _linear(mod: torch.nn.Module, act: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(mod, kernels.PackedLinear):
        return lambda x: mod.call(x, act)
    w, b = mod.weight, mod.bias
    if act == "swish":
        return lambda x: F.silu(F.linear(x, w, b))
    return lambda x: F.linear(x, w, b)


def _linear_add(mod: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, residual) -> residual + x W^T + b``, the add fused into the GEMM where packed."""
    if isinstance(mod, kernels.PackedLinear):
        return lambda x, r: mod.call(x, res=r)
    w, b = mod.weight, mod.bias
    return lambda x, r: r + F.linear(x, w, b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "q", "k", "v", "o", "gate", "up", "down", "mlp")


_PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class _CLayer(ctypes.Structure):
    """``kvb_layer`` of csrc/amx.c, gemm_bf16.c and gemm_f32.c: one layer's weights for their layer stack."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("ln1", "ln2", *(f"w{p}" for p in _PROJ), *(f"b{p}" for p in _PROJ))]
                + [("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]
                + [(f"rows_{p}", ctypes.c_int64) for p in _PROJ])


def _stack(model: torch.nn.Module, amx: bool) -> ctypes.Array | None:
    """Every layer's weights for one ``kvb_amx_layers`` (``amx``) or ``kvb_bf16_layers`` /
    ``kvb_f32_layers`` call, where all its linears run on that GEMM with no K padding (else None:
    the per-op path runs)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if amx and any(n % 32 for n in (cfg.hidden_size, cfg.num_attention_heads * head_dim, cfg.intermediate_size)):
        return None
    if not amx and not kernels.native_attention_fits(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim):
        return None
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        mods = dict(zip(_PROJ, (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)))
        if not all(isinstance(x, kernels.PackedLinear) and x.own and x.amx == amx and not x.k_pad
                   for x in mods.values()):
            return None
        c = _CLayer(ln1=layer.input_layernorm.weight.data_ptr(), ln2=layer.post_attention_layernorm.weight.data_ptr(),
                    eps1=layer.input_layernorm.variance_epsilon, eps2=layer.post_attention_layernorm.variance_epsilon)
        for p, mod in mods.items():
            setattr(c, f"w{p}", mod.packed.data_ptr())
            setattr(c, f"b{p}", None if mod.bias32 is None else mod.bias32.data_ptr())
            setattr(c, f"rows_{p}", mod.block_rows)
        out.append(c)
    return (_CLayer * len(out))(*out)


class LlamaStep:
    """One packed step: ``logits = step(ids [T], positions [T], batch, keep)`` for positions ``keep``."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        inner = model.model
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.scaling = self.head_dim ** -0.5
        self.intermediate = cfg.intermediate_size
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
            x.mlp = self._mlp(x, m.up_proj)
            self.layers.append(x)
        # Our GEMMs (bf16 on AMX or AVX512-BF16, fp32 on AVX-512/AVX2): RMSNorm, RoPE and the MLP's
        # product from the same library, one pass each; and where every shape fits, the whole layer
        # stack in one call (``_run_stack``).
        packed = [mod for mod in model.modules() if isinstance(mod, kernels.PackedLinear)]
        own = packed[0].native if packed and all(mod.own and mod.native is packed[0].native for mod in packed) else None
        self.fused = self.rowops = own.load() if own is not None else None
        self.amx = own is native.AMX
        self.stack = _stack(model, self.amx) if self.fused is not None else None
        self._pool_ptrs: tuple = (None, None)

    def _mlp(self, L: _Layer, up: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``silu(gate(y)) * up(y)``, the product in the up projection's epilogue where our GEMM runs it."""
        if isinstance(up, kernels.PackedLinear) and up.own:
            return lambda y: up.call(y, "times", L.gate(y))
        return lambda y: L.gate(y) * L.up(y)

    def _norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if self.rowops is None:
            return F.rms_norm(x, (self.hidden,), w, eps)
        out = torch.empty_like(x)
        self.rowops.kvb_rms_norm(x.data_ptr(), x.shape[0], self.hidden, w.data_ptr(), eps, out.data_ptr(),
                                torch.get_num_threads())
        return out

    def _rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q ``[t, heads, d]``, k ``[t, kv_heads, d]``; cos/sin ``[t, 1, d]``."""
        if self.rowops is None:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        q, k, cos, sin = q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous()
        t, d = q.shape[0], self.head_dim
        self.rowops.kvb_rope(q.data_ptr(), t, self.heads, d, cos.data_ptr(), sin.data_ptr())
        self.rowops.kvb_rope(k.data_ptr(), t, self.kv_heads, d, cos.data_ptr(), sin.data_ptr())
        return q, k

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

    def _run_stack(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: StepBatch) -> bool:
        """All layers in one native call (``kvb_amx_layers`` / ``kvb_bf16_layers`` / ``kvb_f32_layers``)
        on ``x`` in place; False where the pool or the shapes do not fit it (nothing has changed then)."""
        pool = batch.pool
        if not (batch.native and pool.dtype == self.embed.dtype):
            return False
        if self.amx:  # its attention reads keys by position
            if pool.keys_by_dim or not kernels.amx_attention_fits(self.heads, self.kv_heads, self.head_dim,
                                                                  pool.block_size):
                return False
            run, attention = self.fused.kvb_amx_layers, ()
        else:  # the attention kernel is another library's, passed in as a function pointer
            lib = native.ATTENTION.load()
            if lib is None or not pool.keys_by_dim:
                return False
            bf16 = pool.dtype == torch.bfloat16
            kernel = lib.kvb_paged_attention_bf16 if bf16 else lib.kvb_paged_attention
            run = self.fused.kvb_bf16_layers if bf16 else self.fused.kvb_f32_layers
            attention = (ctypes.cast(kernel, ctypes.c_void_p),)
        if self._pool_ptrs[0] is not pool:
            arrays = [(ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts]) for ts in (pool.keys, pool.values)]
            self._pool_ptrs = (pool, arrays)
        kp, vp = self._pool_ptrs[1]
        seq, pos, tables = batch.native_meta()
        t = x.shape[0]
        rc = run(len(self.layers), self.stack, *attention, kp, vp, x.data_ptr(), t, self.hidden, self.heads,
                 self.kv_heads, self.head_dim, self.intermediate, cos.data_ptr(), sin.data_ptr(),
                 batch.slot_mapping.data_ptr(), seq.data_ptr(), pos.data_ptr(), tables.data_ptr(),
                 tables.shape[1], pool.block_size, self.scaling, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"the native layer stack failed ({rc})")
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, batch: StepBatch,
                 keep: torch.Tensor) -> torch.Tensor:
        t = ids.shape[0]
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)  # [t, hidden]
        cos, sin = self.rotary(x, positions.view(1, t))  # [1, t, d]
        if self.stack is not None and self._run_stack(x, cos.contiguous(), sin.contiguous(), batch):
            x = x.index_select(0, keep)
            return self.lm_head(self._norm(x, self.norm, self.norm_eps))
        cos, sin = cos.view(t, 1, d), sin.view(t, 1, d)
        for i, L in enumerate(self.layers):
            y = self._norm(x, L.ln1, L.eps1)
            q, k = self._rope(L.q(y).view(t, h, d), L.k(y).view(t, hkv, d), cos, sin)
            v = L.v(y).view(t, hkv, d)
            batch.pool.write(i, batch.slot_mapping, k, v)
            attn = paged_attention(q, i, batch, self.scaling)
            x = L.o(attn.reshape(t, h * d), x)
            x = L.down(L.mlp(self._norm(x, L.ln2, L.eps2)), x)
        x = x.index_select(0, keep)
        return self.lm_head(self._norm(x, self.norm, self.norm_eps))


def build(model: torch.nn.Module, dtype: torch.dtype, max_context: int, native: bool) -> LlamaStep | None:
    """The fast step for ``model`` if it applies and agrees with the HF forward, else None."""
    why = LlamaStep.supports(model, max_context)
    if why is not None:
        log.info("step: HF forward (%s)", why)
        return None
    step = LlamaStep(model)
    try:
        err, scale = _self_check(model, step, dtype, native)
    except Exception as exc:  # a layout the structural check missed
        log.warning("step: HF forward (self-check failed: %s: %s)", type(exc).__name__, exc)
        return None
    # A layout mistake moves logits wholesale; rounding moves them by a few units of the dtype's
    # precision per layer. Half types get 64 machine epsilons of the largest logit (fp16 ~0.06,
    # bf16 ~0.5 at |logit| ~1): bf16 rounds 8x coarser than fp16, and on the tiny model the two
    # orders of the same bf16 arithmetic already differ by more than fp16's bound.
    tol = 1e-3 if dtype == torch.float32 else 64 * torch.finfo(dtype).eps * max(1.0, scale)
    if not err <= tol:
        log.warning("step: HF forward (fast step differs from it by %.3g)", err)
        return None
    log.info("step: lean Llama step (max |logit diff| vs HF forward %.2g)", err)
    return step


@torch.inference_mode()
def _self_check(model: torch.nn.Module, step: LlamaStep, dtype: torch.dtype, native: bool) -> tuple[float, float]:
    """Run a prefill of two prompts, then a step mixing a decode token and a chunk, both ways;
    return the largest logit difference and the largest logit magnitude of the HF forward."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (12,), generator=g).tolist()
    seqs = [tokens[:7], tokens[7:]]
    by_dim = native and kernels.keys_by_dim(dtype, step.heads, step.kv_heads, step.head_dim, 16)
    pools = [KVPool(cfg.num_hidden_layers, step.kv_heads, step.head_dim, dtype, torch.device("cpu"), 4, 16,
                    native_copy=native, keys_by_dim=by_dim) for _ in range(2)]
    tables = [[0, 1], [2, 3]]
    err = scale = 0.0
    for chunks in ([(0, 5), (0, 2)], [(5, 6), (2, 5)]):
        ids = torch.tensor([t for s, (a, b) in zip(seqs, chunks) for t in s[a:b]])
        q_lens, ctx = [b - a for a, b in chunks], [b for _, b in chunks]
        batches = [StepBatch(pool, tables, q_lens, ctx, native) for pool in pools]
        keep = torch.arange(ids.shape[0])
        pos = batches[0].positions
        want = model(input_ids=ids.view(1, -1), position_ids=pos.view(1, -1), attention_mask=NO_MASK,
                     past_key_values=PagedCache(batches[0]), use_cache=True, kvbento=batches[0]).logits[0].float()
        got = step(ids, pos, batches[1], keep).float()
        err = max(err, float((want - got).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return err, scale
