"""The one place that reads configuration: ``KVBENTO_*`` environment variables and a ``.env`` file.

Every field below is settable as ``KVBENTO_<FIELD>`` (upper case). Environment variables win over
``.env``; ``.env`` wins over the defaults written here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.params import PARAMS, settings_fields

ROOT = Path(__file__).resolve().parent
# The tiny default model is created deterministically by `python -m model.bundled` (make setup).
DEFAULT_MODEL_DIR = ROOT / "var" / "models" / "kvbento-tiny"
DEFAULT_CACHE_DIR = ROOT / "var" / "kvcache"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KVBENTO_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- model and device -------------------------------------------------------------------
    # HF model directory or hub id; loaded with from_pretrained.
    model: str = str(DEFAULT_MODEL_DIR)
    # The model name clients see (OpenAI's ``model``, /v1/models, cache records); empty = the model
    # directory's own name, or the hub id. Never a path: a server's disk layout is not the API.
    model_name: str = Field(default="", max_length=256)
    # "auto" = cuda when available, else cpu.
    device: str = "auto"
    # "auto" = bfloat16 on CUDA (float16 without bf16 support); on CPU bfloat16 where the CPU
    # multiplies bf16 natively (amx_bf16 or avx512_bf16 in its flags), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Torch intra-op threads on CPU; 0 = torch's default (one per core).
    num_threads: int = Field(default=0, ge=0)
    # CPU matmul kernels: "onednn" (weights re-packed once at load, faster) or "torch" (defaults).
    cpu_kernels: Literal["onednn", "torch"] = "onednn"

    # --- engine -----------------------------------------------------------------------------
    # Sequences decoded together in one step (the running batch).
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    # Requests allowed to wait beyond the running batch; past it new requests get 429.
    max_queue: int = Field(default=64, ge=0)
    # Prompt tokens of one sequence prefilled per engine step, so long prompts do not stall streams.
    prefill_chunk: int = Field(default=512, ge=16)
    # Tokens of one engine step, all sequences together: every running sequence's decode token
    # first, then prefill chunks of as many sequences as fit (several short prompts at once).
    # 256: measured on CPU (BENCHMARKS.md, issue 26) — prefill throughput no higher above it, a
    # decoding row's gap while a long prompt prefills grows with it. GPUs want thousands.
    max_batch_tokens: int = Field(default=256, ge=16)
    # A step that carries prefill chunks gets the tokens it can run in about this long (from the
    # cost per token of the engine's recent such steps; at most max_batch_tokens): a decoding row
    # waits one whole step per token, so this bounds the gap a joining prompt adds on a slow CPU
    # as on a fast one. 150 ms: measured (BENCHMARKS.md, issue 26): 128-token steps on a CPU
    # without AMX, the whole 256 on an AMX one. 0: always max_batch_tokens.
    step_target_ms: float = Field(default=150.0, ge=0)
    # Bytes of the paged KV pool (blocks of cache_block_tokens positions, shared between requests
    # with a common prefix); 0 = kv_cache_share of the memory available at start, at most a full
    # batch of max-context sequences. A request that finds no free block waits (or is preempted).
    kv_cache_bytes: int = Field(default=0, ge=0)
    kv_cache_share: float = Field(default=0.25, gt=0, le=0.95)
    # Longest context (prompt + generated) a request may reach; 0 = the model's own limit.
    max_context: int = Field(default=0, ge=0)
    # Seconds an output constraint (JSON schema, regex, grammar, tools) may take to compile; past it
    # the request is refused with 400 (the compilation finishes in the background and is cached).
    grammar_compile_timeout: float = Field(default=10.0, gt=0)
    # Largest request body accepted, in bytes.
    max_body_bytes: int = Field(default=4 << 20, ge=1024)

    # --- KV-cache store ---------------------------------------------------------------------
    # disk:///path (diskcache, the default), redis://[:password@]host:port/db (also rediss://) or
    # redis+cluster://host:port[,host:port...] (Redis Cluster: budget = each node's maxmemory).
    cache_url: str = f"disk://{DEFAULT_CACHE_DIR}"
    # Seconds a record lives after its last write; 0 = no expiry.
    cache_ttl: float = Field(default=0, ge=0)
    # Byte budget of the store; least recently used records are evicted past it. 0 = unbounded.
    cache_max_bytes: int = Field(default=0, ge=0)
    # Seconds a store call may take before the store counts as unavailable.
    cache_timeout: float = Field(default=5.0, gt=0)
    # Bytes of KV blocks this server wrote kept in host memory (blocks are immutable), so a next
    # turn on the same replica restores without reading the store; 0 = off. Unset: 512 MiB when the
    # engine's KV pool is on an accelerator, 0 on CPU, where the pool is that memory already.
    cache_recent_bytes: int | None = Field(default=None, ge=0)
    # Buffers for store reads, allocated and touched at start (at most a max-context sequence's
    # blocks): a first load into fresh memory pays page faults, on some VMs more than the read.
    cache_read_buffer_bytes: int = Field(default=256 << 20, ge=0)
    # Tokens per stored KV block: identical prefixes are shared and reused at this granularity.
    cache_block_tokens: int = Field(default=64, ge=1, le=4096)

    # --- replicas ---------------------------------------------------------------------------
    # Seconds a request_id's or a background response's lease lives unless renewed (every third
    # of it): a crashed holder's work is taken over between one and two of these after its death.
    lease_seconds: float = Field(default=10.0, ge=0.5, le=600)
    # Seconds a background response's events and registry record live after their last write.
    background_ttl: float = Field(default=86400.0, gt=0)
    # How often a background response's events are written to the store and read by a follower.
    background_poll_seconds: float = Field(default=0.05, gt=0, le=5)
    # Seconds a streamed /api/generate whose client went away goes on generating, resumable by its
    # request_id (POST /api/generate/resume), and a finished one's text stays resumable; 0 = off
    # (a disconnect aborts at once). Nobody resuming: the record keeps the delivered tokens.
    resume_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    # This process's id in the X-KV-Replica answer header; empty = a hash of host name and pid.
    replica_id: str = Field(default="", pattern=r"^[A-Za-z0-9._:-]{0,64}$")

    # --- auth -------------------------------------------------------------------------------
    # Comma-separated bearer keys; empty = no auth. Request ids are scoped per key.
    api_keys: str = ""

    # --- generation_config defaults: one KVBENTO_<NAME> per sampling parameter of model/params.py
    # (num_beams, do_sample, temperature, top_p, top_k, max_new_tokens, min_new_tokens,
    # repetition_penalty, length_penalty), added below from that table.

    @field_validator("cache_url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.split("://", 1)[0] in {"disk", "redis", "rediss", "redis+cluster"}:
            raise ValueError(
                "KVBENTO_CACHE_URL must start with disk://, redis://, rediss:// or redis+cluster://")
        return v

    @property
    def served_model_name(self) -> str:
        """``model_name``, else the last part of a local ``model`` path, else the hub id."""
        if self.model_name:
            return self.model_name
        path = Path(self.model).expanduser()
        return path.name if path.is_dir() or path.is_absolute() else self.model

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def generation_defaults(self) -> dict:
        """The generation_config defaults, as a dict keyed like the request-id API."""
        return {name: getattr(self, name) for name, p in PARAMS.items() if p.setting}


# The sampling defaults join the settings from the one table that declares them.
Settings = create_model("Settings", __base__=Settings, __module__=__name__, **settings_fields())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process."""
    return Settings()
