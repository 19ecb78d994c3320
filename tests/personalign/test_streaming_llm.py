"""StreamingLLM baseline cache: sinks + window eviction, turns and memory on the tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch

from personalign.generation import (
    GenerationConfig,
    decode_one_token,
    generate_tokens,
    prefill,
)
from personalign.memory_cache import close_turn
from personalign.streaming_llm import (
    StreamingLLMCache,
    StreamingLLMConfig,
    sink_window_indices,
)
from tests.conftest import random_utterance

BOS, EOU = 1, 2  # as in tests/conftest.py (and SmolLM2)
GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)


def _feed(model, ids: list[int], cache) -> torch.Tensor:
    """Run ``ids`` through the model into ``cache``; return last-position logits (1, V)."""
    return prefill(model, torch.tensor([ids]), cache)


def _encode(llm, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"]


# --- config and the pure policy ----------------------------------------------------------------


def test_config_is_checked() -> None:
    assert StreamingLLMConfig().capacity == 4 + 256
    for bad in ({"sink_tokens": -1}, {"window": 0}, {"window": 2.5}, {"sink_tokens": True}):
        with pytest.raises(ValueError):
            StreamingLLMConfig(**bad)
    with pytest.raises(TypeError):
        StreamingLLMCache(config={"window": 8})


def test_sink_window_indices() -> None:
    assert sink_window_indices(10, 2, 3) == [0, 1, 7, 8, 9]
    assert sink_window_indices(5, 2, 3) == [0, 1, 2, 3, 4]  # fits: nothing evicted
    assert sink_window_indices(6, 0, 3) == [3, 4, 5]  # no sinks: a plain sliding window
    assert sink_window_indices(6, 1, 1) == [0, 5]


# --- eviction ---------------------------------------------------------------------------------


def test_compress_keeps_sinks_and_window_on_every_layer(tiny_llm) -> None:
    ids = [BOS, *random_utterance(0, 9), *random_utterance(1, 7)]  # 17 tokens
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=2, window=5))
    _feed(tiny_llm.model, ids, cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]  # (B, H, T, D) each

    kept = cache.compress(ids)

    assert kept == [0, 1, 12, 13, 14, 15, 16]
    assert cache.kept_positions == kept
    assert cache.cached_tokens == [ids[i] for i in kept]
    assert cache.get_seq_length() == 7
    assert len(cache.layers) == tiny_llm.model.config.num_hidden_layers
    index = torch.tensor(kept)
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys[:, :, index])
        assert torch.equal(layer.values, values[:, :, index])


def test_sinks_stay_the_first_dialogue_tokens_across_turns(tiny_llm) -> None:
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=4, window=6))
    first = [BOS, 5, 6]  # shorter than the sinks: nothing evicted yet
    _feed(tiny_llm.model, first, cache)
    cache.compress(first)
    stream = list(first)
    for seed in range(4):
        utterance = random_utterance(seed, 5)
        _feed(tiny_llm.model, utterance, cache)
        cache.compress(utterance)
        stream += utterance
        assert cache.cached_tokens[:4] == stream[:4]
        assert cache.kept_positions[:4] == [0, 1, 2, 3]
        assert cache.cached_tokens[4:] == stream[4:][-6:]
        assert cache.kept_positions[-1] == len(stream) - 1
        assert all(layer.keys.shape[-2] == len(cache.cached_tokens) for layer in cache.layers)
    assert cache.tokens_seen == len(stream)


def test_compress_checks_the_ids_match_the_cache(tiny_llm) -> None:
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=2))
    _feed(tiny_llm.model, [BOS, 7, EOU], cache)
    with pytest.raises(ValueError, match="cache holds 3"):
        cache.compress([BOS, 7])


# --- positions --------------------------------------------------------------------------------


def test_after_compress_next_token_is_placed_at_the_compressed_length(tiny_llm) -> None:
    model = tiny_llm.model
    ids = [BOS, *random_utterance(2, 11), *random_utterance(3, 8)]  # 20 tokens
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=6))
    _feed(model, ids, cache)
    kept = cache.compress(ids)

    compressed = len(kept)
    assert compressed == 7
    assert cache.get_seq_length() == compressed
    # kept keys keep their rotation: their recorded positions are the original ones
    assert cache.rope_positions == kept == [0, 14, 15, 16, 17, 18, 19]

    token = torch.tensor([[40]])  # (1, 1)
    explicit = copy.deepcopy(cache)
    absolute = copy.deepcopy(cache)
    logits = decode_one_token(model, token, cache)
    with torch.inference_mode():
        at_compressed = model(input_ids=token, past_key_values=explicit, position_ids=torch.tensor([[compressed]]))
        at_absolute = model(input_ids=token, past_key_values=absolute, position_ids=torch.tensor([[len(ids)]]))
    torch.testing.assert_close(logits, at_compressed.logits[:, -1])
    assert not torch.allclose(logits, at_absolute.logits[:, -1])

    # The next compress records the new entry at the compressed length, its absolute index at
    # the dialogue length, and evicts the oldest window entry.
    cache.compress([40])
    assert cache.rope_positions == [0, 15, 16, 17, 18, 19, compressed]
    assert cache.kept_positions == [0, 15, 16, 17, 18, 19, len(ids)]


# --- behaviour inside and across turns --------------------------------------------------------


def test_a_turn_longer_than_the_window_decodes_like_the_default_cache(tiny_llm) -> None:
    """Eviction waits for compress: inside a turn the cache is a plain DynamicCache."""
    model = tiny_llm.model
    prompt = [BOS, *_encode(tiny_llm, "A prompt that is much longer than the tiny window of this cache.")]
    stops = tiny_llm.stop_token_ids
    plain = list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops))
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=4))
    ours = list(generate_tokens(model, prompt, GREEDY, stop_token_ids=stops, cache=cache))
    assert ours == plain
    assert cache.get_seq_length() > cache.config.capacity


def test_with_a_window_larger_than_everything_generation_equals_plain(tiny_llm) -> None:
    """Several turns, compressing between them: nothing is evicted, so replies match a dense cache."""
    model = tiny_llm.model
    stops = tiny_llm.stop_token_ids
    ours = StreamingLLMCache(StreamingLLMConfig(sink_tokens=4, window=10_000))
    dense: list[int] = []  # the whole dialogue, re-generated from scratch each turn
    turns = ["Hello there.", "What did I just say?", "And before that?"]
    for turn, text in enumerate(turns):
        user = [*([BOS] if turn == 0 else []), *_encode(tiny_llm, text), EOU]
        dense += user
        plain_reply = list(generate_tokens(model, dense, GREEDY, stop_token_ids=stops))
        reply = list(generate_tokens(model, user, GREEDY, stop_token_ids=stops, cache=ours))
        assert reply == plain_reply
        assert len(reply) > 0
        close_turn(model, ours, [*user, *reply, EOU])
        dense += [*reply, EOU]
        assert ours.cached_tokens == dense
        assert ours.kept_positions == ours.rope_positions == list(range(len(dense)))


def test_close_turn_feeds_the_unfed_tail(tiny_llm) -> None:
    model = tiny_llm.model
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=3))
    prompt = [BOS, *_encode(tiny_llm, "Hi")]
    reply = list(generate_tokens(model, prompt, GREEDY, stop_token_ids=tiny_llm.stop_token_ids, cache=cache))
    kept = close_turn(model, cache, [*prompt, *reply, EOU])
    total = len(prompt) + len(reply) + 1
    assert kept == [0, total - 3, total - 2, total - 1]
    assert cache.cached_tokens[-1] == EOU
    _feed(model, [5, 6], cache)
    with pytest.raises(ValueError, match="took 2 tokens"):
        close_turn(model, cache, [5])


# --- memory -----------------------------------------------------------------------------------


def test_kv_bytes_shrink_on_eviction_then_stay_flat(tiny_llm) -> None:
    model = tiny_llm.model
    config = StreamingLLMConfig(sink_tokens=2, window=8)
    cache = StreamingLLMCache(config)
    per_entry = 0
    after = []
    for seed in range(6):
        utterance = ([BOS] if seed == 0 else []) + random_utterance(seed, 6)
        _feed(model, utterance, cache)
        fed, fed_entries = cache.kv_bytes(), cache.get_seq_length()
        cache.compress(utterance)
        after.append(cache.kv_bytes())
        per_entry = fed // fed_entries
        assert after[-1] <= fed
        assert after[-1] == per_entry * cache.get_seq_length()
    # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes (float32) per entry
    assert per_entry == 2 * 2 * 2 * 16 * 4
    assert after[-1] == after[-2] == after[-3] == per_entry * config.capacity
    assert after[0] < after[-1]


# --- saving -----------------------------------------------------------------------------------


def test_export_and_load_state_round_trip(tiny_llm) -> None:
    model = tiny_llm.model
    config = StreamingLLMConfig(sink_tokens=1, window=5)
    cache = StreamingLLMCache(config)
    ids = [BOS, *random_utterance(4, 12)]
    _feed(model, ids, cache)
    cache.compress(ids)
    state = cache.export_state()

    restored = StreamingLLMCache(config)
    restored.load_state(state, "cpu")
    assert restored.cached_tokens == cache.cached_tokens
    assert restored.rope_positions == cache.rope_positions
    assert restored.tokens_seen == cache.tokens_seen
    token = torch.tensor([[50]])  # (1, 1)
    torch.testing.assert_close(decode_one_token(model, token, restored), decode_one_token(model, token, cache))

    # Entries kept by another policy are not a valid state of this one.
    with pytest.raises(ValueError, match="StreamingDialogueCache"):
        StreamingLLMCache(config).load_state({**state, "policy": "StreamingDialogueCache"}, "cpu")
