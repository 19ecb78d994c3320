"""Slot-buffer decode steps (the CUDA graph path run eagerly on CPU) against plain decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from personalign import generation
from personalign.generation import (
    GenerationConfig,
    decode_one_token,
    generate_tokens,
    new_cache,
    prefill,
    sample,
)
from personalign.graph_decode import (
    KEPT_GRAPHS,
    SLOT_ROUNDING,
    GraphDecoder,
    SlotSteps,
    graph_decoder,
)
from personalign.memory_cache import Positions
from personalign.streaming_dialogue import StreamingDialogueCache
from tests.conftest import random_utterance

BOS, EOU = 1, 2  # as in tests/conftest.py
GREEDY = GenerationConfig(temperature=0, max_new_tokens=20)


def _memory(model, turns: int) -> StreamingDialogueCache:
    """A StreamingDialogue memory (distance rule, so new tokens sit past the cache length) of ``turns`` utterances."""
    cache = StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("distance", model))
    for seed in range(turns):
        ids = [*([BOS] if seed == 0 else []), *random_utterance(seed, 9), EOU]
        prefill(model, torch.tensor([ids]), cache)
        cache.compress(ids)
    return cache


def _decode(model, cache, prompt: list[int], steps: int, decoder: GraphDecoder | None) -> list[int]:
    """Greedy tokens after ``prompt``, decoding on ``cache`` step by step or through ``decoder``."""
    logits = prefill(model, torch.tensor([prompt]), cache)
    run = decoder.begin(cache, steps) if decoder is not None else None
    tokens = []
    for _ in range(steps):
        token = sample(logits, GREEDY)  # (1, 1)
        tokens.append(int(token))
        logits = run.step(token) if run is not None else decode_one_token(model, token, cache)
    if run is not None:
        run.finish()
    return tokens


@pytest.mark.parametrize("make_cache", [lambda m: new_cache(m), lambda m: _memory(m, 6)], ids=["dynamic", "memory"])
def test_slot_steps_decode_like_plain_steps_and_leave_the_same_cache(tiny_llm, make_cache) -> None:
    model, prompt = tiny_llm.model, random_utterance(99, 7)
    plain_cache, slot_cache = make_cache(model), make_cache(model)
    plain = _decode(model, plain_cache, prompt, 16, None)
    slotted = _decode(model, slot_cache, prompt, 16, GraphDecoder(model, capture=False))
    assert slotted == plain
    assert slot_cache.get_seq_length() == plain_cache.get_seq_length()
    for ours, theirs in zip(slot_cache.layers, plain_cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-5)


def test_a_memory_decoded_in_slots_compresses_as_before(tiny_llm) -> None:
    model = tiny_llm.model
    cache = _memory(model, 4)
    before = cache.get_seq_length()
    prompt = [*random_utterance(7, 5), EOU, *random_utterance(8, 3)]
    reply = _decode(model, cache, prompt, 6, GraphDecoder(model, capture=False))
    assert cache.get_seq_length() == before + len(prompt) + len(reply)  # _decode feeds every token it picks
    prefill(model, torch.tensor([[EOU]]), cache)
    cache.compress([*prompt, *reply, EOU])
    assert cache.cached_tokens[-1] == EOU and cache.get_seq_length() < before + len(prompt) + len(reply) + 1


def test_finish_appends_the_fed_entries_once(tiny_llm) -> None:
    model = tiny_llm.model
    cache = new_cache(model)
    logits = prefill(model, torch.tensor([random_utterance(1, 5)]), cache)
    run = GraphDecoder(model, capture=False).begin(cache, 8)
    for _ in range(3):
        logits = run.step(sample(logits, GREEDY))
    assert cache.get_seq_length() == 5  # the steps write only the slots until finish
    run.finish()
    run.finish()
    assert cache.get_seq_length() == 8


def test_buffers_are_rounded_and_only_the_newest_sizes_kept(tiny_llm) -> None:
    model = tiny_llm.model
    decoder = GraphDecoder(model, capture=False)
    cache = new_cache(model)
    prefill(model, torch.tensor([random_utterance(1, 5)]), cache)
    sizes = []
    for room in (10, SLOT_ROUNDING, 2 * SLOT_ROUNDING, 10):
        sizes.append(decoder.begin(cache, room).steps.capacity)
    assert sizes == [SLOT_ROUNDING, 2 * SLOT_ROUNDING, 3 * SLOT_ROUNDING, SLOT_ROUNDING]
    assert len(decoder._steps) == KEPT_GRAPHS
    kept = decoder._steps[SLOT_ROUNDING]
    assert decoder.begin(cache, 10).steps is kept  # the same size is served by the same buffers
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # the weights move
    try:
        assert decoder.begin(cache, 10).steps is not kept  # a graph of the old addresses is dropped
    finally:
        model.tie_weights()


def test_caches_the_slots_cannot_stand_for_are_left_to_plain_decoding(tiny_llm) -> None:
    model = tiny_llm.model
    decoder = GraphDecoder(model, capture=False)
    assert decoder.begin(DynamicCache(), 4) is None  # nothing prefilled yet
    cache = new_cache(model)
    prefill(model, torch.tensor([random_utterance(1, 5)]), cache)
    assert decoder.begin(cache, 0) is None
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    sliding.update(*(torch.zeros(1, 2, 3, 16) for _ in range(2)))
    cache.layers[0] = sliding  # a layer that drops entries on its own
    assert decoder.begin(cache, 4) is None
    decoder.broken = True
    assert decoder.begin(new_cache(model), 4) is None


def test_no_graph_decoder_off_cuda(tiny_llm) -> None:
    assert graph_decoder(tiny_llm.model) is None


def test_forget_drops_a_models_decoder(tiny_llm) -> None:
    from personalign import graph_decode

    graph_decode._decoders[tiny_llm.model] = GraphDecoder(tiny_llm.model, capture=False)
    graph_decode.forget(tiny_llm.model)
    graph_decode.forget(tiny_llm.model)  # nothing left to drop: no error
    assert tiny_llm.model not in graph_decode._decoders


def test_generate_tokens_through_the_slots_and_back_after_a_failure(tiny_llm, monkeypatch, caplog) -> None:
    model, prompt = tiny_llm.model, torch.tensor([random_utterance(5, 8)])
    stops = tiny_llm.stop_token_ids
    plain_cache = new_cache(model)
    plain = list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=plain_cache))
    decoder = GraphDecoder(model, capture=False)
    monkeypatch.setattr(generation, "graph_decoder", lambda m: decoder)
    cache = new_cache(model)
    assert list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=cache)) == plain
    assert cache.get_seq_length() == plain_cache.get_seq_length()
    # Closed early, the cache still holds every token fed.
    cache = new_cache(model)
    tokens = generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=cache)
    assert [next(tokens) for _ in range(5)] == plain[:5]
    tokens.close()
    assert cache.get_seq_length() == prompt.shape[1] + 4

    calls = []
    original = SlotSteps.step

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("capture failed")
        return original(self, *args)

    monkeypatch.setattr(SlotSteps, "step", flaky)
    cache = new_cache(model)
    assert list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=cache)) == plain
    assert cache.get_seq_length() == plain_cache.get_seq_length()
    assert decoder.broken and "decoding step by step" in caplog.text
    assert list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=new_cache(model))) == plain
    assert len(calls) == 3  # a broken decoder is not tried again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_steps_decode_like_plain_steps_on_cuda(tiny_llm) -> None:
    model = tiny_llm.model.to("cuda")
    try:
        prompt = random_utterance(99, 7)
        plain = _decode(model, new_cache(model), prompt, 16, None)
        assert _decode(model, new_cache(model), prompt, 16, GraphDecoder(model, capture=True)) == plain
    finally:
        model.to("cpu")


@pytest.mark.parametrize("policy", ["streaming-dialogue", "streaming-llm"])
def test_engine_turns_through_the_slots_leave_the_memory_step_by_step_turns_leave(tiny_llm, monkeypatch,
                                                                                  policy) -> None:
    from personalign.engine import Engine

    turns = ["My code is 4721", "What is it?", "And again?"]
    config = GenerationConfig(max_new_tokens=12, temperature=0)

    def chat(engine: Engine) -> tuple[list[str], object]:
        memory, replies = engine.empty_memory(policy), []
        for text in turns:
            stream = engine.stream_turn(memory, [{"role": "user", "content": text}], config)
            replies.append(list(stream)[-1])
        return replies, memory.cache

    plain_replies, plain = chat(Engine(tiny_llm))
    decoder = GraphDecoder(tiny_llm.model, capture=False)
    monkeypatch.setattr(generation, "graph_decoder", lambda m: decoder)
    replies, ours = chat(Engine(tiny_llm))
    assert replies == plain_replies
    assert decoder._steps  # the slots were used
    assert ours.cached_tokens == plain.cached_tokens and ours.rope_positions == plain.rope_positions
    for a, b in zip(ours.layers, plain.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
