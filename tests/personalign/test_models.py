"""ModelConfig validation, load errors, end-of-turn detection and loading by path."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

from personalign.embedded import EMBEDDED_MODEL
from personalign.generation import GenerationConfig, generate_tokens
from personalign.models import (
    ModelConfig,
    ModelLoadError,
    find_eou_token_id,
    load_model,
)


@pytest.fixture()
def no_cuda(monkeypatch):
    """Behave like a CPU-only machine even where a GPU exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def tiny_folder(tiny_llm, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llm.model.save_pretrained(folder)
    tiny_llm.tokenizer.save_pretrained(folder)
    return folder


def test_model_config_defaults_and_validation():
    config = ModelConfig()
    assert (config.model, config.quantize, config.device, config.cache_dir) == (EMBEDDED_MODEL, "auto", "auto", None)
    assert ModelConfig(cache_dir="/tmp/x").cache_dir == Path("/tmp/x")
    for kwargs, word in [({"quantize": "2bit"}, "quantize"), ({"device": "tpu"}, "device"), ({"model": " "}, "model")]:
        with pytest.raises(ValueError, match=word):
            ModelConfig(**kwargs)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantization_without_cuda_is_a_clear_error(no_cuda, quantize):
    with pytest.raises(ModelLoadError, match=f"{quantize[0]}-bit quantization needs a CUDA GPU.*--quantize none"):
        load_model(ModelConfig(model="any/model", quantize=quantize))


def test_quantization_on_cpu_when_a_gpu_exists_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelLoadError, match="--device cpu was chosen"):
        load_model(ModelConfig(model="any/model", device="cpu", quantize="4bit"))


def test_cuda_device_without_cuda_is_a_clear_error(no_cuda):
    with pytest.raises(ModelLoadError, match="--device cpu"):
        load_model(ModelConfig(model="any/model", device="cuda"))


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "/no/such/local/folder", "not a valid id"])
def test_unknown_model_fails_quickly(name):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="neither a local folder nor reachable") as err:
        load_model(ModelConfig(model=name, device="cpu"))
    assert name in str(err.value)
    assert time.perf_counter() - start < 10


def test_model_path_that_is_a_file(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(ModelConfig(model=str(file), device="cpu"))


def test_eou_detection_on_chatml(tiny_llm):
    assert find_eou_token_id(tiny_llm.tokenizer) == tiny_llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny_llm.eou_token_id == 2 and 2 in tiny_llm.stop_token_ids


def test_eou_detection_follows_the_template(tiny_llm):
    tok = copy.deepcopy(tiny_llm.tokenizer)
    # A template whose turns end in <unk>: the detected token must follow it, not EOS.
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<unk>{% endfor %}"
    assert find_eou_token_id(tok) == tok.convert_tokens_to_ids("<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no specials: fall back
    assert find_eou_token_id(tok) == tok.eos_token_id


def test_load_tiny_model_by_path(tiny_folder, tiny_llm, no_cuda):
    loaded = load_model(ModelConfig(model=str(tiny_folder)))  # auto on CPU -> unquantized float32
    assert loaded.name == str(tiny_folder)
    assert (loaded.device.type, loaded.quantization, loaded.dtype) == ("cpu", "none", torch.float32)
    assert loaded.eou_token_id == 2 and loaded.stop_token_ids == frozenset({2})
    assert loaded.load_seconds > 0 and not loaded.model.training
    ids = torch.tensor([[1, 80, 81, 82, 2, 1, 83]])
    config = GenerationConfig(temperature=0, max_new_tokens=8)
    assert list(generate_tokens(loaded.model, ids, config, stop_token_ids=())) == list(
        generate_tokens(tiny_llm.model, ids, config, stop_token_ids=())
    )


def test_tokenizer_without_chat_template_is_rejected(tiny_llm, tmp_path):
    tok = copy.deepcopy(tiny_llm.tokenizer)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    tiny_llm.model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not hold a complete Hugging Face causal LM"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))
