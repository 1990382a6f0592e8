"""The served model name: KVBENTO_MODEL_NAME, else a local model directory's own name, else the hub id."""

from __future__ import annotations

from config import Settings


def test_default_name_is_the_directory_name(tmp_path, monkeypatch):
    tiny_model_dir = tmp_path / "kvbento-tiny"
    tiny_model_dir.mkdir()
    monkeypatch.delenv("KVBENTO_MODEL_NAME", raising=False)
    assert Settings(model=str(tiny_model_dir)).served_model_name == "kvbento-tiny"
    assert Settings(model="Qwen/Qwen2.5-0.5B-Instruct").served_model_name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert Settings(model=str(tiny_model_dir), model_name="mine").served_model_name == "mine"
