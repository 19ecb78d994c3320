"""Conversation memory: incremental turns, the meter, replay, and the saved file, on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personalign.engine import Engine
from personalign.errors import UserError
from personalign.generation import GenerationConfig, generate_tokens, prefill
from personalign.memory import (
    REPLAY_TOKENS,
    TURN_RESERVE,
    ConversationMemory,
    MemoryFileError,
    MemoryPolicy,
    MemoryTemplateError,
    dense_meter,
    kv_bytes_per_token,
    memory_positions,
    memory_reach,
    new_cache,
    replay,
)
from personalign.streaming_dialogue import kept_indices

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0)
TURNS = [
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}], "Hello!"),
    ([{"role": "user", "content": "My code is 4721"}], "Noted."),
    ([{"role": "user", "content": "What is it?"}], "It is 4721."),
]


def _conversation(turns) -> list[dict[str, str]]:
    messages = list(turns[0][0])
    for i, (prompt, reply) in enumerate(turns):
        if i:
            messages.append(prompt[-1])
        messages.append({"role": "assistant", "content": reply})
    return messages


def _replayed(llm, turns, policy=MemoryPolicy.STREAMING_DIALOGUE) -> ConversationMemory:
    steps = replay(llm, policy, turns)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def test_turns_fed_one_by_one_add_up_to_the_whole_rendered_conversation(tiny_llm) -> None:
    memory = _replayed(tiny_llm, TURNS)
    whole = tiny_llm.tokenizer.apply_chat_template(_conversation(TURNS), tokenize=False)
    ids = tiny_llm.tokenizer(whole, add_special_tokens=False)["input_ids"]
    # ChatML puts a newline after every <|im_end|>: the last one waits as the next turn's first token.
    assert memory.cache.tokens_seen + len(memory.pending) == len(ids)
    fed = ids[: memory.cache.tokens_seen]
    assert fed[-1] == tiny_llm.eou_token_id
    assert memory.cache.cached_tokens == [fed[i] for i in kept_indices(fed, tiny_llm.eou_token_id)]


def test_first_turn_with_nothing_to_evict_replies_like_dense(tiny_llm) -> None:
    engine = Engine(tiny_llm)
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    dense = list(engine.stream(messages, GREEDY))
    memory = engine.empty_memory(MemoryPolicy.STREAMING_DIALOGUE)
    assert list(engine.stream_turn(memory, messages, GREEDY)) == dense


def test_second_turn_reads_only_the_new_message(tiny_llm) -> None:
    engine = Engine(tiny_llm)
    memory = _replayed(tiny_llm, TURNS[:1])
    before = memory.cache.tokens_seen
    ids, text = memory.turn_prompt(tiny_llm, TURNS[1][0])
    assert text == "<|im_start|>user\nMy code is 4721<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tiny_llm.tokenizer("\n", add_special_tokens=False)["input_ids"][0]  # the pending newline
    stream = engine.stream_turn(memory, TURNS[1][0], GREEDY)
    assert stream.prompt == text
    list(stream)
    assert stream.stats.prompt_tokens == len(ids)
    assert memory.cache.tokens_seen > before + len(ids)  # the prompt, the reply and its EoU


def test_compressed_memory_keeps_one_entry_per_earlier_utterance(tiny_llm) -> None:
    memory = _replayed(tiny_llm, TURNS)
    eou = tiny_llm.eou_token_id
    cached = memory.cache.cached_tokens
    # system, 3 user and 3 assistant utterances: 7 EoUs, and only the last reply kept whole.
    assert cached.count(eou) == 7
    reply = tiny_llm.tokenizer(TURNS[-1][1], add_special_tokens=False)["input_ids"]
    assert cached[-len(reply) - 1: -1] == reply
    assert len(cached) < memory.cache.tokens_seen / 3


def test_meter_counts_cached_and_dense_bytes(tiny_llm) -> None:
    memory = _replayed(tiny_llm, TURNS)
    per_token = kv_bytes_per_token(tiny_llm.model, tiny_llm.dtype)
    assert per_token == 2 * 2 * 16 * 2 * 4  # layers × KV heads × head size × K,V × fp32
    meter = memory.meter(tiny_llm)
    assert meter.cached_tokens == len(memory.cache.cached_tokens)
    assert meter.kv_bytes == meter.cached_tokens * per_token
    assert meter.dense_kv_bytes == memory.cache.tokens_seen * per_token
    assert meter.utterances == 7 and meter.reduction == pytest.approx(meter.dense_kv_bytes / meter.kv_bytes)
    assert dense_meter(tiny_llm, 10).kv_bytes == 10 * per_token


def test_saved_memory_round_trips_and_continues_identically(tiny_llm, tmp_path) -> None:
    engine = Engine(tiny_llm)
    memory = _replayed(tiny_llm, TURNS)
    memory.message_count, memory.last_message_id = 6, 42
    path = tmp_path / "m" / "1.pt"
    assert memory.save(path) > 0
    loaded = ConversationMemory.load(path, tiny_llm, MemoryPolicy.STREAMING_DIALOGUE)
    assert (loaded.anchor, loaded.pending, loaded.message_count, loaded.last_message_id) == (
        memory.anchor, memory.pending, 6, 42)
    assert loaded.cache.cached_tokens == memory.cache.cached_tokens
    assert loaded.cache.rope_positions == memory.cache.rope_positions
    for a, b in zip(loaded.cache.layers, memory.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    question = [{"role": "user", "content": "Say it again"}]
    assert list(engine.stream_turn(loaded, question, GREEDY)) == list(engine.stream_turn(memory, question, GREEDY))


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "other-model", "other-policy"])
def test_unusable_memory_files_raise_memory_file_error(tiny_llm, tmp_path, damage) -> None:
    path = tmp_path / "1.pt"
    memory = _replayed(tiny_llm, TURNS[:2])
    policy = MemoryPolicy.STREAMING_DIALOGUE
    if damage != "missing":
        memory.save(path)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "other-model":
        memory.model_name = "another-model"
        memory.save(path)
    elif damage == "other-policy":
        policy = MemoryPolicy.STREAMING_LLM
    with pytest.raises(MemoryFileError):
        ConversationMemory.load(path, tiny_llm, policy)


def test_template_that_rewrites_history_is_refused(tiny_llm) -> None:
    counting = "{{ messages|length }}" + tiny_llm.tokenizer.chat_template
    original = tiny_llm.tokenizer.chat_template
    memory = _replayed(tiny_llm, TURNS[:1])
    tiny_llm.tokenizer.chat_template = counting
    try:
        with pytest.raises(MemoryTemplateError):
            memory.turn_prompt(tiny_llm, TURNS[1][0])
    finally:
        tiny_llm.tokenizer.chat_template = original


def test_dense_policy_has_no_cache() -> None:
    assert not MemoryPolicy.DENSE.streaming and MemoryPolicy.STREAMING_DIALOGUE.streaming


def test_decode_loop_over_the_memory_cache_matches_stream_turn(tiny_llm) -> None:
    memory = _replayed(tiny_llm, TURNS[:2])
    twin = _replayed(tiny_llm, TURNS[:2])
    question = TURNS[2][0]
    ids, _ = twin.turn_prompt(tiny_llm, question)
    rest = twin.begin_turn(tiny_llm, ids)
    expected = list(generate_tokens(tiny_llm.model, torch.tensor([rest]), GREEDY,
                                    stop_token_ids=tiny_llm.stop_token_ids, cache=twin.cache))
    engine = Engine(tiny_llm)
    stream = engine.stream_turn(memory, question, GREEDY)
    list(stream)
    assert stream.stats.new_tokens == len(expected)


def test_app_memories_place_streaming_dialogue_at_true_distances_and_streaming_llm_in_slots(tiny_llm) -> None:
    dialogue = _replayed(tiny_llm, TURNS, MemoryPolicy.STREAMING_DIALOGUE).cache
    assert dialogue.positions.rule == "distance"
    assert dialogue.positions.max_distance == tiny_llm.context_length - min(TURN_RESERVE, tiny_llm.context_length // 4)
    assert dialogue.rope_positions == dialogue.kept_positions  # no key re-rotated: each at its dialogue index
    assert dialogue.position_offset == dialogue.tokens_seen - len(dialogue.cached_tokens) > 0
    window = _replayed(tiny_llm, TURNS, MemoryPolicy.STREAMING_LLM).cache
    assert window.rope_positions == list(range(len(window.cached_tokens))) and window.position_offset == 0


def _with_adapter_metadata(llm, folder, meta):
    return dataclasses.replace(llm, adapter=folder, adapter_metadata=meta)  # as apply_adapter leaves it


def test_a_memory_adapter_caps_the_distance_rule_at_half_its_reach(tiny_llm, tmp_path) -> None:
    context_cap = tiny_llm.context_length - min(TURN_RESERVE, tiny_llm.context_length // 4)
    assert memory_reach(tiny_llm) is None  # no adapter: keys at their true distance up to the context
    adapted = _with_adapter_metadata(tiny_llm, tmp_path / "a", {"purpose": "memory", "longest_sequence": 80,
                                                                "max_tokens": 512})
    assert memory_reach(adapted) == 80
    cache = new_cache(MemoryPolicy.STREAMING_DIALOGUE, adapted)
    assert (cache.positions.rule, cache.positions.max_distance) == ("distance", 40)
    assert new_cache(MemoryPolicy.STREAMING_LLM, adapted).positions.max_distance is None  # slots need no cap
    # Adapters trained before the record: their runs were packed up to max_tokens.
    older = _with_adapter_metadata(tiny_llm, tmp_path / "b", {"purpose": "memory", "max_tokens": 192})
    assert memory_reach(older) == 192
    for meta in ({"purpose": "preference", "longest_sequence": 80}, {}, {"purpose": "memory", "max_tokens": "x"}):
        assert memory_reach(_with_adapter_metadata(tiny_llm, tmp_path / "c", meta)) is None
    # The cap never exceeds what the context allows.
    assert memory_positions("distance", tiny_llm.model, tiny_llm.context_length, 10**9).max_distance == context_cap


def test_keys_of_a_capped_memory_sit_no_further_back_than_the_cap(tiny_llm, tmp_path) -> None:
    adapted = _with_adapter_metadata(tiny_llm, tmp_path / "a", {"purpose": "memory", "longest_sequence": 40})
    memory = _replayed(adapted, TURNS)
    cache = memory.cache
    assert cache.tokens_seen > 20 and cache.kept_positions == _replayed(tiny_llm, TURNS).cache.kept_positions
    assert min(cache.rope_positions) >= cache.tokens_seen - 20 > min(cache.kept_positions)


def test_a_memory_saved_under_another_position_rule_is_not_loaded(tiny_llm, tmp_path) -> None:
    """Files the app saved before the distance rule hold slot-rotated keys: they are rebuilt, not misread."""
    memory = _replayed(tiny_llm, TURNS[:2])
    path = tmp_path / "1.pt"
    memory.cache.positions = memory_positions("slot", tiny_llm.model, tiny_llm.context_length)
    memory.save(path)
    with pytest.raises(MemoryFileError, match="position rule"):
        ConversationMemory.load(path, tiny_llm, MemoryPolicy.STREAMING_DIALOGUE)


def test_a_chat_with_more_sinks_than_the_context_has_positions_goes_on(tiny_llm) -> None:
    """The capped distance rule keeps every key within reach, so only the span limits a turn."""
    engine = Engine(tiny_llm)
    memory = _replayed(tiny_llm, [([{"role": "user", "content": "a"}], "b")] * 300)
    cache = memory.cache
    assert len(cache.cached_tokens) > tiny_llm.context_length >= cache.position_span
    assert cache.position_span <= cache.positions.max_distance
    stream = engine.stream_turn(memory, [{"role": "user", "content": "q"}], GREEDY)
    assert list(stream) and stream.stats.new_tokens == GREEDY.max_new_tokens
    too_long = [{"role": "user", "content": "x" * tiny_llm.context_length}]
    with pytest.raises(UserError, match="span more than the model's context"):
        engine.stream_turn(memory, too_long, GREEDY)


def _turn_by_turn(llm, turns, policy) -> ConversationMemory:
    """The memory as live turns build it: the user's turn, a compress, then the reply and its closing."""
    memory = ConversationMemory.empty(policy, llm)
    for messages, reply_text in turns:
        prompt_ids, _ = memory.turn_prompt(llm, messages)
        rest = memory.begin_turn(llm, prompt_ids)
        reply_ids = llm.tokenizer(reply_text, add_special_tokens=False)["input_ids"]
        prefill(llm.model, torch.tensor([[*rest, *reply_ids]]), memory.cache)
        memory.end_turn(llm, messages, prompt_ids, reply_ids, reply_text)
    return memory


@pytest.mark.parametrize("policy", [MemoryPolicy.STREAMING_DIALOGUE, MemoryPolicy.STREAMING_LLM])
def test_a_replay_fed_many_turns_at_a_time_builds_the_memory_turns_build(tiny_llm, policy) -> None:
    # 80 turns, ~1,300 tokens: several forwards of REPLAY_TOKENS, and past the capped distance (384 here).
    turns = [*TURNS[:1], *[([{"role": "user", "content": f"Fact {i}: {i * 37 % 101}"}], f"Noted {i}.")
                           for i in range(79)]]
    steps = replay(tiny_llm, policy, turns)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as done:
            replayed = done.value
            break
    assert progress == [(n, len(turns)) for n in range(1, len(turns) + 1)]
    live = _turn_by_turn(tiny_llm, turns, policy)
    cache, expected = replayed.cache, live.cache
    assert cache.tokens_seen > REPLAY_TOKENS * 2 and (replayed.anchor, replayed.pending) == (live.anchor, live.pending)
    if policy is MemoryPolicy.STREAMING_DIALOGUE:
        assert cache.tokens_seen > cache.positions.max_distance and min(cache.rope_positions) > 0  # sinks moved
    for name in ("cached_tokens", "kept_positions", "rope_positions", "position_offset"):
        assert getattr(cache, name) == getattr(expected, name), name
    for a, b in zip(cache.layers, expected.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)
