"""The studio-sweep benchmark end to end on the tiny random model, and its pure parts."""

from __future__ import annotations

import re

import pytest

from benchmarks import studio_sweep as ss
from personalign import studio
from personalign.preference_space import DIMENSIONS


def test_the_default_dimension_is_communication_style() -> None:
    dim = ss.find_dimension(ss.COMMUNICATION_STYLE)
    assert dim.positive == "Concise communication style" and dim.negative == "Detailed communication style"
    assert ss.find_dimension(str(dim.index)) == dim == ss.find_dimension("detailed communication")
    with pytest.raises(ValueError):
        ss.find_dimension("communication")  # several dimensions hit
    with pytest.raises(ValueError):
        ss.find_dimension("no such pole")


def test_expected_direction_and_monotone_counting() -> None:
    dim = ss.find_dimension(ss.COMMUNICATION_STYLE)
    assert ss.expected_sign(dim, "length") == -1  # more concise, fewer words
    assert ss.expected_sign(dim, "sentiment") is None
    assert ss.expected_sign(dim, "sentiment", "up") == +1
    assert ss.expected_sign(DIMENSIONS[0], ss.PROJECTION) == +1
    assert ss.PROJECTION == studio.PROJECTION
    assert ss.monotone([5, 5, 3, 1], -1) and not ss.monotone([5, 6, 3], -1)
    assert ss.monotone([1, 1], -1) and ss.monotone([1, 1], +1)


def test_profile_lines_follow_the_pba_thresholds() -> None:
    dim = ss.find_dimension(ss.COMMUNICATION_STYLE)
    lines = dict(ss.profile_lines(dim, [0, 0.25, 0.5, 0.75, 1]))
    assert lines[0] == lines[0.25] == dim.negative and lines[0.75] == lines[1] == dim.positive
    assert lines[0.5] == ""


def test_a_tiny_sweep_prints_per_value_rows_and_rho(tiny_folder, tmp_path, capsys) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text("How do I brew green tea?\n\n")
    text = ss.main(["--model", str(tiny_folder), "--device", "cpu", "--values", "0,1", "--questions", str(questions),
                    "--samples", "1", "--max-new-tokens", "6", "--threads", "1"])
    assert text in capsys.readouterr().out
    assert "command: benchmarks/studio_sweep.py --model" in text and "wall time:" in text
    assert "'Detailed communication style'" in text and "'Concise communication style'" in text
    assert "Q1: How do I brew green tea?" in text and "expected direction: down" in text
    # Per question and pooled: one row per value, each with a computed mean.
    assert len(re.findall(r"^0\s+-?\d+\.\d", text, re.MULTILINE)) == 2
    assert len(re.findall(r"^1\s+-?\d+\.\d", text, re.MULTILINE)) == 2
    assert re.search(r"^rho = (undefined|[+-]\d\.\d\d);", text, re.MULTILINE)
    assert re.search(r"^rho over all \(value, measurement\) points = ", text, re.MULTILINE)
    assert re.search(r"monotone non-increasing \(expected\): \d of 1", text)
    assert re.search(r"^answers cut at the token limit: \d of 2$", text, re.MULTILINE)


def test_the_control_shares_its_answers_across_values(tiny_folder, capsys) -> None:
    text = ss.main(["--model", str(tiny_folder), "--device", "cpu", "--values", "0,1", "--questions", "1",
                    "--samples", "1", "--max-new-tokens", "6", "--mode", "none", "--threads", "1"])
    capsys.readouterr()
    assert "mode: none" in text and "control (--mode none)" in text
    assert "rho = undefined; means monotone flat" in text
