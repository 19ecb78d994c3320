"""The recall-transfer benchmark's training dialogues and paired counts."""

from __future__ import annotations

import random

import pytest

from benchmarks import recall_transfer as rt
from benchmarks.memory_recall import _FILLER, FACT_TYPES

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
