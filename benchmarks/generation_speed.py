"""Load time and decode speed of a model through Personalign's engine, beside plain HF generate.

    python benchmarks/generation_speed.py [--model embedded] [--device auto] [--quantize auto] [--tokens 128] [--runs 3]

The engine runs twice, with its decode steps replayed from CUDA graphs (``graph_decode``;
on CUDA only, elsewhere both rows run the same loop) and step by step; all paths run greedy
decoding of the same prompt in one process, alternately, so the ratios are fair; absolute
figures count only from the machine they were taken on. Whether the graph steps' reply is the
step-by-step one is printed too (bf16 kernels over a padded buffer may round differently).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.models import ModelConfig, load_model

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def timed(fn) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention costs ~2 ms of CPU per call there

    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    engine, stepwise = Engine(loaded), Engine(loaded, cuda_graphs=False)
    config = GenerationConfig(max_new_tokens=args.tokens, temperature=0.0)
    ids = torch.tensor([engine.encode(PROMPT)], device=loaded.device)
    replies: dict[str, str] = {}

    def through(name: str, chat: Engine) -> Callable[[], int]:
        def run() -> int:
            stream = chat.stream(PROMPT, config)
            for text in stream:
                replies[name] = text
            return stream.stats.new_tokens
        return run

    ours, steps = through("graphs", engine), through("steps", stepwise)

    def plain() -> int:
        out = loaded.model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                    eos_token_id=list(loaded.stop_token_ids), pad_token_id=loaded.eou_token_id)
        return out.shape[1] - ids.shape[1]

    paths = (("engine.stream", ours), ("engine.stream, step by step", steps), ("HF generate", plain))
    for _, fn in paths:  # warm-up (and the graph's capture)
        fn()
    rates: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(args.runs):
        for name, fn in paths:
            seconds, tokens = timed(fn)
            rates[name].append(tokens / seconds)
    print(f"model: {engine.info()['name']} on {loaded.device} ({loaded.quantization}, {engine.info()['dtype']})")
    print(f"load from converted folder: {loaded.load_seconds:.2f} s")
    for name, values in rates.items():
        print(f"{name:>28}: {statistics.median(values):7.1f} tok/s (median of {args.runs}, {args.tokens} new tokens)")
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"engine / HF generate: {median['engine.stream'] / median['HF generate']:.2f}x; "
          f"engine / step by step: {median['engine.stream'] / median['engine.stream, step by step']:.2f}x")
    same = next((i for i, (a, b) in enumerate(zip(replies["graphs"], replies["steps"])) if a != b), None)
    print("graph steps' reply: " + ("the same as step by step" if replies["graphs"] == replies["steps"] else
                                    f"differs from step by step from character {same}"))


if __name__ == "__main__":
    main()
