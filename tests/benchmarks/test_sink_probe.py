"""The sink-probe benchmark: its sequences, features and ridge probe, on the tiny random model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from benchmarks import sink_probe as sp
from benchmarks.memory_recall import FACT_TYPES

BOS, EOU = 1, 2  # as in tests/conftest.py


def test_statement_marks_the_eous_the_last_token_and_the_value(tiny_llm) -> None:
    tokenizer = tiny_llm.tokenizer
    kind = FACT_TYPES[0]  # "My sister's name is {}."
    row = sp.statement(tokenizer, kind, 0, 3, "The weather has been lovely.", EOU, BOS)
    ids = list(row.ids)
    assert ids[0] == BOS and ids[row.eou] == EOU and row.eou == len(ids) - 1
    assert ids[row.prior_eou] == EOU and ids.count(EOU) == 2
    assert tokenizer.decode(ids[row.prior_eou + 1:row.eou]) == "My sister's name is Helen."
    assert tokenizer.decode(ids[row.prior_eou + 1:row.value_token + 1]) == "My sister's name is Helen"
    assert tokenizer.decode([ids[row.last]]) == "."
    assert (row.fact, row.value) == (0, 3)


def test_statements_give_every_value_of_every_type_the_same_count(tiny_llm) -> None:
    rows = sp.statements(tiny_llm.tokenizer, 3, seed=1, eou_id=EOU, bos_id=BOS)
    counts = Counter((r.fact, r.value) for r in rows)
    assert len(rows) == 3 * sum(len(k.values) for k in FACT_TYPES)
    assert set(counts.values()) == {3} and len(counts) == sum(len(k.values) for k in FACT_TYPES)
    assert len({r.ids[:r.prior_eou] for r in rows}) > 1  # the fillers before the statements differ
    assert rows == sp.statements(tiny_llm.tokenizer, 3, seed=1, eou_id=EOU, bos_id=BOS)


def test_fold_ids_deal_every_class_across_the_folds() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    fold = sp.fold_ids(labels, 5, seed=0)
    for label in range(3):
        per_fold = torch.bincount(fold[labels == label], minlength=5)
        assert int(per_fold.max() - per_fold.min()) <= 1


def test_probe_reads_a_linear_code_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(20)  # (200,), 10 classes
    noise = torch.randn(2, 200, 16, generator=generator)  # (layers, n, d)
    coded = noise.clone()
    coded[0, torch.arange(200), labels] += 4.0  # layer 0 carries the class on one axis each
    accuracy = sp.probe_accuracy(coded, labels, folds=5, ridge=1.0)
    assert accuracy.shape == (2,)
    assert accuracy[0] > 0.9  # the coded layer is read
    assert accuracy[1] < 0.3  # pure noise stays near chance (0.1): the probe does not overfit


def test_probe_checks_shapes() -> None:
    with pytest.raises(ValueError, match="want x"):
        sp.probe_accuracy(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))


def test_features_are_the_projections_at_the_marked_tokens_whatever_the_padding(tiny_llm) -> None:
    rows = sp.statements(tiny_llm.tokenizer, 1, seed=0, eou_id=EOU, bos_id=BOS)[:6]
    feats = sp.features(tiny_llm.model, rows, batch_size=4)  # rows of different lengths, right-padded
    config = tiny_llm.model.config
    width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert set(feats) == {"v@eou", "v@last", "v@value", "v@prior", "k@eou"}
    assert all(f.shape == (config.num_hidden_layers, 6, width) for f in feats.values())
    alone = sp.features(tiny_llm.model, rows[5:], batch_size=1)  # the last row, unpadded
    for name in feats:
        torch.testing.assert_close(feats[name][:, 5:], alone[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats["v@eou"], feats["v@prior"])


def test_site_accuracy_has_every_site_per_layer(tiny_llm) -> None:
    rows = sp.statements(tiny_llm.tokenizer, 2, seed=0, eou_id=EOU, bos_id=BOS)
    accuracy = sp.site_accuracy(sp.features(tiny_llm.model, rows), rows, folds=2, ridge=10.0, seed=0)
    assert list(accuracy) == list(sp.SITES)
    assert all(a.shape == (tiny_llm.model.config.num_hidden_layers,) and ((a >= 0) & (a <= 1)).all()
               for a in accuracy.values())
    odds = sp.chance(rows)
    assert odds["type @ EoU key"] == pytest.approx(0.1)
    assert odds["value @ EoU"] == pytest.approx(sum(1 / len(k.values) for k in FACT_TYPES) / len(FACT_TYPES))
