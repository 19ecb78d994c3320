"""How much the conversational sinks carry: memory-training losses with the sinks seen, hidden, and bypassed.

    PYTHONPATH=. python benchmarks/sink_information.py [--model embedded] [--device cpu]
        [--adapter DIR ...] [--dialogues 200] [--samples 24] [--seed 4242]

Recall through StreamingDialogue's cache needs two things: the EoU sinks must hold their
utterance, and the model must read the right one back. This separates the first from the
rest. On held-out built-in dialogues (a seed the training does not use) it builds the SMR,
LMR and dialogue-stage samples ``train-memory`` trains on, plus ``answers``: whole dialogues
under the inference mask with the loss only on the answers to questions about earlier facts
(the recall a user asks for), and scores their loss per target token three ways, with the
same targets:

- ``sinks``: the memory mask as trained (a target sees BOS, earlier EoUs and what its kind allows);
- ``hidden``: the same mask with every link to an earlier EoU removed, so no sink is read;
- ``dense``: every earlier token visible, the ceiling a full history gives.

``hidden - sinks`` is what the sinks carry, in nats per target token; 0 means the model gets
nothing out of them, whatever its loss. Each ``--adapter`` (a memory LoRA) adds a row beside
the base model's, all in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from personalign.memory_training import (
    IGNORE,
    SEES_ALL,
    SEES_EOU,
    MemorySample,
    MemoryTrainingConfig,
    answer_indices,
    bos_token_id,
    build_stages,
    dialogue_sample,
    memory_loss,
    synthetic_dialogues,
    tokenize_dialogues,
)

logger = logging.getLogger("sink_information")

KINDS = ("smr", "lmr", "dialogue", "answers")
VIEWS = ("sinks", "hidden", "dense")


def hidden(sample: MemorySample) -> MemorySample:
    """``sample`` with no utterance seeing another's EoU: only BOS, its own prefix and whole utterances."""
    links = sample.links.clone()
    links[links == SEES_EOU] = 0
    return dataclasses.replace(sample, links=links)


def dense(sample: MemorySample) -> MemorySample:
    """``sample`` with every utterance seeing all earlier ones whole: the plain causal mask."""
    return dataclasses.replace(sample, links=torch.full_like(sample.links, SEES_ALL).tril(-1))


def view(sample: MemorySample, name: str) -> MemorySample:
    """``sample`` as the named view of ``VIEWS`` shows it."""
    if name not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}; got {name!r}")
    return sample if name == "sinks" else hidden(sample) if name == "hidden" else dense(sample)


def only_utterances(sample: MemorySample, keep: Sequence[int]) -> MemorySample:
    """``sample`` with the loss only on the tokens of the utterances numbered in ``keep`` (0-based).

    Their EoUs carry no loss: an answer's closing token says nothing of whether its content came
    back, and a model trained under the memory mask predicts it differently once the mask changes.
    """
    is_eou = sample.input_ids == sample.eou_id  # (T,)
    wanted = torch.isin(sample.utterance_of_token, torch.as_tensor(list(keep), dtype=torch.long)) & ~is_eou
    return dataclasses.replace(sample, labels=torch.where(wanted, sample.labels, IGNORE))


def answer_samples(loaded: Any, dialogues: Sequence[Sequence[str]], samples: int) -> list[MemorySample]:
    """Up to ``samples`` dialogues that ask and answer, as dialogue samples scored on their answers only."""
    eou, bos = loaded.eou_token_id, bos_token_id(loaded)
    out = []
    for dialogue in dialogues:
        answers = answer_indices(dialogue)
        utterances = tokenize_dialogues([dialogue], loaded.tokenizer, 10**6, (eou, bos))[0]  # none cut
        if answers and len(utterances) == len(dialogue):  # no utterance dropped, so the indices hold
            out.append(only_utterances(dialogue_sample(utterances, eou, bos), answers))
        if len(out) == samples:
            break
    return out


def losses(loaded: Any, dialogues: Sequence[Sequence[str]], samples: int, seed: int,
           kinds: Sequence[str] = KINDS) -> dict[str, dict[str, float]]:
    """Mean loss per target token, by kind and view, on the first ``samples`` samples of each kind."""
    eou, bos = loaded.eou_token_id, bos_token_id(loaded)
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        if kind == "answers":
            built = answer_samples(loaded, dialogues, samples)
        else:
            config = MemoryTrainingConfig(method=kind, samples=len(dialogues), seed=seed)
            built = build_stages(dialogues, loaded.tokenizer, config, eou_id=eou, bos_id=bos)[0][:samples]
        out[kind] = {name: memory_loss(loaded.model, [view(s, name) for s in built], pad_id=eou,
                                       dtype=loaded.model.dtype, device=loaded.model.device)
                     for name in VIEWS}
        logger.info("%s, %s: %s", loaded.name, kind, out[kind])
    return out


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"kinds must be some of {', '.join(KINDS)}; got {text!r}")
    return kinds


def main(argv: Sequence[str] | None = None) -> None:
    from personalign.models import ModelConfig, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter", action="append", default=[], help="a memory adapter folder; repeat for more")
    parser.add_argument("--dialogues", type=int, default=200, help="held-out built-in dialogues drawn")
    parser.add_argument("--samples", type=int, default=24, help="samples scored per kind")
    parser.add_argument("--seed", type=int, default=4242, help="of the held-out dialogues (training uses 0)")
    parser.add_argument("--kinds", type=_kinds, default=KINDS, help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    dialogues = synthetic_dialogues(args.dialogues, seed=args.seed)
    rows = []
    for adapter in [None, *args.adapter]:
        loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize="none",
                                        adapter=None if adapter is None else Path(adapter)))
        rows.append(("base" if adapter is None else Path(adapter).name,
                     losses(loaded, dialogues, args.samples, 1, args.kinds)))

    print(f"loss per target token (nats) on {args.dialogues} held-out built-in dialogues (seed {args.seed}), "
          f"{args.samples} samples per kind; carried = hidden - sinks")
    print("| model | " + " | ".join(f"{k} sinks / hidden / dense | {k} carried" for k in args.kinds) + " |")
    print("| --- |" + " --- | --- |" * len(args.kinds))
    for name, cells in rows:
        parts = [f"{c['sinks']:.3f} / {c['hidden']:.3f} / {c['dense']:.3f} | {c['hidden'] - c['sinks']:+.3f}"
                 for c in (cells[k] for k in args.kinds)]
        print(f"| {name} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
