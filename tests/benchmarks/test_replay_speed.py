"""The replay benchmark on the tiny model: both replays build the same memory, and the report."""

from __future__ import annotations

import json
import re

from benchmarks import replay_speed as rs


def test_the_report_compares_packed_and_one_by_one_replays(tiny_folder, tmp_path, capsys) -> None:
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"prompt": f"Question {i}?", "chosen": f"Answer {i}."} for i in range(30)]))
    text = rs.main(["--model", str(tiny_folder), "--device", "cpu", "--turns", "3,30", "--tokens-per-forward", "64",
                    "--threads", "1", "--data", str(data)])
    assert text in capsys.readouterr().out and "command: benchmarks/replay_speed.py --model" in text
    for n in (3, 30):
        row = re.search(rf"^{n}\s+[\d,]+\s+[\d,]+\s+[\d.]+ s\s+[\d.]+ s\s+[\d.]+x\s+(\S+)\s+(\S+)$", text, re.MULTILINE)
        assert row and row[1] == "yes" and float(row[2]) < 1e-3
