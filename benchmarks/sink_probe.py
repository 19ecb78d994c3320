"""Is the fact in the sink? Linear probes on the keys and values a StreamingDialogue EoU leaves in the cache.

    PYTHONPATH=. python benchmarks/sink_probe.py [--model embedded] [--device cpu] [--adapter DIR ...]
        [--per-value 16] [--folds 5] [--ridge 10] [--seed 0]

Recall through the StreamingDialogue cache needs two things from a fact's EoU sink: its key must
let a question find it, and its value must hold the fact, in a form attention can read. Attention
reads a kept token only as a weighted sum of its value vectors, so a fact a question could get
back from the sink at some layer is one that is *linearly* decodable from that layer's value at
the EoU. This measures both sides per layer, on the recall benchmark's own fact statements
(``memory_recall.FACT_TYPES``: fact types the memory training never saw):

- ``value @ EoU``: the fact's value (one of 7-10 per type) from ``v_proj``'s output at the
  statement's EoU, the entry the cache keeps;
- ``value @ last``: the same from the token before the EoU, which has read the whole statement
  too but is evicted: whether the EoU holds less than an ordinary position would;
- ``value @ value``: from the value's own last token, evicted as well: the reference, what the
  model encodes of the value where it is written;
- ``value @ prior EoU``: from the EoU of the filler utterance before the statement, which cannot
  know the value: the control, at chance if the probe does not overfit;
- ``type @ EoU key``: which of the 10 fact types is stated, from ``k_proj``'s output (before
  rotation) at the EoU: whether a question about "my sister" has anything to find.

Each sequence is ``BOS filler EoU statement EoU``; with one utterance before it, the statement
sees exactly what the StreamingDialogue mask lets it see, so a plain causal forward gives the
cache's entries. The probe is a ridge-regression classifier (one-hot targets, features
standardised on the training folds), scored by k-fold cross-validation; for values, per fact
type and then averaged over types. Each ``--adapter`` adds the same rows for a trained model,
all in one process.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.memory_recall import FACT_TYPES
from personalign.memory_training import bos_token_id
from personalign.recall_dialogues import FactType, filler_utterance

logger = logging.getLogger("sink_probe")

SITES = ("value @ EoU", "value @ last", "value @ value", "value @ prior EoU", "type @ EoU key")


# --- sequences (pure but for the tokenizer) -----------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One probe sequence and the token positions the probes read."""

    ids: tuple[int, ...]  # BOS filler EoU statement EoU
    fact: int  # index into FACT_TYPES
    value: int  # index into that type's values
    eou: int  # the statement's EoU (the last token)
    last: int  # the token before it
    value_token: int  # the last token of the value
    prior_eou: int  # the filler's EoU


def statement(tokenizer: Any, kind: FactType, fact: int, value: int, filler: str, eou_id: int,
              bos_id: int | None) -> Statement:
    """``BOS filler EoU statement EoU`` with the value's last token located by tokenizing up to it."""
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    text = kind.statement.format(kind.values[value])
    upto = encode(kind.statement[: kind.statement.index("{}")] + kind.values[value])
    said = encode(text)
    if said[: len(upto)] != upto:  # the value's tokens merge with what follows it
        raise ValueError(f"cannot locate the value in {text!r}: its tokens change with the text after it")
    head = ([] if bos_id is None else [bos_id]) + encode(filler) + [eou_id]
    ids = (*head, *said, eou_id)
    return Statement(ids, fact, value, len(ids) - 1, len(ids) - 2, len(head) + len(upto) - 1, len(head) - 1)


def statements(tokenizer: Any, per_value: int, seed: int, eou_id: int, bos_id: int | None) -> list[Statement]:
    """``per_value`` sequences for every value of every fact type, each behind a different random filler."""
    rng = random.Random(seed)
    return [statement(tokenizer, kind, f, v, filler_utterance(rng), eou_id, bos_id)
            for f, kind in enumerate(FACT_TYPES) for v in range(len(kind.values)) for _ in range(per_value)]


# --- features (the model) -----------------------------------------------------------------------


def _projections(model: Any, suffix: str) -> list[Any]:
    modules = [m for name, m in model.named_modules() if name.endswith(suffix)]
    if not modules:
        raise ValueError(f"the model has no modules named *{suffix}; the probe needs Llama-style attention")
    return modules


@torch.inference_mode()
def features(model: Any, rows: Sequence[Statement], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per-layer key/value projections at each probed position.

    Returns ``{"v@eou", "v@last", "v@value", "v@prior", "k@eou"}`` -> (layers, n, kv width) float32.
    Sequences are right-padded, so every real token keeps its position and sees only real tokens.
    """
    grabbed: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    out: dict[str, list[list[torch.Tensor]]] = {name: [] for name in ("v@eou", "v@last", "v@value", "v@prior", "k@eou")}
    hooks = [module.register_forward_hook(lambda _m, _i, o, key=key: grabbed[key].append(o))
             for key in ("k", "v") for module in _projections(model, f"self_attn.{key}_proj")]
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(r.ids) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
            mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
            for i, row in enumerate(batch):
                ids[i, : len(row.ids)] = torch.as_tensor(row.ids)
                mask[i, : len(row.ids)] = 1
            grabbed["k"].clear()
            grabbed["v"].clear()
            model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
            rows_at = torch.arange(len(batch))
            for name, key, attr in (("v@eou", "v", "eou"), ("v@last", "v", "last"), ("v@value", "v", "value_token"),
                                    ("v@prior", "v", "prior_eou"), ("k@eou", "k", "eou")):
                at = torch.as_tensor([getattr(r, attr) for r in batch])
                out[name].append([layer[rows_at, at].float().cpu() for layer in grabbed[key]])  # layers x (B, W)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack([torch.cat(layer) for layer in zip(*chunks)]) for name, chunks in out.items()}


# --- the probe (pure) ---------------------------------------------------------------------------


def fold_ids(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """(n,) fold of each example, dealt round-robin within each class so every fold sees every class."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        where = where[torch.randperm(len(where), generator=generator)]
        fold[where] = torch.arange(len(where)) % folds
    return fold


def probe_accuracy(x: torch.Tensor, labels: torch.Tensor, *, folds: int = 5, ridge: float = 10.0,
                   seed: int = 0) -> torch.Tensor:
    """Cross-validated accuracy of a ridge classifier, per layer.

    x: (layers, n, d) features; labels: (n,) class ids. Returns (layers,) accuracy over all n
    held-out predictions. Features are standardised with each training fold's statistics; the
    classifier solves (XᵀX + ridge·I) W = XᵀY for one-hot Y and predicts the largest score.
    """
    if x.dim() != 3 or labels.shape != x.shape[1:2]:
        raise ValueError(f"want x (layers, n, d) and labels (n,); got {tuple(x.shape)} and {tuple(labels.shape)}")
    classes, target = labels.unique(return_inverse=True)
    onehot = torch.nn.functional.one_hot(target, len(classes)).to(x.dtype)  # (n, C)
    fold = fold_ids(target, folds, seed)
    correct = torch.zeros(x.shape[0])
    eye = torch.eye(x.shape[2] + 1, dtype=x.dtype)
    eye[-1, -1] = 0  # the bias is not shrunk
    for k in range(folds):
        train, test = fold != k, fold == k
        if not test.any():
            continue
        mean, std = x[:, train].mean(1, keepdim=True), x[:, train].std(1, keepdim=True).clamp_min(1e-6)
        z = (x - mean) / std  # (L, n, d)
        z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)  # (L, n, d+1)
        a, b = z[:, train], onehot[train]
        # Cholesky, not a general solve: the system is symmetric positive definite, and torch's batched
        # LU solve fails inside MKL (SLASWP) under torch.set_num_threads(2) on the CPU machine.
        factor = torch.linalg.cholesky(a.transpose(1, 2) @ a + ridge * eye)  # (L, d+1, d+1)
        w = torch.cholesky_solve(a.transpose(1, 2) @ b, factor)  # (L, d+1, C)
        predicted = (z[:, test] @ w).argmax(-1)  # (L, n_test)
        correct += (predicted == target[test]).sum(1).float()
    return correct / len(labels)


def site_accuracy(feats: dict[str, torch.Tensor], rows: Sequence[Statement], *, folds: int, ridge: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """(layers,) accuracy of every ``SITES`` probe; value probes averaged over the fact types."""
    facts = torch.as_tensor([r.fact for r in rows])
    values = torch.as_tensor([r.value for r in rows])
    out = {}
    for site, name in zip(SITES[:4], ("v@eou", "v@last", "v@value", "v@prior")):
        per_type = [probe_accuracy(feats[name][:, facts == f], values[facts == f], folds=folds, ridge=ridge,
                                   seed=seed) for f in facts.unique()]
        out[site] = torch.stack(per_type).mean(0)
    out[SITES[4]] = probe_accuracy(feats["k@eou"], facts, folds=folds, ridge=ridge, seed=seed)
    return out


def chance(rows: Sequence[Statement]) -> dict[str, float]:
    """What guessing the most common class scores at each site."""
    value_chance = [1 / len(FACT_TYPES[f].values) for f in sorted({r.fact for r in rows})]
    return {site: sum(value_chance) / len(value_chance) for site in SITES[:4]} | {SITES[4]: 1 / len(FACT_TYPES)}


# --- main ---------------------------------------------------------------------------------------


def _layers_shown(layers: int) -> list[int]:
    return sorted({0, layers // 6, layers // 3, layers // 2, 2 * layers // 3, 5 * layers // 6, layers - 1})


def main(argv: Sequence[str] | None = None) -> None:
    from personalign.models import ModelConfig, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter", action="append", default=[], help="a memory adapter folder; repeat for more")
    parser.add_argument("--per-value", type=int, default=16, help="sequences per value of each fact type")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--ridge", type=float, default=10.0, help="L2 strength on standardised features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.per_value < 2 or args.folds < 2 or args.per_value < args.folds:
        parser.error("need --folds >= 2 and --per-value >= --folds, so every fold holds every value")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    results, rows = [], []
    for adapter in [None, *args.adapter]:
        loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize="none",
                                        adapter=None if adapter is None else Path(adapter)))
        if not rows:  # an adapter leaves the tokenizer as it is: one set of sequences serves every model
            rows = statements(loaded.tokenizer, args.per_value, args.seed, loaded.eou_token_id, bos_token_id(loaded))
        feats = features(loaded.model, rows)
        accuracy = site_accuracy(feats, rows, folds=args.folds, ridge=args.ridge, seed=args.seed)
        name = "base" if adapter is None else Path(adapter).name
        logger.info("%s: %s", name, {site: round(float(a.max()), 3) for site, a in accuracy.items()})
        results.append((name, accuracy))

    layers = len(results[0][1][SITES[0]])
    shown = _layers_shown(layers)
    odds = chance(rows)
    print(f"linear-probe accuracy, {args.folds}-fold, ridge {args.ridge}, {len(rows)} sequences "
          f"({args.per_value} per value); chance: values {odds[SITES[0]]:.3f}, type {odds[SITES[4]]:.3f}")
    print("| model | probe | " + " | ".join(f"layer {i}" for i in shown) + " | best (layer) |")
    print("| --- | --- |" + " --- |" * (len(shown) + 1))
    for name, accuracy in results:
        for site in SITES:
            a = accuracy[site]
            cells = " | ".join(f"{float(a[i]):.2f}" for i in shown)
            print(f"| {name} | {site} | {cells} | {float(a.max()):.2f} ({int(a.argmax())}) |")


if __name__ == "__main__":
    main()
