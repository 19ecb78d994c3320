"""Position rules of the compressing caches (Positions, RopeShift): arithmetic, and what each makes the model compute."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from personalign.generation import decode_one_token, position_ids_after, prefill
from personalign.memory_cache import POSITION_RULES, GrowingLayer, Positions, RopeShift
from personalign.streaming_dialogue import (
    StreamingDialogueCache,
    additive_mask,
    streaming_dialogue_mask,
)
from personalign.streaming_llm import StreamingLLMCache, StreamingLLMConfig
from tests.conftest import random_utterance

BOS, EOU = 1, 2  # as in tests/conftest.py (and SmolLM2)


def _dialogue(lengths: list[int]) -> list[list[int]]:
    utterances = [random_utterance(seed, n) for seed, n in enumerate(lengths)]
    utterances[0] = [BOS, *utterances[0]]
    return utterances


def _fed(model, utterances: list[list[int]], positions: Positions) -> StreamingDialogueCache:
    """A StreamingDialogue cache under ``positions``, each utterance fed and compressed in turn."""
    cache = StreamingDialogueCache(EOU, BOS, positions=positions)
    for ids in utterances:
        prefill(model, torch.tensor([ids]), cache)
        cache.compress(ids)
    return cache


def _layer0_keys(model, ids: list[int], positions: list[int]) -> torch.Tensor:
    """Layer-0 keys of ``ids`` rotated at ``positions``: (1, H, T, D); layer 0 sees RoPE alone."""
    cache = StreamingLLMCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=torch.tensor([positions]))
    return cache.layers[0].keys


# --- the rule itself --------------------------------------------------------------------------


def test_positions_are_checked(tiny_llm) -> None:
    shift = RopeShift.from_model(tiny_llm.model)
    assert Positions().rule == "compressed" and POSITION_RULES == ("compressed", "slot", "distance")
    for bad in (
        {"rule": "absolute", "shift": shift},
        {"rule": "slot"},  # re-rotating needs the model's frequencies
        {"rule": "distance"},
        {"rule": "compressed", "shift": shift},
        {"rule": "slot", "shift": shift, "max_distance": 8},  # only distance has a cap
        {"rule": "distance", "shift": shift, "max_distance": 0},
        {"rule": "distance", "shift": shift, "max_distance": 2.5},
    ):
        with pytest.raises(ValueError):
            Positions(**bad)
    with pytest.raises(TypeError):
        StreamingDialogueCache(EOU, BOS, positions="slot")
    assert Positions.for_model("compressed", tiny_llm.model).shift is None
    assert Positions.for_model("distance", tiny_llm.model, max_distance=9).max_distance == 9


def test_placement_on_hand_built_positions(tiny_llm) -> None:
    shift = RopeShift.from_model(tiny_llm.model)
    kept, seen = [0, 5, 9, 10, 11], 12  # BOS, an EoU, and the latest utterance 9..11; next token is 12
    rope = [0, 5, 9, 10, 11]
    assert Positions().place(kept, [0, 3, 4, 5, 6], seen) == ([0, 3, 4, 5, 6], 5)  # next at the cache length
    assert Positions("slot", shift).place(kept, rope, seen) == ([0, 1, 2, 3, 4], 5)
    # Every key keeps its true distance to the next token, which goes to its dialogue index.
    assert Positions("distance", shift).place(kept, rope, seen) == (rope, 12)
    # More than 4 back: moved forward to 2 back, where it stays until it is 4 back again.
    assert Positions("distance", shift, max_distance=4).place(kept, rope, seen) == ([10, 10, 9, 10, 11], 12)
    assert Positions("distance", shift, max_distance=4).place(kept, [10, 10, 9, 10, 11], 14) == (
        [10, 10, 12, 10, 11], 14)


def test_rope_shift_moves_keys_to_other_positions(tiny_llm) -> None:
    model = tiny_llm.model
    ids = [BOS, 40, 41, 42, 43]
    at = [0, 1, 2, 3, 4]
    moved = [0, 9, 3, 2, 30]
    shift = RopeShift.from_model(model)
    delta = torch.tensor(moved) - torch.tensor(at)
    torch.testing.assert_close(shift(_layer0_keys(model, ids, at), delta), _layer0_keys(model, ids, moved))
    keys = _layer0_keys(model, ids, at)
    # A zero turn is exact, so a cache may turn only the keys that move (in bf16 too).
    assert torch.equal(shift(keys, torch.zeros(5, dtype=torch.long)), keys)
    assert torch.equal(shift(keys.bfloat16(), torch.zeros(5, dtype=torch.long)), keys.bfloat16())
    torch.testing.assert_close(shift(keys, delta)[:, :, 1:2], shift(keys[:, :, 1:2], delta[1:2]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dims"):
        shift(keys[..., :8], delta)


def test_under_the_slot_rule_compress_moves_kept_keys_to_their_slots(tiny_llm) -> None:
    model = tiny_llm.model
    ids = [BOS, *random_utterance(6, 11), *random_utterance(7, 8)]  # 20 tokens
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=2, window=5), positions=Positions.for_model("slot", model))
    prefill(model, torch.tensor([ids]), cache)
    kept = cache.compress(ids)

    assert kept == [0, 1, 15, 16, 17, 18, 19]  # the same entries as without the shift
    assert cache.rope_positions == list(range(7))
    kept_ids = [ids[i] for i in kept]
    torch.testing.assert_close(cache.layers[0].keys, _layer0_keys(model, kept_ids, list(range(7))))

    # New tokens follow at the compressed length, after every kept key; the next compress
    # moves the window's keys to their new slots again.
    turn = random_utterance(8, 4)
    prefill(model, torch.tensor([turn]), cache)
    cache.compress(turn)
    assert cache.rope_positions == list(range(7))
    assert cache.kept_positions == [0, 1, 19, 20, 21, 22, 23]
    torch.testing.assert_close(cache.layers[0].keys, _layer0_keys(model, cache.cached_tokens, list(range(7))))
    assert copy.deepcopy(cache).positions is cache.positions  # stateless: copies share it


# --- what the model computes under each rule ----------------------------------------------------


@torch.inference_mode()
def _last_utterance_logits(model, utterances: list[list[int]], positions: Positions) -> torch.Tensor:
    """Logits over the last utterance, every earlier one fed and compressed turn by turn: (T, V)."""
    cache = _fed(model, utterances[:-1], positions)
    ids = torch.tensor([utterances[-1]])  # (1, T)
    return model(input_ids=ids, past_key_values=cache, position_ids=position_ids_after(cache, ids.shape[1], "cpu")).logits[0]


def test_distance_rule_equals_one_masked_forward_of_the_whole_dialogue(tiny_llm) -> None:
    """The trained setting: every utterance sees BOS, earlier EoUs and the previous utterance at true distances."""
    model = tiny_llm.model
    utterances = _dialogue([6, 9, 4, 7, 5, 8])
    ids = [t for u in utterances for t in u]
    mask = additive_mask(streaming_dialogue_mask(ids, EOU, BOS), torch.float32)  # (1, 1, T, T)
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0]  # (T, V)
    expected = full[-len(utterances[-1]):]

    distance = _last_utterance_logits(model, utterances, Positions.for_model("distance", model))
    torch.testing.assert_close(distance, expected, atol=1e-4, rtol=1e-4)
    # The other rules place the kept keys elsewhere, so they compute something else.
    for rule in ("compressed", "slot"):
        assert not torch.allclose(_last_utterance_logits(model, utterances, Positions.for_model(rule, model)),
                                  expected, atol=1e-3)


def test_a_capped_distance_puts_older_keys_at_the_cap(tiny_llm) -> None:
    model = tiny_llm.model
    utterances = _dialogue([5, 6, 4, 6])  # 22 tokens
    cache = _fed(model, utterances, Positions.for_model("distance", model, max_distance=8))
    kept, seen = cache.kept_positions, cache.tokens_seen
    assert kept == [0, 5, 11, 15, 16, 17, 18, 19, 20, 21] and seen == 22
    # BOS (moved at 12 and 22) and the first two EoUs fell more than 8 behind: now 4 behind.
    assert cache.rope_positions == [18, 18, 18, 15, 16, 17, 18, 19, 20, 21]
    assert cache.position_offset == seen - len(kept)
    torch.testing.assert_close(cache.layers[0].keys, _layer0_keys(model, cache.cached_tokens, cache.rope_positions))


def test_distance_rule_keeps_streaming_llm_windows_at_true_distances(tiny_llm) -> None:
    model = tiny_llm.model
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=4), positions=Positions.for_model("distance", model))
    ids = [BOS, *random_utterance(3, 12)]
    prefill(model, torch.tensor([ids]), cache)
    assert cache.compress(ids) == [0, 9, 10, 11, 12]
    assert cache.rope_positions == [0, 9, 10, 11, 12] and cache.position_offset == 13 - 5


def test_decoding_after_a_distance_compress_goes_on_from_the_dialogue_index(tiny_llm) -> None:
    model = tiny_llm.model
    utterances = _dialogue([6, 9, 4])
    cache = _fed(model, utterances, Positions.for_model("distance", model))
    assert position_ids_after(cache, 2, "cpu").tolist() == [[20, 21]]
    assert position_ids_after(StreamingDialogueCache(EOU, BOS), 2, "cpu") is None  # the model's default
    token = torch.tensor([[40]])  # (1, 1)
    twin = copy.deepcopy(cache)
    with torch.inference_mode():
        explicit = model(input_ids=token, past_key_values=twin, position_ids=torch.tensor([[20]])).logits[:, -1]
    torch.testing.assert_close(decode_one_token(model, token, cache), explicit)
    assert position_ids_after(cache, 1, "cpu").tolist() == [[21]]



def test_the_span_is_what_a_new_token_reads_across_under_each_rule(tiny_llm) -> None:
    model = tiny_llm.model
    utterances = _dialogue([5, 6, 4, 6])  # 22 tokens, 10 kept
    assert StreamingDialogueCache(EOU, BOS).position_span == 0
    # Capped: the next token (22) reads back to the oldest key left uncapped (15), not to BOS.
    capped = _fed(model, utterances, Positions.for_model("distance", model, max_distance=8))
    assert capped.position_span == 22 - 15 < len(capped.cached_tokens)
    assert _fed(model, utterances, Positions.for_model("distance", model)).position_span == 22  # back to BOS at 0
    assert _fed(model, utterances, Positions.for_model("slot", model)).position_span == 10  # slots 0..9, next 10
    # Compressed: the last utterance was fed from 7 (the length before it), so its keys sit at
    # 7..12, while the next token goes to 10: the span runs to the keys beyond it.
    compressed = _fed(model, utterances, Positions())
    assert compressed.rope_positions[-6:] == list(range(7, 13)) and compressed.position_offset == 0
    assert compressed.position_span == 13

# --- saving -----------------------------------------------------------------------------------


def test_a_state_saved_under_one_rule_loads_only_under_it(tiny_llm) -> None:
    model = tiny_llm.model
    utterances = _dialogue([5, 6, 4])
    cache = _fed(model, utterances, Positions.for_model("distance", model))
    state = cache.export_state()
    assert state["positions"] == "distance"
    with pytest.raises(ValueError, match="distance position rule, not slot"):
        StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("slot", model)).load_state(state, "cpu")
    with pytest.raises(ValueError, match="unrecorded"):
        StreamingDialogueCache(EOU, BOS, positions=cache.positions).load_state(
            {k: v for k, v in state.items() if k != "positions"}, "cpu")

    # Under another cap the loaded keys are moved to where that cap puts them.
    capped = StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("distance", model, max_distance=3))
    capped.load_state(state, "cpu")
    assert capped.rope_positions == [15, 15, 15, 15, 13, 14, 15] != cache.rope_positions
    torch.testing.assert_close(capped.layers[0].keys,
                               _layer0_keys(model, capped.cached_tokens, capped.rope_positions))


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 4, generator=generator), torch.randn(1, 2, n, 4, generator=generator)  # (B, H, T, D)


def test_a_growing_layer_appends_in_place_and_holds_what_concatenation_would() -> None:
    layer, plain = GrowingLayer(), DynamicLayer()
    with torch.inference_mode():
        for step, n in enumerate([5, 1, 1, 3]):
            keys, values = layer.update(*_kv(n, step))
            expected = plain.update(*_kv(n, step))
            assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
            if step == 1:
                before, storage = keys, keys.untyped_storage().data_ptr()
        assert keys.untyped_storage().data_ptr() == storage  # no copy per step: one store since the first token
        assert before.shape[-2] == 6 and torch.equal(before, plain.keys[..., :6, :])  # old views keep their values
        assert layer.get_seq_length() == 10
        layer.keys = layer.keys.index_select(-2, torch.tensor([0, 9]))  # an eviction replaces the tensor
        layer.values = layer.values.index_select(-2, torch.tensor([0, 9]))
        keys, _ = layer.update(*_kv(1, 7))
    assert torch.equal(keys, torch.cat([plain.keys[..., [0, 9], :], _kv(1, 7)[0]], dim=-2))
    keys, _ = layer.update(*_kv(GrowingLayer.spare + 1, 8))  # outside inference mode, past the spare room
    assert keys.shape[-2] == GrowingLayer.spare + 4 and not keys.is_inference()


def test_a_growing_layer_concatenates_where_autograd_records_the_keys() -> None:
    layer = GrowingLayer()
    keys, values = _kv(3, 0)
    keys.requires_grad_(True)
    held, _ = layer.update(keys, values)
    more, _ = layer.update(*_kv(2, 1))
    (held.sum() + more.square().sum()).backward()  # an in-place write would have broken this backward
    assert keys.grad is not None and torch.equal(more[..., :3, :], keys)


def test_memory_caches_grow_in_place_and_save_only_their_entries(tiny_llm) -> None:
    cache = StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=64))  # keeps all: no eviction compacts it
    ids = random_utterance(0, 8)
    prefill(tiny_llm.model, torch.tensor([ids]), cache)
    decode_one_token(tiny_llm.model, torch.tensor([[5]]), cache)
    cache.compress([*ids, 5])
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers) and cache.get_seq_length() == 9
    state = cache.export_state()
    entries = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in state["layers"])
    stored = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in state["layers"])
    assert stored == entries  # torch.save writes whole storages: not the stores' spare room


# --- feeding many segments at once ---------------------------------------------------------


def _segments() -> list[list[int]]:
    """A dialogue cut where the app compresses: each utterance's opening part, then the rest with its EoU."""
    utterances = [[*u, EOU] for u in (random_utterance(20 + i, n) for i, n in enumerate([5, 7, 3, 6, 8, 4, 5]))]
    utterances[0] = [BOS, *utterances[0]]
    return [part for u in utterances for part in (u[:2], u[2:])]


FEED_CASES = {
    "dialogue/distance": lambda m: StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("distance", m)),
    "dialogue/capped": lambda m: StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("distance", m,
                                                                                                max_distance=12)),
    "dialogue/compressed": lambda m: StreamingDialogueCache(EOU, BOS),
    "dialogue/slot": lambda m: StreamingDialogueCache(EOU, BOS, positions=Positions.for_model("slot", m)),
    "window/slot": lambda m: StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=6),
                                               positions=Positions.for_model("slot", m)),
    "window/distance": lambda m: StreamingLLMCache(StreamingLLMConfig(sink_tokens=1, window=6),
                                                   positions=Positions.for_model("distance", m)),
}


@pytest.mark.parametrize("make", FEED_CASES.values(), ids=FEED_CASES.keys())
def test_feeding_segments_together_equals_feeding_them_one_by_one(tiny_llm, make) -> None:
    model = tiny_llm.model
    one_by_one, together = make(model), make(model)
    for segment in _segments():
        prefill(model, torch.tensor([segment]), one_by_one)
        one_by_one.compress(segment)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        together.feed(model, _segments(), max_tokens=24)
    finally:
        hook.remove()
    for name in ("cached_tokens", "kept_positions", "rope_positions", "position_offset", "tokens_seen"):
        assert getattr(together, name) == getattr(one_by_one, name), name
    for a, b in zip(together.layers, one_by_one.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    token = torch.tensor([[7]])
    torch.testing.assert_close(decode_one_token(model, token, together), decode_one_token(model, token, one_by_one),
                               atol=1e-5, rtol=1e-4)
    # 14 segments, 53 tokens: three forwards within the 24-token budget, more where compresses move kept keys.
    moving = together.positions.rule == "slot" or together.positions.max_distance is not None
    assert 3 < len(forwards) < 14 if moving else len(forwards) == 3


def test_feed_needs_a_compressed_cache_and_a_token_budget(tiny_llm) -> None:
    cache = StreamingDialogueCache(EOU, BOS)
    with pytest.raises(ValueError, match="max_tokens"):
        cache.feed(tiny_llm.model, _segments(), max_tokens=0)
    prefill(tiny_llm.model, torch.tensor([[BOS, 5]]), cache)
    with pytest.raises(ValueError, match="compressed cache"):
        cache.feed(tiny_llm.model, _segments())


def test_a_snapshot_shares_the_tensors_and_neither_cache_changes_the_other(tiny_llm) -> None:
    model = tiny_llm.model
    positions = Positions.for_model("distance", model, max_distance=12)  # turns keys as chats go on
    cache = _fed(model, _dialogue([5, 6, 4]), positions)
    snap, reference = cache.snapshot(), copy.deepcopy(cache)
    assert snap.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # nothing copied
    more = _dialogue([5, 6, 4, 7, 3])[3:]
    for twin in (cache, snap, reference):  # the original goes on first, then the snapshot, then a deep copy
        for ids in more:
            prefill(model, torch.tensor([ids]), twin)
            twin.compress(ids)
        decode_one_token(model, torch.tensor([[9]]), twin)
    for a, b in zip(snap.layers, reference.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert snap.rope_positions == reference.rope_positions == cache.rope_positions
    assert torch.equal(cache.layers[0].keys, reference.layers[0].keys)


def test_a_snapshot_and_its_original_decoding_at_once_write_their_own_slots(tiny_llm) -> None:
    model = tiny_llm.model
    cache = _fed(model, _dialogue([5, 6]), Positions())
    decode_one_token(model, torch.tensor([[4]]), cache)  # the layers now append into a store with spare room
    snap, reference = cache.snapshot(), copy.deepcopy(cache)
    decode_one_token(model, torch.tensor([[9]]), cache)
    decode_one_token(model, torch.tensor([[8]]), snap)  # would overwrite the original's slot in a shared store
    decode_one_token(model, torch.tensor([[9]]), reference)
    for a, b in zip(cache.layers, reference.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(snap.layers[-1].keys[..., -1, :], cache.layers[-1].keys[..., -1, :])
