"""The CPU kernels (model/kernels.py) and the slab they read: same numbers as the torch reference."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.kv import BatchKV


class _Module:  # attention functions only read attributes they need from the module
    pass


def reference_attention(q, k, v, lo):
    """Float64 softmax(q k^T / sqrt(d)) v per row over columns [lo[b], S), heads grouped as HF repeats them."""
    b, h, _, d = q.shape
    g = h // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / d ** 0.5  # [b, h, 1, S]
    cols = torch.arange(k.shape[2])
    scores = scores.masked_fill((cols[None, :] < lo[:, None])[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [b, 1, h, d]


def slab_views(rows, kv_heads, head_dim, cap, start, end, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows + 2, kv_heads, cap, head_dim, generator=g)
    values = torch.randn(rows + 2, kv_heads, cap, head_dim, generator=g)
    return keys[:rows, :, start:end], values[:rows, :, start:end]  # strided, like the engine's


def native_expected() -> bool:
    """In CI (and wherever a C compiler is on PATH) the native kernel must build and load."""
    return os.environ.get("CI") == "true" or bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.parametrize("rows,heads,kv_heads,head_dim", [(16, 12, 12, 64), (5, 4, 2, 48), (3, 8, 1, 128), (1, 4, 4, 64)])
def test_decode_attention_matches_reference(rows, heads, kv_heads, head_dim):
    cap, start, end = 96, 20, 90
    k, v = slab_views(rows, kv_heads, head_dim, cap, start, end)
    width = end - start
    lo = torch.randint(0, width, (rows,), generator=torch.Generator().manual_seed(1))
    lo[0], lo[-1] = 0, width - 1  # a row over the whole window, a row of one column
    q = torch.randn(rows, 1, heads, head_dim).transpose(1, 2)  # HF's [b, h, 1, d] view
    bias = torch.zeros(rows, width).masked_fill_(torch.arange(width)[None, :] < lo[:, None], float("-inf"))
    ref = reference_attention(q, k, v, lo)

    fallback, _ = kernels.attention(_Module(), q, k, v, bias[:, None, None, :], scaling=head_dim ** -0.5)
    assert fallback.shape == (rows, 1, heads, head_dim)
    assert torch.allclose(fallback.double(), ref, atol=1e-5)

    if native_expected():
        assert kernels.load_native() is not None, "a C compiler is here, the native kernel must load"
    native, _ = kernels.attention(_Module(), q, k, v, bias[:, None, None, :], scaling=head_dim ** -0.5, kvbento_lo=lo)
    assert native.shape == (rows, 1, heads, head_dim)
    assert torch.allclose(native.double(), ref, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (8, 2, 128), (4, 2, 48)])
def test_bf16_decode_attention_matches_reference(heads, kv_heads, head_dim):
    """bf16 K/V (a bf16 model's slab): the native kernel widens them to fp32 and must agree with
    the float64 reference over the same bf16 values, to bf16's output rounding."""
    if kernels.load_native() is None:
        pytest.skip("no C compiler here")
    rows, cap, start, end = 6, 96, 20, 90
    k, v = slab_views(rows, kv_heads, head_dim, cap, start, end, seed=3)
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    width = end - start
    lo = torch.tensor([0, 5, 30, 69, 1, 50])
    q = torch.randn(rows, 1, heads, head_dim).transpose(1, 2).to(torch.bfloat16)
    ref = reference_attention(q, k, v, lo)
    native = kernels._native_decode(q, k, v, lo, head_dim ** -0.5)
    assert native is not None and native.dtype == torch.bfloat16 and native.shape == (rows, 1, heads, head_dim)
    assert torch.allclose(native.double(), ref, atol=2e-2, rtol=1e-2)
    bias = torch.zeros(rows, width).masked_fill_(torch.arange(width)[None, :] < lo[:, None], float("-inf"))
    fallback, _ = kernels.attention(_Module(), q, k, v, bias[:, None, None, :].to(torch.bfloat16),
                                    scaling=head_dim ** -0.5)
    assert torch.allclose(native.double(), fallback.double(), atol=3e-2, rtol=2e-2)


def test_native_kernel_reads_only_the_live_span():
    """Columns left of a row's first live one may hold anything (a reused slab): they are never read."""
    if kernels.load_native() is None:
        pytest.skip("no C compiler here")
    k, v = slab_views(2, 2, 16, 40, 0, 30)
    lo = torch.tensor([10, 25])
    q = torch.randn(2, 1, 2, 16).transpose(1, 2)
    want = reference_attention(q, k, v, lo)
    k[0, :, :10] = float("nan")
    v[1, :, :25] = float("inf")
    got, _ = kernels.attention(_Module(), q, k, v, None, scaling=16 ** -0.5, kvbento_lo=lo)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_prefill_queries_go_through_sdpa():
    q = torch.randn(1, 4, 5, 32)
    k = torch.randn(1, 4, 5, 32)
    v = torch.randn(1, 4, 5, 32)
    mod = _Module()
    mod.is_causal = True
    out, _ = kernels.attention(mod, q, k, v, None, scaling=32 ** -0.5)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-6)


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


# ------------------------------------------------------------------------------- the slab (kv.py)
def _step(kv: BatchKV, value: dict[int, float]) -> None:
    """One decode step writing ``value[row]`` as the new column of each live row."""
    cache, mask, rows, lo = kv.prepare_step()
    width = kv.end + 1 - kv.start
    assert mask.shape == (rows, 1, 1, width) and lo.shape == (rows,)
    for r in range(rows):  # the mask and the native kernel's first live column agree
        live = (mask[r, 0, 0] == 0).nonzero().flatten()
        assert int(live[0]) == int(lo[r]) and int(live[-1]) == width - 1
    new = torch.zeros(rows, 1, 1, 2)
    for r, x in value.items():
        new[r] = x
    cache.layers[0].update(new, new.clone())
    kv.finish_step()


class _Slab:
    """A one-layer slab plus what each row should hold, to check after every operation."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.kv = BatchKV(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"),
                          max_rows=4, column_chunk=4)
        self.kv.reserve(rows, capacity)
        self.written: dict[int, list[float]] = {}

    def insert(self, vals: list[float]) -> int:
        t = torch.tensor(vals, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 2).contiguous()
        row = self.kv.insert([t], [t.clone()])
        self.written[row] = list(vals)
        return row

    def remove(self, row: int) -> None:
        self.kv.remove(row)
        del self.written[row]

    def step(self, base: float) -> None:
        values = {r: base + r for r in self.written}
        _step(self.kv, values)
        for r, x in values.items():
            self.written[r].append(x)
        self.check()

    def check(self) -> None:
        for row, vals in self.written.items():
            k, v = self.kv.extract(row)
            assert k[0][0, :, 0].tolist() == vals and v[0][0, :, 1].tolist() == vals


@torch.inference_mode()
def test_slab_grows_with_rows_intact():
    s = _Slab(2, 8)
    assert len(s.kv.row_len) == 2 and s.kv.capacity == 8
    first = id(s.kv.keys[0])
    s.insert([1.0, 2.0, 3.0])
    s.insert([4.0, 5.0])
    s.check()
    for i in range(12):  # past the capacity
        s.step(10.0 * i)
    assert s.kv.capacity >= 15 and id(s.kv.keys[0]) != first
    s.insert([6.0])  # a third row: more rows
    s.step(500.0)
    assert len(s.kv.row_len) >= 3


@torch.inference_mode()
def test_slab_compacts_in_place_and_is_reused_when_idle():
    s = _Slab(2, 16)
    slab = id(s.kv.keys[0])
    a = s.insert([float(x) for x in range(10)])
    b = s.insert([100.0])
    s.remove(a)  # the window now starts at b's only column, far right
    before = s.kv.num_relayouts
    for i in range(8):  # runs out of columns at 16: b's short span fits, so it moves left in place
        s.step(200.0 + i)
    assert s.kv.num_relayouts == before + 1 and id(s.kv.keys[0]) == slab
    s.remove(b)
    c = s.insert([7.0, 8.0, 9.0])  # an idle slab restarts at row 0, same tensors
    assert c == 0 and s.kv.num_rows == 1 and id(s.kv.keys[0]) == slab
    s.step(300.0)


@torch.inference_mode()
def test_copy_row_forks_a_row_growing_the_slab_when_full():
    s = _Slab(1, 8)  # one row reserved: the copy needs a second
    a = s.insert([1.0, 2.0, 3.0])
    b = s.kv.copy_row(a)
    s.written[b] = list(s.written[a])
    assert b != a and len(s.kv.row_len) == 2
    s.check()
    for i in range(3):  # the copies go their own ways
        s.step(10.0 * i)
    s.remove(a)
    s.step(100.0)


def test_loading_the_native_kernel_keeps_denormals():
    """Built with -ffast-math, the kernel must not switch the process to flush-to-zero (gcc < 13
    links crtfastmath.o into shared objects unless compile and link are separate)."""
    if kernels.load_native() is None:
        pytest.skip("no C compiler here")
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal
    assert float(tiny * 2) > 0


@torch.inference_mode()
def test_idle_slab_lays_the_reserve_out_anew_for_a_long_sequence():
    s = _Slab(4, 8)  # 4 rows x 8 columns reserved
    reserved, mem = id(s.kv.keys[0]), s.kv.keys[0].data_ptr()
    a = s.insert([float(x) for x in range(10)])  # longer than the reserve's rows
    # The same memory as 2 rows x 16 columns: no new slab, nothing widened for rows not in use.
    assert len(s.kv.row_len) == 2 and s.kv.capacity == 16 and s.kv.keys[0].data_ptr() == mem
    assert s.kv.num_relayouts == 1  # the reservation itself
    b = s.insert([1.0, 2.0])  # a short one joins the long layout's free row
    for i in range(3):
        s.step(40.0 + i)
    assert s.kv.num_relayouts == 1
    s.remove(a)
    s.remove(b)
    c = s.insert([5.0, 6.0, 7.0])  # fits the reserve again: back to its own layout, values exact
    assert c == 0 and id(s.kv.keys[0]) == reserved and len(s.kv.row_len) == 4 and s.kv.capacity == 8
    s.insert([8.0])
    s.step(60.0)


@torch.inference_mode()
def test_idle_slab_gives_a_sequence_longer_than_the_whole_reserve_its_own_row():
    s = _Slab(2, 8)
    reserved = id(s.kv.keys[0])
    a = s.insert([float(x) for x in range(20)])  # more columns than the reserve holds in all
    assert len(s.kv.row_len) == 1 and id(s.kv.keys[0]) != reserved  # one row, not 2 x 20+ columns
    s.step(50.0)
    s.remove(a)
    b = s.insert([1.0, 2.0])  # fits the reserve again: back to it, no new slab
    assert b == 0 and id(s.kv.keys[0]) == reserved and len(s.kv.row_len) == 2
    s.insert([3.0])
    s.step(60.0)


@torch.inference_mode()
def test_extract_is_a_host_copy_per_layer_that_outlives_the_row():
    layers, heads, dim = 3, 2, 4
    kv = BatchKV(num_layers=layers, kv_heads=heads, head_dim=dim, dtype=torch.float32,
                 device=torch.device("cpu"), max_rows=2, column_chunk=4)
    keys = [torch.randn(heads, 5, dim) for _ in range(layers)]
    values = [torch.randn(heads, 5, dim) for _ in range(layers)]
    row = kv.insert(keys, values)
    k, v = kv.extract(row, 4)  # the first 4 of 5 columns, as a record keeps them
    assert len(k) == len(v) == layers
    for l in range(layers):
        assert k[l].shape == v[l].shape == (heads, 4, dim) and k[l].is_contiguous() and k[l].device.type == "cpu"
        assert torch.equal(k[l], keys[l][:, :4]) and torch.equal(v[l], values[l][:, :4])
    kv.remove(row)
    kv.insert([torch.zeros(heads, 5, dim)] * layers, [torch.zeros(heads, 5, dim)] * layers)  # reuses the row
    for l in range(layers):  # a copy, not a view of the slab
        assert torch.equal(k[l], keys[l][:, :4]) and torch.equal(v[l], values[l][:, :4])
    k0, v0 = kv.extract(row, 0)  # a one-token sequence keeps no columns
    assert all(t.shape == (heads, 0, dim) for t in k0 + v0)


@torch.inference_mode()
def test_a_slab_in_the_reserve_widens_inside_it_with_every_row_exact():
    layers, heads, dim = 2, 3, 4
    kv = BatchKV(num_layers=layers, kv_heads=heads, head_dim=dim, dtype=torch.float32,
                 device=torch.device("cpu"), max_rows=8, column_chunk=4)
    kv.reserve(4, 24)  # 96 row-columns of memory
    mem = kv.keys[0].data_ptr()
    g = torch.Generator().manual_seed(0)
    held = {}
    for n in (5, 3, 6, 2):
        k = [torch.randn(heads, n, dim, generator=g) for _ in range(layers)]
        v = [torch.randn(heads, n, dim, generator=g) for _ in range(layers)]
        held[kv.insert(k, v)] = (k, v)
    kv.remove(1)  # a free row among live ones
    del held[1]
    kv.remove(3)  # a free row past the last live one: dropped when the slab widens
    del held[3]

    def steps(count: int) -> None:
        for _ in range(count):
            cache, _, rows, _ = kv.prepare_step()
            for layer in range(layers):
                nk = torch.randn(rows, heads, 1, dim, generator=g)
                nv = torch.randn(rows, heads, 1, dim, generator=g)
                cache.layers[layer].update(nk, nv)
                for r, (k, v) in held.items():
                    k[layer] = torch.cat([k[layer], nk[r]], dim=1)
                    v[layer] = torch.cat([v[layer], nv[r]], dim=1)
            kv.finish_step()

    def exact() -> bool:
        return all(torch.equal(a, b) for r, (k, v) in held.items()
                   for a, b in zip([*kv.extract(r)[0], *kv.extract(r)[1]], [*k, *v]))

    assert kv.keys[0].data_ptr() == mem and exact()  # the 6-token row moved the others right, in place
    steps(20)  # past 24 columns: 3 rows x 32 columns fit the reserve's 96
    assert kv.capacity == 32 and len(kv.row_len) == 3 and kv.keys[0].data_ptr() == mem and exact()
    steps(10)  # past 32: 3 x 40 does not fit, a slab of its own
    assert kv.capacity > 32 and kv.keys[0].data_ptr() != mem and exact()


@torch.inference_mode()
def test_a_long_sequence_joining_moves_the_batch_inside_the_reserve_dropping_rows_it_cannot_hold():
    s = _Slab(4, 12)  # 48 row-columns of memory
    mem = s.kv.keys[0].data_ptr()
    s.insert([1.0, 2.0, 3.0])
    s.insert([4.0, 5.0])
    s.step(10.0)
    s.insert([float(x) for x in range(12)])  # needs 16 columns: 3 rows x 16 fit, a 4th would not
    assert s.kv.capacity == 16 and len(s.kv.row_len) == 3 and s.kv.keys[0].data_ptr() == mem
    s.step(20.0)
    s.insert([6.0])  # no free row left: more rows, a slab of its own
    s.step(30.0)
    assert len(s.kv.row_len) > 3


@torch.inference_mode()
def test_prefill_buffer_holds_the_prefix_and_the_chunks_in_order_and_grows_when_short():
    from model.kv import PrefillBuffer

    buf = PrefillBuffer(num_layers=2, kv_heads=2, head_dim=3, dtype=torch.float32,
                        device=torch.device("cpu"), column_chunk=4)
    buf.reserve(4)
    kept = buf.keys[0].data_ptr()
    prefix = [([torch.randn(2, 2, 3) for _ in range(2)], [torch.randn(2, 2, 3) for _ in range(2)])]
    cache = buf.cache(4, prefix)
    assert cache.get_seq_length() == 2 and buf.keys[0].data_ptr() == kept
    new_k, new_v = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    k, v = cache.layers[1].update(new_k, new_v)
    assert torch.equal(k[0], torch.cat([prefix[0][0][1], new_k[0]], dim=1))
    assert torch.equal(v[0], torch.cat([prefix[0][1][1], new_v[0]], dim=1))
    assert cache.layers[1].get_mask_sizes(3) == (7, 0)
    buf.cache(9, [])  # longer than the buffer: it grows (by half at least), empty again
    assert buf.capacity >= 9 and buf.keys[0].data_ptr() != kept


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
    assert kernels.batch_variance(torch.nn.Sequential(_RowByRow(24, 40), _Jumps(40, 24))) == [5, 16, 33]
    if kernels.onednn_packs(torch.float32) is None:  # the packed linears, fused SiLU and add included
        packed = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24))
        kernels.pack_linears(packed)
        assert kernels.batch_variance(packed) == []
