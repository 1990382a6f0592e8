"""Loading any HF causal LM (directory or hub id) onto the right device, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch

from model import attention, fastpath, kernels, native, precision

log = logging.getLogger("kvbento.model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    name: str
    max_context: int
    eos_token_ids: list[int]
    weight_bytes: int = 0  # parameter bytes as loaded (packed kernels hold them outside parameters())
    # The lean step (model.fastpath) where it applies; None = the HF forward runs the steps.
    decode_step: object | None = None
    # Why this dtype (precision.DtypeChoice.reason) and which kernels run: for /health and metrics.
    dtype_reason: str = ""
    kernels: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return 2 * self.num_layers * kv_heads * head_dim * self.dtype.itemsize


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fingerprint(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """Identity of a model's weights and dtype, cheap enough for large models.

    Hashes the config and, per parameter, its name, shape and a strided sample of its values, so
    two models of one architecture with different weights (or dtypes) never share KV records.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].float().cpu()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def install_kernels(model: torch.nn.Module, dtype: torch.dtype, max_context: int,
                    cpu_kernels: str) -> tuple[object | None, dict[str, str], str]:
    """Swap in this repo's CPU kernels (``cpu_kernels="onednn"``: oneDNN linears, the native
    paged-attention kernel, the lean step) and probe batch invariance.

    Returns:
        The lean decode step (or None), the kernels in use by role (for the log, /health and the
        metrics) and the kernels' part of the fingerprint ("" = the model's own modules).
    """
    step = None
    # Attention is paged either way: the native kernel, or the pure-torch path (the CUDA path).
    used = {"linears": "torch", "attention": "torch", "decode_step": "hf forward"}
    ident = "paged"
    if cpu_kernels == "onednn":
        packed = kernels.pack_linears(model)
        # Another row chunk sums in another order: part of the fingerprint, as the kernels are.
        chunks = kernels.fit_row_chunks(model) if packed else {}
        attn = native.ATTENTION.load() is not None
        step = fastpath.build(model, dtype, max_context, attn)
        linear = next((m for m in model.modules() if isinstance(m, kernels.PackedLinear)), None)
        used = {"linears": linear.kernel if linear is not None else "torch",
                "attention": "native" if attn else "torch", "decode_step": "lean" if step is not None else "hf forward"}
        # a kernel's build name hashes its source: another summation order is another fingerprint
        kernel = native.ATTENTION.name() if attn else "none"
        ident = f"paged:onednn={packed}:native={kernel}:step={step is not None}"
        if linear is not None and linear.own:
            ident += f":{linear.kernel}={linear.native.name()}"
        if chunks:
            ident += ":rows=" + ",".join(f"{i}x{o}:{c}{'p' if p else ''}" for (i, o), (c, p) in sorted(chunks.items()))
    bad = kernels.batch_variance(model)
    used["batch_invariant"] = "yes" if not bad else "no"
    if bad:  # the exactness tests would fail here: say so at start, not in a diverging answer
        log.warning("linears are NOT batch-invariant here (a row differs at m=%s): a sequence's tokens may "
                    "depend on what shares its batch", bad)
    return step, used, ident


def load(name_or_path: str, device: str = "auto", dtype: str = "auto", max_context: int = 0,
         cpu_kernels: str = "onednn") -> LoadedModel:
    """Load model and tokenizer with ``from_pretrained``.

    ``cpu_kernels="onednn"`` swaps a CPU model's linear layers for oneDNN-packed ones
    (``model.kernels``); ``"torch"`` keeps torch's defaults.

    Raises:
        OSError: the directory or hub id cannot be loaded.
        ValueError: ``dtype`` is not a floating torch dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    choice = precision.pick(dev, dtype)
    dt = choice.dtype
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    cfg = model.config
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 4096
    if max_context:
        limit = min(limit, max_context)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    fp = fingerprint(model, dt)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not attention.install(model):
        raise OSError(f"{name_or_path}: the model takes no custom attention implementation (paged KV)")
    step, used, ident = install_kernels(model, dt, limit, cpu_kernels if dev.type == "cpu" else "torch")
    if ident:  # other kernels sum in another order: records stay exact only between equal kernels
        fp = hashlib.sha256(f"{fp}:{ident}".encode()).hexdigest()
    log.info("loaded %s on %s, dtype %s (%s), kernels %s, context %d, fingerprint %s", name_or_path, dev,
             choice.name, choice.reason, " ".join(f"{k}={v}" for k, v in used.items()), limit, fp[:12])
    return LoadedModel(model, tokenizer, dev, dt, fp, name_or_path, limit, eos_ids, weight_bytes, step,
                       choice.reason, used)
