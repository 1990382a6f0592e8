"""How far two kernel orders of the same arithmetic may differ, per dtype, for tests that compare the
engine with another path (the HF forward, HF generate, a fresh prefill of reused KV).

In float32 those paths agree to ~1e-6 and the tests ask for equal tokens. In bfloat16 (the default
on a CPU with native bf16 matmul) a logit carries ~3 significant digits: paths that sum in another
order (the lean decode step vs the HF forward, a decode step's KV vs a prefill's) may pick either of
two tokens whose logits are within rounding of each other, and then follow different texts. What
stays exact in every dtype (12 + 12 == 24, alone == in a batch) is tested bitwise in
test_exactness_dtypes.py.
"""

from __future__ import annotations

import torch


def logit_tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest difference rounding explains between two logits of magnitude up to ``scale``."""
    if dtype == torch.float32:
        return 1e-4
    return 8 * torch.finfo(dtype).eps * max(1.0, scale)


def assert_same_greedy(loaded, prompt_ids: list[int], got: list[int], want: list[int]) -> None:
    """``got == want`` in float32; in a half type they may part only at a near tie of the model's
    logits (checked with the HF forward over ``prompt_ids + want[:i]``)."""
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        assert len(got) == len(want)
        return
    assert loaded.dtype != torch.float32, f"greedy tokens part at {i} in float32: {got} != {want}"
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([list(prompt_ids) + want[:i]])).logits[0, -1].float()
    gap = abs(float(logits[want[i]] - logits[got[i]]))
    tol = logit_tolerance(loaded.dtype, float(logits.abs().max()))
    assert gap <= tol, f"tokens part at {i} where the logits differ by {gap:.3g} > rounding {tol:.3g}"
