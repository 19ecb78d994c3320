"""Decode speed of persona guidance beside plain decoding, and how a persona attribute moves with gamma.

    PYTHONPATH=. python benchmarks/guidance_speed.py [--model embedded] [--device auto] [--quantize auto]
        [--tokens 128] [--gammas 0,1,3] [--runs 3] [--reply-tokens 150]

Speed: the same question with an ICA persona (the condition) and without one (Mode.NONE,
the unconditioned prompt), greedy, exactly --tokens new tokens (stop tokens ignored so
every path decodes the same count). Plain decoding of the persona prompt and the guided
batched loop for each gamma run alternately in one process; the figure to read is the
ratio. gamma 0 here times the batched loop itself (through ``generate_guided_tokens``);
``generate_tokens`` at gamma 0 takes the plain path and costs nothing extra.

Quality: word counts of greedy replies (ending at the end-of-turn token) for a concise and
a detailed ICA persona at each gamma, so one can see the attribute move with gamma.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from personalign.engine import Engine
from personalign.generation import GenerationConfig, generate_tokens
from personalign.guidance import generate_guided_tokens
from personalign.models import ModelConfig, load_model
from personalign.persona import Persona
from personalign.prompts import Mode, build_messages

QUESTION = "How can I sleep better?"
# Demographic text only: a worked example in the persona (UGC or pairwise items) makes a
# small model copy the example's topic instead of answering the question.
PERSONAS = {
    "concise": Persona(demographics="Someone who wants very short answers: one or two sentences, no lists, no details."),
    "detailed": Persona(
        demographics="Someone who wants long, thorough, detailed answers with many steps, examples and explanations."
    ),
}


def timed(device: torch.device, fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds and tokens of one call; synchronizes only on CUDA, where work is asynchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tokens = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, tokens


def parse_gammas(text: str) -> list[float]:
    gammas = [float(g) for g in text.split(",") if g.strip()]
    for gamma in gammas:
        GenerationConfig(persona_strength=gamma)  # validates the range
    return gammas


def prompt_ids(engine: Engine, persona: str | None) -> torch.Tensor:
    """The question's prompt ids with the named ICA persona, or plain (Mode.NONE) for None."""
    if persona is None:
        messages = build_messages(Mode.NONE, None, [], QUESTION)
    else:
        messages = build_messages(Mode.ICA, PERSONAS[persona], [], QUESTION)
    return torch.tensor(engine.encode(messages), device=engine.loaded.device)  # (T,)


def measure_speed(engine: Engine, tokens: int, gammas: list[float], runs: int) -> dict[str, list[float]]:
    """tok/s per path and run: plain decoding of the persona prompt, then the guided loop per gamma."""
    model, device = engine.loaded.model, engine.loaded.device
    cond, uncond = prompt_ids(engine, "concise"), prompt_ids(engine, None)
    greedy = GenerationConfig(max_new_tokens=tokens, temperature=0.0)

    def plain() -> int:
        return sum(1 for _ in generate_tokens(model, cond, greedy, stop_token_ids=()))

    def guided(gamma: float) -> Callable[[], int]:
        config = dataclasses.replace(greedy, persona_strength=gamma)
        return lambda: sum(1 for _ in generate_guided_tokens(model, cond, uncond, config, stop_token_ids=()))

    paths = {"plain": plain} | {f"guided g={g:g}": guided(g) for g in gammas}
    for fn in paths.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, fn in paths.items():
            seconds, count = timed(device, fn)
            assert count == tokens, f"{name} decoded {count} tokens, not {tokens}"
            rates[name].append(count / seconds)
    print(f"prompt tokens: with persona {len(cond)}, without {len(uncond)}; "
          f"{tokens} new tokens, greedy, {runs} alternating runs")
    return rates


def print_speed(rates: dict[str, list[float]]) -> None:
    # The best run is the one least disturbed by other work on a shared machine.
    base, base_best = statistics.median(rates["plain"]), max(rates["plain"])
    print(f"{'path':>14}  {'median tok/s':>12}  {'slowdown':>8}  {'best tok/s':>10}  {'slowdown':>8}")
    for name, values in rates.items():
        rate, best = statistics.median(values), max(values)
        print(f"{name:>14}  {rate:12.1f}  {base / rate:7.2f}x  {best:10.1f}  {base_best / best:7.2f}x")


def print_reply_lengths(engine: Engine, gammas: list[float], max_tokens: int) -> None:
    """Word counts of greedy guided replies for each persona and gamma."""
    loaded = engine.loaded
    uncond = prompt_ids(engine, None)
    reply = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0)

    def words(ids: torch.Tensor, config: GenerationConfig, unconditioned: torch.Tensor | None) -> int:
        tokens = generate_tokens(loaded.model, ids, config, stop_token_ids=loaded.stop_token_ids,
                                 unconditioned_ids=unconditioned)
        return len(loaded.tokenizer.decode(list(tokens), skip_special_tokens=True).split())

    print(f"reply length in words (greedy, up to {max_tokens} tokens, ends at end of turn)")
    print(f"{'persona':>9}  " + "  ".join(f"{'g=' + format(g, 'g'):>6}" for g in gammas))
    for name in PERSONAS:
        ids = prompt_ids(engine, name)
        counts = [words(ids, dataclasses.replace(reply, persona_strength=g), uncond) for g in gammas]
        print(f"{name:>9}  " + "  ".join(f"{c:>6}" for c in counts))
    print(f"(no persona at all: {words(uncond, reply, None)} words)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--gammas", type=parse_gammas, default=parse_gammas("0,1,3"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reply-tokens", type=int, default=150,
                        help="cap on the replies in the word-count table; 0 skips the table")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    if loaded.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as in generation_speed.py: cuDNN attention costs CPU per call
    engine = Engine(loaded)
    info = engine.info()
    print(f"model: {info['name']} on {loaded.device} ({loaded.quantization}, {info['dtype']}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print_speed(measure_speed(engine, args.tokens, args.gammas, args.runs))
    if args.reply_tokens > 0:
        print()
        print_reply_lengths(engine, args.gammas, args.reply_tokens)


if __name__ == "__main__":
    main()
