"""DPO preference training: the pairs, the loss, a run on the tiny model, the adapter, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from personalign.adapter_training import LoraSettings
from personalign.cli import main
from personalign.evaluation import record_messages
from personalign.models import ADAPTER_METADATA, ModelConfig, load_model
from personalign.preference_training import (
    PreferenceTrainingConfig,
    dpo_loss,
    pair_logprobs,
    preference_pairs,
    train_preference,
)
from personalign.prompts import Mode, build_messages
from tests.conftest import make_tiny_llm

PAIRWISE = "Pair-wise Comparative Feedback"


def _record(profile: str, post: str, chosen: str, rejected: str, history=()) -> dict:
    return {"prompt": post, "chosen": chosen, "rejected": rejected, "profile": profile,
            PAIRWISE: [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in history]}


RECORDS = [
    _record("Concise communication style", "Explain rain.", "Water falls.", "Rain is a long story...",
            history=[("Explain snow.", "Frozen rain.", "Snow, you see, is..."), ("Say hi.", "Hi.", "Hi.")]),
    _record("Detailed communication style", "Explain wind.", "Air moves from high to low pressure because...",
            "Air moves."),
]


def _text(pair) -> str:
    return "\n".join(m["content"] for m in pair.messages)


# --- the pairs -----------------------------------------------------------------------------------


def test_pairs_take_each_record_and_its_history_framed_by_its_person() -> None:
    pairs = preference_pairs(RECORDS, "pba")
    # Record 0: its own pair and one history pair ("Say hi." has equal replies and teaches nothing).
    assert [(p.record, p.chosen) for p in pairs] == [(0, "Water falls."), (0, "Frozen rain."),
                                                     (1, "Air moves from high to low pressure because...")]
    assert list(pairs[1].messages) == record_messages("pba", RECORDS[0], "Explain snow.")
    assert "Concise communication style" in _text(pairs[1]) and "Explain snow." in _text(pairs[1])
    assert "Detailed communication style" in _text(pairs[2])

    raw = preference_pairs(RECORDS, "raw", history=False)
    assert [p.record for p in raw] == [0, 1]
    assert list(raw[0].messages) == build_messages(Mode.NONE, None, [], "Explain rain.")


def test_excluded_posts_are_left_out_wherever_they_appear() -> None:
    pairs = preference_pairs(RECORDS, "pba", exclude_posts={"Explain snow.", "Explain wind."})
    assert [p.chosen for p in pairs] == ["Water falls."]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (["not a record"], "record 0: not a JSON object"),
        ([{"prompt": "p", "chosen": "c"}], "must all be text"),
        ([{**RECORDS[0], PAIRWISE: {"prompt": "p"}}], "must be a list"),
        ([{**RECORDS[0], PAIRWISE: [{"prompt": "p", "chosen": 3, "rejected": "r"}]}], "pairwise item 0"),
    ],
)
def test_malformed_records_are_clear_errors(records, message) -> None:
    with pytest.raises(ValueError, match=message):
        preference_pairs(records, "pba")


def test_ica_is_not_a_training_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        preference_pairs(RECORDS, "ica")
    with pytest.raises(ValueError, match="kind"):
        PreferenceTrainingConfig(kind="ica")


# --- the loss ------------------------------------------------------------------------------------


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_margin_grows() -> None:
    reference = torch.tensor([[-10.0, -12.0]])
    assert dpo_loss(reference.clone(), reference, beta=0.1).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    better = torch.tensor([[-9.0, -13.0]])  # chosen up 1, rejected down 1: margin 2
    assert dpo_loss(better, reference, beta=0.5).item() == pytest.approx(-torch.nn.functional.logsigmoid(
        torch.tensor(1.0)).item())
    policy = reference.clone().requires_grad_()
    dpo_loss(policy, reference, beta=0.1).backward()
    assert policy.grad[0, 0] < 0 < policy.grad[0, 1]  # descent raises chosen and lowers rejected


# --- a run on the tiny model ---------------------------------------------------------------------

FAST = PreferenceTrainingConfig(lr=5e-3, beta=0.5, batch_size=2, epochs=8, seed=1, lora=LoraSettings(rank=4))


def _margins(model, loaded, pairs) -> list[float]:
    with torch.inference_mode():
        return [float(s[0] - s[1]) for s in (pair_logprobs(model, loaded, p) for p in pairs)]


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    loaded = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    pairs = preference_pairs(RECORDS, "pba")
    before_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    before = _margins(loaded.model, loaded, pairs)
    steps = []
    out = tmp_path_factory.mktemp("pref-adapter")
    report = train_preference(loaded, pairs, FAST, out, run_info={"data": "hand-made"},
                              progress=lambda *a: steps.append(a))
    return loaded, pairs, report, before_state, before, steps


def test_training_widens_the_chosen_margin(trained, tiny_folder) -> None:
    _, pairs, report, _, before, steps = trained
    assert report.steps == len(steps) == 8 * 2  # 3 pairs, no probe (too few), batches of 2, 8 epochs
    assert report.probe_pairs == 0 and report.probe_accuracy_before is None
    assert report.last_loss < report.first_loss
    adapted = load_model(ModelConfig(model=str(tiny_folder), device="cpu", adapter=report.out_dir))
    after = _margins(adapted.model, adapted, pairs)
    assert sum(after) > sum(before) + 1.0


def test_the_base_model_is_left_as_it_was(trained) -> None:
    loaded, pairs, _, before_state, before, _ = trained
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    after_state = loaded.model.state_dict()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert _margins(loaded.model, loaded, pairs) == pytest.approx(before)


def test_adapter_metadata_says_what_it_is(trained) -> None:
    loaded, _, report, _, _, _ = trained
    meta = json.loads((report.out_dir / ADAPTER_METADATA).read_text())
    assert (meta["purpose"], meta["method"], meta["kind"], meta["data"]) == ("preference", "dpo", "pba", "hand-made")
    assert meta["base_model"] == loaded.name and meta["steps"] == report.steps and meta["lora"]["rank"] == 4


def test_a_probe_of_whole_records_is_held_out(tmp_path) -> None:
    many = [_record("Concise communication style", f"Post {i}?", f"Yes {i}.", f"No {i}, because...")
            for i in range(30)]
    pairs = preference_pairs(many, "pba")
    config = PreferenceTrainingConfig(max_steps=1, batch_size=2, lora=LoraSettings(rank=2, layers=(1,)))
    report = train_preference(make_tiny_llm(), pairs, config, tmp_path / "a")
    assert report.probe_pairs == 3 and report.train_pairs == 27 and report.steps == 1
    assert 0 <= report.probe_accuracy_before <= 1 and 0 <= report.probe_accuracy_after <= 1


def test_too_few_pairs_or_a_used_folder_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 2 pairs"):
        train_preference(make_tiny_llm(), preference_pairs(RECORDS[1:], "pba"), FAST, tmp_path / "a")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder"):
        train_preference(make_tiny_llm(), preference_pairs(RECORDS, "pba"), FAST, tmp_path)


# --- the command line ----------------------------------------------------------------------------


def test_train_preference_then_eval_the_held_out_records(tiny_folder, tmp_path, capsys) -> None:
    records = [_record("Concise communication style" if i % 2 else "Detailed communication style",
                       f"Question {i}?", f"Short {i}.", f"A long answer {i} that goes on.",
                       history=[(f"Question {(i + 1) % 6}?", "Brief.", "Lengthy reply.")]) for i in range(6)]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "adapter"
    code = main(["train-preference", "--model", str(tiny_folder), "--device", "cpu", "--data", str(data),
                 "--out", str(out), "--holdout", "0:2", "--steps", "2", "--batch-size", "2", "--top-layers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 2/2" in captured.err and "--records 0:2" in captured.out
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    # Records 0 and 1 are held out, and so is record 5's history pair, whose post is record 0's.
    assert (meta["held_out_records"], meta["excluded_posts"], meta["train_pairs"]) == (2, 2, 7)
    assert meta["lora"]["layers"] == [1] and meta["history"] is True and meta["kind"] == "pba"

    results = tmp_path / "results.jsonl"
    code = main(["eval", "--model", str(tiny_folder), "--device", "cpu", "--adapter", str(out), "--data", str(data),
                 "--records", "0:2,4", "--mode", "contrast", "--out", str(results)])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["index"] for line in results.read_text().splitlines()] == [0, 1, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--holdout", "all"], "no records to train on"),
        (["--holdout", "0:9"], "outside the 2 records"),
        (["--kind", "raw", "--adapter", "."], "leave out --adapter"),
        (["--steps", "0"], "max_steps"),
    ],
)
def test_train_preference_errors_are_one_line_and_exit_2(tiny_folder, tmp_path, capsys, extra, message) -> None:
    data = tmp_path / "records.json"
    data.write_text(json.dumps(RECORDS))
    code = main(["train-preference", "--model", str(tiny_folder), "--device", "cpu", "--data", str(data),
                 "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err
