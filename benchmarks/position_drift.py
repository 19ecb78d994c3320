"""How far a compressing cache's kept keys drift from exact under each position rule, in half precision.

    PYTHONPATH=. python benchmarks/position_drift.py [--model embedded] [--device cpu] [--dtype bfloat16]
        [--turns 10,100,400] [--cap 256] [--seed 0]

Rules that re-rotate kept keys (``slot``; ``distance`` past its cap) round them to the cache's
dtype each time they turn them, so in bf16 a key turned every turn blurs. Layer 0's keys depend
on the token and its position alone, so the exact key of every cached entry can be recomputed
at the position the cache says it is rotated at; this prints the relative error
‖cached − exact‖ / ‖exact‖ over the entries (median, max) and for BOS, the oldest sink, at each
checkpoint of one synthetic dialogue (filler utterances from ``memory_recall``), fed one
utterance at a time and compressed as StreamingDialogue does.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.memory_recall import Tokens
from personalign.generation import new_cache, prefill
from personalign.memory_cache import Positions
from personalign.recall_dialogues import filler_utterance
from personalign.streaming_dialogue import StreamingDialogueCache

logger = logging.getLogger("position_drift")


@torch.inference_mode()
def exact_layer0_keys(model: Any, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """Layer-0 keys of ``ids`` rotated at ``positions``, computed afresh: (1, H, T, D)."""
    cache = new_cache(model)
    device = model.device
    model(input_ids=torch.tensor([list(ids)], device=device), past_key_values=cache,
          position_ids=torch.tensor([list(positions)], device=device))
    return cache.layers[0].keys


def key_errors(model: Any, cache: StreamingDialogueCache) -> torch.Tensor:
    """Relative error of each cached layer-0 key against its exact value: (H, K), float32."""
    exact = exact_layer0_keys(model, cache.cached_tokens, cache.rope_positions).float()
    got = cache.layers[0].keys.float()
    return ((got - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12))[0]


def run(model: Any, tokens: Tokens, rules: Sequence[tuple[str, Positions]], turns: Sequence[int],
        seed: int) -> dict[str, dict[int, tuple[float, float, float]]]:
    """For each named rule: at each checkpoint, (median, max, BOS) relative key error."""
    rng = random.Random(seed)
    dialogue = tokens.dialogue([filler_utterance(rng) for _ in range(max(turns))])
    out: dict[str, dict[int, tuple[float, float, float]]] = {}
    for name, positions in rules:
        cache = StreamingDialogueCache(tokens.eou_id, tokens.bos_id, positions=positions)
        for turn, ids in enumerate(dialogue, start=1):
            prefill(model, torch.tensor([ids], device=model.device), cache)
            cache.compress(ids)
            if turn in turns:
                errors = key_errors(model, cache)
                out.setdefault(name, {})[turn] = (float(errors.median()), float(errors.max()),
                                                  float(errors[:, 0].mean()))
                logger.info("%s, turn %d: %s", name, turn, out[name][turn])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.memory_recall import _ints
    from personalign.models import ModelConfig, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--turns", type=_ints, default=(10, 100, 400))
    parser.add_argument("--cap", type=int, default=256, help="max_distance of the capped distance row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize="none"))
    model = loaded.model.to(getattr(torch, args.dtype))
    tokens = Tokens(loaded.tokenizer, loaded.eou_token_id, loaded.tokenizer.bos_token_id)
    rules = [("slot", Positions.for_model("slot", model)),
             ("distance", Positions.for_model("distance", model)),
             (f"distance, cap {args.cap}", Positions.for_model("distance", model, max_distance=args.cap))]
    figures = run(model, tokens, rules, sorted(set(args.turns)), args.seed)

    print(f"{loaded.name} on {args.device} in {args.dtype}: relative error of cached layer-0 keys")
    print("| rule | turn | median | max | BOS |")
    print("| --- | --- | --- | --- | --- |")
    for name, cells in figures.items():
        for turn, (median, largest, bos) in cells.items():
            print(f"| {name} | {turn} | {median:.4f} | {largest:.4f} | {bos:.4f} |")


if __name__ == "__main__":
    main()
