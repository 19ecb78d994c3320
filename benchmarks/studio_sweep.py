"""Does the studio's slider sweep move the measured attribute monotonically with the slider?

    PYTHONPATH=. python benchmarks/studio_sweep.py [--model embedded] [--adapter DIR] [--device auto]
        [--quantize auto] [--dimension "Concise communication style"] [--values 0,0.25,0.5,0.75,1]
        [--questions N|FILE] [--samples 3] [--attribute length] [--max-new-tokens 160]
        [--temperature 0.7] [--seed 0] [--threads N] [--mode pba|none] [--expect auto|up|down]
        [--show-answers]

The issue target: "the sweep's measured attribute moves monotonically with the slider for
the communication-style dimension on the embedded model; report the rank correlation".
Each question goes through the real ``StudioService.sweep`` (a temporary SQLite database, a
persona with every slider neutral, PBA mode): the swept dimension's slider takes each value,
``--samples`` answers per value with seeds ``seed + k`` shared across values, the attribute
is measured on every answer. Reported per question and pooled over questions: the mean
attribute per value, Spearman's rho over the (value, measurement) points, and how many
questions have per-value means monotone in the expected direction (for the default
dimension, whose slider 1 is "Concise communication style", and length: more concise, so
fewer words, as the slider rises).

PBA renders a slider at >= 0.6 as the positive pole and <= 0.4 as the negative one and
leaves it out between, so 0 and .25 give the same prompt, as do .75 and 1; under shared
seeds their answers are then identical. The profile line of each value is printed once.

``--mode none`` is a control: no persona, so the prompt does not depend on the slider. The
studio refuses a slider sweep outside PBA, so the control answers through the engine with the
sweep's seeds, once per sample, and the same answers stand for every value: its rows give
each question's plain baseline, and its rho is undefined by construction.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign.attributes import ATTRIBUTES, spearman
from personalign.persona import Persona
from personalign.preference_space import DIMENSIONS, Dimension

logger = logging.getLogger("studio_sweep")

COMMUNICATION_STYLE = "Concise communication style"
"""The default dimension, found by its positive pole's label."""

QUESTIONS = (
    "How do I brew green tea?",
    "How can I sleep better?",
    "What should I pack for a weekend hiking trip?",
    "How do I start running if I have never exercised?",
    "How can I keep my houseplants alive?",
    "What is a good way to save money each month?",
)

# Where an attribute is expected to go as a slider rises to its positive pole: -1 down, +1 up.
# Keyed by (positive pole, attribute); other pairs have no expectation unless --expect says so.
EXPECTED = {
    (COMMUNICATION_STYLE, "length"): -1,
    ("Detailed communication style", "length"): +1,
}
EXPECT_WORDS = {-1: "down", +1: "up"}
PROJECTION = "projection"  # personalign.studio.PROJECTION (the test checks), named here so this part needs no torch


# --- the pure parts ---------------------------------------------------------------------------


def find_dimension(query: str) -> Dimension:
    """A dimension by index, by either pole's exact label, or by a text that hits one dimension only."""
    text = query.strip()
    if text.isdigit() and int(text) < len(DIMENSIONS):
        return DIMENSIONS[int(text)]
    exact = [d for d in DIMENSIONS if text.lower() in (d.positive.lower(), d.negative.lower())]
    if len(exact) == 1:
        return exact[0]
    hits = [d for d in DIMENSIONS if text.lower() in d.positive.lower() or text.lower() in d.negative.lower()]
    if len(hits) != 1:
        found = "no dimension" if not hits else f"{len(hits)} dimensions ({', '.join(str(d.index) for d in hits[:6])})"
        raise ValueError(f"--dimension {query!r} names {found}; give an index or a pole's label")
    return hits[0]


def expected_sign(dimension: Dimension, attribute: str, expect: str = "auto") -> int | None:
    """-1 or +1 for where the attribute should go as the slider rises; None when nothing is expected.

    The projection is on the swept dimension's positive pole, so it should rise with any slider.
    """
    if expect in ("up", "down"):
        return +1 if expect == "up" else -1
    if attribute == PROJECTION:
        return +1
    return EXPECTED.get((dimension.positive, attribute))


def profile_lines(dimension: Dimension, values: Sequence[float]) -> list[tuple[float, str]]:
    """The PBA profile line a neutral persona renders with the swept slider at each value."""
    return [(v, Persona().with_values({dimension.index: v}).profile) for v in values]


def monotone(means: Sequence[float], sign: int) -> bool:
    """Whether ``means`` (in rising value order) never step against ``sign`` (ties allowed)."""
    return all((b - a) * sign >= 0 for a, b in itertools.pairwise(means))


@dataclass(frozen=True)
class QuestionResult:
    """One question's sweep: (value, measurement) points, the answers, and the seconds it took."""

    question: str
    points: tuple[tuple[float, float], ...]
    texts: tuple[str, ...]
    seconds: float

    def means(self, values: Sequence[float]) -> list[float]:
        return [_mean([s for v, s in self.points if v == value]) for value in values]

    @property
    def rho(self) -> float | None:
        return spearman([v for v, _ in self.points], [s for _, s in self.points])


def _mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores) if scores else float("nan")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "undefined" if x is None else f"{x:+.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def report(results: Sequence[QuestionResult], values: Sequence[float], dimension: Dimension, attribute: str,
           sign: int | None, *, mode: str = "pba", show_answers: bool = False,
           at_cap: Callable[[str], bool] | None = None) -> str:
    """The readable figures: profile lines, per-question means and rho, then pooled over questions.

    ``at_cap`` tells whether an answer ran to the token limit: such an answer was cut, so
    its length says more about the limit than about the slider.
    """
    order = sorted(values)
    label = ATTRIBUTES[attribute][0] if attribute in ATTRIBUTES else f"embedding projection on '{dimension.positive}'"
    out = [f"dimension {dimension.index}: slider 0 = '{dimension.negative}', 1 = '{dimension.positive}'",
           f"attribute: {label}"]
    if sign is None:
        out.append("expected direction: none given (pass --expect up|down); both monotone counts shown")
    else:
        why = " (more concise -> shorter)" if (dimension.positive, attribute) == (COMMUNICATION_STYLE, "length") else ""
        out.append(f"expected direction: {EXPECT_WORDS[sign]} as the slider rises{why}")

    out.append("\nPBA profile line per value (persona neutral on every other dimension):")
    seen: dict[str, float] = {}
    for value, profile in profile_lines(dimension, order):
        same = f"  (same prompt as {seen[profile]:g})" if profile in seen else ""
        out.append(f"  {value:<5g} {repr(profile) if profile else '(empty: every dimension neutral)'}{same}")
        seen.setdefault(profile, value)
    if mode == "none":
        out.append("  control (--mode none): no persona in the prompt, so none of these lines is used")

    for n, result in enumerate(results, 1):
        means = result.means(order)
        out.append(f"\nQ{n}: {result.question}  ({len(result.points)} answers, {result.seconds:.1f} s)")
        rows = [[f"{v:g}", f"{m:.1f}", ", ".join(f"{s:g}" for w, s in result.points if w == v)]
                for v, m in zip(order, means)]
        out.append(_table(["value", "mean", "answers"], rows))
        out.append(f"rho = {_fmt(result.rho)}; means monotone {_monotone_words(means, sign)}")
        if at_cap is not None:
            out.append(f"answers cut at the token limit: {sum(map(at_cap, result.texts))} of {len(result.texts)}")
        if show_answers:
            for (value, score), text in zip(result.points, result.texts):
                short = " ".join(text.split())
                out.append(f"  [{value:g}] ({score:g}) {short[:300]}{' …' if len(short) > 300 else ''}")

    points = [p for r in results for p in r.points]
    pooled = [_mean([s for v, s in points if v == value]) for value in order]
    rhos = [r.rho for r in results if r.rho is not None]
    out.append(f"\nPooled over {len(results)} question(s), {len(points)} answers")
    out.append(_table(["value", "mean"], [[f"{v:g}", f"{m:.1f}"] for v, m in zip(order, pooled)]))
    out.append(f"rho over all (value, measurement) points = {_fmt(spearman([v for v, _ in points], [s for _, s in points]))}")
    out.append(f"mean of per-question rho = {_fmt(_mean(rhos) if rhos else None)} "
               f"({len(rhos)} of {len(results)} defined)")
    if at_cap is not None:
        texts = [t for r in results for t in r.texts]
        out.append(f"answers cut at the token limit: {sum(map(at_cap, texts))} of {len(texts)}")
    per_question = [r.means(order) for r in results]
    down = sum(monotone(m, -1) for m in per_question)
    up = sum(monotone(m, +1) for m in per_question)
    tag = {-1: " (expected)" if sign == -1 else "", +1: " (expected)" if sign == +1 else ""}
    out.append(f"questions with means monotone non-increasing{tag[-1]}: {down} of {len(results)}; "
               f"non-decreasing{tag[+1]}: {up} of {len(results)}")
    if sign is not None:
        ends = sum((m[-1] - m[0]) * sign > 0 for m in per_question)
        out.append(f"questions whose mean at {order[-1]:g} vs {order[0]:g} moves the expected way (strictly): "
                   f"{ends} of {len(results)}")
    return "\n".join(out)


def _monotone_words(means: Sequence[float], sign: int | None) -> str:
    if len(set(means)) == 1:
        return "flat (every value scored alike)"
    signs = [sign] if sign is not None else [-1, +1]
    parts = []
    for s in signs:
        word = "non-increasing" if s == -1 else "non-decreasing"
        parts.append(f"{word}{' (expected)' if sign is not None else ''}: {'yes' if monotone(means, s) else 'no'}")
    return "; ".join(parts)


# --- running the sweeps -------------------------------------------------------------------------


def run_sweeps(services: Any, persona_id: int, questions: Sequence[str], dimension: Dimension,
               values: Sequence[float], attribute: str, generation: Any, samples: int) -> list[QuestionResult]:
    """One ``StudioService.sweep`` per question, in PBA mode."""
    results = []
    for n, question in enumerate(questions, 1):
        start = time.perf_counter()
        sweep = services.studio.sweep(None, question, persona_id, dimension.index, list(values), attribute, "pba",
                                      generation, samples=samples)
        seconds = time.perf_counter() - start
        logger.info("question %d/%d: %d answers in %.1f s, rho %s", n, len(questions), len(sweep.points), seconds,
                    _fmt(sweep.rho))
        results.append(QuestionResult(question, tuple((p.value, p.score) for p in sweep.points),
                                      tuple(p.text for p in sweep.points), seconds))
    return results


def run_control(engine: Any, questions: Sequence[str], values: Sequence[float], measure: Callable[[str], float],
                generation: Any, samples: int) -> list[QuestionResult]:
    """The no-persona control: answers with the sweep's seeds, shared by every value (the prompt has no slider)."""
    from dataclasses import replace

    from personalign.prompts import Mode, build_messages

    results = []
    for n, question in enumerate(questions, 1):
        start = time.perf_counter()
        messages = build_messages(Mode.NONE, None, [], question)
        texts = [_whole_answer(engine, messages, replace(generation, seed=generation.seed + k)) for k in range(samples)]
        scores = [measure(t) for t in texts]
        seconds = time.perf_counter() - start
        logger.info("control question %d/%d: %d answers in %.1f s", n, len(questions), samples, seconds)
        results.append(QuestionResult(question, tuple((v, s) for v in values for s in scores),
                                      tuple(t for _ in values for t in texts), seconds))
    return results


def _measurer(attribute: str, dimension: Dimension) -> Callable[[str], float]:
    """The control's measurement, as the studio's sweep takes it (the projection on the swept dimension)."""
    if attribute != PROJECTION:
        return ATTRIBUTES[attribute][1]
    from personalign.attributes import embedding_projection
    from personalign.embeddings import default_embedder

    embedder = default_embedder()
    return lambda text: embedding_projection(text, dimension.index, embedder)


def _token_limit_check(tokenizer: Any, limit: int) -> Callable[[str], bool]:
    """Whether an answer's text re-tokenises to about ``limit`` tokens, i.e. it was cut there.

    The sweep keeps text, not the finish reason; decoding then encoding again can merge a
    token or two, hence the slack.
    """
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= limit - 2


def _whole_answer(engine: Any, messages: list[dict[str, str]], generation: Any) -> str:
    text = ""
    for text in engine.stream(messages, generation):
        pass
    return text


# --- the edge: arguments ------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas; got {text!r}") from exc
    if len(values) < 2 or len(set(values)) != len(values) or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected at least two distinct slider values in [0, 1]; got {text!r}")
    return values


def _questions(text: str) -> tuple[str, ...]:
    """A count N (the first N built-in questions) or a file with one question per line."""
    if text.strip().isdigit():
        count = int(text)
        if not 1 <= count <= len(QUESTIONS):
            raise argparse.ArgumentTypeError(f"expected 1 to {len(QUESTIONS)} built-in questions; got {count}")
        return QUESTIONS[:count]
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"--questions takes a count or a file of questions; {text!r} is neither")
    questions = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not questions:
        raise argparse.ArgumentTypeError(f"{text} holds no questions")
    return questions


def _parser(attributes: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default=None, help="a LoRA folder applied on top of the model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--dimension", default=COMMUNICATION_STYLE, help="an index or a pole's label")
    parser.add_argument("--values", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    parser.add_argument("--questions", type=_questions, default=QUESTIONS,
                        help=f"a count of built-in questions (1-{len(QUESTIONS)}) or a file, one question a line")
    parser.add_argument("--samples", type=int, default=3, help="answers per value (seeds seed..seed+samples-1)")
    parser.add_argument("--attribute", choices=attributes, default="length")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--mode", choices=("pba", "none"), default="pba", help="none: the no-persona control")
    parser.add_argument("--expect", choices=("auto", "up", "down"), default="auto",
                        help="where the attribute should go as the slider rises (auto: known pairs only)")
    parser.add_argument("--show-answers", action="store_true", help="print every answer (first 300 characters)")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the sweeps, print the report with the command, model and wall time, and return it."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)

    import torch

    import storage
    from personalign.engine import Engine
    from personalign.generation import GenerationConfig
    from personalign.models import ModelConfig, load_model
    from personalign.services import build_services
    from personalign.studio import attribute_choices

    args = _parser([name for _, name in attribute_choices()]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    dimension = find_dimension(args.dimension)
    sign = expected_sign(dimension, args.attribute, args.expect)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize,
                                    adapter=Path(args.adapter) if args.adapter else None))
    engine = Engine(loaded)
    with tempfile.TemporaryDirectory() as folder:
        db = storage.Database.open(Path(folder) / "studio.db")
        try:
            services = build_services(db, engine)
            if args.mode == "pba":
                persona_id = services.personas.create(None, "Neutral", Persona()).id
                results = run_sweeps(services, persona_id, args.questions, dimension, args.values, args.attribute,
                                     generation, args.samples)
            else:
                results = run_control(engine, args.questions, args.values, _measurer(args.attribute, dimension),
                                      generation, args.samples)
        finally:
            db.close()

    info = engine.info()
    head = [
        f"command: {shlex.join(['benchmarks/studio_sweep.py', *argv])}",
        (f"model: {info['name']} ({info['dtype']}, quantization {info['quantization']}); "
         f"adapter: {loaded.adapter or 'none'}; device: {info['device']}"),
        (f"mode: {args.mode}; {len(args.questions)} question(s), {args.samples} answer(s) per value, "
         f"up to {args.max_new_tokens} new tokens, temperature {args.temperature:g}, "
         f"seeds {args.seed}..{args.seed + args.samples - 1}"),
    ]
    at_cap = _token_limit_check(loaded.tokenizer, args.max_new_tokens)
    text = "\n".join([*head, report(results, args.values, dimension, args.attribute, sign, mode=args.mode,
                                        show_answers=args.show_answers, at_cap=at_cap),
                      f"\nwall time: {time.perf_counter() - started:.1f} s (model load {loaded.load_seconds:.1f} s)"])
    print(text)
    return text


if __name__ == "__main__":
    main()
