"""OpenAI conformance with the official `openai` SDK against a live `bentoml serve`: vLLM's
extensions (ignore_eos, min_tokens, top_k, repetition_penalty), penalties, n, logprobs, echo (with
the prompt's logprobs), and the fields still refused."""

from __future__ import annotations

import openai
import pytest

pytestmark = [pytest.mark.e2e]

MSGS = [{"role": "user", "content": "Tell me about cats"}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("n_tokens", [7, 40])
def test_ignore_eos_and_min_tokens_give_exactly_n_tokens(client, n_tokens):
    extra = {"ignore_eos": True, "min_tokens": n_tokens}
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=n_tokens, temperature=0.9,
                                     seed=3, extra_body=extra)
    assert full.usage.completion_tokens == n_tokens and full.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="m", messages=MSGS, max_completion_tokens=n_tokens,
                                          extra_body=extra, stream=True, stream_options={"include_usage": True},
                                          logprobs=True)
    chunks = list(chat)
    assert chunks[-1].usage.completion_tokens == n_tokens
    # Every generated token is reported once in the stream's logprobs.
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == n_tokens


def test_min_tokens_above_max_tokens_is_refused_by_its_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=4, extra_body={"min_tokens": 9})
    assert e.value.body["param"] == "min_tokens"


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == r.choices[0].message.content
    # Streamed: the same tokens with the same logprobs.
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    # Without logprobs there are none.
    plain = client.chat.completions.create(model="m", messages=MSGS, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_k(client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(x) for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_logprobs_follow_temperature(client):
    """The reported logprobs are those of the distribution the token was drawn from."""
    def first(temperature):
        r = client.completions.create(model="m", prompt=PROMPT, max_tokens=1, temperature=temperature,
                                      top_p=1, logprobs=1, seed=1, extra_body={"top_k": -1})
        return max(r.choices[0].logprobs.top_logprobs[0].values())
    assert first(0.05) > first(1.9)


def test_n_choices_are_indexed_and_counted(client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) > 1  # seed + i: the choices differ
    again = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=5,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, n=2, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
        if c.choices[0].finish_reason:
            finished.add(c.choices[0].index)
    assert finished == {0, 1} and texts[0] and texts[1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_top_k_one_is_greedy_and_penalties_change_the_greedy_distribution(client):
    greedy = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    top1 = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=1.5, seed=9,
                                     extra_body={"ignore_eos": True, "top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    # Each penalty changes the greedy distribution (the scores of the seen / generated tokens), so
    # the reported logprobs move whether or not the random model's argmax happens to change.
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    for extra, kw in (({"repetition_penalty": 5.0}, {}), ({}, {"frequency_penalty": 2.0}),
                      ({}, {"presence_penalty": 2.0})):
        other = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                          extra_body={"ignore_eos": True, **extra}, **kw)
        assert other.choices[0].logprobs.top_logprobs != plain.choices[0].logprobs.top_logprobs, (extra, kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=PROMPT, presence_penalty=2.5)
    assert e.value.body["param"] == "presence_penalty"


def test_echo_stop_and_seed(client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, echo=True, temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=5, echo=True, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    a = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=1.2, seed=42)
    b = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=1.2, seed=42)
    assert a.choices[0].text == b.choices[0].text
    base = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    cut = base[3:5]
    stopped = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0,
                                        stop=["\x00never", cut], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == base[: base.find(cut)] and stopped.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def tiny_forward(tiny_model_dir, server):
    """Token ids and log-softmax of the tiny model's own forward over a text, in the server's dtype
    (its /health says which: bf16 where the CPU multiplies bf16 natively), and the tolerance two
    implementations of one forward meet in that dtype (bf16 keeps 8 bits of mantissa)."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = httpx.get(server.url + "/health", timeout=10).json()["dtype"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).eval()

    def forward(text):
        ids = tok(text).input_ids
        with torch.inference_mode():
            return ids, model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    forward.tolerance = 1e-3 if dtype == "float32" else 0.15
    return forward


def test_echo_with_logprobs_reports_the_prompts_logprobs(client, tiny_forward):
    prompt = PROMPT + ", in a land far away"
    ids, lp = tiny_forward(prompt)
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    n = len(ids)
    assert r.usage.prompt_tokens == n and c.text.startswith(prompt)
    got = c.logprobs
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == n + 4
    assert len(got.text_offset) == n + 4
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    prompt_lps = got.token_logprobs[1:n]
    assert all(x < 0 for x in prompt_lps)
    tol = tiny_forward.tolerance
    assert prompt_lps == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, n)], abs=tol)
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(float(lp[i].max()), abs=tol)
               for i, t in enumerate(got.top_logprobs[1:n]))
    # Offsets index the echoed text (the BOS takes no room); the completion's tokens follow.
    assert all(prompt[o:].startswith(t) for t, o in zip(got.tokens[1:n], got.text_offset[1:n]))
    assert got.text_offset[n] == len(prompt)
    # A cache hit changes nothing: the prompt is computed again for its logits.
    again = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                      logprobs=2, extra_body={"ignore_eos": True})
    assert again.choices[0].logprobs.token_logprobs[1:] == pytest.approx(got.token_logprobs[1:], abs=1e-4)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    # Streamed: the echo chunk carries the prompt's logprobs, then the completion's follow.
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            logprobs=2, n=2, stream=True, extra_body={"ignore_eos": True}))
    for index in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == index]
        assert mine[0].text == prompt and mine[0].logprobs.token_logprobs[0] is None
        assert mine[0].logprobs.token_logprobs[1:] == pytest.approx(prompt_lps, abs=1e-4)
        assert [t for ch in mine if ch.logprobs for t in ch.logprobs.tokens] == got.tokens
        assert "".join(ch.text for ch in mine) == c.text


def test_greedy_choices_are_the_single_answer(client):
    one = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    three = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, n=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens and three.usage.completion_tokens == 24


@pytest.mark.parametrize("kwargs, param", [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"n": 9}, "n"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"logprobs": 21}, "logprobs"),
])
def test_unsupported_fields_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, **kwargs)
    assert e.value.body["param"] == param and param in e.value.body["message"]


def test_chat_refusals_name_the_field(client):
    for kwargs, param in (({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
                          ({"tool_choice": "required"}, "tool_choice"),
                          ({"top_logprobs": 2}, "top_logprobs"),
                          ({"n": 2, "extra_body": {"request_id": "eco-n"}}, "n")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param
