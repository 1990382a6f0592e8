"""Faster CPU kernels for an eager HF forward, swapped in at load time.

On CPU the forward of a decoder is almost all ``nn.Linear``: torch runs it as an MKL sgemm on
the row-major weight, which at the small row counts of decode (1-32 tokens per step) reaches
clearly less than oneDNN does on the same weight re-ordered once into its blocked layout
(bench/NOTES.md has the figures). Same
fp32 arithmetic (errors ~1e-6 against float64, like MKL's); only the summation order differs,
which is why the choice is part of the model fingerprint (KV records stay exact).

``pack_linears`` replaces every ``nn.Linear`` of a CPU model by ``PackedLinear``. The original
weight is dropped (a tied LM head keeps the embedding's), so memory does not grow.
``paged_attention_native`` runs ``model.attention``'s paged attention through the C kernel of
``csrc/decode_attention.c``, built here at first use.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from model import native

log = logging.getLogger("kvbento.model")

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Our GEMMs' epilogues (csrc/amx.c, csrc/gemm_f32.c).
_ACTS = {"none": 0, "swish": 1, "times": 2}


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` pre-packed once: for our own GEMM where this CPU runs it (bf16 on
    AMX, fp32 on AVX-512 or AVX2+FMA; batch-invariant by construction, ``own``) or else for oneDNN.
    Inference only (no autograd)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.bias = None if linear.bias is None else linear.bias.detach()
        # Rows per oneDNN call (0: any): it may switch kernels, and the order of a row's sum,
        # above some row count (bf16 on AMX: a 512-wide input at 37 rows); set by ``fit_row_chunks``.
        self.rows = 0
        # A lone row goes through oneDNN's GEMV path, which sums in another order than any GEMM
        # (fp32 on AVX-512: a 2048-wide input); padded to two rows it gets the GEMM's bits.
        self.pad_single = False
        self.native, lib = own_gemm(self.dtype)
        self.amx = self.native is native.AMX
        self.own = lib is not None  # our kernel: one sum order at any row count, no chunks
        self.k_pad = 0
        if self.amx:
            self.k_pad = -self.in_features % 32  # the kernel steps K by 32
            blocks = (self.out_features + 15) // 16 * (self.in_features + self.k_pad) // 32
            self.packed = torch.empty(blocks * 512, dtype=torch.bfloat16)
            lib.kvb_amx_pack(weight.contiguous().data_ptr(), self.out_features, self.in_features,
                             self.in_features + self.k_pad, self.packed.data_ptr())
        elif self.native is native.BF16:
            self.k_pad, self.isa = self.in_features % 2, "avx512bf16"  # the kernel steps K by pairs
            panel = lib.kvb_bf16_panel()
            self.packed = torch.empty((self.out_features + panel - 1) // panel * panel
                                      * (self.in_features + self.k_pad), dtype=torch.bfloat16)
            lib.kvb_bf16_pack(weight.contiguous().data_ptr(), self.out_features, self.in_features,
                              self.in_features + self.k_pad, self.packed.data_ptr())
        elif self.own:
            panel = lib.kvb_f32_panel()
            self.isa = "avx512" if lib.kvb_f32_isa() == 512 else "avx2"
            self.packed = torch.empty((self.out_features + panel - 1) // panel * panel * self.in_features)
            lib.kvb_f32_pack(weight.contiguous().data_ptr(), self.out_features, self.in_features,
                             self.packed.data_ptr())
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        if self.own:
            self.bias32 = None if self.bias is None else self.bias.float().contiguous()
            # x rows kept in L2 while every column block passes over them (speed only, not bits)
            k_bytes = (self.in_features + self.k_pad) * self.dtype.itemsize
            budget = (3 << 19) if self.amx else (3 << 18)
            self.block_rows = max(128 if self.amx else 32, min(512, budget // k_bytes // 32 * 32))
            self._run = lib.kvb_amx_linear if self.amx else lib.kvb_bf16_linear if self.dtype == torch.bfloat16 \
                else lib.kvb_f32_linear

    def gemm(self, x: torch.Tensor, act: str = "none", res: torch.Tensor | None = None) -> torch.Tensor:
        """One library call on 2-D ``x``: ``act(x W^T + b) + res`` (act "none" or "swish"), or with
        act "times" (our kernels only) ``(x W^T + b) * res``."""
        if not self.own:
            op, w, b = torch.ops.mkldnn._linear_pointwise, self.packed, self.bias
            return op(x, w, b, act, [], "") if res is None else op.binary(x, res, w, b, "add")
        if self.k_pad:
            x = F.pad(x, (0, self.k_pad))
        if x.stride(-1) != 1 or x.dtype != self.dtype:
            x = x.contiguous().to(self.dtype)
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n, dtype=self.dtype)
        if res is not None:
            res = res.contiguous().to(self.dtype)
        b = self.bias32
        rc = self._run(x.data_ptr(), m, self.in_features + self.k_pad, x.stride(0), self.packed.data_ptr(), n,
                       None if b is None else b.data_ptr(), None if res is None else res.data_ptr(), _ACTS[act],
                       out.data_ptr(), self.block_rows, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"linear kernel failed ({rc})")
        return out

    def call(self, x: torch.Tensor, act: str = "none", res: torch.Tensor | None = None) -> torch.Tensor:
        """``gemm`` on 2-D ``x`` in the row chunks that keep every row's bits (one call with ours)."""
        if self.own:
            return self.gemm(x, act, res)
        if res is None:
            return by_rows(lambda a: self.gemm(a, act), self.rows, x, pad=self.pad_single)
        return by_rows(lambda a, r: self.gemm(a, act, r), self.rows, x, res, pad=self.pad_single)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.call(x.reshape(-1, self.in_features)).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    @property
    def kernel(self) -> str:
        return "amx" if self.amx else self.isa if self.own else "onednn"


def own_gemm(dtype: torch.dtype) -> tuple[native.Native | None, object | None]:
    """Our GEMM for ``dtype`` on this CPU and its library: bf16 on AMX, else on AVX512-BF16; fp32
    on AVX-512, else on AVX2+FMA; (None, None) where none runs (oneDNN then)."""
    libs = {torch.bfloat16: (native.AMX, native.BF16), torch.float32: (native.F32, native.F32_AVX2)}
    for kernel in libs.get(dtype, ()):
        lib = kernel.load()
        if lib is not None:
            return kernel, lib
    return None, None


def onednn_packs(dtype: torch.dtype) -> str | None:
    """None if oneDNN packs ``dtype`` weights on this CPU, else why not (for the startup log).

    oneDNN's bf16 linear needs AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; without them it refuses to
    pack, and torch's own bf16 linear then runs (converting to fp32 around each multiply).
    """
    if not onednn_available():
        return "oneDNN missing"
    if dtype not in PACKABLE_DTYPES:
        return f"oneDNN does not pack {str(dtype).removeprefix('torch.')}"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
    except RuntimeError as exc:
        return f"oneDNN cannot pack it on this CPU: {str(exc).split(':')[-1].strip()}"
    return None


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` (on CPU, fp32/bf16) by a ``PackedLinear``.

    Returns:
        How many modules were replaced (0 when oneDNN is missing, cannot pack the model's dtype on
        this CPU, or the model is not on CPU).
    """
    dtype = next(model.parameters()).dtype
    why = onednn_packs(dtype)
    if why is not None:
        log.info("linears: torch %s (%s)", str(dtype).removeprefix("torch."), why)
        return 0
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu" and module.weight.dtype in PACKABLE_DTYPES
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(module))
    if targets:
        log.info("linears: %s packed %s (%d layers)", model.get_submodule(targets[0][0]).kernel,
                 str(dtype).removeprefix("torch."), len(targets))
    return len(targets)


def by_rows(fn: Callable[..., torch.Tensor], rows: int, x: torch.Tensor, *more: torch.Tensor,
            pad: bool = False) -> torch.Tensor:
    """``fn(x, *more)`` over chunks of at most ``rows`` rows (all at once when ``rows`` is 0 or
    enough), a lone row padded to two with ``pad``: every row then goes through a GEMM of a row
    count the library computes invariantly."""
    if not x.is_contiguous():
        x = x.contiguous()
    if pad and x.shape[0] == 1:
        return fn(*(torch.cat([t, torch.zeros_like(t)]) for t in (x, *more)))[:1]
    if not rows or x.shape[0] <= rows:
        return fn(x, *more)
    return torch.cat([by_rows(fn, 0, x[i:i + rows], *(t[i:i + rows] for t in more), pad=pad)
                      for i in range(0, x.shape[0], rows)])


# Row counts the batch-invariance probe tries: 1 row alone against these many rows together
# (past a prefill chunk's 64 and a step's budget, where a GEMM library switches blockings).
PROBE_ROWS = (2, 5, 16, 33, 64, 100, 256)
# Row-chunk sizes ``fit_row_chunks`` tries, largest first. The largest is also the cap where no
# chunk is needed: oneDNN compiles and caches primitives per row count, so a bounded set of row
# counts bounds its memory (a GEMM's rate per row is flat from 64 rows up on CPU).
CHUNK_ROWS = (64, 48, 32, 16, 8)


def _fused_calls(mod: "PackedLinear") -> list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The library calls the engine makes on ``mod``: plain, fused SiLU, fused residual add."""
    return [lambda a, _r: mod.gemm(a), lambda a, _r: mod.gemm(a, "swish"), lambda a, r: mod.gemm(a, res=r)]


def _chunk(calls, x: torch.Tensor, r: torch.Tensor, alone: list[torch.Tensor]) -> int:
    """The largest of ``CHUNK_ROWS`` under which every row count gives each row its ``alone`` bits."""
    def fine(m: int) -> bool:
        return all(torch.equal(f(x[:m], r[:m]), a[:m]) for f, a in zip(calls, alone))

    bad = [m for m in sorted({*PROBE_ROWS, *CHUNK_ROWS}) if not fine(m)]
    if not bad:
        return CHUNK_ROWS[0]
    return next((c for c in CHUNK_ROWS if all(m > c for m in bad) and all(fine(m) for m in range(2, c + 1))), 1)


@torch.inference_mode()
def fit_row_chunks(model: torch.nn.Module) -> dict[tuple[int, int], tuple[int, bool]]:
    """Give each packed linear the largest chunk of ``CHUNK_ROWS`` whose every row count up to it
    gives each row the bits it gets alone (the largest, when every ``PROBE_ROWS`` count does).

    Returns:
        The chunk per (in, out) shape, and whether a lone row is padded to two.
    """
    mods: dict[tuple[int, int], list[PackedLinear]] = {}
    for mod in model.modules():
        if isinstance(mod, PackedLinear) and not mod.own:  # ours: one fixed sum order, no chunks
            mods.setdefault((mod.in_features, mod.out_features), []).append(mod)
    g = torch.Generator().manual_seed(1)
    top = max(PROBE_ROWS)
    chosen: dict[tuple[int, int], tuple[int, bool]] = {}
    for shape, group in mods.items():
        mod = group[0]
        x = torch.randn(top, shape[0], generator=g).to(mod.dtype)
        r = torch.randn(top, shape[1], generator=g).to(mod.dtype)
        calls = _fused_calls(mod)
        single = [torch.cat([f(x[j:j + 1], r[j:j + 1]) for j in range(top)]) for f in calls]
        paired = [torch.cat([by_rows(f, 0, x[j:j + 1], r[j:j + 1], pad=True) for j in range(top)])
                  for f in calls]
        rows, pad = _chunk(calls, x, r, single), False
        if rows < CHUNK_ROWS[0] and (rows_paired := _chunk(calls, x, r, paired)) > rows:
            rows, pad = rows_paired, True
        chosen[shape] = (rows, pad)
        for m in group:
            m.rows, m.pad_single = rows, pad
    if chosen:
        log.info("linears: GEMM row chunks %s", {f"{i}x{o}": f"{c}{' (lone rows padded)' if p else ''}"
                                                 for (i, o), (c, p) in chosen.items()})
    return chosen


@torch.inference_mode()
def batch_variance(model: torch.nn.Module, rows: tuple[int, ...] = PROBE_ROWS) -> list[int]:
    """Row counts at which a linear of ``model`` gives some row other bits than that row alone.

    A GEMM library may pick another kernel, blocking or split of the sum by row count; then a
    sequence's logits would depend on what else is in its batch. Each distinct linear shape is
    tried as the engine calls it (for packed ones also with the fused SiLU and residual add).

    Returns:
        The failing row counts, sorted; empty = batch-invariant.
    """
    shapes: dict[tuple, torch.nn.Module] = {}
    for mod in model.modules():
        if isinstance(mod, (PackedLinear, torch.nn.Linear)):
            shapes.setdefault((type(mod), mod.in_features, mod.out_features), mod)
    g = torch.Generator().manual_seed(0)
    top, bad = max(rows), set()
    for mod in shapes.values():
        dev, dtype = (mod.weight.device, mod.weight.dtype) if hasattr(mod, "weight") else ("cpu", mod.dtype)
        x = torch.randn(top, mod.in_features, generator=g).to(dev, dtype)
        r = torch.randn(top, mod.out_features, generator=g).to(dev, dtype)
        calls = [lambda a, _r: mod(a)]
        if isinstance(mod, PackedLinear):  # as the engine calls them (in the module's row chunks)
            calls += [lambda a, _r: mod.call(a, "swish"), lambda a, r_: mod.call(a, res=r_)]
        for f in calls:
            alone = torch.cat([f(x[j:j + 1], r[j:j + 1]) for j in range(top)])
            bad.update(m for m in rows if not torch.equal(f(x[:m], r[:m]), alone[:m]))
    return sorted(bad)


def paged_attention_native(q: torch.Tensor, layer: int, batch, scaling: float, window: int | None,
                           softcap: float | None) -> torch.Tensor | None:
    """``model.attention.paged_attention`` through a native kernel: ``csrc/decode_attention.c`` where
    the pool's keys are laid out for it (``keys_by_dim``), else AMX tiles for bf16 where the CPU has
    them and the shapes fit; None where neither can (no compiler, fp16, too many query heads per KV
    head): the torch path runs instead. Which kernel runs depends only on the model, the pool and
    the CPU, never on the batch."""
    pool = batch.pool
    t, h, d = q.shape
    if pool.keys_by_dim:
        lib = native.ATTENTION.load()
        fn = None if lib is None else {torch.float32: lib.kvb_paged_attention,
                                       torch.bfloat16: lib.kvb_paged_attention_bf16}.get(pool.dtype)
        qc = q.to(torch.float32).contiguous()  # scores and sums in fp32 either way
    else:
        amx = native.AMX.load() if pool.dtype == torch.bfloat16 and q.dtype == torch.bfloat16 else None
        fits = amx is not None and amx_attention_fits(h, pool.kv_heads, d, pool.block_size)
        fn, qc = (amx.kvb_amx_attention, q.contiguous()) if fits else (None, q)
    if fn is None:
        return None
    seq, pos, tables = batch.native_meta()
    keys, values = pool.keys[layer], pool.values[layer]
    out = torch.empty(t, h, d, dtype=torch.float32)
    rc = fn(qc.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), seq.data_ptr(), pos.data_ptr(),
            tables.data_ptr(), tables.shape[1], t, h, pool.kv_heads, d, pool.block_size, window or 0,
            float(softcap or 0.0), scaling, torch.get_num_threads())
    if rc != 0:
        return None
    return out.to(q.dtype)


def amx_attention_fits(heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
    """The shapes ``kvb_amx_attention`` takes (one tile row per query head of a KV head, head
    dimension and blocks in steps of 32)."""
    return heads % kv_heads == 0 and heads // kv_heads <= 16 and head_dim % 32 == 0 and head_dim <= 256 \
        and block_size % 32 == 0


def keys_by_dim(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Whether a pool of this model's K/V, read by the native attention, lays its keys out by
    dimension (``model.kv.KVPool``): where ``csrc/decode_attention.c`` reads it (blocks of a multiple
    of 16 positions), not the AMX kernel (bf16 on AMX, which reads keys by position)."""
    if dtype == torch.bfloat16 and native.AMX.load() is not None \
            and amx_attention_fits(heads, kv_heads, head_dim, block_size):
        return False
    return dtype in (torch.float32, torch.bfloat16) and block_size % 16 == 0 \
        and native_attention_fits(heads, kv_heads, head_dim) and native.ATTENTION.load() is not None


def native_attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """The shapes ``csrc/decode_attention.c`` takes (up to 16 query heads a KV head, head
    dimension a multiple of 8 up to 256)."""
    return heads % kv_heads == 0 and heads // kv_heads <= 16 and head_dim % 8 == 0 and 0 < head_dim <= 256
