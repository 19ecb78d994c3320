"""The decode-step benchmark on the tiny model: both caches hold what they are filled with, and the report."""

from __future__ import annotations

import re

import torch
from transformers import DynamicCache

from benchmarks import decode_step as ds
from personalign.memory_cache import GrowingLayer, MemoryCache


def test_both_caches_are_filled_alike_and_compact(tiny_llm) -> None:
    config = tiny_llm.model.config
    plain, growing = (ds.filled(kind, config, 7, torch.float32, "cpu") for kind in (DynamicCache, MemoryCache))
    assert isinstance(growing.layers[0], GrowingLayer) and len(growing.layers) == config.num_hidden_layers
    for a, b in zip(plain.layers, growing.layers, strict=True):
        assert a.keys.shape[-2] == 7 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert b.keys.untyped_storage().nbytes() == b.keys.numel() * b.keys.element_size()
    assert ds.step_seconds(tiny_llm.model, growing, 2) > 0 and growing.get_seq_length() == 9


def test_the_report_has_a_row_per_entry_count(tiny_folder, capsys) -> None:
    text = ds.main(["--model", str(tiny_folder), "--device", "cpu", "--entries", "4,20", "--steps", "2",
                    "--repeats", "1", "--threads", "1"])
    assert text in capsys.readouterr().out and "command: benchmarks/decode_step.py --model" in text
    for n in (4, 20):
        assert re.search(rf"^{n}\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+x\s+[\d.]+x\s+[\d.]+x\s+[\d,]+$",
                         text, re.MULTILINE)


def test_graph_steps_on_a_filled_memory_feed_one_slot_each(tiny_llm) -> None:
    from personalign.graph_decode import GraphDecoder

    cache = ds.filled(MemoryCache, tiny_llm.model.config, 7, torch.float32, "cpu")
    decoder = GraphDecoder(tiny_llm.model, capture=False)
    assert ds.graph_step_seconds(decoder, cache, 3) > 0
    assert cache.get_seq_length() == 7  # the run is timed, not finished: the memory is left as it was
