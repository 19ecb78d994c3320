"""Load time and decode speed of a model through Personalign's engine, beside plain HF generate.

    python benchmarks/generation_speed.py [--model embedded] [--device auto] [--quantize auto] [--tokens 128] [--runs 3]

Both paths run greedy decoding of the same prompt in one process, alternately, so the
ratio is fair; absolute figures count only from the machine they were taken on.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    engine = Engine(loaded)
    config = GenerationConfig(max_new_tokens=args.tokens, temperature=0.0)
    ids = torch.tensor([engine.encode(PROMPT)], device=loaded.device)

    def ours() -> int:
        stream = engine.stream(PROMPT, config)
        for _ in stream:
            pass
        return stream.stats.new_tokens

    def plain() -> int:
        out = loaded.model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                    eos_token_id=list(loaded.stop_token_ids), pad_token_id=loaded.eou_token_id)
        return out.shape[1] - ids.shape[1]

    ours(), plain()  # warm-up
    rates = {"engine.stream": [], "HF generate": []}
    for _ in range(args.runs):
        for name, fn in (("engine.stream", ours), ("HF generate", plain)):
            seconds, tokens = timed(fn)
            rates[name].append(tokens / seconds)
    print(f"model: {engine.info()['name']} on {loaded.device} ({loaded.quantization}, {engine.info()['dtype']})")
    print(f"load from converted folder: {loaded.load_seconds:.2f} s")
    for name, values in rates.items():
        print(f"{name:>14}: {statistics.median(values):7.1f} tok/s (median of {args.runs}, {args.tokens} new tokens)")
    ratio = statistics.median(rates["engine.stream"]) / statistics.median(rates["HF generate"])
    print(f"engine / HF generate: {ratio:.2f}x")


if __name__ == "__main__":
    main()
