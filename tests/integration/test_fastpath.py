"""The lean step (model/fastpath.py) against the HF forward it replaces, on the tiny model."""

import pytest
import torch

from model import fastpath, kernels
from model.attention import NO_MASK
from model.kv import PagedCache, StepBatch
from model.runner import ModelRunner
from tests.integration.rounding import assert_same_greedy


@pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")
def test_tiny_model_runs_the_lean_step(loaded):
    assert loaded.decode_step is not None
    # Linears are packed wherever oneDNN packs the dtype on this CPU (bf16 needs AVX512 or
    # AVX-NE-CONVERT), and the kernels the model runs say which.
    packs = kernels.onednn_packs(loaded.dtype) is None
    assert any(isinstance(mod, kernels.PackedLinear) for mod in loaded.model.modules()) == packs
    linear = next((m for m in loaded.model.modules() if isinstance(m, kernels.PackedLinear)), None)
    assert loaded.kernels["linears"] == (linear.kernel if packs else "torch")
    assert loaded.kernels["decode_step"] == "lean"


@pytest.fixture(scope="module")
def loaded_fp32(loaded, tiny_model_dir):
    """The tiny model in float32: for tests of layout (the lean step computes what the HF forward
    computes), where only float32 makes two summation orders agree to ~1e-6."""
    from model.loader import load

    return loaded if loaded.dtype == torch.float32 else load(str(tiny_model_dir), dtype="float32")


@torch.inference_mode()
def test_lean_step_matches_the_hf_forward_over_mixed_steps(loaded_fp32):
    """Prompts prefilled in chunks while others decode, each path feeding its own argmax back (in
    float32, pinned: the half-precision self-check below bounds bf16's rounding instead)."""
    loaded = loaded_fp32
    if loaded.decode_step is None:
        pytest.skip("lean step not active here")
    prompts = ["Hello world, how are you?", "A", "The quick brown fox jumps over the lazy dog again and again"]
    toks = [loaded.tokenizer(t).input_ids for t in prompts]
    pools = [ModelRunner.new_pool(loaded, 6, 16) for _ in range(2)]
    tables = [list(range(i * 2, i * 2 + 2)) for i in range(3)]
    seqs = [[list(t) for t in toks] for _ in range(2)]
    done = [0, 0, 0]
    for _ in range(6):
        chunks = [(i, done[i], min(len(seqs[0][i]), done[i] + 5)) for i in range(3)]
        logits = []
        for path, (pool, ss) in enumerate(zip(pools, seqs)):
            batch = StepBatch(pool, tables, [e - s for _, s, e in chunks], [e for _, _, e in chunks], True)
            ids = torch.tensor([t for i, s, e in chunks for t in ss[i][s:e]])
            keep = torch.tensor([sum(e - s for _, s, e in chunks[: k + 1]) - 1 for k in range(3)])
            if path == 0:
                out = loaded.model(input_ids=ids.view(1, -1), position_ids=batch.positions.view(1, -1),
                                   attention_mask=NO_MASK, past_key_values=PagedCache(batch), use_cache=True,
                                   logits_to_keep=keep, kvbento=batch).logits[0]
            else:
                out = loaded.decode_step(ids, batch.positions, batch, keep)
            logits.append(out)
            for i, _, e in chunks:
                if e == len(ss[i]):
                    ss[i].append(int(out[i].argmax()))
        assert torch.allclose(logits[0], logits[1], atol=1e-4), float((logits[0] - logits[1]).abs().max())
        assert seqs[0] == seqs[1]
        done = [e for _, _, e in chunks]


def test_unsupported_architectures_keep_the_hf_forward(loaded):
    cfg = loaded.model.config
    old = cfg.model_type
    try:
        cfg.model_type = "gpt2"
        assert fastpath.LlamaStep.supports(loaded.model, 1024) == "model_type 'gpt2'"
        assert fastpath.build(loaded.model, loaded.dtype, 1024, True) is None
    finally:
        cfg.model_type = old
    cfg.sliding_window = 16
    try:
        assert fastpath.LlamaStep.supports(loaded.model, 1024) == "sliding window"
    finally:
        cfg.sliding_window = None


def test_torch_kernels_setting_loads_plain_modules_and_agrees(loaded, tiny_model_dir):
    from model.loader import load

    plain = load(str(tiny_model_dir), dtype=str(loaded.dtype).removeprefix("torch."), cpu_kernels="torch")
    assert plain.decode_step is None and plain.kernels["linears"] == "torch"
    assert not any(isinstance(mod, kernels.PackedLinear) for mod in plain.model.modules())
    assert plain.fingerprint != loaded.fingerprint or loaded.decode_step is None  # kernels are in the identity
    ids = plain.tokenizer("Hello world, how are you?", return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        a = plain.model.generate(ids, **kw)
        b = loaded.model.generate(ids, **kw)
    n = ids.shape[1]
    assert_same_greedy(loaded, ids[0].tolist(), a[0, n:].tolist(), b[0, n:].tolist())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_keep_the_lean_step_and_a_wrong_step_is_still_refused(tiny_model_dir, dtype):
    """Rounding in half precision moves logits a little (bf16: ~0.07 on the tiny model, above the
    old fixed 0.05); a structural mistake moves them wholesale and must still fail the check."""
    from model.loader import load

    half = load(str(tiny_model_dir), dtype=dtype)
    if not kernels.onednn_available():
        pytest.skip("torch built without oneDNN")
    assert half.decode_step is not None
    step = half.decode_step
    err, scale = fastpath._self_check(half.model, step, half.dtype, True)
    tol = 64 * torch.finfo(half.dtype).eps * max(1.0, scale)
    assert err <= tol
    step.layers = step.layers[::-1]  # the layers in the wrong order (per op and in the native stack)
    if step.stack is not None:
        step.stack = (fastpath._CLayer * len(step.stack))(*list(step.stack)[::-1])
    err, _ = fastpath._self_check(half.model, step, half.dtype, True)
    assert err > tol, (err, tol)
