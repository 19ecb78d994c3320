"""Pairwise accuracy on AlignX records with the tiny random model, and the `eval` command.

The inferred-profile tests also run the packaged embedding model (all-MiniLM-L6-v2) on the CPU.
"""

from __future__ import annotations

import json

import pytest

from personalign import cli, evaluation
from personalign.embeddings import default_embedder
from personalign.engine import Engine
from personalign.evaluation import (
    MODES,
    PROFILE_SOURCES,
    EvalResult,
    RecordResult,
    accuracy_by_group,
    evaluate,
    evaluate_modes,
    inferred_direction,
    paired_exact_p,
    parse_selection,
    wilson_interval,
)
from personalign.persona import Persona, from_record
from personalign.profile import render_profile
from personalign.profile_inference import EmbeddingInferrer, items_from_persona
from personalign.prompts import Mode, build_messages
from personalign.scoring import response_logprobs
from tests.shared_data import load_alignx

DATA = "p_soups_student_phd.json"


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)


def test_paired_exact_p_known_values():
    assert paired_exact_p(0, 0) == 1.0  # nothing differs: no evidence either way
    assert paired_exact_p(5, 0) == pytest.approx(2 / 32)
    assert paired_exact_p(3, 3) == 1.0
    assert paired_exact_p(1, 7) == paired_exact_p(7, 1) == pytest.approx(2 * 9 / 256)


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


# --- PBA's bridge: profiles inferred from each record's behaviour -----------------------------

GIVEN = "Concise communication style"  # a given profile the inferred path must never show

BEHAVIOUR = {
    "Pair-wise Comparative Feedback": [
        {"prompt": "How should I spend my weekend?",
         "chosen": "Go hiking in the mountains, camp under the stars and cook over a fire!",
         "rejected": "Stay home, tidy up and go to bed early."},
        {"prompt": "Any advice for my first job interview?",
         "chosen": "Be brief: three points, one example each, then stop talking.",
         "rejected": "Well, there are many, many things one might consider, so let me walk you through all of them."},
    ],
    "User-Generated Content": [
        {"prompt": "Post: my dog learnt a new trick", "comment": "I adore dogs, they are the best!"},
    ],
}


def _hand_made() -> list[dict]:
    return [
        {"prompt": "Plan a trip for me.", "chosen": "A week of trekking in Patagonia.", "rejected": "A spa hotel.",
         "profile": GIVEN, **BEHAVIOUR},
        # Same behaviour, a different (and unreadable) given direction: the inference never reads it.
        {"prompt": "Plan a trip for me.", "chosen": "A week of trekking in Patagonia.", "rejected": "A spa hotel.",
         "profile": "not a label at all", "Preference Direction": [2.0], **BEHAVIOUR},
        # No behaviour at all: the empty-profile rule's result for no evidence, the empty profile.
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "profile": GIVEN},
    ]


@pytest.fixture(scope="module")
def embedding_inferrer():
    return EmbeddingInferrer(default_embedder())


@pytest.fixture
def prompts_seen(monkeypatch):
    """Every message list the evaluation scores; the real scorer still runs."""
    seen: list[list[dict[str, str]]] = []

    def spy(engine, messages, replies):
        seen.append(messages)
        return response_logprobs(engine, messages, replies)

    monkeypatch.setattr(evaluation, "response_logprobs", spy)
    return seen


def test_embedding_profile_is_inferred_from_behaviour_and_used(tiny_llm, embedding_inferrer, prompts_seen):
    records = _hand_made()
    engine = Engine(tiny_llm)
    seen_progress = []
    results = evaluate_modes(records, engine, MODES, profile_source="embedding", inferrer=embedding_inferrer,
                             progress=lambda done, total: seen_progress.append((done, total)))
    assert seen_progress == [(1, 3), (2, 3), (3, 3)]
    expected = render_profile(embedding_inferrer.infer(items_from_persona(from_record(BEHAVIOUR))).direction)
    assert expected and expected != GIVEN
    pba, contrast = results["pba"].records, results["contrast"].records
    assert [r.profile for r in pba] == [expected, expected, ""]
    assert [r.profile for r in contrast] == [expected, expected, ""]
    assert all(r.profile is None for m in ("raw", "ica") for r in results[m].records)
    assert results["pba"].profile_source == results["contrast"].profile_source == "embedding"
    assert results["raw"].profile_source is None and results["ica"].profile_source is None
    # The prompt scored holds the inferred profile and never the record's own.
    pba_system = build_messages(Mode.PBA, Persona(), [], "x", profile="")[0]["content"]
    pba_turns = [m[-1]["content"] for m in prompts_seen if m[0]["content"] == pba_system]
    assert len(pba_turns) == 3
    assert expected in pba_turns[0] and expected in pba_turns[1]
    assert all(GIVEN not in t and "not a label" not in t for t in pba_turns)
    # The numbers are those of the PBA prompt with the inferred profile.
    for record, row in zip(records, pba):
        messages = build_messages(Mode.PBA, Persona(), [], record["prompt"], profile=row.profile)
        c, r = response_logprobs(engine, messages, [record["chosen"], record["rejected"]])
        assert (row.score_chosen, row.score_rejected) == pytest.approx((c, r))
        assert row.correct == (row.score_chosen > row.score_rejected)
    assert pba[0].score_chosen == pytest.approx(pba[1].score_chosen)
    for i in range(3):
        raw = results["raw"].records[i]
        assert contrast[i].score_chosen == pytest.approx(pba[i].score_chosen - raw.score_chosen)
    for result in results.values():
        assert result.n == 3 and 0.0 <= result.ci_low <= result.accuracy <= result.ci_high <= 1.0
        assert result.seconds > 0


def test_embedding_source_changes_only_pba_and_contrast(tiny_llm, embedding_inferrer):
    records = _hand_made()
    engine = Engine(tiny_llm)
    given = evaluate_modes(records, engine, MODES)
    inferred = evaluate_modes(records, engine, MODES, profile_source="embedding", inferrer=embedding_inferrer)
    for mode in ("raw", "ica"):
        assert [r.to_dict() for r in inferred[mode].records] == [r.to_dict() for r in given[mode].records]
    # Record 0's given and inferred profiles differ, so its PBA scores do too.
    assert inferred["pba"].records[0].score_chosen != pytest.approx(given["pba"].records[0].score_chosen)


def test_given_source_is_unchanged(tiny_llm):
    records = load_alignx(DATA)[:2]
    engine = Engine(tiny_llm)
    default = evaluate_modes(records, engine, MODES)
    explicit = evaluate_modes(records, engine, MODES, profile_source="given")
    for mode in MODES:
        assert [r.to_dict() for r in explicit[mode].records] == [r.to_dict() for r in default[mode].records]
        assert all(set(r.to_dict()) == {"index", "score_chosen", "score_rejected", "correct"}
                   for r in default[mode].records)
        assert all(r.profile is None for r in default[mode].records)
    # PBA with the given profile scores the record's own profile string.
    row = default["pba"].records[0]
    messages = build_messages(Mode.PBA, Persona(), [], records[0]["prompt"], profile=records[0]["profile"])
    assert (row.score_chosen, row.score_rejected) == pytest.approx(
        response_logprobs(engine, messages, [records[0]["chosen"], records[0]["rejected"]])
    )


def test_no_behaviour_gives_the_empty_profile(embedding_inferrer):
    assert render_profile(inferred_direction({"profile": GIVEN}, embedding_inferrer)) == ""
    assert render_profile(inferred_direction(BEHAVIOUR, embedding_inferrer)) != ""


def test_bad_profile_source_is_a_clear_error(tiny_llm, embedding_inferrer):
    engine = Engine(tiny_llm)
    record = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    assert PROFILE_SOURCES == ("given", "embedding")
    with pytest.raises(ValueError, match="unknown profile source"):
        evaluate(record, engine, "pba", profile_source="oracle")
    with pytest.raises(ValueError, match="uses the records' own profiles"):
        evaluate(record, engine, "pba", inferrer=embedding_inferrer)
    bad_item = [{**record[0], "User-Generated Content": [{"prompt": "p", "comment": "   "}]}]
    with pytest.raises(ValueError, match="record 0"):
        evaluate(bad_item, engine, "pba", profile_source="embedding", inferrer=embedding_inferrer)


def test_cli_eval_profile_flag(eval_cli, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(_hand_made()))
    given_out, default_out, inferred_out = (tmp_path / f"{name}.jsonl" for name in ("given", "default", "inferred"))
    assert eval_cli("--data", str(data), "--mode", "all", "--out", str(default_out)) == 0
    default_table = capsys.readouterr().out
    assert eval_cli("--data", str(data), "--mode", "all", "--profile", "given", "--out", str(given_out)) == 0
    assert capsys.readouterr().out == default_table
    assert given_out.read_bytes() == default_out.read_bytes()

    assert eval_cli("--data", str(data), "--mode", "all", "--profile", "embedding", "--out", str(inferred_out)) == 0
    captured = capsys.readouterr()
    assert "3/3 records" in captured.err
    assert "pba and contrast: profile inferred from behaviour by embedding" in captured.out
    rows = [json.loads(line) for line in inferred_out.read_text().splitlines()]
    assert len(rows) == 3 * len(MODES)
    for row in rows:
        assert ("profile" in row) == (row["mode"] in ("pba", "contrast"))
    assert [r["profile"] for r in rows if r["mode"] == "pba"][2] == ""
    assert all(GIVEN not in r.get("profile", "") for r in rows)


# --- choosing records -----------------------------------------------------------------------------


def test_parse_selection_ranges_and_indices():
    assert parse_selection("0:3,7,5:6", 10) == [0, 1, 2, 5, 7]
    assert parse_selection(" 8: , :2 ", 10) == [0, 1, 8, 9]
    assert parse_selection("all", 4) == [0, 1, 2, 3]
    assert parse_selection("1:3,2", 4) == [1, 2]  # repeats collapse


@pytest.mark.parametrize(("spec", "message"), [("0:11", "outside"), ("3:3", "empty"), ("x", "neither"),
                                               ("-1", "outside"), ("1:2:3", "neither")])
def test_parse_selection_refuses_what_it_cannot_mean(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_selection(spec, 10)


def test_cli_eval_records_keep_their_file_indices(eval_cli, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(load_alignx(DATA)[:4]))
    out = tmp_path / "results.jsonl"
    assert eval_cli("--data", str(data), "--mode", "raw", "--records", "3,1", "--out", str(out)) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [1, 3]
    assert eval_cli("--data", str(data), "--mode", "raw", "--records", "1", "--limit", "2") == 2
    assert "not both" in capsys.readouterr().err


def test_accuracy_by_group_splits_records_by_label():
    rows = tuple(RecordResult(index=i, score_chosen=1.0, score_rejected=0.0 if i < 3 else 2.0, correct=i < 3)
                 for i in range(5))
    result = EvalResult(mode="pba", records=rows, accuracy=0.6, ci_low=0.2, ci_high=0.9, seconds=1.0)
    groups = accuracy_by_group(result, ["a", "b", "a", "b", "b"])
    assert list(groups) == ["a", "b"]
    assert (groups["a"].n, groups["a"].accuracy) == (2, 1.0)
    assert (groups["b"].n, groups["b"].correct) == (3, 1)
    assert (groups["b"].ci_low, groups["b"].ci_high) == wilson_interval(1, 3)


def test_cli_eval_group_by_prints_a_row_per_group(eval_cli, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(load_alignx(DATA)[298:302]))  # two students, then two PhD students
    assert eval_cli("--data", str(data), "--mode", "raw", "--group-by", "ground_truth_persona") == 0
    out = capsys.readouterr().out.split("by ground_truth_persona:")[1]
    lines = [line for line in out.splitlines() if line.startswith("raw")]
    assert len(lines) == 2 and all(" 2 " in line for line in lines)
    assert "elementary school" in lines[0] and "PhD" in lines[1]
