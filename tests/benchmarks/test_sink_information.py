"""The sink-information benchmark's views of a training sample, and its losses on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from benchmarks import sink_information as si
from personalign.memory_training import dialogue_sample, lmr_sample, synthetic_dialogues
from personalign.streaming_dialogue import streaming_dialogue_mask

BOS, EOU = 1, 2  # as in tests/conftest.py


def _sample():
    pairs = [([5, 6], [7]), ([8], [9, 10]), ([11, 12], [13])]
    return lmr_sample(pairs, 1, EOU, BOS)


def test_hidden_removes_exactly_the_links_to_earlier_eous() -> None:
    sample = _sample()
    ids = sample.input_ids
    earlier_eou = (ids[None, :] == EOU) & (torch.arange(len(ids))[None, :] < torch.arange(len(ids))[:, None])
    own = torch.cumsum((ids == EOU).long(), 0) - (ids == EOU).long()  # utterance of each token
    same = own[:, None] == own[None, :]
    seen, hidden = sample.attention, si.hidden(sample).attention
    assert not (hidden & ~seen).any()  # only removes
    removed = seen & ~hidden
    assert removed.any() and not (removed & ~(earlier_eou & ~same)).any()
    assert hidden[:, 0].all()  # BOS stays: it is the first sink of every view
    assert torch.equal(si.hidden(sample).labels, sample.labels)


def test_dense_is_the_causal_mask_and_contains_the_inference_mask() -> None:
    sample = _sample()
    full = si.dense(sample).attention
    assert torch.equal(full, torch.ones_like(full).tril())
    inference = streaming_dialogue_mask(sample.input_ids.tolist(), EOU, BOS)
    assert not (inference & ~full).any()


def test_only_utterances_keeps_the_loss_on_the_named_utterances() -> None:
    sample = dialogue_sample([[5, 6], [7], [8], [9, 10]], EOU, BOS)  # BOS 5 6 E | 7 E | 8 E | 9 10 E
    kept = si.only_utterances(sample, [1, 3])
    assert [int(t) for t, label in zip(sample.input_ids, kept.labels) if label != -100] == [7, 9, 10]
    assert torch.equal(kept.attention, sample.attention)
    # Utterance 0 carries no loss in a dialogue sample, so naming it adds nothing.
    assert torch.equal(si.only_utterances(sample, [0]).labels, torch.full_like(sample.labels, -100))


def test_answer_samples_score_only_answers(tiny_llm) -> None:
    dialogues = synthetic_dialogues(60, seed=3)
    samples = si.answer_samples(tiny_llm, dialogues, samples=5)
    assert len(samples) == 5
    for sample in samples:
        assert (sample.labels != -100).any() and sample.kind == "dialogue"


def test_view_names_are_checked() -> None:
    with pytest.raises(ValueError, match="view must be one of"):
        si.view(_sample(), "sparse")


def test_losses_cover_every_kind_and_view(tiny_llm) -> None:
    figures = si.losses(tiny_llm, synthetic_dialogues(6, seed=3), samples=2, seed=1)
    assert set(figures) == set(si.KINDS)
    for cells in figures.values():
        assert set(cells) == set(si.VIEWS) and all(value > 0 for value in cells.values())
