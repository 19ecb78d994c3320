"""The recall-transfer benchmark's training dialogues and paired counts."""

from __future__ import annotations

import random
import re

import pytest

from benchmarks import recall_transfer as rt
from benchmarks.memory_recall import _FILLER, _OPENERS, CANDIDATES, FACT_TYPES

TRAINED = rt.fact_types("sister,locker,city")


def test_fact_types_are_looked_up_by_name_and_checked() -> None:
    assert [k.key for k in TRAINED] == ["sister", "locker", "city"]
    for bad in ("", "sister,sister", "sister,uncle"):
        with pytest.raises(ValueError, match="fact types must be distinct names"):
            rt.fact_types(bad)


def test_every_question_comes_after_its_statement_and_is_answered_with_its_value() -> None:
    rng = random.Random(5)
    for _ in range(50):
        dialogue = rt.training_dialogue(rng, TRAINED)
        by_statement = {}
        for kind in TRAINED:
            # A statement, not an answer (the locker's answer repeats its statement word for word).
            stated = [i for i, u in enumerate(dialogue) if u in {kind.statement.format(v) for v in kind.values}
                      and (i == 0 or dialogue[i - 1] != kind.question)]
            asked = [i for i, u in enumerate(dialogue) if u == kind.question]
            assert len(stated) == len(asked) == 1  # each of the three facts once, asked once
            by_statement[kind.key] = (stated[0], asked[0])
            value = dialogue[stated[0]].removeprefix(kind.statement.split("{}")[0]).rstrip(".")
            assert dialogue[asked[0] + 1] == f"{kind.answer} {value}."  # answered right after, with its value
            assert 1 <= asked[0] - stated[0] <= rt.MAX_GAP + 2 * len(TRAINED)  # other Q/A pairs may sit between
        others = [u for i, u in enumerate(dialogue)
                  if all(i not in (s, q, q + 1) for s, q in by_statement.values())]
        assert all(any(u.lower().endswith(f.lower()) for f in _FILLER) for u in others)


def test_training_dialogues_are_deterministic_and_use_only_the_trained_types() -> None:
    dialogues = rt.training_dialogues(20, TRAINED, seed=1)
    assert dialogues == rt.training_dialogues(20, TRAINED, seed=1) != rt.training_dialogues(20, TRAINED, seed=2)
    held_out = [k for k in FACT_TYPES if k not in TRAINED]
    text = " ".join(u for d in dialogues for u in d)
    assert not any(k.question in text for k in held_out)


def test_pairing_counts_the_trials_only_one_row_got_right() -> None:
    assert rt.paired([True, True, False, False], [True, False, True, False]) == (1, 1)


def test_fillers_set_the_length_and_too_few_are_refused() -> None:
    rng = random.Random(0)
    lengths = {len(rt.training_dialogue(rng, TRAINED, fillers=(4, 6))) for _ in range(60)}
    assert lengths == {4 + 6, 5 + 6, 6 + 6}  # the fillers, then a question and an answer per fact
    with pytest.raises(ValueError, match="cannot hold 3 facts"):
        rt.training_dialogue(rng, TRAINED, fillers=(3, 3))


def test_reply_losses_score_every_view_on_the_tiny_model(tiny_llm) -> None:
    losses = rt.reply_losses(tiny_llm, rt.training_dialogues(4, TRAINED, fillers=(4, 5)))
    assert list(losses) == ["sinks", "hidden", "dense"]
    assert all(0 < loss < 20 for loss in losses.values())
    assert losses["sinks"] != losses["hidden"]  # the views differ: hiding the sinks changes what is seen


def test_training_only_types_are_new_and_give_every_question_one_answer() -> None:
    kinds = [*FACT_TYPES, *rt.TRAINING_ONLY_TYPES]
    for field in ("key", "statement", "question"):
        assert len({getattr(k, field) for k in kinds}) == len(kinds)
    words = set(re.findall(r"[\w']+", " ".join([*_FILLER, *_OPENERS]).lower()))
    for kind in rt.TRAINING_ONLY_TYPES:
        assert len(set(kind.values)) >= CANDIDATES and "{}" in kind.statement
        assert not {v.lower() for v in kind.values} & words  # no filler utterance names a value
    # Training never teaches a value the probe scores (bus and daughter share a few numbers: each
    # question still has one answer, its own type's).
    assert not {v for k in rt.TRAINING_ONLY_TYPES for v in k.values} & {v for k in FACT_TYPES for v in k.values}


def test_max_gap_and_facts_shape_the_dialogue() -> None:
    rng = random.Random(3)
    kinds = TRAINED + rt.TRAINING_ONLY_TYPES
    gaps = []
    for _ in range(40):
        dialogue = rt.training_dialogue(rng, kinds, facts=4, fillers=(30, 32), max_gap=28)
        asked = [i for i, u in enumerate(dialogue) if u in {k.question for k in kinds}]
        assert len(asked) == 4 and len(dialogue) in {30 + 8, 31 + 8, 32 + 8}
        for i in asked:
            kind = next(k for k in kinds if k.question == dialogue[i])
            stated = next(j for j, u in enumerate(dialogue) if u.startswith(kind.statement.split("{}")[0])
                          and (j == 0 or dialogue[j - 1] != kind.question))
            gaps.append(i - stated)
    assert max(gaps) > rt.MAX_GAP + 2 * 4  # further than the default can put any question
    assert all(1 <= g <= 28 + 2 * 4 for g in gaps)


def test_each_trained_row_is_paired_against_streaming_llm_and_its_own_untrained_row() -> None:
    right, wrong = [True, True], [False, False]
    hits = {"dense": {1: right}, "streaming-llm 4+256 (distance pos)": {1: wrong},
            "streaming-dialogue untrained (distance pos)": {1: wrong},
            "streaming-dialogue trained (distance pos)": {1: right},
            "streaming-dialogue untrained (distance pos, cap 64)": {1: right},
            "streaming-dialogue trained (distance pos, cap 64)": {1: right}}
    paired_lines = [line for line in rt._report("t", hits, (1,)).splitlines() if "paired" in line]
    assert paired_lines == [
        "| trained (distance pos) vs streaming-llm 4+256 (distance pos), paired | +2/-0 (p 0.50) |",
        "| trained (distance pos) vs streaming-dialogue untrained (distance pos), paired | +2/-0 (p 0.50) |",
        "| trained (distance pos, cap 64) vs streaming-llm 4+256 (distance pos), paired | +2/-0 (p 0.50) |",
        ("| trained (distance pos, cap 64) vs streaming-dialogue untrained (distance pos, cap 64), paired "
         "| +0/-0 (p 1.00) |"),
    ]
