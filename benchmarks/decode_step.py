"""One decode step on top of a long chat's memory: concatenating cache layers against growing ones.

    PYTHONPATH=. python benchmarks/decode_step.py [--model embedded] [--device auto] [--quantize auto]
        [--entries 53,1033,4033] [--steps 16] [--repeats 5] [--threads N]

A StreamingDialogue memory after N utterances holds about N entries per layer (BOS, one sink per
utterance, the latest utterance), and every token of the next reply is one decode step on top of
them. transformers' ``DynamicLayer`` concatenates at every step, copying all of them;
``memory_cache.GrowingLayer`` writes each token into spare room. Per entry count, both caches are
filled with the same random keys and values (a step's cost does not depend on them), made compact
as an eviction leaves them, then ``--steps`` tokens are decoded, alternately, ``--repeats`` times;
the medians are reported. A third column decodes on the growing cache through ``graph_decode``'s
slot steps, replayed from a captured CUDA graph on CUDA (the app's path there; elsewhere they run
eagerly over the padded buffer, which only costs). The default counts are the memories of the long-chat benchmark
(``long_chat.py``) at 10, 500 and 2,000 turns.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.memory_recall import _ints, _model_options, _table


def filled(kind: type, config: Any, entries: int, dtype: Any, device: Any, seed: int = 0) -> Any:
    """A ``kind`` cache holding ``entries`` random entries per layer, each layer one compact tensor."""
    import torch

    cache = kind()
    heads = config.num_key_value_heads
    dims = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # as the app fills its caches
        for index in range(config.num_hidden_layers):
            keys, values = (torch.randn(1, heads, entries, dims, generator=generator).to(device, dtype)
                            for _ in range(2))  # (B, H, N, D)
            cache.update(keys, values, index)
            layer = cache.layers[index]
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()  # compact, as after an eviction
    return cache


def step_seconds(model: Any, cache: Any, steps: int) -> float:
    """Seconds per decode step, over ``steps`` steps on ``cache``."""
    import torch

    from personalign.generation import decode_one_token

    token = torch.tensor([[42]], device=model.device)  # (1, 1)
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        decode_one_token(model, token, cache)
    synchronize()
    return (time.perf_counter() - started) / steps


def graph_step_seconds(decoder: Any, cache: Any, steps: int) -> float:
    """Seconds per decode step, over ``steps`` slot steps of ``decoder`` on top of ``cache``."""
    import torch

    token = torch.tensor([[42]], device=cache.layers[0].keys.device)  # (1, 1)
    synchronize = torch.cuda.synchronize if token.device.type == "cuda" else (lambda: None)
    run = decoder.begin(cache, steps)
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        run.step(token)
    synchronize()
    return (time.perf_counter() - started) / steps


def run(model: Any, dtype: Any, entries: Sequence[int], steps: int,
        repeats: int) -> list[tuple[int, float, float, float]]:
    """(entries, median seconds per step concatenating, growing, graph-replayed) per entry count;
    ``dtype``: the caches'."""
    from transformers import DynamicCache

    from personalign.graph_decode import GraphDecoder
    from personalign.memory_cache import MemoryCache

    decoder = GraphDecoder(model, capture=model.device.type == "cuda")
    rows = []
    for n in entries:
        times: dict[str, list[float]] = {"concatenating": [], "growing": [], "graph": []}
        for repeat in range(repeats + 1):  # the first round warms up (and captures) and is dropped
            for kind, seen in times.items():
                cache = filled(DynamicCache if kind == "concatenating" else MemoryCache, model.config, n, dtype,
                               model.device, repeat)
                seconds = (graph_step_seconds(decoder, cache, steps) if kind == "graph"
                           else step_seconds(model, cache, steps))
                if repeat:
                    seen.append(seconds)
        rows.append((n, *(statistics.median(times[kind]) for kind in ("concatenating", "growing", "graph"))))
    return rows


def report(rows: Sequence[tuple[int, float, float, float]]) -> str:
    base = rows[0][2]
    cells = [[f"{n:,}", f"{plain * 1000:.2f} ms", f"{growing * 1000:.2f} ms", f"{graph * 1000:.2f} ms",
              f"{plain / growing:.2f}x", f"{growing / base:.2f}x", f"{growing / graph:.2f}x", f"{1 / graph:,.0f}"]
             for n, plain, growing, graph in rows]
    return _table(["entries per layer", "DynamicLayer (concatenates)", "GrowingLayer (in place)",
                   "slot steps (graph on CUDA)", "concatenating / growing", f"growing / at {rows[0][0]:,}",
                   "growing / graph", "graph tok/s"], cells)


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _model_options(parser)
    parser.add_argument("--entries", type=_ints, default=(53, 1033, 4033))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be at least 1")

    import torch

    from personalign.models import ModelConfig, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # its CPU cost per layer call dominates a small model's step
    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    rows = run(loaded.model, loaded.dtype, args.entries, args.steps, args.repeats)
    text = "\n".join([
        f"command: {shlex.join(['benchmarks/decode_step.py', *argv])}",
        f"model: {args.model} on {loaded.device} ({loaded.dtype}), {args.steps} steps, median of {args.repeats}",
        "",
        report(rows),
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
