"""SMR/LMR memory training: masks and labels, data sources, training, the adapter, and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch

from personalign.cli import main
from personalign.memory_training import (
    _ECHOES,
    _QUESTIONS,
    IGNORE,
    MemoryTrainingConfig,
    answer_indices,
    build_samples,
    build_stages,
    collate,
    dialogue_sample,
    lmr_sample,
    load_corpus,
    load_dialogues,
    memory_loss,
    reply_indices,
    smr_sample,
    synthetic_dialogues,
    train_memory,
)
from personalign.models import ADAPTER_METADATA, ModelConfig, apply_adapter, load_model
from personalign.recall_dialogues import FAR, NEAR, TRAINING_FACTS, recall_dialogues
from personalign.streaming_dialogue import additive_mask, streaming_dialogue_mask
from tests.conftest import make_tiny_llm

BOS, EOU = 1, 2  # as in tests/conftest.py (and SmolLM2)
A, B, C, D = 10, 20, 30, 40
# Small and fast on the tiny model; a high lr so that a few steps visibly move the loss.
FAST = MemoryTrainingConfig(samples=40, max_tokens=192, pairs=4, lr=5e-3, max_steps=12, seed=3)


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    """One short training run on a freshly loaded tiny model: (loaded model, report, its state before)."""
    loaded = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    steps = []
    out = tmp_path_factory.mktemp("adapter")
    report = train_memory(loaded, "synthetic", FAST, out, progress=lambda *a: steps.append(a))
    return loaded, report, before, steps


def _rows(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.replace(" ", "")] for row in rows])


# --- masks and labels on hand-built sequences ----------------------------------------------------


def test_smr_mask_and_labels_on_hand_built_sequence() -> None:
    sample = smr_sample([[A, A], [B]], EOU, BOS)
    #                  0    1  2  3    4  5  6    7  8    9  10
    assert sample.input_ids.tolist() == [BOS, A, A, EOU, A, A, EOU, B, EOU, B, EOU]
    expected = _rows(
        # B a a E a a E b E b E
        "1 0 0 0 0 0 0 0 0 0 0",  # BOS
        "1 1 0 0 0 0 0 0 0 0 0",  # a   first copy: BOS and its own prefix
        "1 1 1 0 0 0 0 0 0 0 0",  # a
        "1 1 1 1 0 0 0 0 0 0 0",  # EoU of the first copy
        "1 0 0 1 1 0 0 0 0 0 0",  # a'  second copy: BOS, the first copy's EoU, own prefix
        "1 0 0 1 1 1 0 0 0 0 0",  # a'
        "1 0 0 1 1 1 1 0 0 0 0",  # EoU'
        "1 0 0 0 0 0 0 1 0 0 0",  # b   the next pair sees nothing of the first
        "1 0 0 0 0 0 0 1 1 0 0",  # EoU
        "1 0 0 0 0 0 0 0 1 1 0",  # b'
        "1 0 0 0 0 0 0 0 1 1 1",  # EoU'
    )
    assert torch.equal(sample.attention, expected)
    assert sample.labels.tolist() == [IGNORE] * 4 + [A, A, EOU] + [IGNORE] * 2 + [B, EOU]
    assert sample.kind == "smr"


def test_lmr_mask_and_labels_on_hand_built_sequence() -> None:
    sample = lmr_sample([([A], [B]), ([C], [D])], 0, EOU, BOS)
    #                  0    1  2    3  4    5  6    7  8    9  10   11 12
    assert sample.input_ids.tolist() == [BOS, A, EOU, B, EOU, C, EOU, D, EOU, A, EOU, B, EOU]
    expected = _rows(
        # B a E b E c E d E a E b E
        "1 0 0 0 0 0 0 0 0 0 0 0 0",  # BOS
        "1 1 0 0 0 0 0 0 0 0 0 0 0",  # a
        "1 1 1 0 0 0 0 0 0 0 0 0 0",  # EoU(a)
        "1 1 1 1 0 0 0 0 0 0 0 0 0",  # b: its prompt a whole, own prefix
        "1 1 1 1 1 0 0 0 0 0 0 0 0",  # EoU(b)
        "1 0 1 0 1 1 0 0 0 0 0 0 0",  # c: another dialogue, so only the sinks of the first pair
        "1 0 1 0 1 1 1 0 0 0 0 0 0",  # EoU(c)
        "1 0 1 0 1 1 1 1 0 0 0 0 0",  # d: c whole, sinks
        "1 0 1 0 1 1 1 1 1 0 0 0 0",  # EoU(d)
        "1 0 1 0 1 0 1 0 1 1 0 0 0",  # a again: sinks only
        "1 0 1 0 1 0 1 0 1 1 1 0 0",  # its EoU
        "1 0 1 0 1 0 1 0 1 1 1 1 0",  # b again: sinks, a again whole, own prefix
        "1 0 1 0 1 0 1 0 1 1 1 1 1",  # its EoU
    )
    assert torch.equal(sample.attention, expected)
    assert sample.labels.tolist() == [IGNORE] * 9 + [A, EOU, B, EOU]
    with pytest.raises(ValueError, match="repeat"):
        lmr_sample([([A], [B])], 1, EOU, BOS)
    with pytest.raises(ValueError, match="only the layout"):
        smr_sample([[A, EOU, B]], EOU, BOS)


def test_dialogue_sample_is_the_inference_mask_with_loss_after_the_first_utterance() -> None:
    sample = dialogue_sample([[A], [B, B], [C]], EOU, BOS)
    #                                    0    1  2    3  4  5    6  7
    assert sample.input_ids.tolist() == [BOS, A, EOU, B, B, EOU, C, EOU]
    assert torch.equal(sample.attention, streaming_dialogue_mask(sample.input_ids.tolist(), EOU, BOS))
    assert torch.equal(sample.attention, _rows(
        # B a E b b E c E
        "1 0 0 0 0 0 0 0",  # BOS
        "1 1 0 0 0 0 0 0",  # a
        "1 1 1 0 0 0 0 0",  # E  (a's)
        "1 1 1 1 0 0 0 0",  # b  sees all of the previous utterance
        "1 1 1 1 1 0 0 0",  # b
        "1 1 1 1 1 1 0 0",  # E  (b's)
        "1 0 1 1 1 1 1 0",  # c  a's tokens are gone; a's EoU and all of b remain
        "1 0 1 1 1 1 1 1",  # E  (c's)
    ))
    assert sample.labels.tolist() == [IGNORE, IGNORE, IGNORE, B, B, EOU, C, EOU] and sample.kind == "dialogue"
    with pytest.raises(ValueError, match="two utterances"):
        dialogue_sample([[A]], EOU, BOS)


def test_dialogue_sample_targets_limit_the_loss_to_the_utterances_named() -> None:
    sample = dialogue_sample([[A], [B, B], [C]], EOU, BOS, targets=[2])
    assert sample.labels.tolist() == [IGNORE] * 6 + [C, EOU]
    assert torch.equal(sample.attention, dialogue_sample([[A], [B, B], [C]], EOU, BOS).attention)
    for bad in ([0], [3]):  # the first utterance has nothing before it; there is no fourth
        with pytest.raises(ValueError, match="targets must be utterance numbers from 1 to 2"):
            dialogue_sample([[A], [B, B], [C]], EOU, BOS, targets=bad)


def test_reply_indices_are_the_utterances_after_a_question() -> None:
    assert reply_indices(["Hi?", "yes", "Why? ", "no", "ok.", "So?"]) == [1, 3]
    assert reply_indices(["Nothing asked.", "Still nothing."]) == []


def test_replies_carry_the_loss_once_each_across_the_runs_a_dialogue_is_cut_into(tiny_llm) -> None:
    dialogue = ("Hi?", "yes", "Why?", "no", "ok", "So?", "fine", "bye")  # replies: 1, 3, 6
    config = MemoryTrainingConfig(method="dialogue", loss_on="replies", max_tokens=24)
    (samples,) = build_stages([dialogue], tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    assert len(samples) >= 2  # 33 tokens do not fit 24: the dialogue is cut into runs
    scored = []
    for sample in samples:
        utterance = sample.utterance_of_token
        for number in utterance[sample.labels != IGNORE].unique().tolist():
            tokens = sample.input_ids[(utterance == number) & (sample.input_ids != EOU)]
            scored.append(tiny_llm.tokenizer.decode(tokens.tolist()))
    assert sorted(scored) == ["fine", "no", "yes"]
    with pytest.raises(ValueError, match="found no reply to a question"):
        build_stages([("Hello.", "Hi.")], tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)


def test_all_runs_the_memory_objectives_then_whole_dialogues(tiny_llm) -> None:
    dialogues = synthetic_dialogues(10, 0)
    config = MemoryTrainingConfig(method="all", max_tokens=96, pairs=3)
    memory, dialogue = build_stages(dialogues, tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    assert {s.kind for s in memory} == {"smr", "lmr"} and {s.kind for s in dialogue} == {"dialogue"}
    flat = build_samples(dialogues, tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    assert [s.input_ids.tolist() for s in flat] == [s.input_ids.tolist() for s in [*memory, *dialogue]]
    tokenized = [[tiny_llm.tokenizer(u, add_special_tokens=False)["input_ids"][:config.max_utterance_tokens]
                  for u in d] for d in dialogues]
    covered = set()
    for s in dialogue:
        ids = s.input_ids.tolist()
        assert len(ids) <= config.max_tokens
        run = _split(ids[1:])
        # A run is consecutive utterances of one dialogue; runs overlap by the utterance replied to.
        home = next(d for d, utts in enumerate(tokenized)
                    if any(utts[i:i + len(run)] == run for i in range(len(utts))))
        start = next(i for i in range(len(tokenized[home])) if tokenized[home][i:i + len(run)] == run)
        covered |= {(home, i) for i in range(start + 1, start + len(run))}
    # Every utterance after a dialogue's first is a target somewhere.
    assert covered == {(d, i) for d, utts in enumerate(tokenized) for i in range(1, len(utts))}
    only, = build_stages(dialogues, tiny_llm.tokenizer, dataclasses.replace(config, method="dialogue"),
                         eou_id=EOU, bos_id=BOS)
    assert sorted(s.input_ids.tolist() for s in only) == sorted(s.input_ids.tolist() for s in dialogue)


def test_training_masks_never_allow_what_inference_forbids(tiny_llm) -> None:
    # The inference mask is what the model runs with later: training may only remove links from it.
    config = MemoryTrainingConfig(samples=12, max_tokens=160, pairs=3)
    samples = build_samples(synthetic_dialogues(12, 0), tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    assert {s.kind for s in samples} == {"smr", "lmr"}
    for s in samples:
        inference = streaming_dialogue_mask(s.input_ids.tolist(), EOU, BOS)
        assert not (s.attention & ~inference).any()


def test_built_samples_copy_what_they_must_recall(tiny_llm) -> None:
    config = MemoryTrainingConfig(samples=20, max_tokens=200, pairs=4, seed=5)
    samples = build_samples(synthetic_dialogues(20, 5), tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    for s in samples:
        ids = s.input_ids.tolist()
        assert ids[0] == BOS and ids[-1] == EOU and len(ids) <= config.max_tokens
        assert ids.count(BOS) == 1  # only the layout places BOS and EoU
        target = [t for t, label in zip(ids, s.labels.tolist()) if label != IGNORE]
        assert target == [label for label in s.labels.tolist() if label != IGNORE]
        utterances = _split(ids[1:])
        if s.kind == "smr":  # (u, u) pairs; the loss is on each second copy
            assert all(utterances[i] == utterances[i + 1] for i in range(0, len(utterances), 2))
            assert target == [t for i in range(1, len(utterances), 2) for t in utterances[i] + [EOU]]
        else:  # the last pair repeats an earlier pair; the loss is on it
            *earlier, u, v = utterances
            assert [u, v] in [earlier[i:i + 2] for i in range(0, len(earlier), 2)]
            assert target == u + [EOU] + v + [EOU]


def _split(ids: list[int]) -> list[list[int]]:
    out, current = [], []
    for t in ids:
        if t == EOU:
            out.append(current)
            current = []
        else:
            current.append(t)
    return out


def test_build_samples_is_deterministic_per_seed(tiny_llm) -> None:
    dialogues = synthetic_dialogues(15, 0)

    def build(seed: int) -> list[list[int]]:
        config = MemoryTrainingConfig(max_tokens=160, seed=seed)
        return [s.input_ids.tolist() for s in build_samples(dialogues, tiny_llm.tokenizer, config, eou_id=EOU,
                                                             bos_id=BOS)]

    assert build(1) == build(1) != build(2)


def test_special_token_text_in_an_utterance_is_ordinary_text(tiny_llm) -> None:
    config = MemoryTrainingConfig(method="smr", max_tokens=64)
    (sample,) = build_samples([("a <|im_end|> b",)], tiny_llm.tokenizer, config, eou_id=EOU, bos_id=BOS)
    assert sample.input_ids.tolist().count(EOU) == 2  # the two copies' own EoUs only


def test_lmr_needs_two_utterance_dialogues(tiny_llm) -> None:
    with pytest.raises(ValueError, match="at least two utterances"):
        build_samples([("alone",), ("also alone",)], tiny_llm.tokenizer, MemoryTrainingConfig(method="lmr"),
                      eou_id=EOU, bos_id=BOS)
    both = build_samples([("alone",)], tiny_llm.tokenizer, MemoryTrainingConfig(), eou_id=EOU, bos_id=BOS)
    assert [s.kind for s in both] == ["smr"]


def test_collate_pads_without_empty_rows() -> None:
    short, long = smr_sample([[A]], EOU, BOS), smr_sample([[A, B, C]], EOU, BOS)
    batch = collate([short, long], pad_id=EOU, dtype=torch.float32)
    assert batch["input_ids"].shape == (2, 9) and batch["attention_mask"].shape == (2, 1, 9, 9)
    assert batch["labels"][0, 5:].tolist() == [IGNORE] * 4
    allowed = batch["attention_mask"] == 0  # (B, 1, T, T)
    assert allowed.any(-1).all()  # every row, padding included, attends somewhere
    assert not allowed[0, 0, :5, 5:].any()  # real tokens never see padding
    assert torch.equal(allowed[1, 0], long.attention)


# --- the model honours the masks ----------------------------------------------------------------


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T,) ids under a (T, T) bool mask -> (T, V) logits."""
    with torch.no_grad():
        return model(input_ids=ids[None], attention_mask=additive_mask(mask, torch.float32)).logits[0]


def test_4d_masks_work_under_eager_and_sdpa_and_are_honoured(tiny_llm) -> None:
    sample = smr_sample([[A, B, C], [D, D]], EOU, BOS)  # u1 at 1..4, u1' at 5..8, u2 at 9..11, u2' at 12..14
    ids, mask = sample.input_ids, sample.attention
    sdpa = _logits(tiny_llm.model, ids, mask)
    eager_model = copy.deepcopy(tiny_llm.model)
    eager_model.set_attn_implementation("eager")
    torch.testing.assert_close(_logits(eager_model, ids, mask), sdpa, rtol=1e-4, atol=1e-5)

    causal = _logits(tiny_llm.model, ids, torch.ones_like(mask).tril())
    assert not torch.allclose(causal[5:9], sdpa[5:9])  # the mask changes what the copy sees

    changed_ids = sample.input_ids.clone()
    changed_ids[1:4] = torch.tensor([50, 60, 70])  # another first copy of u1 (the copy keeps A B C)
    changed = _logits(tiny_llm.model, changed_ids, mask)
    torch.testing.assert_close(changed[9:], sdpa[9:])  # the second pair cannot see u1 at all
    assert not torch.allclose(changed[5:9], sdpa[5:9])  # u1' sees it, through the EoU alone


# --- data sources -------------------------------------------------------------------------------


def test_text_corpus(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("Hello there.\n  I am Ana.  \n\n\n\nSecond dialogue\nreply\n  \nthird line?\n", encoding="utf-8")
    assert load_corpus(path) == [("Hello there.", "I am Ana."), ("Second dialogue", "reply"), ("third line?",)]


def test_jsonl_corpus_by_suffix_or_content(tmp_path) -> None:
    lines = ['{"dialogue": ["hi", "  ", "hello"]}', "", '{"dialogue": ["one"]}', '{"dialogue": []}']
    for name in ("corpus.jsonl", "corpus.txt"):
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert load_corpus(path) == [("hi", "hello"), ("one",)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "holds no utterances"),
        ("blank.txt", "\n  \n\n", "holds no utterances"),
        ("bad.jsonl", '{"dialogue": ["a"]}\n{"dialogue": [\n', "line 2: not valid JSON"),
        ("shape.jsonl", '{"dialogue": "not a list"}\n', 'line 1: expected {"dialogue"'),
        ("kind.jsonl", '{"dialogue": ["a", 3]}\n', "line 1: expected"),
        ("array.jsonl", '["a", "b"]\n', "line 1: expected"),
        ("empty.jsonl", '{"dialogue": []}\n', "holds no utterances"),
    ],
)
def test_bad_corpus_files_are_clear_errors(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_corpus(path)


def test_unreadable_corpus_paths_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a folder"):
        load_corpus(tmp_path)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(latin)


def test_synthetic_dialogues_are_deterministic_and_full_of_facts() -> None:
    first = synthetic_dialogues(50, seed=7)
    assert first == synthetic_dialogues(50, seed=7) != synthetic_dialogues(50, seed=8)
    assert len(first) == 50 and all(6 <= len(d) <= 24 for d in first)
    assert len({d for d in first}) == 50
    utterances = [u for d in first for u in d]
    assert all(u.strip() == u and u for u in utterances)
    assert sum(any(ch.isdigit() for ch in u) for u in utterances) > len(utterances) / 2
    with pytest.raises(ValueError):
        synthetic_dialogues(0)


def test_the_built_in_recall_sources_ask_near_and_far_and_every_answer_is_a_reply() -> None:
    config = MemoryTrainingConfig(samples=30, seed=4)
    near, far = load_dialogues("recall-near", config), load_dialogues("recall-far", config)
    assert near == recall_dialogues(30, 4, shape=NEAR) and far == recall_dialogues(30, 4, shape=FAR)
    questions = {kind.question for kind in TRAINING_FACTS}
    for shape, dialogues in ((NEAR, near), (FAR, far)):
        for dialogue in dialogues:
            answers = [i for i in range(1, len(dialogue)) if dialogue[i - 1] in questions]
            # loss_on="replies" trains every answer (and the odd reply to a small-talk question).
            assert len(answers) == shape.facts and set(answers) <= set(reply_indices(dialogue))


def _values(utterance: str, templates: tuple[str, ...]) -> tuple[str, ...] | None:
    """The values ``utterance`` fills into the first of ``templates`` it matches, or None."""
    for template in templates:
        pattern = re.escape(template)
        for field_name in set(re.findall(r"\{(\w+)\}", template)):
            pattern = pattern.replace(re.escape("{" + field_name + "}"), "(.+?)")
        match = re.fullmatch(pattern, utterance)
        if match:
            return match.groups()
    return None


def test_synthetic_echoes_repeat_the_other_speakers_facts_from_three_or_more_utterances_back() -> None:
    echoes = 0
    for dialogue in synthetic_dialogues(200, seed=3):
        for i, utterance in enumerate(dialogue):
            values = _values(utterance, _ECHOES)
            if values is None:
                continue
            echoes += 1
            # Only the other speaker's utterances the cache no longer holds whole can say them.
            sources = [dialogue[j] for j in range(i - 3, -1, -2)]
            assert i >= 4 and any(all(v in source for v in values) for source in sources), (i, utterance)
    assert echoes > 100


def test_synthetic_answers_recall_the_askers_facts_from_beyond_the_question() -> None:
    asked = tuple(question for question, _ in _QUESTIONS)
    answers = 0
    for dialogue in synthetic_dialogues(200, seed=3):
        found = [i for i in range(1, len(dialogue)) if _values(dialogue[i - 1], asked) is not None]
        assert answer_indices(dialogue) == found
        for i in found:
            utterance = dialogue[i]
            values = _values(utterance, tuple(answer for _, answer in _QUESTIONS))
            assert values is not None, (dialogue[i - 1], utterance)
            answers += 1
            # The asker said it two or more utterances before asking: the answer, which sees the
            # question whole, can find it only in an earlier utterance's sink.
            sources = [dialogue[j] for j in range(i - 3, -1, -2)]
            assert i >= 5 and any(all(v in source for v in values) for source in sources), (i, utterance)
    assert answers > 100


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "sft"}, {"rank": 0}, {"lr": 0.0}, {"lr": 2.0}, {"max_steps": 0}, {"dropout": 1.0},
     {"max_tokens": 8}, {"epochs": 0}, {"batch_size": 0}, {"samples": 0}],
)
def test_config_is_checked(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MemoryTrainingConfig(**kwargs)


def test_loss_on_replies_needs_a_dialogue_stage() -> None:
    with pytest.raises(ValueError, match="loss_on must be one of"):
        MemoryTrainingConfig(method="dialogue", loss_on="answers")
    with pytest.raises(ValueError, match="has no dialogue stage"):
        MemoryTrainingConfig(method="both", loss_on="replies")
    assert MemoryTrainingConfig(method="all", loss_on="replies").loss_on == "replies"
    assert MemoryTrainingConfig().loss_on == "all"  # the published targets by default


def test_config_defaults_follow_the_published_recipe() -> None:
    config = MemoryTrainingConfig()
    assert (config.method, config.rank, config.alpha, config.lr, config.epochs) == ("both", 8, 16, 5e-5, 1)
    assert config.modules == ("q_proj", "v_proj")


# --- training and the adapter -------------------------------------------------------------------


def test_training_reduces_the_loss_on_a_fixed_batch(trained) -> None:
    loaded, report, _, steps = trained
    assert report.steps == FAST.max_steps and report.seconds > 0 and report.probe_held_out
    assert report.probe_loss_after < report.probe_loss_before - 0.05
    assert [s[:2] for s in steps] == [(i, FAST.max_steps) for i in range(1, FAST.max_steps + 1)]
    assert steps[0][2] == report.first_loss and steps[-1][2] == report.last_loss
    # The probe scored on the untouched base model gives the "before" figure again.
    score = {"pad_id": EOU, "dtype": torch.float32, "device": loaded.device}
    assert memory_loss(loaded.model, report.probe, **score) == pytest.approx(report.probe_loss_before, rel=1e-5)


def test_all_trains_both_stages_in_order_under_one_step_cap(tiny_folder, tmp_path) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    config = dataclasses.replace(FAST, method="all", samples=12, max_steps=None)
    memory, dialogue = build_stages(synthetic_dialogues(12, config.seed), loaded.tokenizer, config, eou_id=EOU,
                                    bos_id=BOS)
    # Each stage holds back one probe batch of at most a tenth of its samples.
    planned = [-(-(len(stage) - min(config.batch_size, len(stage) // 10)) // config.batch_size)
               for stage in (memory, dialogue)]
    assert all(planned)

    def run(max_steps: int | None, out: str) -> tuple[list[tuple], object]:
        steps: list[tuple] = []
        report = train_memory(loaded, "synthetic", dataclasses.replace(config, max_steps=max_steps), tmp_path / out,
                              progress=lambda *a: steps.append(a))
        return steps, report

    steps, report = run(None, "whole")
    total = sum(planned)
    assert [s[:2] for s in steps] == [(i, total) for i in range(1, total + 1)] and report.steps == total
    assert len(report.probe) == sum(min(config.batch_size, len(stage) // 10) for stage in (memory, dialogue))
    assert json.loads((tmp_path / "whole" / ADAPTER_METADATA).read_text())["method"] == "all"
    # --steps caps both stages together: the dialogue stage gets what the first one leaves.
    steps, report = run(planned[0] + 1, "capped")
    assert report.steps == planned[0] + 1 and steps[-1][:2] == (planned[0] + 1, planned[0] + 1)


def test_the_base_model_is_left_as_it_was(trained) -> None:
    loaded, _, before, _ = trained
    model = loaded.model
    assert not model.training and not hasattr(model, "peft_config")
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())  # as from_pretrained left them
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_adapter_folder_and_metadata(trained) -> None:
    loaded, report, _, _ = trained
    files = {p.name for p in report.out_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_METADATA} <= files
    meta = json.loads((report.out_dir / ADAPTER_METADATA).read_text())
    assert meta["base_model"] == loaded.name and meta["method"] == "both" and meta["steps"] == FAST.max_steps
    assert (meta["eou_token_id"], meta["bos_token_id"]) == (EOU, BOS)
    assert meta["final_loss"] == pytest.approx(report.last_loss, abs=1e-5) and meta["date"]
    # Runs are packed up to max_tokens, so the longest trained sequence comes near it.
    assert FAST.max_tokens // 2 < meta["longest_sequence"] <= FAST.max_tokens
    config = json.loads((report.out_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == FAST.rank


def test_saved_adapter_loads_and_reproduces_the_trained_model(trained, tiny_folder) -> None:
    _, report, _, _ = trained
    adapted = load_model(ModelConfig(model=str(tiny_folder), device="cpu", adapter=report.out_dir))
    assert adapted.adapter == report.out_dir and type(adapted.model).__name__ == "LlamaForCausalLM"  # merged
    score = {"pad_id": EOU, "dtype": torch.float32, "device": adapted.device}
    # The probe loss the trained (unmerged, in-memory) model scored before its LoRA was removed.
    assert memory_loss(adapted.model, report.probe, **score) == pytest.approx(report.probe_loss_after, rel=1e-4)

    base = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    # As on a 4-bit base: the LoRA kept beside the weights, as during training, not merged into them.
    unmerged = apply_adapter(dataclasses.replace(copy.deepcopy(base), quantization="4bit"), report.out_dir).model
    ids, mask = report.probe[0].input_ids, report.probe[0].attention
    merged = _logits(adapted.model, ids, mask)
    torch.testing.assert_close(merged, _logits(unmerged, ids, mask), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, _logits(base.model, ids, mask), atol=1e-4)


def test_training_goes_on_from_a_saved_adapter(trained, tiny_folder, tmp_path) -> None:
    _, first, _, _ = trained
    loaded = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    config = dataclasses.replace(FAST, method="dialogue", max_steps=2)
    report = train_memory(loaded, "synthetic", config, tmp_path / "second", start_from=first.out_dir)
    # The second stage starts where the first ended: its "before" is the first adapter's score.
    adapted = load_model(ModelConfig(model=str(tiny_folder), device="cpu", adapter=first.out_dir))
    score = {"pad_id": EOU, "dtype": torch.float32, "device": adapted.device}
    assert memory_loss(adapted.model, report.probe, **score) == pytest.approx(report.probe_loss_before, rel=1e-4)
    assert memory_loss(loaded.model, report.probe, **score) != pytest.approx(report.probe_loss_before, rel=1e-3)
    meta = json.loads((tmp_path / "second" / ADAPTER_METADATA).read_text())
    assert meta["method"] == "dialogue" and meta["steps"] == 2
    assert meta["continued_from"] | {"date": None} == {"adapter": first.out_dir.name, "method": "both",
                                                       "steps": FAST.max_steps, "data": "synthetic", "date": None}
    assert not any("lora" in name for name, _ in loaded.model.named_modules())


def test_going_on_from_an_adapter_refuses_what_would_not_fit(trained, tiny_folder, tmp_path) -> None:
    _, first, _, _ = trained
    loaded = load_model(ModelConfig(model=str(tiny_folder), device="cpu"))
    with pytest.raises(ValueError, match="being continued"):
        train_memory(loaded, "synthetic", FAST, first.out_dir, start_from=first.out_dir)
    with pytest.raises(ValueError, match="rank 8 \\(asked for 4\\)"):
        train_memory(loaded, "synthetic", dataclasses.replace(FAST, rank=4), tmp_path / "r4", start_from=first.out_dir)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())  # unwrapped again
    other = tmp_path / "preference"
    shutil.copytree(first.out_dir, other)
    meta = json.loads((other / ADAPTER_METADATA).read_text())
    (other / ADAPTER_METADATA).write_text(json.dumps(meta | {"purpose": "preference"}))
    with pytest.raises(ValueError, match="not a memory adapter"):
        train_memory(loaded, "synthetic", FAST, tmp_path / "p", start_from=other)


def test_out_dir_that_is_not_an_adapter_is_refused_before_training(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    loaded = make_tiny_llm()
    with pytest.raises(ValueError, match="non-empty folder"):
        train_memory(loaded, "synthetic", FAST, tmp_path)


# --- the command line ---------------------------------------------------------------------------


def test_train_memory_command_end_to_end(tiny_folder, tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    dialogues = synthetic_dialogues(12, seed=1)
    corpus.write_text("".join(json.dumps({"dialogue": list(d)}) + "\n" for d in dialogues), encoding="utf-8")
    out = tmp_path / "adapter"
    code = main(["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--data", str(corpus),
                 "--out", str(out), "--method", "smr", "--steps", "3", "--lr", "1e-3", "--rank", "4",
                 "--max-tokens", "128", "--seed", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 3/3" in captured.err and "adapter saved to" in captured.out and "3 steps" in captured.out
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    assert (meta["method"], meta["steps"], meta["lora"]["rank"], meta["data"]) == ("smr", 3, 4, "corpus.jsonl")

    code = main(["info", "--model", str(tiny_folder), "--device", "cpu", "--adapter", str(out),
                 "--data-dir", str(tmp_path / "data")])
    assert code == 0, capsys.readouterr().err


def test_train_memory_command_adapts_the_modules_asked_for(tiny_folder, tmp_path, capsys) -> None:
    out = tmp_path / "qkv"
    code = main(["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--data", "synthetic",
                 "--samples", "8", "--out", str(out), "--method", "dialogue", "--steps", "1", "--epochs", "2",
                 "--modules", "q_proj, k_proj,v_proj", "--max-tokens", "128"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    assert (meta["lora"]["target_modules"], meta["epochs"]) == (["q_proj", "k_proj", "v_proj"], 2)
    assert meta["loss_on"] == "all"
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "k_proj", "q_proj", "v_proj"]
    adapted = load_model(ModelConfig(model=str(tiny_folder), device="cpu", adapter=out))
    assert adapted.adapter is not None  # the app loads a q/k/v adapter as it loads a q/v one


def test_train_memory_names_the_layers_a_model_has_when_asked_for_one_it_lacks(tiny_folder, tmp_path,
                                                                               capsys) -> None:
    code = main(["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--data", "synthetic",
                 "--out", str(tmp_path / "o"), "--modules", "q_proj,gate"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading output
    assert code == 2 and last.startswith("error: ") and "no gate layers" in last and "gate_proj" in last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "no-such-corpus.txt"], "corpus file not found"),
        (["--data", "synthetic", "--steps", "0"], "max_steps"),
        (["--data", "synthetic", "--adapter", "."], "leave out --adapter"),
        (["--data", "synthetic", "--init", "no-such-adapter"], "does not exist"),
        (["--data", "synthetic", "--modules", ","], "modules must be"),
        (["--data", "synthetic", "--epochs", "0"], "epochs must be"),
        (["--data", "synthetic", "--loss-on", "replies"], "no dialogue stage"),
    ],
)
def test_train_memory_errors_are_one_line_and_exit_2(tiny_folder, tmp_path, capsys, extra, message) -> None:
    code = main(["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--out", str(tmp_path / "o"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err


def test_train_memory_command_trains_on_a_built_in_recall_source(tiny_folder, tmp_path, capsys) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    common = ["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--samples", "8", "--method",
              "dialogue", "--loss-on", "replies", "--steps", "1", "--max-tokens", "256"]
    assert main([*common, "--data", "recall-near", "--out", str(near)]) == 0, capsys.readouterr().err
    assert main([*common, "--data", "recall-far", "--init", str(near), "--out", str(far)]) == 0, capsys.readouterr().err
    meta = json.loads((far / ADAPTER_METADATA).read_text())
    assert (meta["data"], meta["loss_on"], meta["continued_from"]["data"]) == ("recall-far", "replies", "recall-near")


def test_train_memory_command_trains_on_replies_when_asked(tiny_folder, tmp_path, capsys) -> None:
    out = tmp_path / "replies"
    code = main(["train-memory", "--model", str(tiny_folder), "--device", "cpu", "--data", "synthetic",
                 "--samples", "8", "--out", str(out), "--method", "dialogue", "--loss-on", "replies",
                 "--steps", "1", "--max-tokens", "128"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / ADAPTER_METADATA).read_text())["loss_on"] == "replies"
