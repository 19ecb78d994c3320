"""The controllability studio: does moving a control actually move the answer?

Two experiments over one question, both with a shared seed so that the setting is the
only thing that changes between answers:

- a *comparison* answers the question under two to four settings (persona, mode,
  slider overrides, persona strength γ) and marks the words where each answer departs
  from the first;
- a *sweep* moves one control (a dimension's slider, or γ) through a list of values,
  measures one attribute of every answer, and reports the Spearman correlation between
  control and attribute.

Results are plain frozen dataclasses that serialise to JSON and back, can be drawn with
matplotlib (imported only when a figure is asked for) and saved per user. The service
knows no UI and no SQL: prompts come from the pure builders, answers from the shared
engine, storage from its typed functions.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import re
import secrets
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import storage
from personalign.accounts import AccountService
from personalign.attributes import ATTRIBUTES, embedding_projection, measure, spearman
from personalign.chat import check_message
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError, user_errors
from personalign.generation import MAX_PERSONA_STRENGTH, GenerationConfig
from personalign.persona import Persona
from personalign.persona_tuning import TuningService
from personalign.personas import PersonaService
from personalign.preference_space import DIMENSIONS, NEUTRAL, SIZE
from personalign.prompts import Message, Mode, build_messages
from personalign.stops import UserStops

log = logging.getLogger(__name__)

PERSONA_STRENGTH = "persona_strength"
"""The sweep variable that moves γ instead of a slider."""
PROJECTION = "projection"
"""The attribute name for the embedding projection on the swept dimension (see `Sweep`)."""
DEFAULT_SLIDER_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_STRENGTH_VALUES = (0.0, 1.0, 2.0, 3.0, 4.0)
MIN_SETTINGS, MAX_SETTINGS = 2, 4
MAX_VALUES = 11
MAX_SAMPLES = 10
COMPARISON, SWEEP = "comparison", "sweep"

# Word-level difference labels, as gr.HighlightedText shows them.
CHANGED, ADDED = "changed", "added"

Progress = Callable[[int, int, str], None]
"""Called as progress(done, total, note) before each answer and once at the end."""


class StudioError(UserError, ValueError):
    """A studio setting or request the user can fix; the message says what to change."""


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_strength(value: object) -> float:
    if not _finite(value) or not 0 <= value <= MAX_PERSONA_STRENGTH:
        raise StudioError(f"Persona strength must be a number in [0, {MAX_PERSONA_STRENGTH:g}]; got {value!r}.")
    return float(value)


def _check_slider(index: object, value: object) -> tuple[int, float]:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < SIZE:
        raise StudioError(f"A dimension index must be a whole number in [0, {SIZE - 1}]; got {index!r}.")
    if not _finite(value) or not 0 <= value <= 1:
        raise StudioError(f"A slider value must lie in [0, 1]; got {value!r} for dimension {index}.")
    return index, float(value)


@dataclass(frozen=True)
class Setting:
    """One way to answer: a persona (or none), a mode, slider overrides and persona strength γ.

    `overrides` sets some dimensions of the persona's direction for this answer only
    (index -> value in [0, 1]); a mapping is accepted and kept as sorted pairs. γ > 0
    applies classifier-free guidance with the persona as the condition, so it needs a
    persona mode (ICA or PBA). `tuned` answers with the persona's tuned adapter when it has
    one (``persona_tuning``); False asks the shared model, to show what tuning changed.
    """

    label: str
    persona_id: int | None = None
    mode: Mode = Mode.NONE
    overrides: tuple[tuple[int, float], ...] = ()
    persona_strength: float = 0.0
    tuned: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise StudioError(f"Unknown mode {self.mode!r}; choose one of {', '.join(m.value for m in Mode)}.") from None
        pairs = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        overrides = dict(_check_slider(i, v) for i, v in pairs)
        object.__setattr__(self, "overrides", tuple(sorted(overrides.items())))
        object.__setattr__(self, "persona_strength", _check_strength(self.persona_strength))
        object.__setattr__(self, "label", (self.label or "").strip())
        object.__setattr__(self, "tuned", bool(self.tuned))
        if self.persona_id is None and self.mode is not Mode.NONE:
            raise StudioError(f"{self.mode.label} needs a persona: pick one, or choose mode 'none'.")
        if self.persona_strength > 0 and self.mode is Mode.NONE:
            raise StudioError("Persona strength needs the persona in the prompt: choose ICA or PBA mode.")
        if self.overrides and self.mode is not Mode.PBA:
            raise StudioError("Slider overrides only change PBA answers (ICA reads behaviour, not sliders).")

    def describe(self) -> str:
        """A one-line summary, e.g. "PBA · persona 3 · γ=2 · dim 55=1"."""
        parts = [self.mode.value.upper() if self.mode is not Mode.NONE else "no persona"]
        if self.persona_id is not None and self.mode is not Mode.NONE:
            parts.append(f"persona {self.persona_id}")
        if self.persona_strength:
            parts.append(f"γ={self.persona_strength:g}")
        if not self.tuned and self.mode is not Mode.NONE:
            parts.append("untuned")
        parts.extend(f"dim {i}={v:g}" for i, v in self.overrides)
        return " · ".join(parts)


@dataclass(frozen=True)
class Answer:
    """One generated answer with the prompt it came from and its measured text attributes."""

    label: str
    text: str
    prompt: str
    attributes: dict[str, float] = field(default_factory=dict)
    tuned: bool = False  # the persona's tuned adapter answered


@dataclass(frozen=True)
class Comparison:
    """One question answered under several settings with the same seed."""

    question: str
    generation: GenerationConfig
    settings: tuple[Setting, ...]
    answers: tuple[Answer, ...]
    cancelled: bool = False

    @property
    def diffs(self) -> list[list[tuple[str, str | None]]]:
        """Per answer, its text as (segment, label) pairs against the first answer (see `word_diff`)."""
        if not self.answers:
            return []
        base = self.answers[0].text
        return [word_diff(base, a.text) if n else [(a.text, None)] if a.text else []
                for n, a in enumerate(self.answers)]

    @property
    def similarities(self) -> list[float]:
        """Per answer, the word-sequence similarity ratio to the first answer (1 = same words)."""
        if not self.answers:
            return []
        base = _words(self.answers[0].text)
        return [difflib.SequenceMatcher(None, base, _words(a.text), autojunk=False).ratio() for a in self.answers]


@dataclass(frozen=True)
class SweepPoint:
    """One answer of a sweep: the control's value, the seed, the answer and its measured attribute."""

    value: float
    seed: int
    text: str
    score: float


@dataclass(frozen=True)
class Sweep:
    """One control moved through values, one attribute measured on every answer.

    `variable` is a dimension index (that slider set to each value) or
    `PERSONA_STRENGTH` (γ set to each value). With attribute `PROJECTION`, the projection
    is on `projection_dimension`: the swept dimension, or for a γ sweep the persona's
    dimension furthest from neutral.
    """

    question: str
    persona_id: int
    persona_name: str
    mode: Mode
    variable: int | str
    values: tuple[float, ...]
    attribute: str
    samples: int
    generation: GenerationConfig
    points: tuple[SweepPoint, ...]
    persona_strength: float = 0.0
    projection_dimension: int | None = None
    cancelled: bool = False
    tuned: bool = False  # the persona's tuned adapter answered

    @property
    def variable_label(self) -> str:
        if self.variable == PERSONA_STRENGTH:
            return "Persona strength γ"
        return DIMENSIONS[int(self.variable)].title

    @property
    def attribute_label(self) -> str:
        return attribute_label(self.attribute, self.projection_dimension)

    @property
    def means(self) -> list[float | None]:
        """Mean attribute per value, in the order of `values`; None for a value with no answer yet."""
        out = []
        for value in self.values:
            scores = [p.score for p in self.points if p.value == value]
            out.append(sum(scores) / len(scores) if scores else None)
        return out

    @property
    def rho(self) -> float | None:
        """Spearman correlation of value vs attribute over all answers; None when undefined."""
        return spearman([p.value for p in self.points], [p.score for p in self.points])


Result = Comparison | Sweep


@dataclass(frozen=True)
class RunSummary:
    """A saved studio result as a list shows it."""

    id: int
    kind: str
    title: str
    created_at: datetime


def attribute_label(attribute: str, projection_dimension: int | None = None) -> str:
    """The display label of an attribute name."""
    if attribute == PROJECTION:
        where = f" on '{DIMENSIONS[projection_dimension].positive}'" if projection_dimension is not None else ""
        return f"Embedding projection{where} (+ = positive pole)"
    return ATTRIBUTES[attribute][0]


def attribute_choices() -> list[tuple[str, str]]:
    """(label, name) of every attribute a sweep can measure."""
    return [(label, name) for name, (label, _) in ATTRIBUTES.items()] + [
        ("Embedding projection on the swept dimension", PROJECTION)
    ]


# Word-level differences -----------------------------------------------------------------

_TOKENS = re.compile(r"\S+|\s+")


def _words(text: str) -> list[str]:
    return text.split()


def word_diff(base: str, text: str) -> list[tuple[str, str | None]]:
    """`text` cut into segments labelled by how its words differ from `base`'s.

    Words are compared as whitespace-separated tokens (difflib); a word in `text` that
    replaces words of `base` is labelled CHANGED, one with no counterpart ADDED, the
    rest None. Whitespace joins the label of its neighbours when both sides share it.
    Joining the segments gives back `text` exactly.
    """
    tokens = _TOKENS.findall(text)
    word_positions = [i for i, t in enumerate(tokens) if not t.isspace()]
    labels: list[str | None] = [None] * len(tokens)
    matcher = difflib.SequenceMatcher(None, _words(base), [tokens[i] for i in word_positions], autojunk=False)
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "insert"):
            for j in range(j1, j2):
                labels[word_positions[j]] = CHANGED if tag == "replace" else ADDED
    for i, t in enumerate(tokens):
        if t.isspace() and 0 < i < len(tokens) - 1 and labels[i - 1] == labels[i + 1]:
            labels[i] = labels[i - 1]
    segments: list[tuple[str, str | None]] = []
    for t, label in zip(tokens, labels):
        if segments and segments[-1][1] == label:
            segments[-1] = (segments[-1][0] + t, label)
        else:
            segments.append((t, label))
    return segments


# JSON ----------------------------------------------------------------------------------


def _generation_data(config: GenerationConfig) -> dict[str, Any]:
    return asdict(config)


def _generation_from(data: Mapping[str, Any]) -> GenerationConfig:
    known = {f.name for f in fields(GenerationConfig)}
    return GenerationConfig(**{k: v for k, v in data.items() if k in known})


def _setting_data(s: Setting) -> dict[str, Any]:
    return {"label": s.label, "persona_id": s.persona_id, "mode": s.mode.value,
            "overrides": [[i, v] for i, v in s.overrides], "persona_strength": s.persona_strength, "tuned": s.tuned}


def to_data(result: Result) -> dict[str, Any]:
    """A result as plain JSON data; derived figures (diffs, means, ρ) are included for readers."""
    if isinstance(result, Comparison):
        return {
            "kind": COMPARISON,
            "question": result.question,
            "generation": _generation_data(result.generation),
            "settings": [_setting_data(s) for s in result.settings],
            "answers": [{"label": a.label, "text": a.text, "prompt": a.prompt, "attributes": dict(a.attributes),
                         "tuned": a.tuned} for a in result.answers],
            "cancelled": result.cancelled,
            "similarities": result.similarities,
        }
    if isinstance(result, Sweep):
        return {
            "kind": SWEEP,
            "question": result.question,
            "persona_id": result.persona_id,
            "persona_name": result.persona_name,
            "mode": result.mode.value,
            "variable": result.variable,
            "variable_label": result.variable_label,
            "values": list(result.values),
            "attribute": result.attribute,
            "attribute_label": result.attribute_label,
            "samples": result.samples,
            "persona_strength": result.persona_strength,
            "projection_dimension": result.projection_dimension,
            "generation": _generation_data(result.generation),
            "points": [asdict(p) for p in result.points],
            "cancelled": result.cancelled,
            "tuned": result.tuned,
            "means": result.means,
            "rho": result.rho,
        }
    raise TypeError(f"not a studio result: {type(result).__name__}")


def from_data(data: Any) -> Result:
    """The result that `to_data` wrote; raise StudioError if the data is not one."""
    try:
        kind = data["kind"]
        if kind == COMPARISON:
            return Comparison(
                question=data["question"],
                generation=_generation_from(data["generation"]),
                settings=tuple(Setting(s["label"], s["persona_id"], s["mode"],
                                       tuple((int(i), float(v)) for i, v in s["overrides"]),
                                       s["persona_strength"], s.get("tuned", True)) for s in data["settings"]),
                answers=tuple(Answer(a["label"], a["text"], a["prompt"], dict(a["attributes"]), bool(a.get("tuned")))
                              for a in data["answers"]),
                cancelled=bool(data["cancelled"]),
            )
        if kind == SWEEP:
            variable = data["variable"]
            return Sweep(
                question=data["question"],
                persona_id=int(data["persona_id"]),
                persona_name=data["persona_name"],
                mode=Mode(data["mode"]),
                variable=variable if variable == PERSONA_STRENGTH else int(variable),
                values=tuple(float(v) for v in data["values"]),
                attribute=data["attribute"],
                samples=int(data["samples"]),
                generation=_generation_from(data["generation"]),
                points=tuple(SweepPoint(float(p["value"]), int(p["seed"]), p["text"], float(p["score"]))
                             for p in data["points"]),
                persona_strength=float(data["persona_strength"]),
                projection_dimension=data["projection_dimension"],
                cancelled=bool(data["cancelled"]),
                tuned=bool(data.get("tuned")),  # absent from results saved before tuning existed
            )
    except (KeyError, TypeError, ValueError) as err:
        raise StudioError(f"This is not a readable studio result: {err}") from err
    raise StudioError(f"This is not a studio result (kind {kind!r}).")


def dumps(result: Result) -> str:
    """A result as JSON text, readable by `loads`."""
    return json.dumps(to_data(result), indent=2, ensure_ascii=False)


def loads(text: str | bytes) -> Result:
    """Read a result from JSON text."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudioError(f"Not valid JSON: {err}") from err
    return from_data(data)


# Figures -------------------------------------------------------------------------------


def figure(result: Result) -> Any:
    """A matplotlib Figure of a result (Agg canvas, no pyplot state): a plot for a sweep,
    the answers side by side for a comparison."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(result, Sweep):
        fig = Figure(figsize=(7.5, 4.8), layout="constrained")
        FigureCanvasAgg(fig)
        _draw_sweep(fig, result)
    else:
        fig = Figure(figsize=(4.6 * max(1, len(result.answers)), 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        _draw_comparison(fig, result)
    return fig


def _draw_sweep(fig: Any, sweep: Sweep) -> None:
    ax = fig.add_subplot()
    ax.scatter([p.value for p in sweep.points], [p.score for p in sweep.points], alpha=0.45, s=28,
               label="answers", color="tab:blue")
    means = [(v, m) for v, m in zip(sweep.values, sweep.means) if m is not None]
    if means:
        xs, ys = zip(*sorted(means))
        ax.plot(xs, ys, marker="o", color="tab:orange", linewidth=2, label="mean")
    rho = sweep.rho
    rho_text = "ρ undefined" if rho is None else f"ρ = {rho:+.2f}"
    title = textwrap.wrap(f"{sweep.attribute_label} vs {sweep.variable_label}", 80)
    title.append(f"{rho_text}, n = {len(sweep.points)} · persona {_printable(sweep.persona_name)}, "
                 f"{sweep.mode.value.upper()}" + (" · stopped early" if sweep.cancelled else ""))
    ax.set_title("\n".join(title), fontsize=10, parse_math=False)
    if sweep.variable == PERSONA_STRENGTH:
        ax.set_xlabel("Persona strength γ (0 = plain)")
    else:
        dim = DIMENSIONS[int(sweep.variable)]
        ax.set_xlabel("\n".join(textwrap.wrap(f"slider: 0 = {dim.negative}   1 = {dim.positive}", 90)), fontsize=9)
    ax.set_ylabel(sweep.attribute_label, fontsize=9)
    ax.set_xticks(sorted(set(sweep.values)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


_FIGURE_TEXT_CHARS = 1_400
_FIGURE_WRAP = 46


def _printable(text: str) -> str:
    """Text safe to draw: control characters (which fonts lack) shown as "·"."""
    return "".join(c if c.isprintable() or c == "\n" else "·" for c in text)


def _draw_comparison(fig: Any, comparison: Comparison) -> None:
    # parse_math=False everywhere: answers are free text, and "$...$" must not turn into mathtext.
    question = _printable(comparison.question)
    fig.suptitle("\n".join(textwrap.wrap(f"Q: {question}", 140)[:3]), fontsize=10, parse_math=False)
    answers = comparison.answers or (Answer("(no answers)", "", ""),)
    similarities = comparison.similarities or [1.0]
    for n, (answer, setting) in enumerate(zip(answers, (*comparison.settings, None))):
        ax = fig.add_subplot(1, len(answers), n + 1)
        ax.set_axis_off()
        head = answer.label + (f"\n{setting.describe()}" if setting is not None else "")
        ax.set_title(_printable(head), fontsize=9, loc="left", parse_math=False)
        text = answer.text if len(answer.text) <= _FIGURE_TEXT_CHARS else answer.text[:_FIGURE_TEXT_CHARS] + " …"
        body = "\n".join(textwrap.fill(line, _FIGURE_WRAP) for line in _printable(text).split("\n"))
        ax.text(0, 1, body, va="top", ha="left", fontsize=7.5, family="monospace", transform=ax.transAxes,
                parse_math=False)
        figures = "  ".join(f"{k}={v:.2f}" for k, v in answer.attributes.items())
        ax.text(0, 0, f"{figures}\nsimilarity to first = {similarities[n]:.2f}", va="bottom", ha="left",
                fontsize=7, color="dimgray", transform=ax.transAxes)


def png_bytes(result: Result) -> bytes:
    """The result's figure as PNG bytes."""
    fig = figure(result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# The service ---------------------------------------------------------------------------


def _run_config(generation: GenerationConfig) -> GenerationConfig:
    """The run's shared config: a concrete seed, so every answer shares it and it is on record,
    and no persona strength of its own (each setting or sweep value brings its γ)."""
    seed = generation.seed if generation.seed is not None else secrets.randbelow(2**31)
    return replace(generation, seed=seed, persona_strength=0.0)


class StudioService:
    """Comparisons, sweeps and saved runs for one signed-in user at a time, over the shared engine.

    The embedder for the projection attribute is loaded on first use (it is a second
    model); pass `embedder` to supply one.
    """

    def __init__(self, db: storage.Database, accounts: AccountService, personas: PersonaService, engine: Engine,
                 tuning: TuningService | None = None, *, embedder: Any = None) -> None:
        self._db = db
        self._accounts = accounts
        self._personas = personas
        self._engine = engine
        self._tuning = tuning
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._stops = UserStops()

    # Experiments ---------------------------------------------------------------------------

    def compare(self, user: str | None, question: str, settings: Sequence[Setting], generation: GenerationConfig,
                *, progress: Progress | None = None, stop_event: threading.Event | None = None) -> Comparison:
        """Answer `question` once under each setting with one shared seed.

        A stop (`stop_event` or `stop(user)`) ends the run before the next answer; the
        answer in progress is dropped and the comparison holds the answers done so far.
        """
        question = check_message(question, "question")
        if not MIN_SETTINGS <= len(settings) <= MAX_SETTINGS:
            raise StudioError(f"Compare {MIN_SETTINGS} to {MAX_SETTINGS} settings; got {len(settings)}.")
        settings = tuple(replace(s, label=s.label or f"Setting {n}") for n, s in enumerate(settings, 1))
        generation = _run_config(generation)
        personas: dict[int, Persona] = {}
        for s in settings:  # check every persona before spending time on answers
            if s.persona_id is not None and s.persona_id not in personas:
                personas[s.persona_id] = self._personas.load(user, s.persona_id).persona
        answers: list[Answer] = []
        stop = self._stops.register(user, stop_event)
        try:
            for n, s in enumerate(settings):
                _report(progress, n, len(settings), f"Answering as {s.label}")
                persona = personas.get(s.persona_id) if s.persona_id is not None else None
                if persona is not None and s.overrides:
                    persona = persona.with_values(dict(s.overrides))
                messages = build_messages(s.mode, persona, [], question)
                adapter = self._adapter(user, s.persona_id, s.mode) if s.tuned else None
                text = self._answer(messages, question, generation, s.persona_strength, stop, adapter)
                if text is None:
                    break
                answers.append(Answer(s.label, text, self._engine.render(messages), measure(text), adapter is not None))
        finally:
            self._stops.release(user, stop)
        _report(progress, len(answers), len(settings), "Done")
        return Comparison(question, generation, settings, tuple(answers), cancelled=len(answers) < len(settings))

    def sweep(self, user: str | None, question: str, persona_id: int, variable: int | str,
              values: Sequence[float] | None, attribute: str, mode: Mode | str, generation: GenerationConfig,
              samples: int = 1, *, persona_strength: float = 0.0, progress: Progress | None = None,
              stop_event: threading.Event | None = None) -> Sweep:
        """Move one control through `values` and measure `attribute` on `samples` answers per value.

        `variable` is a dimension index (its slider takes each value; needs PBA mode, the
        mode that reads sliders) or `PERSONA_STRENGTH` (γ takes each value; ICA or PBA).
        `values` None takes the defaults (0, .25, .5, .75, 1 for a slider; 0..4 for γ).
        Answer k of every value uses seed `generation.seed + k`, so values are compared on
        the same random draws. A stop ends the run between answers and keeps what is done.
        """
        question = check_message(question, "question")
        mode = Mode(mode)
        variable, values = _check_variable(variable, values, mode)
        if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= MAX_SAMPLES:
            raise StudioError(f"Samples must be a whole number in [1, {MAX_SAMPLES}]; got {samples!r}.")
        persona_strength = _check_strength(persona_strength)
        state = self._personas.load(user, persona_id)
        projection_dimension = self._projection_dimension(attribute, variable, state.persona)
        measure_one = self._measurer(attribute, projection_dimension)
        generation = _run_config(generation)
        total = len(values) * samples
        points: list[SweepPoint] = []
        # PBA renders a slider in three states (pole, other pole, left out), so several values
        # often give the same prompt; with the same seed that is the same answer, so it is reused.
        answered: dict[tuple, str] = {}
        adapter = self._adapter(user, persona_id, mode)
        stop = self._stops.register(user, stop_event)
        try:
            for value in values:
                if variable == PERSONA_STRENGTH:
                    persona, strength = state.persona, value
                else:
                    persona, strength = state.persona.with_values({variable: value}), persona_strength
                messages = build_messages(mode, persona, [], question)
                for k in range(samples):
                    seed = generation.seed + k
                    _report(progress, len(points), total, f"Value {value:g}, answer {k + 1} of {samples}")
                    key = (tuple((m["role"], m["content"]) for m in messages), seed, strength)
                    text = None if stop.is_set() else answered.get(key)
                    if text is None:
                        text = self._answer(messages, question, replace(generation, seed=seed), strength, stop,
                                            adapter)
                    if text is None:
                        break
                    answered[key] = text
                    points.append(SweepPoint(value, seed, text, measure_one(text)))
                if stop.is_set():
                    break
        finally:
            self._stops.release(user, stop)
        _report(progress, len(points), total, "Done")
        return Sweep(question, state.id, state.name, mode, variable, values, attribute, samples, generation,
                     tuple(points), persona_strength if variable != PERSONA_STRENGTH else 0.0, projection_dimension,
                     cancelled=len(points) < total, tuned=adapter is not None)

    def stop(self, user: str | None) -> None:
        """Stop the user's comparison or sweep in progress, if any, before its next answer."""
        self._stops.stop(user)

    # Export --------------------------------------------------------------------------------

    def export_json(self, result: Result) -> str:
        """The result as JSON text (readable back with `loads`)."""
        return dumps(result)

    def figure(self, result: Result) -> Any:
        """The result as a matplotlib Figure, for display."""
        return figure(result)

    def export_png(self, result: Result) -> bytes:
        """The result's figure as PNG bytes."""
        return png_bytes(result)

    # Saved runs ----------------------------------------------------------------------------

    def save(self, user: str | None, result: Result, title: str = "") -> RunSummary:
        """Keep a result under a title (the question when blank)."""
        kind = COMPARISON if isinstance(result, Comparison) else SWEEP
        title = (title or "").strip() or f"{kind.capitalize()}: {result.question}"
        if len(title) > 200:
            title = title[:199] + "…"
        with self._db.session() as s, user_errors():
            row = storage.save_studio_run(session=s, user_id=self._accounts.user_id(user), kind=kind, title=title,
                                          data=to_data(result))
        return RunSummary(row.id, row.kind, row.title, row.created_at)

    def runs(self, user: str | None) -> list[RunSummary]:
        """The user's saved results, newest first."""
        with self._db.session() as s:
            rows = storage.list_studio_runs(session=s, user_id=self._accounts.user_id(user))
        return [RunSummary(r.id, r.kind, r.title, r.created_at) for r in rows]

    def load(self, user: str | None, run_id: int) -> Result:
        """One saved result."""
        with self._db.session() as s:
            row = storage.get_studio_run(session=s, user_id=self._accounts.user_id(user), run_id=run_id)
        if row is None:
            raise NotFoundError(f"Studio run {run_id} was not found.")
        return from_data(row.data)

    def delete(self, user: str | None, run_id: int) -> None:
        with self._db.session() as s:
            if not storage.delete_studio_run(session=s, user_id=self._accounts.user_id(user), run_id=run_id):
                raise NotFoundError(f"Studio run {run_id} was not found.")

    # Internals -----------------------------------------------------------------------------

    def _adapter(self, user: str | None, persona_id: int | None, mode: Mode) -> Path | None:
        return None if self._tuning is None else self._tuning.adapter_for(user, persona_id, mode)

    def _answer(self, messages: list[Message], question: str, generation: GenerationConfig, strength: float,
                stop: threading.Event, adapter: Path | None = None) -> str | None:
        """The whole answer to `messages`, or None if stopped before it was complete."""
        if stop.is_set():
            return None
        # Guidance contrasts the persona prompt with the same question asked plainly.
        plain = build_messages(Mode.NONE, None, [], question) if strength > 0 else None
        with user_errors():  # a prompt too long for the model's context is the user's to fix
            tokens = self._engine.stream(messages, replace(generation, persona_strength=strength), stop_event=stop,
                                         unconditioned=plain, adapter=adapter)
        text = ""
        try:
            for text in tokens:  # cumulative text: the last one is the whole answer
                pass
        finally:
            tokens.close()
        if tokens.stats is None or tokens.stats.finish_reason == "cancelled":
            return None
        return text

    def _projection_dimension(self, attribute: str, variable: int | str, persona: Persona) -> int | None:
        if attribute != PROJECTION:
            if attribute not in ATTRIBUTES:
                raise StudioError(f"Unknown attribute {attribute!r}; choose one of "
                                  f"{', '.join([*ATTRIBUTES, PROJECTION])}.")
            return None
        if variable != PERSONA_STRENGTH:
            return int(variable)
        # A γ sweep has no swept slider: project on the dimension the persona leans on most.
        lean = [abs(v - NEUTRAL) for v in persona.direction]
        if max(lean) == 0:
            raise StudioError("This persona is neutral on every dimension, so there is no dimension to project on; "
                              "pick another attribute or move a slider.")
        return lean.index(max(lean))

    def _measurer(self, attribute: str, projection_dimension: int | None) -> Callable[[str], float]:
        if attribute != PROJECTION:
            return ATTRIBUTES[attribute][1]
        embedder = self._get_embedder()
        return lambda text: embedding_projection(text, projection_dimension, embedder)

    def _get_embedder(self) -> Any:
        with self._embedder_lock:
            if self._embedder is None:
                from personalign.embeddings import default_embedder

                log.info("loading the sentence embedder for the projection attribute")
                self._embedder = default_embedder()
            return self._embedder


def _check_variable(variable: int | str, values: Sequence[float] | None, mode: Mode) -> tuple[int | str, tuple]:
    if variable == PERSONA_STRENGTH:
        if mode is Mode.NONE:
            raise StudioError("A persona-strength sweep needs the persona in the prompt: choose ICA or PBA mode.")
        values = DEFAULT_STRENGTH_VALUES if values is None else tuple(_check_strength(v) for v in values)
    else:
        try:
            variable = int(variable)
        except (TypeError, ValueError):
            raise StudioError(f"Sweep a dimension index or {PERSONA_STRENGTH!r}; got {variable!r}.") from None
        _check_slider(variable, NEUTRAL)
        if mode is not Mode.PBA:
            raise StudioError("A slider sweep needs PBA mode: only PBA puts the sliders (the profile) in the prompt.")
        values = DEFAULT_SLIDER_VALUES if values is None else tuple(_check_slider(variable, v)[1] for v in values)
    if not 2 <= len(values) <= MAX_VALUES:
        raise StudioError(f"A sweep needs 2 to {MAX_VALUES} values; got {len(values)}.")
    if len(set(values)) != len(values):
        raise StudioError("Each sweep value should appear once.")
    return variable, tuple(values)


def _report(progress: Progress | None, done: int, total: int, note: str) -> None:
    if progress is not None:
        progress(done, total, note)
