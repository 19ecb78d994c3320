"""The recall-transfer benchmark's fact-type split, paired counts and reply losses."""

from __future__ import annotations

import pytest

from benchmarks import recall_transfer as rt
from benchmarks.memory_recall import FACT_TYPES
from personalign.recall_dialogues import (
    TRAINING_FACTS,
    RecallShape,
    recall_dialogues,
)

TRAINED = rt.fact_types("sister,locker,city")


def test_fact_types_are_looked_up_by_name_and_checked() -> None:
    assert [k.key for k in TRAINED] == ["sister", "locker", "city"]
    for bad in ("", "sister,sister", "sister,uncle"):
        with pytest.raises(ValueError, match="fact types must be distinct names"):
            rt.fact_types(bad)
    assert rt.fact_types("none") == ()  # every probe type held out, as the built-in recall source has it


def test_pairing_counts_the_trials_only_one_row_got_right() -> None:
    assert rt.paired([True, True, False, False], [True, False, True, False]) == (1, 1)


def test_reply_losses_score_every_view_on_the_tiny_model(tiny_llm) -> None:
    losses = rt.reply_losses(tiny_llm, recall_dialogues(4, kinds=TRAINED, shape=RecallShape((4, 5), 3, 12)))
    assert list(losses) == ["sinks", "hidden", "dense"]
    assert all(0 < loss < 20 for loss in losses.values())
    assert losses["sinks"] != losses["hidden"]  # the views differ: hiding the sinks changes what is seen


def test_the_built_in_training_types_are_new_to_the_probe() -> None:
    kinds = [*FACT_TYPES, *TRAINING_FACTS]
    for field in ("key", "statement", "question"):
        assert len({getattr(k, field) for k in kinds}) == len(kinds)
    # Training never teaches a value the probe scores (bus and daughter share a few numbers: each
    # question still has one answer, its own type's).
    assert not {v for k in TRAINING_FACTS for v in k.values} & {v for k in FACT_TYPES for v in k.values}


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--train-types", "none"], "trains on nothing without --more-types"),
     (["--train-types", "none", "--more-types"], "ask --halves held-out"),
     (["--fillers", "3,3"], "fewest >= facts + 1"),
     (["--halves", "held-out", "--distances", "1,2,3,4,5,6"], "at most 5 distances")],
)
def test_settings_that_cannot_run_are_refused_before_any_model_loads(capsys, argv, message) -> None:
    with pytest.raises(SystemExit):
        rt.main(argv)
    assert message in capsys.readouterr().err
