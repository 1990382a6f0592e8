"""The bundled models: created deterministically here, because no model hub is reachable.

``python -m model.bundled`` writes the tiny default model (a few million parameters) and
``python -m model.bundled --bench`` the ~100M-parameter benchmark model. Both are ordinary HF model
directories (config.json, model.safetensors, tokenizer.json, chat template) that share one
byte-level BPE tokenizer trained here with the ``tokenizers`` library. Weights are random but
seeded, so every machine builds the same model. Building is skipped when the directory exists.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "var" / "models"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# ChatML; with tools, Hermes-style tool calls: a system block lists them, and an assistant's calls
# are written as the model generates them (<tool_call>{"name":...,"arguments":...}</tool_call>,
# compact JSON), so a next turn's prompt repeats the generated tokens and reuses their KV.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ 'You may call functions. Their signatures are within <tools></tools>:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\nWrite each call as <tool_call>\n{\"name\":<name>,\"arguments\":<arguments>}"
    "\n</tool_call><|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '<tool_call>\n{\"name\":\"' + call['function']['name'] + '\",\"arguments\":' }}"
    "{{ args if args is string else (args | tojson) }}{{ '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Corpus for the tokenizer: docstrings of these standard-library modules, in this order.
CORPUS_MODULES = [
    "json", "textwrap", "string", "collections", "functools", "itertools", "pathlib",
    "argparse", "logging", "asyncio", "http.client", "email.message", "csv", "random",
    "statistics", "datetime", "calendar", "decimal", "fractions", "shutil", "tempfile",
    "difflib", "heapq", "bisect", "queue", "threading", "subprocess", "socket", "zipfile",
]

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, max_positions, init_std)
    "kvbento-tiny": (192, 512, 4, 4, 2, 2048, 0.08),
    "kvbento-bench-100m": (768, 2048, 14, 12, 12, 4096, 0.02),
}


def _corpus() -> list[str]:
    texts: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items(), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                texts.append(doc)
        if module.__doc__:
            texts.append(module.__doc__)
    # A little multilingual text so multi-byte characters have tokens of their own.
    texts += ["Grüße aus Köln — naïve café, smörgåsbord.", "日本語のテキスト、中文文本。", "😀 🎉 ✓ ∑ π ≈ 3.14"]
    return texts


def build_tokenizer(out_dir: Path) -> None:
    """Train the byte-level BPE tokenizer and save it (with chat template) into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_model(name: str, out_dir: Path) -> None:
    """Create the seeded random-weight Llama model ``name`` with the shared tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv_heads, max_pos, std = SHAPES[name]
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        initializer_range=std,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("</s>"),
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained writes 0600; the image runs as a non-root user.
    for path in out_dir.iterdir():
        os.chmod(path, 0o644)


def ensure(name: str = "kvbento-tiny", models_dir: Path = MODELS_DIR) -> Path:
    """Return the directory of bundled model ``name``, building it first if it is missing.

    Builds into a temporary directory and renames it into place, so a killed build never leaves
    a half-written model behind.
    """
    out = models_dir / name
    if (out / "config.json").exists():
        _update_template(out)
        return out
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        build_model(name, tmp)
        os.chmod(tmp, 0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _update_template(out: Path) -> None:
    """Give a model built before the template changed the current one (weights stay as they are)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    if tok.chat_template == CHAT_TEMPLATE:
        return
    tok.chat_template = CHAT_TEMPLATE
    try:  # file by file with rename: a replica loading the model meanwhile reads old or new files
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-template-", dir=out.parent))
        try:
            tok.save_pretrained(tmp)
            for path in tmp.iterdir():
                os.chmod(path, 0o644)
                os.replace(path, out / path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a read-only model directory keeps its template
        print(f"kvbento: could not update the chat template of {out}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="build the ~100M benchmark model")
    parser.add_argument("--dir", type=Path, default=MODELS_DIR, help="parent directory")
    args = parser.parse_args(argv)
    path = ensure("kvbento-bench-100m" if args.bench else "kvbento-tiny", args.dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
