import torch

from model.sampling import RowSpec, apply_repetition_penalty, sample


def greedy():
    return RowSpec(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)


def test_greedy_takes_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    assert sample(logits, [greedy(), greedy()]) == [1, 0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0]])
    row = RowSpec(False, 1.0, 0, 1.0, repetition_penalty=2.0, seen_ids=torch.tensor([0]))
    assert sample(logits, [row]) == [1]


def test_blocked_ids_are_never_chosen():
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    row = RowSpec(True, 1.0, 0, 1.0, block_ids=torch.tensor([0]), generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        assert sample(logits.clone(), [row])[0] != 0


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.tensor([[0.0, 0.5, 0.4]])
    row = RowSpec(True, 5.0, 1, 1.0, generator=torch.Generator().manual_seed(1))
    assert {sample(logits.clone(), [row])[0] for _ in range(20)} == {1}


def test_top_k_one_breaks_ties_as_greedy_does():
    """bf16 logits tie often: the top-1 of a sampling row is the token greedy picks (lowest id)."""
    logits = torch.zeros(1, 4096)
    logits[0, [77, 901, 3000]] = 2.5
    row = RowSpec(True, 1.5, 1, 1.0, generator=torch.Generator().manual_seed(9))
    assert sample(logits.clone(), [greedy()]) == [77]
    assert {sample(logits.clone(), [row])[0] for _ in range(10)} == {77}


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    row = RowSpec(True, 1.0, 0, 0.6, generator=torch.Generator().manual_seed(2))
    assert {sample(logits.clone(), [row])[0] for _ in range(30)} == {0}


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(1, 50)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits.clone(), [RowSpec(True, 1.0, 0, 1.0, generator=g)])[0] for _ in range(10)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_mixed_batch_greedy_row_unaffected_by_sampling_row():
    logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    sampled = RowSpec(True, 1.0, 0, 1.0, generator=torch.Generator().manual_seed(3))
    assert sample(logits, [greedy(), sampled])[0] == 1


def test_bf16_logits_are_sampled_and_scored_in_fp32():
    """A bf16 model hands over bf16 logits: penalties, softmax, top-p and logprobs run in fp32 on
    them (a bf16 softmax over a vocabulary would round every small probability away)."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 4096, generator=g) * 4).to(torch.bfloat16)
    rows = [RowSpec(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, logprobs=2),
            RowSpec(do_sample=True, temperature=0.7, top_k=0, top_p=0.9, generator=torch.Generator().manual_seed(1),
                    logprobs=0)]
    got_lp, want_lp = [], []
    got = sample(logits.clone(), rows, got_lp)
    rows[1].generator = torch.Generator().manual_seed(1)
    want = sample(logits.float(), rows, want_lp)
    assert got == want and got_lp == want_lp
    exact = logits[0].float().log_softmax(-1)
    assert got_lp[0].logprob == float(exact[got[0]])  # fp32 arithmetic, not bf16's
    assert got_lp[0].logprob != float(logits[0].log_softmax(-1)[got[0]].float())
