"""How long profile inference takes: the embedding inferrer on 20 items, the model inferrer per item.

    python benchmarks/profile_inference_speed.py [--threads 2] [--items 20] [--runs 5]
        [--model embedded|none] [--model-items 4] [--records PATH]

The items are synthetic chat behaviour of realistic length (pairs, thumbs up and down, UGC
comments, replies of 10 to 150 words). ``--threads`` caps torch's CPU threads to stand in
for a small machine. With ``--records`` (an AlignX benchmark file such as P-Soups), it also
prints how often the embedding inferrer's mean leans the same way as the record's profile
on the dimensions that profile sets (0.5 is chance). Absolute figures count only for the
machine they were taken on.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from personalign.embeddings import Embedder, pole_vectors
from personalign.profile import parse_profile
from personalign.profile_inference import (
    BehaviourItem,
    EmbeddingInferrer,
    ModelInferrer,
)

SENTENCES = (
    "The capital of France is Paris, which has been the seat of government for centuries.",
    "You can reverse a list in Python with slicing or with the reversed built-in.",
    "Black holes form when very massive stars collapse under their own gravity.",
    "A balanced breakfast with protein and fibre keeps you full until lunch.",
    "Compound interest means you earn interest on the interest already paid.",
    "Try to sleep at the same time every night, even at weekends.",
    "The film's second half drags, but the soundtrack carries it.",
    "When two colleagues disagree, it helps to name the problem directly and early.",
    "Hiking in the mountains needs good boots, water and a map you can read offline.",
    "Watercolour rewards patience: let each layer dry before you paint the next.",
)
PROMPTS = ("Can you help me with this?", "What do you think?", "Explain it to me.", "Any advice?")


def text(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(rng.choice(SENTENCES))
    return " ".join(out)


def synthetic_items(n: int, seed: int = 0) -> list[BehaviourItem]:
    """n items cycling through the four shapes, with replies of 10 to 150 words."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        prompt, a, b = rng.choice(PROMPTS), text(rng, rng.randint(10, 150)), text(rng, rng.randint(10, 150))
        shape = i % 4
        if shape == 0:
            items.append(BehaviourItem("pick", prompt, chosen=a, rejected=b))
        elif shape == 1:
            items.append(BehaviourItem("thumb", prompt, chosen=a))
        elif shape == 2:
            items.append(BehaviourItem("thumb", prompt, rejected=a))
        else:
            items.append(BehaviourItem("ugc", prompt, chosen=a))
    return items


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_cpu(fn) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds: on a shared machine the wall time counts
    other people's load too, while CPU seconds over the thread count bound an idle machine's."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def embedding_figures(args: argparse.Namespace) -> Embedder:
    embedder = Embedder()
    print(f"embedding model load: {timed(embedder.load):.2f} s")
    print(f"pole vectors (180 labels, once per model): {timed(lambda: pole_vectors(embedder)):.2f} s")
    inferrer = EmbeddingInferrer(embedder)
    walls, cpus = [], []
    for run in range(args.runs):
        items = synthetic_items(args.items, seed=run)  # fresh texts each run: nothing is cached
        wall, cpu = timed_cpu(lambda items=items: inferrer.infer(items))
        walls.append(wall)
        cpus.append(cpu)
    print(f"embedding inferrer, {args.items} new items: wall median {statistics.median(walls):.3f} s, "
          f"max {max(walls):.3f} s; CPU median {statistics.median(cpus):.3f} s ({args.runs} runs)")
    # Inferring again after two more ratings: the earlier texts' embeddings are remembered.
    again = synthetic_items(args.items - 2, seed=0) + synthetic_items(2, seed=1000)
    wall, cpu = timed_cpu(lambda: inferrer.infer(again))
    print(f"embedding inferrer, {args.items} items of which 2 new: wall {wall:.3f} s, CPU {cpu:.3f} s")
    return embedder


def model_figures(args: argparse.Namespace) -> None:
    from personalign.engine import Engine
    from personalign.models import ModelConfig, load_model

    engine = Engine(load_model(ModelConfig(model=args.model, device="cpu")))
    inferrer = ModelInferrer(engine)
    items = synthetic_items(args.model_items, seed=99)
    prefix, suffixes = inferrer.prompt_parts(items[0])
    print(f"model inferrer on {engine.loaded.name} (cpu): one item = {len(prefix)} prefix tokens + "
          f"{sum(map(len, suffixes))} suffix tokens over 90 dimensions")
    shapes = sorted({i.shape for i in items})
    calibration = timed(lambda: [inferrer.null_gaps(s) for s in shapes])
    print(f"  calibration (content-free items, once per model and shape, {len(shapes)} shapes): {calibration:.1f} s")
    per_item = [timed(lambda item=item: inferrer.infer([item])) for item in items]
    print(f"  per item: median {statistics.median(per_item):.1f} s, max {max(per_item):.1f} s ({len(items)} items)")
    print(f"  all {len(items)} again, cached: {timed(lambda: inferrer.infer(items)) * 1000:.1f} ms")


def agreement(embedder: Embedder, path: Path, limit: int) -> None:
    records = [r for r in json.loads(path.read_text()) if r.get("Pair-wise Comparative Feedback")][:limit]
    inferrer = EmbeddingInferrer(embedder)
    hits = total = 0
    for record in records:
        truth = parse_profile(record["profile"])
        items = [BehaviourItem("pair", p["prompt"], chosen=p["chosen"], rejected=p["rejected"])
                 for p in record["Pair-wise Comparative Feedback"]]
        values = inferrer.infer(items).values
        for t, v in zip(truth, values):
            if t != 0.5 and v != 0.5:
                total += 1
                hits += (v > 0.5) == (t > 0.5)
    print(f"embedding inferrer vs profile on {len(records)} records of {path.name}: "
          f"{hits / total:.3f} of {total} set dimensions lean the profile's way (0.5 is chance)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="embedded", help="chat model for the model inferrer, or 'none'")
    parser.add_argument("--model-items", type=int, default=4)
    parser.add_argument("--records", type=Path, default=None)
    parser.add_argument("--record-limit", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    embedder = embedding_figures(args)
    if args.records is not None:
        agreement(embedder, args.records, args.record_limit)
    if args.model != "none":
        model_figures(args)


if __name__ == "__main__":
    main()
