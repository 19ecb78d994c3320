"""The prepared GPU run stays runnable: every step, shrunk by SMOKE=1, on the tiny model on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_memory.sh"


def test_every_step_of_the_bf16_run_finishes(tiny_folder, tmp_path) -> None:
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "ADAPTERS": str(tmp_path / "adapters"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "bf16", str(tiny_folder)], cwd=SCRIPT.parents[1], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    exits = dict(re.findall(r"^== (\S+): exit (\d+)", done.stdout, re.MULTILINE))
    assert exits == {"memory-bf16": "0", "speed-bf16": "0", "train-near": "0", "train-far-and-recall": "0"}, (
        done.stdout[-3000:] + done.stderr[-3000:])
    assert done.returncode == 0
    assert (tmp_path / "out" / "memory-bf16.json").is_file()  # the figures come back as a file
    assert (tmp_path / "adapters" / "recall-far" / "adapter_config.json").is_file()  # trained far from near
    assert "held-out fact types" in (tmp_path / "out" / "train-far-and-recall.log").read_text()


def test_a_precision_other_than_bf16_or_nf4_is_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "int8"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "bf16 or nf4" in done.stderr
