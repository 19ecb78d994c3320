"""ModelConfig validation, load errors, end-of-turn detection and loading by path."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from personalign.embedded import EMBEDDED_MODEL
from personalign.generation import GenerationConfig, generate_tokens
from personalign.models import (
    ADAPTER_METADATA,
    ModelConfig,
    ModelLoadError,
    apply_adapter,
    base_fingerprint,
    find_eou_token_id,
    load_model,
)


@pytest.fixture()
def no_cuda(monkeypatch):
    """Behave like a CPU-only machine even where a GPU exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


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


# --- LoRA adapters (ModelConfig.adapter, apply_adapter) ---------------------------------------------


def _save_adapter(model, folder: Path, meta: dict | None = None) -> Path:
    """A random (non-zero) q/v LoRA adapter for ``model``, saved as peft does, with optional metadata."""
    import json

    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft probes a deprecated transformers property
        torch.manual_seed(1)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), lora).save_pretrained(folder)
    if meta is not None:
        (folder / ADAPTER_METADATA).write_text(json.dumps(meta))
    return folder


def _meta(loaded, **changes) -> dict:
    return {"base_model": loaded.name, "base_config": base_fingerprint(loaded.model),
            "eou_token_id": loaded.eou_token_id, **changes}


def test_adapter_option_is_checked(tmp_path):
    assert ModelConfig().adapter is None
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig(adapter=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        ModelConfig(adapter=tmp_path / "file")
    with pytest.raises(ModelLoadError, match="holds no adapter_config.json"):
        ModelConfig(adapter=str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    assert ModelConfig(adapter=str(tmp_path)).adapter == tmp_path


def test_adapter_is_merged_on_an_unquantized_base(tiny_folder, tiny_llm, tmp_path, no_cuda):
    base = load_model(ModelConfig(model=str(tiny_folder)))
    adapter = _save_adapter(base.model, tmp_path / "adapter", _meta(base))
    loaded = load_model(ModelConfig(model=str(tiny_folder), adapter=adapter))
    assert loaded.adapter == adapter and type(loaded.model) is type(base.model)  # merged: a plain model again
    assert loaded.adapter_metadata == _meta(base) and base.adapter_metadata == {}  # read once, at load
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    ids = torch.tensor([[1, 80, 81, 82, 2, 1, 83]])
    with torch.no_grad():
        merged, plain = loaded.model(ids).logits, base.model(ids).logits
    assert not torch.allclose(merged, plain, atol=1e-4)
    # The quantized path keeps the peft wrapper unmerged; it computes the same function.
    unmerged = apply_adapter(dataclasses.replace(base, quantization="4bit"), adapter)
    assert type(unmerged.model).__name__.startswith("PeftModel")
    with torch.no_grad():
        torch.testing.assert_close(unmerged.model(ids).logits, merged, rtol=1e-4, atol=1e-4)


def test_adapter_for_another_model_is_refused(tiny_folder, tmp_path, no_cuda):
    base = load_model(ModelConfig(model=str(tiny_folder)))
    other = _save_adapter(base.model, tmp_path / "other", _meta(base, base_model="SmolLM2-135M-Instruct"))
    with pytest.raises(ModelLoadError, match="trained for SmolLM2-135M-Instruct, not"):
        load_model(ModelConfig(model=str(tiny_folder), adapter=other))
    sinks = _save_adapter(base.model, tmp_path / "sinks", _meta(base, eou_token_id=0))
    with pytest.raises(ModelLoadError, match="end-of-utterance token 0"):
        load_model(ModelConfig(model=str(tiny_folder), adapter=sinks))


def test_adapter_metadata_under_its_first_name_is_still_read(tiny_folder, tmp_path, no_cuda):
    base = load_model(ModelConfig(model=str(tiny_folder)))
    old = _save_adapter(base.model, tmp_path / "old")
    # Memory adapters trained before the file was renamed carry personalign-memory.json.
    (old / "personalign-memory.json").write_text(json.dumps(_meta(base, base_model="SmolLM2-135M-Instruct")))
    with pytest.raises(ModelLoadError, match="trained for SmolLM2-135M-Instruct, not"):
        load_model(ModelConfig(model=str(tiny_folder), adapter=old))


def test_adapter_of_another_shape_is_refused(tiny_folder, tmp_path, no_cuda):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = load_model(ModelConfig(model=str(tiny_folder)))
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with_meta = _save_adapter(narrow, tmp_path / "meta", _meta(base, base_config=base_fingerprint(narrow)))
    with pytest.raises(ModelLoadError, match="shape differs.*hidden_size 32 vs 64"):
        load_model(ModelConfig(model=str(tiny_folder), adapter=with_meta))
    plain = _save_adapter(narrow, tmp_path / "plain")  # a bare peft adapter: peft's own shape check
    with pytest.raises(ModelLoadError, match="does not fit model"):
        load_model(ModelConfig(model=str(tiny_folder), adapter=plain))
