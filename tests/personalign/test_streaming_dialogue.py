"""StreamingDialogue mask, eviction and position rule on hand-built ids and the tiny random model."""

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
from personalign.streaming_dialogue import (
    StreamingDialogueCache,
    additive_mask,
    close_turn,
    kept_indices,
    prefill_dialogue,
    streaming_dialogue_mask,
    utterance_index,
)

BOS, EOU = 1, 2  # as in tests/conftest.py (and SmolLM2)
A, B, C = 10, 20, 30
GREEDY = GenerationConfig(temperature=0, max_new_tokens=16)


def _feed(model, ids: list[int], cache) -> torch.Tensor:
    """Run ``ids`` through the model into ``cache``; return last-position logits (1, V)."""
    return prefill(model, torch.tensor([ids]), cache)


def _prompt(llm, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return llm.tokenizer(rendered, add_special_tokens=False)["input_ids"]


# --- the mask -------------------------------------------------------------------------------


def test_utterance_index_eou_belongs_to_the_utterance_it_ends() -> None:
    assert utterance_index([BOS, A, EOU, B, EOU, C], EOU) == [0, 0, 0, 1, 1, 2]


def test_mask_on_hand_built_dialogue() -> None:
    #          0    1  2  3    4  5  6    7  8
    ids = [BOS, A, A, EOU, B, B, EOU, C, C]
    expected = torch.tensor(
        [
            # BOS a  a  E  b  b  E  c  c
            [1, 0, 0, 0, 0, 0, 0, 0, 0],  # BOS
            [1, 1, 0, 0, 0, 0, 0, 0, 0],  # a
            [1, 1, 1, 0, 0, 0, 0, 0, 0],  # a
            [1, 1, 1, 1, 0, 0, 0, 0, 0],  # EoU1
            [1, 1, 1, 1, 1, 0, 0, 0, 0],  # b: utterance 1 whole + own prefix
            [1, 1, 1, 1, 1, 1, 0, 0, 0],  # b
            [1, 1, 1, 1, 1, 1, 1, 0, 0],  # EoU2
            [1, 0, 0, 1, 1, 1, 1, 1, 0],  # c: BOS, EoU1, utterance 2 whole, own prefix
            [1, 0, 0, 1, 1, 1, 1, 1, 1],  # c
        ],
        dtype=torch.bool,
    )
    assert torch.equal(streaming_dialogue_mask(ids, EOU, BOS), expected)


def test_mask_keeps_every_earlier_eou_but_not_older_utterances() -> None:
    ids = [BOS, A, EOU, B, EOU, C, EOU, A, A]
    mask = streaming_dialogue_mask(ids, EOU, BOS)
    assert mask[8].nonzero().flatten().tolist() == [0, 2, 4, 5, 6, 7, 8]


def test_single_utterance_mask_is_causal() -> None:
    ids = [BOS, A, B, C]
    assert torch.equal(streaming_dialogue_mask(ids, EOU, BOS), torch.ones(4, 4, dtype=torch.bool).tril())


def test_additive_mask_shape_and_values() -> None:
    mask = streaming_dialogue_mask([BOS, A, EOU, B], EOU, BOS)
    out = additive_mask(mask, torch.float32)
    assert out.shape == (1, 1, 4, 4)
    assert torch.equal(out[0, 0] == 0, mask)


# --- eviction -------------------------------------------------------------------------------


def test_kept_indices_on_hand_built_ids() -> None:
    #      0    1  2  3    4  5  6  7    8  9  10
    ids = [BOS, A, A, EOU, B, B, B, EOU, C, C, EOU]
    assert kept_indices(ids, EOU) == [0, 3, 7, 8, 9, 10]
    # an open utterance after the last EoU is kept too: the next token must see it
    assert kept_indices([*ids, A, A], EOU) == [0, 3, 7, 8, 9, 10, 11, 12]
    # nothing closed, or only one utterance closed: nothing to evict
    assert kept_indices([BOS, A, A], EOU) == [0, 1, 2]
    assert kept_indices([BOS, A, EOU], EOU) == [0, 1, 2]


def test_compress_keeps_bos_earlier_eous_and_last_utterance_on_every_layer(tiny_llm) -> None:
    ids = [BOS, A, A, EOU, B, B, B, EOU, C, C, EOU]
    cache = StreamingDialogueCache(eou_id=EOU, bos_id=BOS)
    _feed(tiny_llm.model, ids, cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]  # (B, H, T, D) each

    kept = cache.compress(ids)

    assert kept == [0, 3, 7, 8, 9, 10]
    assert cache.kept_positions == kept
    assert cache.cached_tokens == [BOS, EOU, EOU, C, C, EOU]
    assert len(cache.layers) == tiny_llm.model.config.num_hidden_layers
    index = torch.tensor(kept)
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys[:, :, index])
        assert torch.equal(layer.values, values[:, :, index])


def test_compress_checks_the_ids_match_the_cache(tiny_llm) -> None:
    cache = StreamingDialogueCache(eou_id=EOU, bos_id=BOS)
    _feed(tiny_llm.model, [BOS, A, EOU], cache)
    with pytest.raises(ValueError, match="cache holds 3"):
        cache.compress([BOS, A])
    with pytest.raises(ValueError, match="not BOS"):
        cache.compress([A, A, EOU])


# --- behaviour inside a turn ------------------------------------------------------------------


def test_uncompressed_cache_generates_like_the_default_cache(tiny_llm) -> None:
    prompt = _prompt(tiny_llm, "Tell me about streaming dialogue.")
    stops = tiny_llm.stop_token_ids
    plain = list(generate_tokens(tiny_llm.model, prompt, GREEDY, stop_token_ids=stops))
    ours = list(
        generate_tokens(tiny_llm.model, prompt, GREEDY, stop_token_ids=stops, cache=StreamingDialogueCache(EOU, BOS))
    )
    assert ours == plain
    assert len(plain) > 0


def test_uncompressed_cache_matches_model_generate(tiny_llm) -> None:
    prompt = torch.tensor([_prompt(tiny_llm, "Hi!")])  # (1, T)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8, "pad_token_id": EOU}
    plain = tiny_llm.model.generate(prompt, **kwargs)
    ours = tiny_llm.model.generate(prompt, past_key_values=StreamingDialogueCache(EOU, BOS), **kwargs)
    assert torch.equal(ours, plain)


def test_masked_prefill_of_one_utterance_equals_plain_prefill(tiny_llm) -> None:
    ids = torch.tensor([[BOS, A, B, C, A]])  # no EoU: the mask is plain causal
    ours = prefill_dialogue(tiny_llm.model, ids, StreamingDialogueCache(EOU, BOS))
    plain = prefill(tiny_llm.model, ids, StreamingDialogueCache(EOU, BOS))
    torch.testing.assert_close(ours, plain)


def test_masked_prefill_differs_from_dense_once_utterances_are_hidden(tiny_llm) -> None:
    # The last token sees BOS, EoU1 and utterance 2 only; a dense prefill also sees "a a".
    ids = torch.tensor([[BOS, A, A, EOU, B, B, EOU, C]])
    masked = prefill_dialogue(tiny_llm.model, ids, StreamingDialogueCache(EOU, BOS))
    dense = prefill(tiny_llm.model, ids, StreamingDialogueCache(EOU, BOS))
    assert masked.shape == dense.shape
    assert not torch.allclose(masked, dense)


# --- after compress: positions, length, memory ----------------------------------------------


def test_after_compress_next_token_is_placed_at_the_compressed_length(tiny_llm) -> None:
    model = tiny_llm.model
    ids = [BOS, A, A, A, EOU, B, B, EOU, C, C, C, EOU]
    cache = StreamingDialogueCache(EOU, BOS)
    _feed(model, ids, cache)
    bytes_before = cache.kv_bytes()
    kept = cache.compress(ids)

    compressed = len(kept)
    assert compressed == 7  # BOS, EoU1, EoU2, c c c EoU3
    assert cache.get_seq_length() == compressed
    assert cache.kv_bytes() * len(ids) == bytes_before * compressed
    # kept keys keep their rotation: their recorded positions are the original ones
    assert cache.rope_positions == kept

    token = torch.tensor([[A]])  # (1, 1)
    explicit = copy.deepcopy(cache)
    absolute = copy.deepcopy(cache)
    logits = decode_one_token(model, token, cache)
    with torch.inference_mode():
        at_compressed = model(input_ids=token, past_key_values=explicit, position_ids=torch.tensor([[compressed]]))
        at_absolute = model(input_ids=token, past_key_values=absolute, position_ids=torch.tensor([[len(ids)]]))
    torch.testing.assert_close(logits, at_compressed.logits[:, -1])
    assert not torch.allclose(logits, at_absolute.logits[:, -1])
    assert cache.get_seq_length() == compressed + 1

    cache.compress([A])  # a new open utterance: nothing to evict, position recorded at the compressed length
    assert cache.rope_positions[-1] == compressed
    assert cache.kept_positions[-1] == len(ids)


def test_cache_grows_by_one_entry_per_utterance(tiny_llm) -> None:
    model = tiny_llm.model
    cache = StreamingDialogueCache(EOU, BOS)
    utterances = [[BOS, A, A, EOU], [B, B, B, B, EOU], [C, C, EOU], [A, B, C, A, B, EOU], [C, EOU]]
    lengths, seen = [], 0
    for turn, utterance in enumerate(utterances, start=1):
        _feed(model, utterance, cache)
        cache.compress(utterance)
        seen += len(utterance)
        lengths.append(cache.get_seq_length())
        if turn >= 2:
            # BOS + one EoU per earlier utterance + the whole latest utterance
            assert cache.get_seq_length() == 1 + (turn - 1) + len(utterance)
        assert all(layer.keys.shape[-2] == lengths[-1] for layer in cache.layers)
    assert cache.cached_tokens == [BOS, EOU, EOU, EOU, EOU, C, EOU]
    assert cache.kept_positions[-1] == seen - 1
    assert lengths[-1] < seen


def test_chat_turns_with_generation_and_compression(tiny_llm) -> None:
    """Two chat turns through our token loop, compressing between them."""
    model = tiny_llm.model
    cache = StreamingDialogueCache(EOU, BOS)
    prompt = _prompt(tiny_llm, "First question?")
    reply = list(generate_tokens(model, prompt, GREEDY, stop_token_ids=tiny_llm.stop_token_ids, cache=cache))
    # The loop leaves its last token unfed; close_turn feeds that tail plus the EoU sink.
    close_turn(model, cache, [*prompt, *reply, EOU])
    assert cache.cached_tokens[-1] == EOU
    length = cache.get_seq_length()
    assert length < len(prompt) + len(reply) + 1

    follow = tiny_llm.tokenizer(
        "\n<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )["input_ids"]
    second = list(generate_tokens(model, follow, GREEDY, stop_token_ids=tiny_llm.stop_token_ids, cache=cache))
    assert all(isinstance(t, int) for t in second)
    assert cache.get_seq_length() >= length + len(follow)
    close_turn(model, cache, [*follow, *second, EOU])
    # BOS, the first turn's EoU, the earlier EoUs inside the follow-up, then its latest utterance
    assert cache.cached_tokens[0] == BOS and cache.cached_tokens[-1] == EOU
    assert cache.get_seq_length() < length + len(follow) + len(second) + 1


def test_close_turn_requires_the_eou(tiny_llm) -> None:
    cache = StreamingDialogueCache(EOU, BOS)
    _feed(tiny_llm.model, [BOS, A], cache)
    with pytest.raises(ValueError, match="EoU"):
        close_turn(tiny_llm.model, cache, [BOS, A])
