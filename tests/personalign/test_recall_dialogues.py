"""Recall-shaped dialogues: facts among small talk, each asked about later and answered with its value."""

from __future__ import annotations

import random
import re

import pytest

from personalign.recall_dialogues import (
    FAR,
    NEAR,
    OPENERS,
    SMALL_TALK,
    TRAINING_FACTS,
    RecallShape,
    recall_dialogue,
    recall_dialogues,
)

KINDS = TRAINING_FACTS[:3]


def _statement_index(dialogue: tuple[str, ...], kind) -> int:
    """Where ``kind``'s fact is stated: the statement, not an answer that happens to repeat it."""
    return next(i for i, u in enumerate(dialogue) if u.startswith(kind.statement.split("{}")[0])
                and (i == 0 or dialogue[i - 1] != kind.question))


def test_every_question_comes_after_its_statement_and_is_answered_with_its_value() -> None:
    rng = random.Random(5)
    for _ in range(50):
        dialogue = recall_dialogue(rng, KINDS)
        placed = set()
        for kind in KINDS:
            stated = [i for i, u in enumerate(dialogue) if u in {kind.statement.format(v) for v in kind.values}]
            asked = [i for i, u in enumerate(dialogue) if u == kind.question]
            assert len(stated) == len(asked) == 1  # each of the three facts once, asked once
            value = next(v for v in kind.values if dialogue[stated[0]] == kind.statement.format(v))
            assert dialogue[asked[0] + 1] == f"{kind.answer} {value}."  # answered right after, with its value
            assert 1 <= asked[0] - stated[0] <= NEAR.max_gap + 2 * len(KINDS)  # other Q/A pairs may sit between
            placed |= {stated[0], asked[0], asked[0] + 1}
        others = [u for i, u in enumerate(dialogue) if i not in placed]
        assert all(any(u.lower().endswith(s.lower()) for s in SMALL_TALK) for u in others)


def test_dialogues_are_deterministic_and_use_only_the_kinds_given() -> None:
    dialogues = recall_dialogues(20, seed=1, kinds=KINDS)
    assert dialogues == recall_dialogues(20, seed=1, kinds=KINDS) != recall_dialogues(20, seed=2, kinds=KINDS)
    text = " ".join(u for d in dialogues for u in d)
    assert not any(k.question in text for k in TRAINING_FACTS[3:])
    everything = " ".join(u for d in recall_dialogues(200) for u in d)  # the default: every training type
    assert all(k.question in everything for k in TRAINING_FACTS)


def test_fillers_set_the_length() -> None:
    rng = random.Random(0)
    lengths = {len(recall_dialogue(rng, KINDS, RecallShape((4, 6), 3, 12))) for _ in range(60)}
    assert lengths == {4 + 6, 5 + 6, 6 + 6}  # the small talk, then a question and an answer per fact


def test_far_questions_come_further_back_than_near_ones_can() -> None:
    gaps = {}
    for shape in (NEAR, FAR):
        rng = random.Random(3)
        gaps[shape] = []
        for _ in range(60):
            dialogue = recall_dialogue(rng, TRAINING_FACTS, shape)
            asked = [i for i, u in enumerate(dialogue) if u in {k.question for k in TRAINING_FACTS}]
            assert len(asked) == shape.facts
            assert len(dialogue) - 2 * shape.facts in range(shape.fillers[0], shape.fillers[1] + 1)
            for i in asked:
                kind = next(k for k in TRAINING_FACTS if k.question == dialogue[i])
                gaps[shape].append(i - _statement_index(dialogue, kind))
    assert all(1 <= g <= NEAR.max_gap + 2 * NEAR.facts for g in gaps[NEAR])
    assert all(1 <= g <= FAR.max_gap + 2 * FAR.facts for g in gaps[FAR])
    assert max(gaps[FAR]) > NEAR.max_gap + 2 * NEAR.facts  # further than near can put any question


@pytest.mark.parametrize(
    ("fillers", "facts", "max_gap", "message"),
    [((3, 3), 3, 12, "fewest >= facts \\+ 1"), ((8, 6), 3, 12, "fewest,most"), ((8, 9), 0, 12, "facts must be"),
     ((8, 9), 3, 0, "max_gap must be")],
)
def test_a_shape_that_cannot_be_laid_out_is_refused(fillers, facts, max_gap, message) -> None:
    with pytest.raises(ValueError, match=message):
        RecallShape(fillers, facts, max_gap)


def test_bad_counts_and_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="count must be at least 1"):
        recall_dialogues(0)
    with pytest.raises(ValueError, match="at least one fact type"):
        recall_dialogues(3, kinds=())


def test_training_facts_give_every_question_one_answer() -> None:
    for field in ("key", "statement", "question"):
        assert len({getattr(k, field) for k in TRAINING_FACTS}) == len(TRAINING_FACTS)
    words = set(re.findall(r"[\w']+", " ".join([*SMALL_TALK, *OPENERS]).lower()))
    for kind in TRAINING_FACTS:
        assert len(set(kind.values)) >= 4 and kind.statement.count("{}") == 1
        assert not {v.lower() for v in kind.values} & words  # no small talk names a value
