"""Rebuilding a long chat's memory from its stored messages: turns packed into shared forwards, or fed one by one.

    PYTHONPATH=. python benchmarks/replay_speed.py [--model embedded] [--device auto] [--quantize auto]
        [--turns 100,500] [--tokens-per-forward 512] [--threads N]
        [--data ../shared/data/alignx/p_soups_student_phd.json]

When a chat's memory file is missing or stale, the app replays every stored turn into a fresh
StreamingDialogue memory (``memory.replay``). Fed as live turns are, that is two forwards a turn
(the user's turn, then the reply); packed, the parts of several turns share one forward of up to
``--tokens-per-forward`` tokens under a mask that gives the same result (``MemoryCache.feed``).
Per N, both replay the same N turns of P-Soups text (``long_chat.chat_pairs``), packed first, and
the two memories are compared: the same entries at the same positions, and the largest key
difference.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.long_chat import DEFAULT_DATA, chat_pairs, cycled
from benchmarks.memory_recall import _ints, _model_options, _table


def replayed(loaded: Any, turns: Sequence[tuple[list[dict], str]], tokens_per_forward: int) -> tuple[Any, float]:
    """The streaming-dialogue memory of ``turns`` and the seconds its replay took."""
    import torch

    from personalign.memory import MemoryPolicy, replay

    started = time.perf_counter()
    steps = replay(loaded, MemoryPolicy.STREAMING_DIALOGUE, turns, tokens_per_forward=tokens_per_forward)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            return done.value, time.perf_counter() - started


def run(loaded: Any, lengths: Sequence[int], pairs: Sequence[tuple[str, str]], tokens_per_forward: int) -> list[list]:
    rows = []
    for n in lengths:
        turns = [([{"role": "user", "content": question}], reply) for question, reply in pairs[:n]]
        packed, packed_s = replayed(loaded, turns, tokens_per_forward)
        single, single_s = replayed(loaded, turns, 1)
        a, b = packed.cache, single.cache
        same = (a.cached_tokens, a.rope_positions) == (b.cached_tokens, b.rope_positions)
        gap = max(float((x.keys.float() - y.keys.float()).abs().max()) for x, y in zip(a.layers, b.layers, strict=True))
        rows.append([f"{n:,}", f"{a.tokens_seen:,}", f"{len(a.cached_tokens):,}", f"{single_s:.1f} s",
                     f"{packed_s:.1f} s", f"{single_s / packed_s:.2f}x", "yes" if same else "NO", f"{gap:.1e}"])
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _model_options(parser)
    parser.add_argument("--turns", type=_ints, default=(100, 500))
    parser.add_argument("--tokens-per-forward", type=int, default=512)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an AlignX JSON file (prompts, chosen replies)")
    args = parser.parse_args(argv)
    if args.tokens_per_forward < 1:
        raise SystemExit("--tokens-per-forward must be at least 1")

    import torch

    from personalign.models import ModelConfig, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # its CPU cost per layer call dominates a small model's forward
    pairs = cycled(chat_pairs(args.data), max(args.turns))
    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    rows = run(loaded, args.turns, pairs, args.tokens_per_forward)
    text = "\n".join([
        f"command: {shlex.join(['benchmarks/replay_speed.py', *argv])}",
        f"model: {args.model} on {loaded.device} ({loaded.dtype}); chat text: {args.data.name}",
        "",
        _table(["turns", "tokens", "entries kept", "one part a forward", f"packed, {args.tokens_per_forward} tokens",
                "speed-up", "same entries and positions", "largest key difference"], rows),
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
