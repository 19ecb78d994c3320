"""Pairwise accuracy on AlignX records with the tiny random model, and the `eval` command."""

from __future__ import annotations

import json

import pytest

from personalign import cli
from personalign.engine import Engine
from personalign.evaluation import MODES, evaluate, evaluate_modes, wilson_interval
from tests.shared_data import load_alignx

DATA = "p_soups_student_phd.json"


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)


@pytest.mark.parametrize("mode", MODES)
def test_real_records_every_mode(tiny_llm, mode):
    records = load_alignx(DATA)[:5]
    seen = []
    result = evaluate(records, Engine(tiny_llm), mode, progress=lambda done, total: seen.append((done, total)))
    assert result.mode == mode and result.n == 5
    assert [r.index for r in result.records] == list(range(5))
    assert 0.0 <= result.ci_low <= result.accuracy <= result.ci_high <= 1.0
    assert result.accuracy == sum(r.correct for r in result.records) / 5
    assert all(r.correct == (r.score_chosen > r.score_rejected) for r in result.records)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_contrast_is_pba_minus_raw(tiny_llm):
    records = load_alignx(DATA)[:2]
    results = evaluate_modes(records, Engine(tiny_llm), MODES)
    for i in range(2):
        raw, pba, contrast = (results[m].records[i] for m in ("raw", "pba", "contrast"))
        assert contrast.score_chosen == pytest.approx(pba.score_chosen - raw.score_chosen)
        assert contrast.score_rejected == pytest.approx(pba.score_rejected - raw.score_rejected)
    # Scored alone, a mode gives the same numbers as scored alongside the others.
    alone = evaluate(records, Engine(tiny_llm), "contrast")
    assert [r.score_chosen for r in alone.records] == pytest.approx([r.score_chosen for r in results["contrast"].records])


def test_records_missing_optional_keys(tiny_llm):
    records = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},  # no persona at all
        {
            "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.",
            "User-Generated Content": [{"prompt": "Cats?", "comment": "Love them."}],
            "Demographic Information": "A student.",
            "Preference Direction": [0.5] * 89 + [1.0],  # direction, no profile string
        },
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "profile": "Concise communication style"},
    ]
    results = evaluate_modes(records, Engine(tiny_llm), MODES)
    for result in results.values():
        assert result.n == 3 and 0.0 <= result.accuracy <= 1.0


def test_bad_input_is_a_clear_error(tiny_llm):
    engine = Engine(tiny_llm)
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate([{"prompt": "a", "chosen": "b", "rejected": "c"}], engine, "dpo")
    with pytest.raises(ValueError, match="'rejected'"):
        evaluate([{"prompt": "a", "chosen": "b"}], engine, "raw")
    with pytest.raises(ValueError, match="no records"):
        evaluate([], engine, "raw")


@pytest.fixture
def eval_cli(tiny_llm, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda args: Engine(tiny_llm))
    return lambda *argv: cli.run(cli.build_parser().parse_args(["eval", *argv]))


def test_cli_eval_writes_limited_lines(eval_cli, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(load_alignx(DATA)[:3]))
    out = tmp_path / "results.jsonl"
    assert eval_cli("--data", str(data), "--mode", "pba", "--limit", "2", "--out", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and {r["mode"] for r in rows} == {"pba"}
    assert set(rows[0]) == {"mode", "index", "score_chosen", "score_rejected", "correct"}
    captured = capsys.readouterr()
    assert "pba" in captured.out and "2/2 records" in captured.err

    assert eval_cli("--data", str(data), "--mode", "all", "--limit", "2", "--out", str(out)) == 0
    assert len(out.read_text().splitlines()) == 2 * len(MODES)
    table = capsys.readouterr().out
    assert all(mode in table for mode in MODES)


def test_cli_eval_missing_or_invalid_file(eval_cli, tmp_path, capsys):
    assert eval_cli("--data", str(tmp_path / "absent.json"), "--mode", "raw") == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert eval_cli("--data", str(bad), "--mode", "raw") == 2
    assert "not valid JSON" in capsys.readouterr().err
