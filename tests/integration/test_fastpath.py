"""The lean decode step (model/fastpath.py) against the HF forward it replaces, on the tiny model."""

import pytest
import torch

from model import fastpath, kernels
from model.kv import BatchKV
from tests.integration.rounding import assert_same_greedy


def prefilled_slab(loaded, prompts):
    """A slab holding the real prefill KV of ``prompts`` (rows of unequal length), like the engine's."""
    m = loaded.model
    cfg = m.config
    kv = BatchKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                 loaded.dtype, torch.device("cpu"), len(prompts), 8)
    last = []
    for text in prompts:
        ids = loaded.tokenizer(text).input_ids
        with torch.inference_mode():
            out = m(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
        layers = out.past_key_values.layers
        kv.insert([layer.keys[0] for layer in layers], [layer.values[0] for layer in layers])
        last.append(ids[-1])
    return kv, torch.tensor(last)


@pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")
def test_tiny_model_decodes_with_the_lean_step(loaded):
    assert loaded.decode_step is not None
    # Linears are packed wherever oneDNN packs the dtype on this CPU (bf16 needs AVX512 or
    # AVX-NE-CONVERT), and the kernels the model runs say which.
    packs = kernels.onednn_packs(loaded.dtype) is None
    assert any(isinstance(mod, kernels.PackedLinear) for mod in loaded.model.modules()) == packs
    assert loaded.kernels["linears"] == ("onednn" if packs else "torch")
    assert loaded.kernels["decode_step"] == "lean"


@pytest.fixture(scope="module")
def loaded_fp32(loaded, tiny_model_dir):
    """The tiny model in float32: for tests of layout (the lean step computes what the HF forward
    computes), where only float32 makes two summation orders agree to ~1e-6."""
    from model.loader import load

    return loaded if loaded.dtype == torch.float32 else load(str(tiny_model_dir), dtype="float32")


@torch.inference_mode()
def test_lean_step_matches_the_hf_forward_over_several_steps(loaded_fp32):
    """In float32 (pinned: the half-precision self-check below bounds bf16's rounding instead)."""
    loaded = loaded_fp32
    if loaded.decode_step is None:
        pytest.skip("lean step not active here")
    prompts = ["Hello world, how are you?", "A", "The quick brown fox jumps over the lazy dog again and again"]
    hf_kv, ids = prefilled_slab(loaded, prompts)
    fast_kv, _ = prefilled_slab(loaded, prompts)
    hf_ids, fast_ids = ids.clone(), ids.clone()
    for _ in range(6):  # greedy steps, each path feeding its own argmax back
        cache, bias, rows, _ = hf_kv.prepare_step()
        pos = torch.tensor(hf_kv.row_len[:rows])
        want = loaded.model(input_ids=hf_ids.view(-1, 1), position_ids=pos.view(-1, 1), attention_mask=bias,
                            past_key_values=cache, use_cache=True).logits[:, -1]
        hf_kv.finish_step()
        _, bias2, _, lo = fast_kv.prepare_step()
        got = loaded.decode_step(fast_ids, torch.tensor(fast_kv.row_len[:rows]), fast_kv, lo, bias2)
        fast_kv.finish_step()
        assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
        hf_ids, fast_ids = want.argmax(-1), got.argmax(-1)
        assert torch.equal(hf_ids, fast_ids)


def test_unsupported_architectures_keep_the_hf_forward(loaded):
    cfg = loaded.model.config
    old = cfg.model_type
    try:
        cfg.model_type = "gpt2"
        assert fastpath.LlamaDecodeStep.supports(loaded.model, 1024) == "model_type 'gpt2'"
        assert fastpath.build(loaded.model, loaded.dtype, 1024) is None
    finally:
        cfg.model_type = old
    cfg.sliding_window = 16
    try:
        assert fastpath.LlamaDecodeStep.supports(loaded.model, 1024) == "sliding window"
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
    err, scale = fastpath._self_check(half.model, step, half.dtype)
    tol = 64 * torch.finfo(half.dtype).eps * max(1.0, scale)
    assert err <= tol
    step.layers = step.layers[::-1]  # the layers in the wrong order
    err, _ = fastpath._self_check(half.model, step, half.dtype)
    assert err > tol, (err, tol)
