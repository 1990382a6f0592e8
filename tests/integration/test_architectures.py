"""Architectures users bring, as random-weight, scaled-down models built here from their
transformers config classes (no hub): the paged engine runs each (the lean step where it applies
and agrees, else the HF forward), a sequence alone equals it in a batch with prefill chunks riding
in decode steps, and a continuation through the store equals one run."""

import asyncio
import shutil

import pytest
import torch

from model.types import SamplingParams
from session.request import GenerateRequest

COMMON = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)


def configs():
    import transformers as t

    return {
        "llama3": (t.LlamaConfig, t.LlamaForCausalLM, dict(rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(head_dim=16)),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, dict(sliding_window=12)),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=12,
                                                             attn_logit_softcapping=5.0,
                                                             final_logit_softcapping=30.0)),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=12,
                                                                 sliding_window_pattern=2)),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
    }


def build(name, tiny_model_dir, out):
    cfg_cls, model_cls, extra = configs()[name]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**COMMON, **extra}))
    with torch.no_grad():
        for p in model.parameters():  # peaked logits: greedy ties are not what is tested here
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
def arch(request, tiny_model_dir, tmp_path_factory):
    from cache.factory import open_backend
    from cache.store import KVStore
    from model.engine import Engine, EngineConfig
    from model.loader import load
    from session import Session

    path = build(request.param, tiny_model_dir, tmp_path_factory.mktemp(request.param))
    m = load(str(path))
    store = KVStore(open_backend(f"disk://{tmp_path_factory.mktemp('kv')}"), m.fingerprint, block_tokens=8)
    eng = Engine(m, EngineConfig(max_batch_size=4, prefill_chunk=16, max_batch_tokens=24, block_tokens=8))
    yield request.param, Session(eng, store)
    eng.close()
    store.close()


PROMPTS = ["Hello there, how are you today?", "A", "The quick brown fox jumps over the lazy dog " * 2,
           "Once upon a time, in a land far away, there lived a"]


def run(loop, coro):
    return loop.run_until_complete(coro)


def req(prompt, n=10, rid=None):
    return GenerateRequest(rid or "arch", prompt, params=SamplingParams(max_new_tokens=n, ignore_eos=True),
                           use_cache=rid is not None, named=rid is not None, continue_stored=rid is not None)


async def generate(session, reqs):
    streams = [await session.generate(r) for r in reqs]
    await asyncio.gather(*(s.collect() for s in streams))
    return [s.token_ids[len(s.base_token_ids):] for s in streams]


def test_alone_equals_batched_and_continues_through_the_store(arch, loop):
    name, session = arch
    solo = [run(loop, generate(session, [req(p)]))[0] for p in PROMPTS]
    assert run(loop, generate(session, [req(p) for p in PROMPTS])) == solo, name
    full = run(loop, generate(session, [req(PROMPTS[2], 20)]))[0]
    a = run(loop, generate(session, [req(PROMPTS[2], 10, rid=f"{name}-cont")]))[0]
    b = run(loop, generate(session, [req("ignored", 10, rid=f"{name}-cont")]))[0]
    assert a + b == full, name
    assert session.engine.kv_blocks()["used"] == 0


def test_the_engine_matches_the_hf_forward(arch, loop):
    """Greedy through the engine (prompt prefilled in chunks across blocks) picks, at every step, the
    token the HF forward over the same sequence ranks first: exactly in fp32; in bf16, where two
    implementations of one forward differ by rounding, within a bf16 rounding of the top logit."""
    name, session = arch
    m = session.engine.m
    prompt = PROMPTS[2] + PROMPTS[3]
    got = run(loop, generate(session, [req(prompt, 12)]))[0]
    ids = m.tokenizer(prompt).input_ids
    with torch.inference_mode():
        logits = m.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].float()
    top = logits.max(-1).values
    chosen = logits.gather(-1, torch.tensor(got)[:, None])[:, 0]
    tol = 0.0 if m.dtype == torch.float32 else 4 * 2.0 ** -8 * top.abs()
    assert bool((chosen >= top - tol).all()), (name, (top - chosen).tolist())
