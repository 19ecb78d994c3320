"""The memory-recall benchmark's pure parts (dialogue builder, scorer, policies) on the tiny random model."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import memory_recall as mr
from personalign.generation import new_cache, prefill
from personalign.recall_dialogues import OPENERS, SMALL_TALK
from personalign.streaming_llm import StreamingLLMConfig

BOS, EOU = 1, 2  # as in tests/conftest.py


@pytest.fixture(scope="module")
def tokens(tiny_llm) -> mr.Tokens:
    return mr.Tokens(tiny_llm.tokenizer, EOU, BOS)


# --- the dialogue builder ---------------------------------------------------------------------


def test_facts_are_stated_at_the_requested_distance() -> None:
    distances = (1, 5, 12)
    dialogue = mr.build_dialogue(7, distances, held_back=3)
    n = len(dialogue.utterances)
    assert n == mr.LEAD + 12
    assert [p.distance for p in dialogue.probes] == list(distances)
    kinds = {k.key: k for k in mr.FACT_TYPES}
    assert len({p.fact for p in dialogue.probes}) == len(distances)  # one fact type per question
    for probe in dialogue.probes:
        kind = kinds[probe.fact]
        value = probe.candidates[probe.correct]
        assert probe.fact_index == n - probe.distance
        assert dialogue.utterances[probe.fact_index] == kind.statement.format(value)
        assert (probe.question, probe.answer) == (kind.question, kind.answer)
        assert len(set(probe.candidates)) == mr.CANDIDATES
        assert set(probe.candidates) <= set(kind.values)
    facts = {p.fact_index for p in dialogue.probes}
    fillers = [u for i, u in enumerate(dialogue.utterances) if i not in facts]
    assert all(u.rstrip(".?") for u in fillers) and len(dialogue.held_back) == 3


def test_dialogues_are_deterministic_by_seed() -> None:
    assert mr.build_dialogue(3, (1, 10)) == mr.build_dialogue(3, (1, 10))
    assert mr.build_dialogue(3, (1, 10)) != mr.build_dialogue(4, (1, 10))


def test_answers_vary_across_seeds() -> None:
    answers = {p.candidates[p.correct] for s in range(20) for p in mr.build_dialogue(s, (1,)).probes}
    positions = {p.correct for s in range(20) for p in mr.build_dialogue(s, (1,)).probes}
    assert len(answers) > 5 and positions == set(range(mr.CANDIDATES))


def test_filler_names_no_fact_value() -> None:
    """A fact value in the filler would give a question a second answer."""
    words = set(re.findall(r"[\w']+", " ".join([*SMALL_TALK, *OPENERS]).lower()))
    values = {v.lower() for kind in mr.FACT_TYPES for v in kind.values}
    assert not words & values


def test_facts_come_only_from_the_kinds_given() -> None:
    kinds = mr.FACT_TYPES[5:7]
    asked = {p.fact for s in range(10) for p in mr.build_dialogue(s, (1, 4), kinds=kinds).probes}
    assert asked == {k.key for k in kinds}
    with pytest.raises(ValueError, match="at most 2 distances"):
        mr.build_dialogue(0, (1, 2, 3), kinds=kinds)
    # The default draws the same dialogues as before the option existed: the recorded runs still repeat.
    assert mr.build_dialogue(3, (1, 10)) == mr.build_dialogue(3, (1, 10), kinds=list(mr.FACT_TYPES))


def test_bad_distances_are_refused() -> None:
    for bad in ((0,), (3, 3), tuple(range(1, len(mr.FACT_TYPES) + 2))):
        with pytest.raises(ValueError):
            mr.build_dialogue(0, bad)
    with pytest.raises(ValueError):
        mr.build_dialogue(0, (5,), length=3)
    assert len(mr.build_dialogue(0, (), length=6, held_back=2).utterances) == 6


def test_utterances_are_plain_text_closed_by_the_eou(tokens) -> None:
    encoded = tokens.dialogue(["Hello there.", "Fine, thanks."])
    assert encoded[0][0] == BOS and BOS not in encoded[1]
    assert all(ids[-1] == EOU and ids.count(EOU) == 1 for ids in encoded)
    assert tokens.text("Hi") == [tokens.tokenizer.convert_tokens_to_ids(c) for c in "Hi"]


# --- the scorer -------------------------------------------------------------------------------


def test_scorer_returns_one_log_prob_per_candidate_and_leaves_the_cache(tiny_llm, tokens) -> None:
    model = tiny_llm.model
    memory = tokens.utterance("My dog is called Max.", first=True)
    prefix = tokens.text("Your dog is called")
    options = [tokens.text(" " + v) for v in ("Max", "Luna", "Rocky", "Bo")]
    cache = new_cache(model)
    logits = prefill(model, torch.tensor([memory]), cache)  # (1, V)

    scores = mr.continuation_logprobs(model, cache, logits, prefix, options)

    assert len(scores) == len(options)
    assert cache.get_seq_length() == len(memory)
    for option, score in zip(options, scores):
        ids = torch.tensor([[*memory, *prefix, *option]])  # (1, T)
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
        start = len(memory) + len(prefix)
        expected = sum(float(logprobs[start + j - 1, t]) for j, t in enumerate(option))
        assert score == pytest.approx(expected, abs=1e-4)
        assert score < 0


# --- the policies -----------------------------------------------------------------------------


def _policies(tiny_llm, tokens, window: int, rule: str = "compressed") -> dict[str, mr.Policy]:
    policies = mr.make_policies(tiny_llm.model, tokens, 512, StreamingLLMConfig(sink_tokens=4, window=window),
                                positions=(rule,))
    return {p.label.split(" ")[0]: p for p in policies}


def _fed(policy: mr.Policy, encoded: list[list[int]]):
    memory = policy.build()
    for ids in encoded:
        memory.add(ids)
    return memory


@pytest.mark.parametrize("rule", mr.POSITION_RULES)
def test_a_window_larger_than_the_dialogue_scores_like_dense(tiny_llm, tokens, rule) -> None:
    dialogue = mr.build_dialogue(1, (1, 3))
    encoded = tokens.dialogue(dialogue.utterances)
    dense, llm = (_fed(_policies(tiny_llm, tokens, 10_000, rule)[k], encoded) for k in ("dense", "streaming-llm"))
    sd = _fed(_policies(tiny_llm, tokens, 10_000)["streaming-dialogue"], encoded)
    probe = dialogue.probes[1]
    args = (tokens.utterance(probe.question), tokens.text(probe.answer),
            [tokens.text(" " + c) for c in probe.candidates])
    assert llm.answer_logprobs(*args) == pytest.approx(dense.answer_logprobs(*args), abs=1e-3)
    # StreamingDialogue has evicted the earlier utterances' words: its scores differ.
    assert sd.answer_logprobs(*args) != pytest.approx(dense.answer_logprobs(*args), abs=1e-3)
    held = tokens.utterance(mr.build_dialogue(2, (), length=1).utterances[0])
    assert llm.sequence_logprob(held) == pytest.approx(dense.sequence_logprob(held), abs=1e-3)
    # Scoring never changes a memory.
    assert llm.cache.get_seq_length() == len(llm.cache.cached_tokens) == sum(map(len, encoded))
    assert dense.answer_logprobs(*args) == pytest.approx(dense.answer_logprobs(*args), abs=1e-5)


def test_dense_window_drops_the_oldest_whole_utterances_and_keeps_bos(tiny_llm) -> None:
    dense = mr.DenseMemory("dense", tiny_llm.model, context=20, bos_id=BOS, bytes_per_token=8)
    dense.add([BOS, 10, 11, 12, EOU])
    dense.add([20, 21, EOU])
    dense.add([30, 31, 32, 33, EOU])
    assert dense.window(reserve=0) == [BOS, 10, 11, 12, EOU, 20, 21, EOU, 30, 31, 32, 33, EOU]
    assert dense.window(reserve=10) == [BOS, 20, 21, EOU, 30, 31, 32, 33, EOU]
    assert dense.window(reserve=12) == [BOS, 30, 31, 32, 33, EOU]
    assert dense.window(reserve=16) == [BOS, 32, 33, EOU]  # one utterance too long: its end
    assert dense.window(reserve=20) == [BOS]
    assert dense.tokens == 13
    # kv_bytes: what re-reading the window holds, room for the new turn left free
    roomy = mr.DenseMemory("dense", tiny_llm.model, context=mr.DENSE_RESERVE + 6, bos_id=BOS, bytes_per_token=8)
    roomy.utterances = dense.utterances
    assert roomy.window() == [BOS, 30, 31, 32, 33, EOU]
    assert roomy.kv_bytes() == 6 * 8


def test_kv_bytes_per_token_matches_a_real_cache(tiny_llm) -> None:
    cache = new_cache(tiny_llm.model)
    prefill(tiny_llm.model, torch.tensor([[BOS, 5, 6, 7, 8]]), cache)
    real = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    assert mr.kv_bytes_per_token(tiny_llm.model, torch.float32) * 5 == real
    assert mr.kv_bytes_per_token(tiny_llm.model, torch.bfloat16) * 2 == mr.kv_bytes_per_token(
        tiny_llm.model, torch.float32)


def test_streaming_dialogue_memory_grows_by_one_entry_per_utterance(tiny_llm, tokens) -> None:
    dialogue = mr.build_dialogue(5, (), length=6)
    encoded = tokens.dialogue(dialogue.utterances)
    sd = _fed(_policies(tiny_llm, tokens, window=16)["streaming-dialogue"], encoded)
    assert len(sd.cache.cached_tokens) == 1 + (len(encoded) - 1) + len(encoded[-1])
    llm = _fed(_policies(tiny_llm, tokens, window=16)["streaming-llm"], encoded)
    assert len(llm.cache.cached_tokens) == 4 + 16


def test_policy_rows_and_labels(tiny_llm, tokens) -> None:
    llm = StreamingLLMConfig(sink_tokens=1, window=32)
    labels = [p.label for p in mr.make_policies(tiny_llm.model, tokens, 512, llm, trained=[("", tiny_llm.model)])]
    assert labels == ["dense", "streaming-llm 1+32 (compressed pos)", "streaming-dialogue untrained (compressed pos)",
                      "streaming-dialogue trained (compressed pos)"]
    two = [("one-stage", tiny_llm.model), ("two-stage", tiny_llm.model)]
    labels = [p.label for p in mr.make_policies(tiny_llm.model, tokens, 512, llm, trained=two, positions=("slot",))]
    assert labels[2:] == ["streaming-dialogue untrained (slot pos)", "streaming-dialogue trained one-stage (slot pos)",
                          "streaming-dialogue trained two-stage (slot pos)"]
    labels = [p.label for p in mr.make_policies(tiny_llm.model, tokens, 512, llm, positions=mr.POSITION_RULES)]
    assert labels[:4] == ["dense", "streaming-llm 1+32 (compressed pos)", "streaming-dialogue (compressed pos)",
                          "streaming-llm 1+32 (slot pos)"]
    with pytest.raises(ValueError):
        mr.make_policies(tiny_llm.model, tokens, 512, llm, positions=("absolute",))


def test_distance_caps_add_capped_streaming_dialogue_rows(tiny_llm, tokens) -> None:
    llm = StreamingLLMConfig(sink_tokens=1, window=32)
    policies = mr.make_policies(tiny_llm.model, tokens, 512, llm, trained=[("", tiny_llm.model)],
                                positions=("distance",), distance_caps=(24,))
    assert [p.label for p in policies][4:] == ["streaming-dialogue untrained (distance pos, cap 24)",
                                               "streaming-dialogue trained (distance pos, cap 24)"]
    encoded = tokens.dialogue(mr.build_dialogue(2, (1, 6)).utterances)
    capped, uncapped = _fed(policies[4], encoded).cache, _fed(policies[2], encoded).cache
    seen = sum(map(len, encoded))
    assert seen > 48 and capped.kept_positions == uncapped.kept_positions  # the same entries are kept
    assert min(uncapped.rope_positions) < seen - 24  # uncapped, the oldest keys sit at their true distance
    assert min(capped.rope_positions) >= seen - 24  # capped, none sits further back than the cap


def test_end_to_end_on_the_tiny_model(tiny_llm, tokens) -> None:
    config = mr.BenchConfig(distances=(1, 3), trials=2, turns=(2, 5), held_back=1, repeats=1, reply_tokens=2,
                            sink_tokens=1, window=32)
    policies = mr.make_policies(tiny_llm.model, tokens, 512, StreamingLLMConfig(sink_tokens=1, window=32),
                                positions=config.positions)
    figures = mr.measure(policies, tokens, config)

    labels = {p.label for p in policies}
    assert set(figures["recall"]) == labels
    assert all(len(cells[d]) == 2 for cells in figures["recall"].values() for d in ("1", "3"))
    long = figures["long"]
    for label in labels:
        assert set(long["kv_bytes"][label]) == set(long["perplexity"][label]) == set(long["seconds"][label])
        assert set(long["kv_bytes"][label]) == {"2", "5"}
        assert all(p > 1 for p in long["perplexity"][label].values())
    assert long["dense_untruncated"]["5"] == long["kv_bytes"]["dense"]["5"]  # 512 tokens: nothing truncated
    meta = {"model": "tiny", "device": "cpu", "dtype": "float32", "context": 512, "kv_bytes_per_token": 512}
    text = mr.report(meta | figures)
    assert all(label in text for label in labels) and "d=3" in text and "N=5" in text


def test_app_only_keeps_the_caches_the_app_builds(tiny_llm, tokens) -> None:
    llm = StreamingLLMConfig(sink_tokens=1, window=32)
    trained = [("", tiny_llm.model)]
    labels = [p.label for p in mr.make_policies(tiny_llm.model, tokens, 512, llm, trained=trained,
                                                positions=("distance",), distance_caps=(24,), app_only=True)]
    assert labels == ["dense", "streaming-llm 1+32 (distance pos)", "streaming-dialogue untrained (distance pos)",
                      "streaming-dialogue trained (distance pos, cap 24)"]
    # With no cap the app runs the trained cache under the plain rule, so that row stays.
    labels = [p.label for p in mr.make_policies(tiny_llm.model, tokens, 512, llm, trained=trained,
                                                positions=("distance",), app_only=True)]
    assert labels[2:] == ["streaming-dialogue untrained (distance pos)", "streaming-dialogue trained (distance pos)"]


def test_parts_measure_only_what_is_asked(tiny_llm, tokens) -> None:
    policies = mr.make_policies(tiny_llm.model, tokens, 512, StreamingLLMConfig(sink_tokens=1, window=32))
    meta = {"model": "tiny", "device": "cpu", "dtype": "float32", "context": 512, "kv_bytes_per_token": 512}
    for parts, absent in ((("long",), "recall"), (("recall",), "long")):
        config = mr.BenchConfig(distances=(1,), trials=1, turns=(2,), held_back=1, repeats=1, reply_tokens=2,
                                sink_tokens=1, window=32, parts=parts)
        figures = mr.measure(policies, tokens, config)
        assert parts[0] in figures and absent not in figures
        text = mr.report(meta | figures)
        assert ("Recall:" in text) == (parts == ("recall",)) and ("KV cache held" in text) == (parts == ("long",))
    with pytest.raises(ValueError, match="parts"):
        mr.BenchConfig(parts=("speed",))


def test_a_recall_time_limit_runs_fewer_whole_trials(tiny_llm, tokens) -> None:
    policies = mr.make_policies(tiny_llm.model, tokens, 512, StreamingLLMConfig(sink_tokens=1, window=32))
    hits = mr.run_recall(policies, tokens, (1, 3), trials=3, seed=0, seconds=0.0)
    assert all(len(cells[d]) == 1 for cells in hits.values() for d in (1, 3))  # the first trial always runs
    hits = mr.run_recall(policies, tokens, (1, 3), trials=3, seed=0, seconds=600.0)
    assert all(len(cells[d]) == 3 for cells in hits.values() for d in (1, 3))


def test_app_distance_caps_are_the_caps_the_app_puts_on_each_adapter(tiny_llm) -> None:
    import dataclasses

    far = dataclasses.replace(tiny_llm, adapter_metadata={"purpose": "memory", "longest_sequence": 100})
    near = dataclasses.replace(tiny_llm, adapter_metadata={"purpose": "memory", "longest_sequence": 60})
    assert mr.app_distance_caps(tiny_llm.model, 512, [far, near, far]) == (30, 50)  # half of each reach, once
    assert mr.app_distance_caps(tiny_llm.model, 512, [tiny_llm]) == ()  # no adapter: the plain rows are the app's
    assert mr.app_distance_caps(tiny_llm.model, 512, []) == ()


def test_a_reply_decodes_alike_through_the_slot_steps(tiny_llm, tokens, monkeypatch) -> None:
    from personalign.graph_decode import GraphDecoder

    model = tiny_llm.model
    caches = [new_cache(model), new_cache(model)]
    ids = torch.tensor([tokens.utterance("Tell me something.")])
    plain = mr._reply(model, prefill(model, ids, caches[0]), caches[0], 6)
    from personalign import generation

    monkeypatch.setattr(generation, "graph_decoder", lambda m: GraphDecoder(m, capture=False))
    assert mr._reply(model, prefill(model, ids, caches[1]), caches[1], 6) == plain
    assert caches[1].get_seq_length() == caches[0].get_seq_length()  # every token fed, as before
