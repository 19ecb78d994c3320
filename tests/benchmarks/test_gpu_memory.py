"""The prepared GPU run stays runnable: every step, shrunk by SMOKE=1, on the tiny model on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_memory.sh"
STEPS = ["long-bf16", "speed-bf16", "decode-bf16", "train", "recall-bf16"]


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "ADAPTERS": str(tmp_path / "adapters"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=SCRIPT.parents[1], env=env, check=False,
                          capture_output=True, text=True, timeout=600)


def test_every_bf16_step_finishes_and_recall_uses_what_train_made(tiny_folder, tmp_path) -> None:
    done = _run([*STEPS, "--", str(tiny_folder)], tmp_path)
    exits = dict(re.findall(r"^== (\S+): exit (\d+)", done.stdout, re.MULTILINE))
    assert exits == {"long-bf16": "0", "speed-bf16": "0", "decode-bf16": "0", "train-near": "0", "train-far": "0",
                     "recall-bf16": "0"}, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0
    out = tmp_path / "out"
    assert (out / "long-bf16.json").is_file() and (out / "recall-bf16.json").is_file()  # figures come back as files
    assert (tmp_path / "adapters" / "recall-far" / "adapter_config.json").is_file()  # trained far from near
    recall = (out / "recall-bf16.log").read_text()
    assert "streaming-dialogue trained (distance pos, cap" in recall  # the app's trained cache is a row
    assert "streaming-dialogue trained (distance pos) " not in recall  # --app-only: not the uncapped one


def test_a_spent_budget_skips_the_remaining_steps(tiny_folder, tmp_path) -> None:
    done = _run(["speed-bf16", "decode-bf16", "--", str(tiny_folder)], tmp_path, BUDGET="10")
    assert re.findall(r"^== (\S+): skipped", done.stdout, re.MULTILINE) == ["speed-bf16", "decode-bf16"]
    assert done.returncode == 0


def test_unknown_steps_are_refused(tmp_path) -> None:
    for args in (["int8"], []):
        done = _run(args, tmp_path)
        assert done.returncode == 2 and ("unknown step int8" in done.stderr or "usage" in done.stderr)
