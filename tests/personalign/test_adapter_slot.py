"""The swappable persona-adapter slot: applied in place, swapped, taken off without a trace."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from personalign.adapter_slot import AdapterError, AdapterSlot, weights_name
from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.memory import MemoryPolicy
from tests.conftest import make_tiny_llm

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)
MESSAGES = [{"role": "user", "content": "hello there"}]


def _save_adapter(folder, seed: int):
    """A LoRA adapter with random (non-zero) weights, so applying it changes the model."""
    llm = make_tiny_llm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(llm.model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def llm():
    return make_tiny_llm()  # this test's own model: the slot changes it in place


@pytest.fixture
def adapters(tmp_path):
    return _save_adapter(tmp_path / "a", 1), _save_adapter(tmp_path / "b", 2)


def _logits(llm) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.inference_mode():
        return llm.model(ids).logits


def test_use_applies_swaps_and_removes_without_a_trace(llm, adapters) -> None:
    a, b = adapters
    base = _logits(llm)
    names = sorted(n for n, _ in llm.model.named_parameters())
    llm.model.lm_head.weight.requires_grad_(False)  # a flag of the base's own, to be kept as it was
    slot = AdapterSlot(llm)

    with_a = slot.use(a)
    logits_a = _logits(llm)
    assert not torch.allclose(logits_a, base)
    assert with_a.name == weights_name(llm, a) != llm.name and slot.applied == a

    slot.use(b)
    logits_b = _logits(llm)
    assert not torch.allclose(logits_b, logits_a)

    assert slot.use(None) is llm and slot.applied is None
    assert torch.equal(_logits(llm), base)
    assert sorted(n for n, _ in llm.model.named_parameters()) == names
    assert [n for n, p in llm.model.named_parameters() if not p.requires_grad] == ["lm_head.weight"]

    slot.use(a)
    assert torch.allclose(_logits(llm), logits_a)


def test_every_swap_drops_the_models_captured_graphs(llm, adapters, monkeypatch) -> None:
    from personalign import graph_decode

    dropped = []
    monkeypatch.setattr(graph_decode, "forget", lambda model: dropped.append(model))
    slot = AdapterSlot(llm)
    slot.use(adapters[0])
    slot.use(adapters[1])  # off with the one, on with the other
    slot.use(adapters[1])  # no swap
    slot.use(None)
    assert dropped == [llm.model] * 4


def test_the_same_adapter_twice_is_not_applied_again(llm, adapters) -> None:
    slot = AdapterSlot(llm)
    slot.use(adapters[0])
    wrapper = slot._wrapper
    slot.use(adapters[0])
    assert slot._wrapper is wrapper


def test_an_adapter_that_does_not_fit_is_a_clear_error_and_leaves_the_base(llm, tmp_path) -> None:
    base = _logits(llm)
    slot = AdapterSlot(llm)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="cannot be applied"):
        slot.use(empty)
    assert slot.applied is None and torch.equal(_logits(llm), base)


def test_engine_replies_with_the_adapter_and_then_without_it(llm, adapters) -> None:
    engine = Engine(llm)

    def reply(adapter=None) -> str:
        return "".join(list(engine.stream(MESSAGES, GREEDY, adapter=adapter))[-1:])  # "" if it stops at once

    plain = reply()
    assert plain
    tuned = reply(adapters[0])
    assert tuned != plain
    assert reply() == plain and reply(adapters[0]) == tuned


def test_a_memory_is_only_extended_on_the_weights_it_was_made_on(llm, adapters) -> None:
    engine = Engine(llm)
    memory = engine.empty_memory(MemoryPolicy.STREAMING_DIALOGUE, adapters[0])
    assert memory.model_name == engine.weights_name(adapters[0])
    with pytest.raises(ValueError, match="made on"):
        engine.stream_turn(memory, MESSAGES, GREEDY)
    list(engine.stream_turn(memory, MESSAGES, GREEDY, adapter=adapters[0]))
    assert memory.cached_tokens() > 0
