"""The long-chat benchmark on the tiny model: its chat text, its three kinds of turn, its report."""

from __future__ import annotations

import json
import re

import pytest

import storage
from benchmarks import long_chat as lc
from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.services import build_services

RECORDS = [
    {"prompt": "How do I brew tea?", "chosen": "Steep it.", "rejected": "No.",
     "Pair-wise Comparative Feedback": [{"prompt": "Name a fruit.", "chosen": "Pear.", "rejected": "Rock."},
                                        {"prompt": "How do I brew tea?", "chosen": "Steep it.", "rejected": "x"}]},
    {"prompt": "  ", "chosen": "blank prompts are skipped"},
    {"prompt": "Say hi.", "chosen": "Hi!"},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_chat_pairs_are_the_distinct_prompts_and_chosen_replies_in_file_order(data, tmp_path) -> None:
    pairs = lc.chat_pairs(data)
    assert pairs == [("How do I brew tea?", "Steep it."), ("Name a fruit.", "Pear."), ("Say hi.", "Hi!")]
    assert lc.cycled(pairs, 5) == [*pairs, *pairs[:2]]
    with pytest.raises(SystemExit, match="cannot read"):
        lc.chat_pairs(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[{\"prompt\": \"q\"}]")
    with pytest.raises(SystemExit, match="no prompt and chosen reply"):
        lc.chat_pairs(tmp_path / "empty.json")


def test_a_rebuilt_turn_replays_the_history_and_a_restarted_app_reads_the_file(tiny_llm, tmp_path, data) -> None:
    engine = Engine(tiny_llm)
    db = storage.Database.open(tmp_path / "chat.db")
    try:
        runs = lc.run(db, lambda: build_services(db, engine), [2, 12], lc.cycled(lc.chat_pairs(data), 12),
                      GenerationConfig(max_new_tokens=3, temperature=0), repeats=2, dense=True)
    finally:
        db.close()
    for r in runs:
        assert r.rebuilt.rebuild_updates > 0 and r.reopened.rebuild_updates == 0
        assert r.file_bytes > 0 and len(r.live) == len(r.dense) == 2
        meter = r.live[-1].meter
        # Every turn so far is in the memory: the history, the rebuilt, reopened and live turns.
        assert meter.utterances == 2 * (r.turns + 4)
        assert meter.kv_bytes < meter.dense_kv_bytes and r.dense[-1].meter.policy == "dense"
        assert all(t.first_token_s <= t.last_token_s <= t.done_s for t in [r.rebuilt, r.reopened, *r.live])
        assert all(1 <= t.new_tokens <= 3 for t in [r.rebuilt, r.reopened, *r.live, *r.dense])
        assert all(t.step_s is None if t.new_tokens == 1 else t.step_s >= 0 for t in r.live)
    assert runs[1].live[-1].meter.cached_tokens > runs[0].live[-1].meter.cached_tokens


def test_the_report_has_the_reopen_meter_and_turn_tables(tiny_folder, data, capsys) -> None:
    text = lc.main(["--model", str(tiny_folder), "--device", "cpu", "--turns", "3,1", "--repeats", "1",
                    "--max-new-tokens", "3", "--threads", "1", "--data", str(data)])
    assert text in capsys.readouterr().out
    assert "command: benchmarks/long_chat.py --model" in text and "3 distinct (prompt, chosen) pairs" in text
    assert re.search(r"^1\s+\d+\.\d\d s\s+\d+\.\d\d s\s+[\d.]+x\s+[\d,]+ KiB$", text, re.MULTILINE)
    assert re.search(r"^3\s+12\s+\d+", text, re.MULTILINE)  # 2 utterances each: 3 stored turns, rebuilt, reopened, live
    assert re.search(r"^3\s+[\d.]+ s\s+[\d.]+ s\s+[\d.]+ s\s+[\d.]+x\s+[\d.]+ ms\s+([\d.]+x|-)\s+[\d.]+ s\s+[\d.]+x$",
                     text, re.MULTILINE)
    assert re.search(r"^replies at the 3-token limit: \d of 4$", text, re.MULTILINE)
    assert "wall time:" in text
