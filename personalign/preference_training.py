"""Light preference training: a DPO LoRA adapter on people's pairwise choices, persona in the prompt.

The no-training scorers (``evaluation``) read a preference off the base model; this trains
the model to follow the persona instead. Each training pair is (persona prompt, chosen,
rejected), taken from AlignX records: the record's own pair and, optionally, the pairwise
history it carries (the person's earlier choices). The loss is DPO's (Rafailov et al., 2023),

    -log σ(β · [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]),

with log π the summed response log-probability under the adapted model and π_ref the same
model with the adapter switched off, so no second copy of the model is held. The prompt
kind decides what the model conditions on:

- ``pba``: the record's profile in the PBA system prompt, the published PBA setting;
- ``raw``: no persona at all. This learns the population's taste, not the person's; it is
  the control that tells persona-following apart from a general lean (say, towards
  simpler answers) when the adapter is evaluated.

ICA is not offered: its prompt already quotes the pairwise history, so training on those
pairs would teach copying.

Held-out records stay out of training entirely, and so does any pair (from any record's
history) whose post is one of theirs, since P-Soups draws histories from the same pool of
posts as the records themselves. The adapter is written like every other
(``adapter_training``) and applied with ``--adapter``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalign.adapter_training import (
    LoraSettings,
    check_out_dir,
    lora_session,
    optimize,
    planned_steps,
    write_metadata,
)
from personalign.evaluation import record_messages
from personalign.models import LoadedModel
from personalign.persona import PAIRWISE_KEY
from personalign.scoring import scoring_batch, summed_logprobs

logger = logging.getLogger(__name__)

KINDS = ("pba", "raw")
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class PreferencePair:
    """One choice to learn: the prompt messages, and the preferred and the other reply."""

    messages: tuple[Mapping[str, str], ...]
    chosen: str
    rejected: str
    record: int  # index of the record it came from


@dataclass(frozen=True)
class PreferenceTrainingConfig:
    """How to train on pairs already built (``preference_pairs`` decides which pairs there are)."""

    kind: str = "pba"  # the prompt kind the pairs were built with, recorded in the adapter's metadata
    beta: float = 0.1
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8  # pairs per optimizer step
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None; got {self.max_steps!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be a positive number; got {self.beta!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a positive learning rate below 1; got {self.lr!r}")


def _pair(record: Mapping[str, Any], where: str) -> tuple[str, str, str] | None:
    """(post, chosen, rejected) of a record or history item; None when it teaches nothing."""
    texts = [record.get(k) for k in ("prompt", "chosen", "rejected")]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be text")
    post, chosen, rejected = texts
    if not (post.strip() and chosen.strip() and rejected.strip()) or chosen == rejected:
        return None
    return post, chosen, rejected


def preference_pairs(records: Sequence[Mapping[str, Any]], kind: str, *, history: bool = True,
                     exclude_posts: Collection[str] = ()) -> list[PreferencePair]:
    """The training pairs in ``records``: each record's own, then (with ``history``) its history's.

    Every pair is framed by its record's person (``kind``). A pair whose post is in
    ``exclude_posts`` is dropped, and so are pairs with an empty text or two equal replies.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    pairs: list[PreferencePair] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"record {index}: not a JSON object")  # noqa: TRY004 -- a data error, as the CLI shows
        items: list[Mapping[str, Any]] = [record]
        if history:
            feedback = record.get(PAIRWISE_KEY) or []
            if not isinstance(feedback, list):
                raise ValueError(f"record {index}: '{PAIRWISE_KEY}' must be a list")
            items += feedback
        for number, item in enumerate(items):
            where = f"record {index}" if number == 0 else f"record {index}, pairwise item {number - 1}"
            if not isinstance(item, Mapping):
                raise ValueError(f"{where}: not a JSON object")  # noqa: TRY004
            found = _pair(item, where)
            if found is None or found[0] in exclude_posts:
                continue
            post, chosen, rejected = found
            messages = tuple(record_messages(kind, record, post))
            pairs.append(PreferencePair(messages, chosen, rejected, index))
    return pairs


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean DPO loss over pairs; ``policy`` and ``reference`` are (N, 2): log p of (chosen, rejected)."""
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])  # (N,)
    return -F.logsigmoid(beta * margin).mean()


def pair_logprobs(model: Any, loaded: LoadedModel, pair: PreferencePair) -> torch.Tensor:
    """(log p(chosen), log p(rejected)) under ``model`` as one two-row forward; shape (2,)."""
    batch = scoring_batch(loaded, list(pair.messages), [pair.chosen, pair.rejected])
    return summed_logprobs(model, batch, loaded.device)


def pair_accuracy(model: Any, loaded: LoadedModel, pairs: Sequence[PreferencePair]) -> float | None:
    """Share of ``pairs`` whose chosen reply ``model`` scores strictly higher (the eval's rule); None if none."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            hits = sum(bool(s[0] > s[1]) for s in (pair_logprobs(model, loaded, p) for p in pairs))
    finally:
        model.train(was_training)
    return hits / len(pairs)


@dataclass(frozen=True)
class PreferenceReport:
    """What a ``train_preference`` run did; the probe is pairs held out of the optimisation."""

    steps: int
    seconds: float
    train_pairs: int
    first_loss: float
    last_loss: float
    probe_pairs: int
    probe_accuracy_before: float | None  # None when too few pairs to hold any out
    probe_accuracy_after: float | None
    out_dir: Path


def _split_probe(pairs: list[PreferencePair], seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out a tenth of the pairs (at most 64), whole records at a time, to score before and after."""
    records = sorted({p.record for p in pairs})
    random.Random(seed).shuffle(records)
    wanted = min(64, len(pairs) // 10)
    probe_records: set[int] = set()
    count = 0
    for r in records:
        if count >= wanted:
            break
        probe_records.add(r)
        count += sum(p.record == r for p in pairs)
    return [p for p in pairs if p.record in probe_records], [p for p in pairs if p.record not in probe_records]


def train_preference(loaded: LoadedModel, pairs: Sequence[PreferencePair], config: PreferenceTrainingConfig,
                     out_dir: Path | str, *, run_info: Mapping[str, Any] | None = None,
                     progress: ProgressFn | None = None) -> PreferenceReport:
    """Train a DPO LoRA adapter on ``pairs`` and save it in ``out_dir``; ``loaded.model`` is left as it was.

    ``progress(step, total, loss)`` follows every optimizer step. ``run_info`` (the data file,
    the held-out records...) is written into the adapter's metadata as given.
    """
    out = check_out_dir(out_dir)
    if len(pairs) < 2:
        raise ValueError(f"preference training needs at least 2 pairs; got {len(pairs)}")
    probe, train = _split_probe(list(pairs), config.seed)
    total = planned_steps(len(train), config.batch_size, config.epochs, config.max_steps)
    logger.info("preference training (%s prompts): %d pairs, %d probe pairs, %d steps", config.kind, len(train),
                len(probe), total)
    reference: dict[int, torch.Tensor] = {}  # pair index -> (2,) log p under the base, computed on first use

    with lora_session(loaded, config.lora, config.seed) as model:
        before = pair_accuracy(model, loaded, probe)  # LoRA starts as a no-op: this is the base model

        def step(chunk: list[int]) -> float:
            total_loss = 0.0
            for index in chunk:
                if index not in reference:
                    with model.disable_adapter(), torch.no_grad():
                        reference[index] = pair_logprobs(model, loaded, train[index]).detach()
                policy = pair_logprobs(model, loaded, train[index])
                # One pair per backward keeps memory to two sequences; gradients add up over the chunk.
                loss = dpo_loss(policy[None], reference[index][None], config.beta) / len(chunk)
                loss.backward()
                total_loss += loss.item()
            return total_loss

        losses, seconds = optimize(model, range(len(train)), step, lr=config.lr, batch_size=config.batch_size,
                                   total=total, seed=config.seed, progress=progress)
        after = pair_accuracy(model, loaded, probe)
        model.save_pretrained(str(out))
        write_metadata(out, loaded, "preference", config.lora, {
            "method": "dpo", "kind": config.kind, "beta": config.beta, "lr": config.lr,
            "steps": len(losses), "batch_size": config.batch_size, "seed": config.seed, "train_pairs": len(train),
            "final_loss": round(losses[-1], 6), "probe_pairs": len(probe),
            "probe_accuracy_before": before, "probe_accuracy_after": after, **(run_info or {}),
        })
    logger.info("preference training done: %d steps in %.1f s, loss %.4f -> %.4f, probe accuracy %s -> %s",
                len(losses), seconds, losses[0], losses[-1], before, after)
    return PreferenceReport(steps=len(losses), seconds=seconds, train_pairs=len(train), first_loss=losses[0],
                            last_loss=losses[-1], probe_pairs=len(probe), probe_accuracy_before=before,
                            probe_accuracy_after=after, out_dir=out)
