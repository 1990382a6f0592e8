"""Every sampling parameter, declared once: name, type, range, default, and whether a
``KVBENTO_<NAME>`` setting holds its default. Config builds its settings from this table, the
engine checks requests against it, and each dialect's body declares its fields with ``wire``.
Light on purpose (no torch): config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any
    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    setting: bool = True  # a KVBENTO_<NAME> default exists

    def bounds(self, **narrower: float) -> dict[str, float]:
        out = {k: getattr(self, k) for k in ("ge", "gt", "le") if getattr(self, k) is not None}
        out.update(narrower)
        return out

    def contains(self, value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return True
        b = self.bounds()
        return (("ge" not in b or value >= b["ge"]) and ("gt" not in b or value > b["gt"])
                and ("le" not in b or value <= b["le"]))

    def describe(self) -> str:
        b = self.bounds()
        lo = f"[{b['ge']:g}" if "ge" in b else (f"({b['gt']:g}" if "gt" in b else "(-inf")
        hi = f"{b['le']:g}]" if "le" in b else "inf)"
        return f"{lo}, {hi}"


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("max_new_tokens", int, 128, "tokens to generate at most", ge=1),
    Param("min_new_tokens", int, 0, "tokens to generate before EOS may end the answer", ge=0),
    Param("do_sample", bool, False, "sample (true) or decode greedily (false)"),
    Param("temperature", float, 1.0, "softmax temperature when sampling", ge=0, le=100),
    Param("top_p", float, 1.0, "nucleus sampling mass", gt=0, le=1),
    Param("top_k", int, 50, "sample among the k most likely tokens (0: all)", ge=0),
    Param("repetition_penalty", float, 1.0, "HF's penalty on tokens already in the sequence", gt=0, le=100),
    Param("num_beams", int, 1, "beam search width (1: none)", ge=1, le=16),
    Param("length_penalty", float, 1.0, "beam search length penalty", ge=-100, le=100),
    Param("presence_penalty", float, 0.0, "OpenAI's penalty on tokens generated at all", ge=-2, le=2, setting=False),
    Param("frequency_penalty", float, 0.0, "OpenAI's penalty per time a token was generated", ge=-2, le=2,
          setting=False),
    Param("seed", int, None, "seed of this request's sampling", ge=0, le=2**63 - 1, setting=False),
    Param("logprobs", int, None, "alternatives per token to report with its logprob", ge=0, le=20, setting=False),
)}


def wire(name: str, **narrower: float) -> Any:
    """An optional body field carrying parameter ``name`` (None = the configured default), with
    the table's range, optionally narrowed by the dialect (OpenAI's temperature is at most 2)."""
    return Field(default=None, description=PARAMS[name].doc, **PARAMS[name].bounds(**narrower))


def settings_fields() -> dict[str, tuple[Any, Any]]:
    """The ``KVBENTO_<NAME>`` default settings, as pydantic field definitions."""
    return {p.name: (p.type, Field(default=p.default, description=p.doc, **p.bounds()))
            for p in PARAMS.values() if p.setting}
