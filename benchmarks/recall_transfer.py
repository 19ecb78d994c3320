"""Can the sinks learn to be read? Train on recall-shaped dialogues of some fact types, test on the rest.

    PYTHONPATH=. python benchmarks/recall_transfer.py [--model embedded] [--device cpu]
        [--train-types sister,locker,city,pet,colour | none] [--dialogues 600] [--lr 5e-4]
        [--modules q_proj,v_proj] [--out adapters/recall-transfer | --adapter DIR] [--start-from DIR]
        [--loss-on all|replies] [--fillers 12,24] [--facts 3] [--max-gap 12] [--more-types] [--max-tokens 512]
        [--distances 1,10,30,100] [--trials 16] [--distance-caps 160,384] [--halves trained,held-out]

``sink_probe.py`` finds the recall benchmark's facts linearly decodable from the values their
EoU sinks leave in the cache, even untrained, and the fact type from their keys; yet through
the sinks the model answers near chance (``memory_recall.py``). So the question is whether
reading can be learnt. This script trains the published dialogue stage (``train-memory
--method dialogue``: whole dialogues under the inference mask) on dialogues shaped like the
recall probe: small-talk filler from the benchmark's pool, facts of the ``--train-types``
stated among it, and later a question about each, answered in the probe's words ("What is my
sister's name?" / "Your sister's name is Clara."). Then it measures recall side by side,
dense, streaming-llm and StreamingDialogue untrained and trained (distance position rule),
separately on the trained fact types and on the held-out ones, so the two readings of a gain
are told apart: learning to read a sink, or learning these fact types. The probe dialogues are
drawn from the benchmark's own seeds, and the training dialogues from others.

Before recall, the answers of held-out dialogues of the training kind are scored as
``sink_information.py`` scores them: loss per token through the sinks, with every sink hidden,
and with the whole history in view, for the untrained and the trained model. If the sinks give
the answers nothing on the very kind of dialogue trained on, no recall gain can be expected.

With ``--adapter`` an adapter trained before is measured instead of training a new one;
``--no-recall`` stops after the answer losses. ``--more-types`` adds the built-in recall source's
18 types (``recall_dialogues.TRAINING_FACTS``) to the training, never to the probe; with
``--train-types none`` they are all it trains on, as ``train-memory --data recall-near`` does, and
all ten probe types are held out. ``--max-gap`` sets how far after its fact a training question
may come. ``--distance-caps`` adds StreamingDialogue rows under the distance rule
capped at each value (every key kept at most that far back), so that a model trained on short
sequences reads old sinks only at distances it was trained on; the cap the app itself puts on
the adapter (half its longest training sequence) is always among them.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.memory_recall import (
    FACT_TYPES,
    Tokens,
    _ints,
    app_distance_caps,
    make_policies,
    run_recall,
)
from personalign.recall_dialogues import (
    NEAR,
    TRAINING_FACTS,
    FactType,
    RecallShape,
    recall_dialogues,
)
from personalign.streaming_llm import StreamingLLMConfig

logger = logging.getLogger("recall_transfer")


def fact_types(names: str) -> tuple[FactType, ...]:
    """The ``FACT_TYPES`` named in the comma list ``names``, in the order given; ``none``: no type."""
    if names.strip() == "none":  # every probe type held out: the built-in recall source's own setting
        return ()
    by_key = {kind.key: kind for kind in FACT_TYPES}
    keys = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [k for k in keys if k not in by_key]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise ValueError(f"fact types must be distinct names of {', '.join(by_key)}; got {names!r}")
    return tuple(by_key[k] for k in keys)


def paired(trained: Sequence[bool], other: Sequence[bool]) -> tuple[int, int]:
    """(trials only the trained row got right, trials only the other row got right), same dialogues."""
    return (sum(t and not o for t, o in zip(trained, other)), sum(o and not t for t, o in zip(trained, other)))


def reply_losses(loaded: Any, dialogues: Sequence[Sequence[str]], max_tokens: int = 512) -> dict[str, float]:
    """Loss per token of the replies to questions in ``dialogues``, under each ``sink_information`` view.

    The replies are the answers (and, now and then, a filler after one of the pool's few filler
    questions); their EoUs are not scored. ``hidden - sinks`` is what the sinks give the answers.
    """
    from benchmarks.sink_information import VIEWS, only_utterances, view
    from personalign.memory_training import (
        MemoryTrainingConfig,
        bos_token_id,
        build_stages,
        memory_loss,
    )

    config = MemoryTrainingConfig(method="dialogue", loss_on="replies", samples=len(dialogues), max_tokens=max_tokens)
    (samples,) = build_stages(dialogues, loaded.tokenizer, config, eou_id=loaded.eou_token_id,
                              bos_id=bos_token_id(loaded))
    samples = [only_utterances(s, range(1, len(s.links))) for s in samples]  # the same targets, less their EoUs
    return {name: memory_loss(loaded.model, [view(s, name) for s in samples], pad_id=loaded.eou_token_id,
                              dtype=loaded.model.dtype, device=loaded.model.device) for name in VIEWS}


def _report(title: str, hits: dict[str, dict[int, list[bool]]], distances: Sequence[int]) -> str:
    from personalign.evaluation import paired_exact_p, wilson_interval

    lines = [title, "| policy | " + " | ".join(f"d={d}" for d in distances) + " |",
             "| --- |" + " --- |" * len(distances)]
    for label, cells in hits.items():
        parts = []
        for d in distances:
            low, high = wilson_interval(sum(cells[d]), len(cells[d]))
            parts.append(f"{sum(cells[d]) / len(cells[d]):.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    # Each trained row against streaming-llm and against the untrained sinks under its own position rule.
    llm = next(label for label in hits if label.startswith("streaming-llm"))
    for trained in (label for label in hits if label.startswith("streaming-dialogue trained")):
        for other in (llm, trained.replace(" trained", " untrained", 1)):
            cells = []
            for d in distances:
                wins, losses = paired(hits[trained][d], hits[other][d])
                cells.append(f"+{wins}/-{losses} (p {paired_exact_p(wins, losses):.2f})")
            lines.append(f"| {trained.removeprefix('streaming-dialogue ')} vs {other}, paired | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from personalign.engine import Engine
    from personalign.memory_training import LOSS_ON, MemoryTrainingConfig, train_memory
    from personalign.models import ModelConfig, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-types", default="sister,locker,city,pet,colour",
                        help="probe fact types trained on (comma list, or none); the others are held out")
    parser.add_argument("--dialogues", type=int, default=600)
    parser.add_argument("--fillers", type=_ints, default=NEAR.fillers,
                        help="fewest,most utterances of a training dialogue before its questions go in")
    parser.add_argument("--facts", type=int, default=NEAR.facts,
                        help="facts stated, asked and answered per training dialogue")
    parser.add_argument("--max-gap", type=int, default=NEAR.max_gap,
                        help="a training question comes at most this many utterances after its fact")
    parser.add_argument("--more-types", action="store_true",
                        help=f"train on the {len(TRAINING_FACTS)} types of the built-in recall source too")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest training sequence")
    parser.add_argument("--distance-caps", type=_ints, default=(),
                        help="also measure StreamingDialogue under the distance rule capped at each of these")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--modules", default="q_proj,v_proj")
    parser.add_argument("--loss-on", choices=LOSS_ON, default="all", help="the dialogue stage's targets")
    parser.add_argument("--steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--out", type=Path, default=Path("adapters/recall-transfer"))
    parser.add_argument("--adapter", type=Path, default=None, help="measure this adapter instead of training one")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="a memory adapter to go on training (default: a fresh LoRA)")
    parser.add_argument("--halves", default="trained,held-out",
                        help="which fact types the recall probe asks about: trained, held-out or both")
    parser.add_argument("--distances", type=_ints, default=(1, 10, 30, 100))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--reply-dialogues", type=int, default=60,
                        help="held-out training-kind dialogues whose replies are scored (0: none)")
    parser.add_argument("--no-recall", dest="recall", action="store_false",
                        help="score the replies only, not the recall probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        trained_kinds = fact_types(args.train_types)
    except ValueError as exc:
        parser.error(str(exc))
    held_out = tuple(kind for kind in FACT_TYPES if kind not in trained_kinds)
    taught = trained_kinds + (TRAINING_FACTS if args.more_types else ())
    if not taught:
        parser.error("--train-types none trains on nothing without --more-types")
    if not 1 <= args.facts <= len(taught):
        parser.error(f"--facts is 1 to {len(taught)}, the fact types trained on")
    if len(args.fillers) != 2:
        parser.error("--fillers takes two numbers, fewest,most")
    try:
        shape = RecallShape(tuple(args.fillers), args.facts, args.max_gap)
    except ValueError as exc:
        parser.error(str(exc))
    halves = [h.strip() for h in args.halves.split(",") if h.strip()]
    if not halves or not set(halves) <= {"trained", "held-out"}:
        parser.error("--halves is trained, held-out or both, comma-separated")
    asked = {"trained": (f"trained fact types ({', '.join(k.key for k in trained_kinds)})", trained_kinds),
             "held-out": (f"held-out fact types ({', '.join(k.key for k in held_out)})", held_out)}
    if args.recall and not trained_kinds and "trained" in halves:
        parser.error("--train-types none trains no probe type: ask --halves held-out")
    fewest = min(len(asked[half][1]) for half in halves)
    if args.recall and len(args.distances) > fewest:
        parser.error(f"at most {fewest} distances: one fact type of each half asked about apiece")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_model(ModelConfig(model=args.model, device=args.device, quantize="none"))
    adapter = args.adapter
    if adapter is None:
        dialogues = recall_dialogues(args.dialogues, args.seed, taught, shape)
        config = MemoryTrainingConfig(method="dialogue", lr=args.lr, seed=args.seed, max_steps=args.steps,
                                      loss_on=args.loss_on, max_tokens=args.max_tokens,
                                      modules=tuple(m.strip() for m in args.modules.split(",") if m.strip()))

        def progress(step: int, total: int, loss: float) -> None:
            if step % 10 == 0 or step == total:
                logger.info("training step %d/%d, loss %.3f", step, total, loss)

        report = train_memory(base, dialogues, config, args.out, progress=progress, start_from=args.start_from)
        logger.info("trained %d steps in %.0f s; held-out probe loss %.3f -> %.3f", report.steps, report.seconds,
                    report.probe_loss_before, report.probe_loss_after)
        adapter = args.out
    # Held-out dialogues of the training kind (another seed): do the sinks give its answers anything?
    unseen = recall_dialogues(args.reply_dialogues, args.seed + 1, taught, shape) if args.reply_dialogues else []
    if not unseen and not args.recall:
        return  # only the training was asked for
    trained = load_model(ModelConfig(model=args.model, device=args.device, quantize="none", adapter=adapter))
    if unseen:
        print(f"\nloss per reply token on {len(unseen)} held-out training-kind dialogues (sinks / hidden / dense, "
              "carried = hidden - sinks)")
        for name, loaded in (("untrained", base), (adapter.name, trained)):
            cells = reply_losses(loaded, unseen, args.max_tokens)
            print(f"| {name} | {cells['sinks']:.3f} / {cells['hidden']:.3f} / {cells['dense']:.3f} | "
                  f"{cells['hidden'] - cells['sinks']:+.3f} |", flush=True)
    if not args.recall:
        return
    tokens = Tokens(base.tokenizer, base.eou_token_id, base.tokenizer.bos_token_id)
    context = Engine(base).max_context()
    app_caps = app_distance_caps(base.model, context, [trained])
    if app_caps:
        print(f"\nthe app caps {adapter.name}'s distance rule at {app_caps[0]} tokens (half its longest training "
              "sequence): the rows at that cap are the app's caches", flush=True)
    policies = make_policies(base.model, tokens, context, StreamingLLMConfig(4, 256), [("", trained.model)],
                             base.dtype, ("distance",), sorted({*args.distance_caps, *app_caps}))
    for title, kinds in (asked[half] for half in halves):
        start = time.perf_counter()
        hits = run_recall(policies, tokens, args.distances, args.trials, args.seed, kinds)
        print(_report(f"\nrecall, {args.trials} trials, {title}, adapter {adapter.name} "
                      f"({time.perf_counter() - start:.0f} s)", hits, args.distances), flush=True)


if __name__ == "__main__":
    main()
