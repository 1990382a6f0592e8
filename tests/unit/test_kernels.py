"""The paged attention (model/attention.py: the torch path and the native kernel) and the pool it
reads (model/kv.py): same numbers as a float64 reference over dense K/V; the oneDNN linears."""

import os
import shutil

import pytest
import torch

from model import kernels, native
from model.native import AMX, ATTENTION, BF16, F32, F32_AVX2
from model.precision import cpu_flags
from model.attention import paged_attention
from model.kv import KVPool, StepBatch


def native_expected() -> bool:
    """In CI (and wherever a C compiler is on PATH) the native kernel must build and load."""
    return os.environ.get("CI") == "true" or bool(shutil.which("cc") or shutil.which("gcc"))


def make_step(dtype, kv_heads, head_dim, q_lens, ctx_lens, block=16, seed=0, native=False, heads=None):
    """A pool (unused slots NaN) holding random K/V for sequences of ``ctx_lens`` positions in
    shuffled blocks, its keys laid out as the engine would for ``native`` attention; returns
    (batch, dense per-sequence K/V [kv_heads, n, d])."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-c // block) for c in ctx_lens)
    by_dim = native and kernels.keys_by_dim(dtype, heads or kv_heads, kv_heads, head_dim, block)
    pool = KVPool(1, kv_heads, head_dim, dtype, torch.device("cpu"), need + 3, block, keys_by_dim=by_dim)
    pool.keys[0].fill_(float("nan"))
    pool.values[0].fill_(float("nan"))
    ids = torch.randperm(need + 3, generator=g).tolist()
    tables, dense = [], []
    for c in ctx_lens:
        table = [ids.pop() for _ in range(-(-c // block))]
        k = torch.randn(c, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(c, kv_heads, head_dim, generator=g).to(dtype)
        pool.write(0, pool.slots(table, 0, c), k, v)
        tables.append(table)
        dense.append((k.transpose(0, 1), v.transpose(0, 1)))
    return StepBatch(pool, tables, q_lens, ctx_lens, native), dense


def reference(q, dense, q_lens, ctx_lens, scaling, window=None, softcap=None):
    """Float64, per query token over its own sequence's positions (causal, window, soft cap)."""
    out = []
    at = 0
    for (k, v), ql, c in zip(dense, q_lens, ctx_lens):
        g = q.shape[1] // k.shape[0]
        kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
        for i in range(ql):
            p = c - ql + i
            lo = max(0, p - window + 1) if window else 0
            s = torch.einsum("hd,hnd->hn", q[at + i].double(), kk[:, lo : p + 1]) * scaling
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            out.append(torch.einsum("hn,hnd->hd", s.softmax(-1), vv[:, lo : p + 1]))
        at += ql
    return torch.stack(out)


CASES = [  # (heads, kv_heads, head_dim, q_lens, ctx_lens)
    (12, 12, 64, [1, 1, 1], [9, 1, 17]),  # decode rows
    (4, 2, 48, [1, 5, 3], [7, 5, 12]),  # a decode token, a first chunk, a chunk on a prefix
    (8, 1, 128, [6, 1], [6, 30]),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,q_lens,ctx_lens", CASES)
@pytest.mark.parametrize("native", [False, True])
def test_paged_attention_matches_reference(heads, kv_heads, head_dim, q_lens, ctx_lens, native):
    if native and native_expected():
        assert ATTENTION.load() is not None, "a C compiler is here, the native kernel must load"
    batch, dense = make_step(torch.float32, kv_heads, head_dim, q_lens, ctx_lens, native=native, heads=heads)
    q = torch.randn(sum(q_lens), heads, head_dim)
    got = paged_attention(q, 0, batch, head_dim ** -0.5)
    want = reference(q, dense, q_lens, ctx_lens, head_dim ** -0.5)
    assert got.shape == q.shape and torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_sliding_window_and_soft_cap(native):
    batch, dense = make_step(torch.float32, 2, 32, [1, 4], [20, 11], native=native, seed=2, heads=4)
    q = torch.randn(5, 4, 32) * 4
    got = paged_attention(q, 0, batch, 32 ** -0.5, window=6, softcap=5.0)
    want = reference(q, dense, [1, 4], [20, 11], 32 ** -0.5, window=6, softcap=5.0)
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_pool_matches_reference(native):
    if native and ATTENTION.load() is None:
        pytest.skip("no C compiler here")
    batch, dense = make_step(torch.bfloat16, 2, 64, [1, 3], [13, 9], native=native, seed=3, heads=8)
    q = torch.randn(4, 8, 64).to(torch.bfloat16)
    got = paged_attention(q, 0, batch, 64 ** -0.5)
    want = reference(q, dense, [1, 3], [13, 9], 64 ** -0.5)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), want, atol=2e-2, rtol=1e-2)


def test_native_and_torch_paths_agree_and_a_token_does_not_depend_on_its_batch():
    if ATTENTION.load() is None:
        pytest.skip("no C compiler here")
    batch, _ = make_step(torch.float32, 2, 48, [1, 6, 1], [40, 6, 9], native=True, seed=4, heads=4)
    q = torch.randn(8, 4, 48)
    native = paged_attention(q, 0, batch, 0.1)
    batch.native = False
    assert torch.allclose(native, paged_attention(q, 0, batch, 0.1), atol=1e-5)
    alone = StepBatch(batch.pool, batch.tables[:1], [1], [40], True)
    assert torch.equal(paged_attention(q[:1], 0, alone, 0.1), native[:1])  # bit for bit


TILING_CASES = [  # (heads, kv_heads, head_dim): no grouping, GQA 4 and 3 (a head size off the
    # unrolled ones), 16 heads on one KV head (tiles of two tokens)
    (12, 12, 64), (8, 2, 64), (6, 2, 48), (16, 1, 128), (4, 2, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", TILING_CASES)
@pytest.mark.parametrize("window,softcap", [(None, None), (23, 5.0)])
@pytest.mark.parametrize("block", [16, 64])
def test_native_query_tiles_give_each_token_the_bits_it_gets_alone(dtype, heads, kv_heads, head_dim,
                                                                    window, softcap, block):
    """A prefill chunk is scored in tiles of queries; each token's result must not depend on the
    tiling: a 70-token chunk on an 80-token prefix (crossing block boundaries) equals each token
    run alone as a decode token, the chunk cut at other points, and the chunk in a batch behind
    other sequences, bit for bit. bf16 in blocks of 64 with a head size of 32k runs the AMX
    kernel where the CPU has AMX (blocks of 16: decode_attention.c)."""
    if ATTENTION.load() is None:
        pytest.skip("no C compiler here")
    if dtype == torch.bfloat16 and block == 64 and amx_expected() \
            and kernels.amx_attention_fits(heads, kv_heads, head_dim, block):
        assert AMX.load() is not None, "AMX and a compiler are here: the AMX kernel must load"
    ctx, n = 150, 70
    batch, dense = make_step(dtype, kv_heads, head_dim, [3, n, 1], [70, ctx, 9], block=block, seed=5, native=True,
                             heads=heads)
    pool, table = batch.pool, batch.tables[1]
    g = torch.Generator().manual_seed(6)
    q = (torch.randn(n, heads, head_dim, generator=g) * 3).to(dtype)

    def run(tables, q_lens, ctx_lens, qq):
        return paged_attention(qq, 0, StepBatch(pool, tables, q_lens, ctx_lens, True), head_dim ** -0.5,
                               window=window, softcap=softcap)

    whole = run([table], [n], [ctx], q)
    alone = torch.cat([run([table], [1], [ctx - n + i + 1], q[i : i + 1]) for i in range(n)])
    assert torch.equal(whole, alone)
    for cut in (1, 5, 17, 36):  # the same chunk in two pieces, as two steps' budgets would cut it
        parts = run([table, table], [cut, n - cut], [ctx - n + cut, ctx], q)
        assert torch.equal(parts, whole), cut
    q_other = torch.randn(4, heads, head_dim, generator=g).to(dtype)
    mixed = run(batch.tables, [3, n, 1], [70, ctx, 9], torch.cat([q_other[:3], q, q_other[3:]]))
    assert torch.equal(mixed[3 : 3 + n], whole)
    want = reference(q, dense[1:2], [n], [ctx], head_dim ** -0.5, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(whole.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_in_16_lane_registers_gives_the_8_lane_codes_bits(dtype):
    """Where the CPU has AVX-512 the attention kernel runs its arithmetic in 16-lane registers;
    the 8-lane code (AVX2 and older CPUs) must give the same bits: replicas on either share KV."""
    lib = ATTENTION.load()
    if lib is None or not lib.kvb_attention_wide(1):
        pytest.skip("no AVX-512 (or no C compiler) here: only the 8-lane code runs")
    try:
        for heads, kv_heads, head_dim in ((12, 12, 64), (8, 2, 40), (16, 1, 128)):
            batch, _ = make_step(dtype, kv_heads, head_dim, [3, 70, 1], [70, 150, 9], block=16, seed=7, native=True,
                                 heads=heads)
            q = (torch.randn(74, heads, head_dim) * 3).to(dtype)
            wide = paged_attention(q, 0, batch, head_dim ** -0.5, window=40, softcap=30.0)
            assert lib.kvb_attention_wide(0) == 0
            narrow = paged_attention(q, 0, batch, head_dim ** -0.5, window=40, softcap=30.0)
            lib.kvb_attention_wide(1)
            assert torch.equal(wide, narrow), (heads, kv_heads, head_dim)
    finally:
        lib.kvb_attention_wide(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_token_gets_the_same_bits_whether_one_task_covers_its_kv_heads_or_one_each(dtype):
    """With decode tokens enough for every thread, one task covers all kv heads of a decode token
    (it reads whole pool rows in order); with few, each head is a task. The bits must not change."""
    if ATTENTION.load() is None:
        pytest.skip("no C compiler here")
    threads = torch.get_num_threads()
    for heads, kv_heads, head_dim in ((12, 12, 64), (8, 2, 40)):
        batch, _ = make_step(dtype, kv_heads, head_dim, [1, 1, 1, 1, 5], [90, 7, 150, 64, 70], block=16, seed=8,
                             native=True, heads=heads)
        q = (torch.randn(9, heads, head_dim) * 3).to(dtype)
        try:
            torch.set_num_threads(1)  # 4 decode tokens >= 2 a thread: one task a token
            whole = paged_attention(q, 0, batch, head_dim ** -0.5)
            torch.set_num_threads(4)  # fewer than 2 a thread: one task a token and head
            each = paged_attention(q, 0, batch, head_dim ** -0.5)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(whole, each), (heads, kv_heads, head_dim)


@pytest.mark.parametrize("keys_by_dim", [False, True])
@pytest.mark.parametrize("native_copy", [True, False])
def test_pool_load_extract_and_copy_block_round_trip(native_copy, keys_by_dim):
    pool = KVPool(2, 2, 3, torch.float32, torch.device("cpu"), 6, 4, native_copy=native_copy, keys_by_dim=keys_by_dim)
    assert (pool._copy is not None) == (native_copy and native.COPY.load() is not None)
    table = [4, 1, 3]
    chunks = [([torch.randn(2, n, 3) for _ in range(2)], [torch.randn(2, n, 3) for _ in range(2)]) for n in (4, 5)]
    assert pool.load(table, 2, chunks) == 9  # positions 0, 1 are the pool's already
    k, v = pool.extract(table, 2, 9)
    assert torch.equal(k[1], torch.cat([chunks[0][0][1][:, 2:], chunks[1][0][1]], dim=1))
    assert torch.equal(v[0], torch.cat([chunks[0][1][0][:, 2:], chunks[1][1][0]], dim=1))
    rk, rv = pool.rows(1, pool.slots(table, 2, 9))  # what the torch attention path reads
    assert torch.equal(rk, k[1].transpose(0, 1)) and torch.equal(rv, v[1].transpose(0, 1))
    pool.copy_block(1, 5)
    assert torch.equal(pool.extract([4, 5], 4, 8)[0][0], pool.extract(table, 4, 8)[0][0])
    k0, _ = pool.extract(table, 3, 3)  # nothing to keep
    assert k0[0].shape == (2, 0, 3)


@pytest.mark.skipif(native.COPY.load() is None, reason="no C compiler")
@pytest.mark.parametrize("keys_by_dim", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_copies_give_the_torch_paths_bytes(dtype, keys_by_dim):
    pools = [KVPool(3, 4, 16, dtype, torch.device("cpu"), 20, 8, native_copy=c, keys_by_dim=keys_by_dim)
             for c in (True, False)]
    for x, y in zip(pools[0].keys + pools[0].values, pools[1].keys + pools[1].values):
        x.copy_(torch.randn(x.shape))
        y.copy_(x)
    table = [7, 2, 19, 0]
    for start, end in [(0, 32), (3, 29), (8, 9), (31, 32)]:
        (ka, va), (kb, vb) = (p.extract(table, start, end) for p in pools)
        assert all(torch.equal(a, b) for a, b in zip(ka + va, kb + vb)), (start, end)
    slots = pools[0].slots(table, 5, 27)
    k, v = torch.randn(22, 4, 16).to(dtype), torch.randn(22, 4, 16).to(dtype)
    for p in pools:
        p.write(2, slots, k, v)
    assert all(torch.equal(a, b) for a, b in zip(pools[0].keys + pools[0].values, pools[1].keys + pools[1].values))


@pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(bias):
    lin = torch.nn.Linear(96, 160, bias=bias)
    packed = kernels.PackedLinear(lin)
    for x in (torch.randn(1, 96), torch.randn(3, 7, 96), torch.randn(7, 3, 96).transpose(0, 1)):
        with torch.inference_mode():
            assert torch.allclose(packed(x), lin(x), atol=1e-5)


@pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")
def test_pack_linears_replaces_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    x = torch.randn(2, 8)
    with torch.inference_mode():
        want = model(x)
        assert kernels.pack_linears(model) == 2
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert torch.allclose(model(x), want, atol=1e-5)


class _RowByRow(torch.nn.Linear):
    """A linear computed one row at a time (batch-invariant by construction); ``jump`` adds a shift
    once more than 4 rows come together, as a GEMM that switched kernels by row count would."""

    jump = 0.0

    def forward(self, x):
        y = torch.stack([self.weight @ row for row in x]) + self.bias
        return y + (self.jump if x.shape[0] > 4 else 0.0)


class _Jumps(_RowByRow):
    jump = 1e-3


def test_batch_variance_finds_a_linear_that_depends_on_the_row_count():
    torch.manual_seed(0)
    assert kernels.batch_variance(torch.nn.Sequential(_RowByRow(24, 40), _RowByRow(40, 24))) == []
    assert kernels.batch_variance(torch.nn.Sequential(_RowByRow(24, 40), _Jumps(40, 24))) == [5, 16, 33, 64, 100, 256]
    if kernels.onednn_packs(torch.float32) is None:  # the packed linears, fused SiLU and add included
        packed = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24))
        kernels.pack_linears(packed)
        assert kernels.batch_variance(packed) == []


def test_by_rows_calls_the_gemm_on_chunks_of_at_most_rows_rows():
    seen = []

    def rowwise(x, r):
        seen.append(x.shape[0])
        return x * 2 + r

    x, r = torch.randn(70, 3), torch.randn(70, 3)
    assert torch.equal(kernels.by_rows(rowwise, 32, x, r), x * 2 + r) and seen == [32, 32, 6]
    seen.clear()
    assert torch.equal(kernels.by_rows(rowwise, 0, x, r), x * 2 + r) and seen == [70]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_are_batch_invariant_once_their_row_chunks_are_fitted(dtype):
    """oneDNN's bf16 GEMM on AMX sums a row in another order from 59 rows on (a 512-wide input),
    and its fp32 GEMV (one row, a 2048-wide input on AVX-512) in another order than its GEMM: the
    fitted row chunk and lone-row padding keep every row's bits those it gets alone, fused calls
    included. (The modules are probed one by one, never chained.)"""
    if kernels.onednn_packs(dtype) is not None:
        pytest.skip(f"oneDNN does not pack {dtype} here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(192, 512), torch.nn.Linear(512, 192),
                                torch.nn.Linear(2048, 768)).to(dtype)
    kernels.pack_linears(model)
    chunks = kernels.fit_row_chunks(model)
    own = all(m.own for m in model)  # our GEMMs need no chunks (tested below)
    assert set(chunks) == (set() if own else {(192, 512), (512, 192), (2048, 768)})
    assert all(rows > 1 for rows, _ in chunks.values())  # never one GEMV per row
    assert kernels.batch_variance(model) == []


def amx_expected() -> bool:
    return "amx_bf16" in cpu_flags() and native_expected()


def bf16_expected() -> bool:
    """Our AVX512-BF16 GEMM (gemm_bf16.c) runs bf16 linears where the CPU has AVX512-BF16 but no AMX."""
    return "avx512_bf16" in cpu_flags() and "amx_bf16" not in cpu_flags() and native_expected()


def f32_expected() -> str | None:
    """Which of our fp32 GEMMs this CPU runs: "avx512", "avx2" (with FMA), or None."""
    flags = cpu_flags(names=("avx512f", "avx2", "fma"))
    if not native_expected():
        return None
    return "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,n,bias", [(192, 512, False), (512, 192, True), (100, 70, True), (3072, 40, False)])
def test_own_linear_matches_fp32_and_gives_each_row_its_bits_at_every_row_count(dtype, k, n, bias):
    """Our GEMMs (bf16 on AMX or AVX512-BF16, fp32 on AVX-512 or AVX2): close to the exact product
    (plain, fused SiLU, fused residual add, times; a K that is not a multiple of 32 and an N not of
    16 or 64 included), and each row the same bits at every row count 1..300 and any thread count,
    where oneDNN changes a row's bits from 33-37 rows on."""
    isa = f32_expected()
    if dtype == torch.bfloat16:
        expected, lib, name = (True, AMX, "amx") if amx_expected() else (bf16_expected(), BF16, "avx512bf16")
    else:
        expected, lib, name = isa is not None, F32 if isa == "avx512" else F32_AVX2, isa
    if not expected:
        pytest.skip(f"this CPU has no {'AMX or AVX512-BF16' if dtype == torch.bfloat16 else 'AVX-512 or AVX2'} "
                    "(or no C compiler)")
    assert lib.load() is not None, "the CPU and a compiler are here: the kernel must load"
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    mod = kernels.PackedLinear(lin)
    assert mod.own and mod.kernel == name
    x, r = torch.randn(300, k).to(dtype), torch.randn(300, n).to(dtype)
    w, b = lin.weight.double(), (lin.bias.double() if bias else torch.zeros(n, dtype=torch.float64))
    exact = x.double() @ w.T + b
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for got, want in ((mod.call(x), exact), (mod.call(x, "swish"), torch.nn.functional.silu(exact)),
                          (mod.call(x, res=r), exact + r.double()), (mod.call(x, "times", r), exact * r.double())):
            assert got.dtype == dtype
            assert torch.allclose(got.double(), want, atol=tol * float(want.abs().max()), rtol=tol)
        strided = torch.randn(k, 7).to(dtype).T  # rows with a stride, not contiguous
        assert torch.equal(mod.call(strided), mod.call(strided.contiguous()))
        for act, res in (("none", None), ("swish", None), ("none", r), ("times", r)):
            alone = torch.cat([mod.call(x[i:i + 1], act, None if res is None else res[i:i + 1]) for i in range(300)])
            for m in range(2, 301):
                assert torch.equal(mod.call(x[:m], act, None if res is None else res[:m]), alone[:m]), m
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = mod.call(x)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, mod.call(x))


@pytest.mark.parametrize("kernel", ["amx", "bf16", "f32"])
def test_fused_rms_norm_and_rope_match_torch_and_each_row_is_its_own(kernel):
    """The lean step's fused RMSNorm and RoPE (bf16: csrc/rowops.h, in amx.c with AMX and in
    gemm_bf16.c with AVX512-BF16; fp32: in gemm_f32.c): close to the torch ops they replace, and a
    row's (a token's) bits do not depend on how many come together."""
    if kernel == "amx" and not amx_expected():
        pytest.skip("this CPU has no AMX-BF16 (or no C compiler)")
    if kernel == "bf16" and not bf16_expected():
        pytest.skip("this CPU has no AVX512-BF16 (or no C compiler)")
    if kernel == "f32" and f32_expected() is None:
        pytest.skip("this CPU has no AVX-512 or AVX2 (or no C compiler)")
    lib = {"amx": AMX, "bf16": BF16, "f32": F32 if f32_expected() == "avx512" else F32_AVX2}[kernel].load()
    assert lib is not None, f"{kernel} must load where the CPU has it and a compiler is here"
    dtype, tol = (torch.float32, 1e-5) if kernel == "f32" else (torch.bfloat16, 0.01)
    torch.manual_seed(0)
    n, eps = 200, 1e-6  # a width that is not a multiple of 16
    x = (torch.randn(70, n) * 3).to(dtype)
    w = torch.randn(n).to(dtype)

    def norm(rows):
        out = torch.empty_like(rows)
        lib.kvb_rms_norm(rows.data_ptr(), rows.shape[0], n, w.data_ptr(), eps, out.data_ptr(), 2)
        return out

    got = norm(x)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    want = w.float() * h.to(dtype).float()
    assert torch.allclose(got.float(), want, atol=2 * tol * float(want.abs().max()), rtol=tol)
    assert torch.equal(torch.cat([norm(x[i:i + 1].clone()) for i in range(70)]), got)

    t, heads, d = 9, 3, 96
    q = torch.randn(t, heads, d).to(dtype)
    ang = torch.randn(t, d // 2)
    cos, sin = (torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype))

    def rope(xx, c, s_):
        xx = xx.clone()
        lib.kvb_rope(xx.data_ptr(), xx.shape[0], heads, d, c.data_ptr(), s_.data_ptr())
        return xx

    got = rope(q, cos, sin)
    qf, cf, sf = q.float(), cos.float()[:, None], sin.float()[:, None]
    want = qf * cf + torch.cat([-qf[..., d // 2:], qf[..., : d // 2]], -1) * sf
    assert torch.allclose(got.float(), want, atol=3 * tol, rtol=tol)
    assert torch.equal(torch.cat([rope(q[i:i + 1], cos[i:i + 1], sin[i:i + 1]) for i in range(t)]), got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_layer_stack_in_one_native_call_gives_the_per_op_steps_bits(dtype):
    """bf16 on AMX (``kvb_amx_layers``) or AVX512-BF16 (``kvb_bf16_layers``) and fp32 on our
    AVX-512/AVX2 GEMM (``kvb_f32_layers``) run every layer in one call; it must be the per-op lean
    step's arithmetic exactly (same kernels, same order): logits bit for bit over a step of two prefill chunks, a mixed step and a decode
    step, on pools whose unused slots are NaN."""
    if dtype == torch.bfloat16 and not (amx_expected() or bf16_expected()):
        pytest.skip("this CPU has no AMX-BF16 or AVX512-BF16 (or no C compiler)")
    if dtype == torch.float32 and f32_expected() is None:
        pytest.skip("this CPU has no AVX-512 or AVX2 (or no C compiler)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import fastpath

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    kernels.pack_linears(model)
    step = fastpath.LlamaStep(model)
    assert step.stack is not None
    seqs = [torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(5)).tolist(),
            torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(6)).tolist()]

    def run(stack) -> list[torch.Tensor]:
        step.stack = stack
        by_dim = kernels.keys_by_dim(dtype, 8, 4, 32, 64)
        assert by_dim != step.amx  # the layout each stack's attention reads
        pool = KVPool(3, 4, 32, dtype, torch.device("cpu"), 16, 64, keys_by_dim=by_dim)
        for t in pool.keys + pool.values:
            t.fill_(float("nan"))
        out = []
        for chunks in ([(0, 100), (0, 40)], [(100, 101), (40, 89)], [(101, 102), (89, 90)]):
            ids = torch.tensor([t for s, (a, b) in zip(seqs, chunks) for t in s[a:b]])
            batch = StepBatch(pool, [[0, 1, 2], [3, 4, 5]], [b - a for a, b in chunks], [b for _, b in chunks], True)
            out.append(step(ids, batch.positions, batch, torch.arange(ids.shape[0])))
        return out

    stack = step.stack
    for fused, per_op in zip(run(stack), run(None)):
        assert not fused.isnan().any()
        assert torch.equal(fused, per_op)
