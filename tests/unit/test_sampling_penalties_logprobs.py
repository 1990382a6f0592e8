"""OpenAI's presence / frequency penalties and the logprobs the sampler reports."""

from __future__ import annotations

import math

import torch

from model.sampling import RowSpec, TokenLogprob, apply_presence_frequency, sample, with_request_extras
from model.types import InvalidRequest, SamplingParams


def test_presence_and_frequency_follow_openais_formula():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ids, counts = torch.tensor([0, 1, 3, 3, 3]).unique(return_counts=True)
    apply_presence_frequency(logits, ids, counts, presence=0.5, frequency=0.25)
    # token 0 and 1 once: 1 - 0.25 - 0.5; token 3 three times: 1 - 0.75 - 0.5; token 2 untouched.
    assert logits.tolist() == [0.25, 0.25, 1.0, -0.25]


def test_with_request_extras_counts_only_generated_tokens():
    params = SamplingParams(frequency_penalty=1.0, logprobs=2)
    spec = with_request_extras(RowSpec(False, 1.0, 0, 1.0), params, [5, 5, 5, 7, 7], num_base_tokens=3)
    ids, counts = spec.counts
    assert ids.tolist() == [7] and counts.tolist() == [2] and spec.logprobs == 2
    none = with_request_extras(RowSpec(False, 1.0, 0, 1.0), SamplingParams(), [1, 2, 3], 1)
    assert none.counts is None and none.logprobs is None


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.5]])
    spec = with_request_extras(RowSpec(False, 1.0, 0, 1.0), SamplingParams(presence_penalty=1.0), [9, 0], 1)
    assert sample(logits, [spec]) == [1]
    negative = with_request_extras(RowSpec(False, 1.0, 0, 1.0), SamplingParams(presence_penalty=-2.0),
                                   [9, 1], 1)
    assert sample(torch.tensor([[2.0, 1.5]]), [negative]) == [1]


def test_logprobs_are_log_softmax_after_transforms():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]])
    rows = [RowSpec(False, 1.0, 0, 1.0, logprobs=2), RowSpec(False, 1.0, 0, 1.0)]
    out: list = []
    assert sample(logits.clone(), rows, out) == [3, 0]
    assert out[1] is None and isinstance(out[0], TokenLogprob)
    expected = torch.log_softmax(logits[0], -1)
    assert out[0].token_id == 3 and math.isclose(out[0].logprob, float(expected[3]), rel_tol=1e-6)
    assert [t for t, _ in out[0].top] == [3, 2]
    assert math.isclose(out[0].top[1][1], float(expected[2]), rel_tol=1e-6)
    # A blocked token (EOS under min_tokens) has -inf; a sampling row's logprobs include temperature.
    blocked = RowSpec(True, 2.0, 0, 1.0, block_ids=torch.tensor([3]), logprobs=0,
                      generator=torch.Generator().manual_seed(1))
    out = []
    token = sample(logits[:1].clone(), [blocked], out)[0]
    scaled = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, float("-inf")]) / 2.0, -1)
    assert token != 3 and out[0].top == []
    assert math.isclose(out[0].logprob, float(scaled[token]), rel_tol=1e-6)


def test_range_checks_name_the_field():
    for params, name in ((SamplingParams(presence_penalty=2.5), "presence_penalty"),
                         (SamplingParams(frequency_penalty=-3), "frequency_penalty"),
                         (SamplingParams(logprobs=21), "logprobs")):
        try:
            params.validate(4096)
        except InvalidRequest as exc:
            assert exc.param == name
        else:
            raise AssertionError(f"{name} out of range was accepted")
