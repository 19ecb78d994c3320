"""How much does tuning a persona on a handful of its own choices help it? (P-Soups, per persona)

    PYTHONPATH=. python benchmarks/persona_tuning.py --data ../shared/data/alignx/p_soups_student_phd.json
        [--model embedded] [--device cpu] [--group-by ground_truth_persona] [--holdout 0:50,300:350]
        [--picks 8,32] [--modes raw,pba,contrast] [--seed 0] [--threads N]

The app's "Tune to my choices" trains a DPO adapter on one persona's pairwise choices
(``persona_tuning``). A person gives tens of choices, not hundreds, so this measures what K
choices buy. Records are grouped by ``--group-by`` (one group = one person); for each group,
its ``--holdout`` records are the test set, and K "choices" are drawn (seeded) from the
group's other records whose post is not a held-out one, each record's own pair framed by its
profile in the PBA prompt, exactly as the eval frames it. The adapter is trained with the
app's defaults (``TuningSettings()``), applied through the engine's adapter slot as in a
reply, and the held-out records are scored with the eval harness, before and after.

Printed per group and K: training steps and seconds, and per mode the accuracy before and
after with its Wilson interval, and records won and lost against the base (exact McNemar p).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("persona_tuning")


def split_group(records: Sequence[dict], labels: Sequence[str], held: Sequence[int],
                group: str) -> tuple[list[int], list[int]]:
    """(held-out indices, candidate pick indices) of one group; picks never share a held-out post."""
    test = [i for i in held if labels[i] == group]
    posts = {records[i]["prompt"] for i in test}
    held_set = set(held)
    pool = [i for i, label in enumerate(labels)
            if label == group and i not in held_set and records[i]["prompt"] not in posts]
    return test, pool


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="AlignX records (JSON list)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--group-by", default="ground_truth_persona", help="record key that names the person")
    parser.add_argument("--holdout", default="0:50,300:350", help="records to test on (never picked)")
    parser.add_argument("--picks", default="8,32", help="comma-separated numbers of choices to tune on")
    parser.add_argument("--modes", default="raw,pba,contrast")
    parser.add_argument("--seed", type=int, default=0, help="which choices are drawn")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the tuning per group and K, print the report with the command, and return it."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    from personalign.engine import Engine
    from personalign.evaluation import (
        evaluate_modes,
        paired_exact_p,
        parse_selection,
        wilson_interval,
    )
    from personalign.models import ModelConfig, load_model
    from personalign.persona_tuning import TuningSettings, training_config
    from personalign.preference_training import preference_pairs, train_preference

    if args.threads:
        torch.set_num_threads(args.threads)
    records = json.loads(args.data.read_text(encoding="utf-8"))
    labels = [str(r.get(args.group_by, "")) for r in records]
    held = parse_selection(args.holdout, len(records))
    picks = [int(k) for k in args.picks.split(",")]
    modes = args.modes.split(",")
    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    engine = Engine(loaded)
    settings = TuningSettings()

    def scored(test: list[int], adapter: Path | None) -> dict:
        with engine.exclusive(adapter):  # the reply path's slot; scoring itself takes no lock
            return evaluate_modes([records[i] for i in test], engine, modes)

    lines = []
    for group in dict.fromkeys(labels[i] for i in held):
        test, pool = split_group(records, labels, held, group)
        logger.info("group %r: %d held-out records, %d to pick from", group, len(test), len(pool))
        base = scored(test, None)
        lines.append(f"\n{group[:70]}  ({len(test)} held-out records, {len(pool)} to pick from)")
        lines.append("| choices | steps | train s | " + " | ".join(f"{m} before → after (won/lost, p)" for m in modes)
                     + " |")
        lines.append("| --- " * (3 + len(modes)) + "|")
        for k in picks:
            chosen = random.Random(args.seed).sample(pool, min(k, len(pool)))
            pairs = preference_pairs([records[i] for i in chosen], "pba", history=False)
            with tempfile.TemporaryDirectory() as folder:
                with engine.exclusive() as base_model:
                    report = train_preference(base_model, pairs, training_config(settings, base_model), folder)
                tuned = scored(test, Path(folder))
                with engine.exclusive():  # take the adapter off before its folder goes
                    pass
            cells = []
            for m in modes:
                before, after = base[m], tuned[m]
                won = sum(a.correct and not b.correct for a, b in zip(after.records, before.records, strict=True))
                lost = sum(b.correct and not a.correct for a, b in zip(after.records, before.records, strict=True))
                low, high = wilson_interval(after.correct, after.n)
                cells.append(f"{before.accuracy:.2f} → **{after.accuracy:.2f}** [{low:.2f}, {high:.2f}] "
                             f"({won}/{lost}, p={paired_exact_p(won, lost):.2g})")
            lines.append(f"| {len(pairs)} | {report.steps} | {report.seconds:.0f} | " + " | ".join(cells) + " |")
            logger.info("group %r, %d choices: %s", group, len(pairs), lines[-1])

    head = [f"$ PYTHONPATH=. python benchmarks/persona_tuning.py {shlex.join(argv)}",
            (f"model {loaded.name} on {loaded.device} ({loaded.dtype}, quantization {loaded.quantization}); "
             f"tuning {settings}"),
            f"wall time {time.perf_counter() - started:.0f} s"]
    text = "\n".join(head + lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
