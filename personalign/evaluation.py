"""Pairwise preference accuracy on AlignX benchmark records (METHODS.md section 1).

A record holds a post, a ``chosen`` and a ``rejected`` reply and some description of the
person. Each reply is scored by a no-training scorer, and the record counts as correct
when chosen scores strictly higher (a tie counts as wrong):

- ``raw``: log p(y | plain prompt, the post alone, Mode.NONE);
- ``ica``: log p(y | ICA prompt from the record's UGC, pairwise feedback and demographics);
- ``pba``: log p(y | PBA prompt with the record's ``profile`` string);
- ``contrast``: log p(y | PBA prompt) - log p(y | plain prompt), i.e. how much the PBA
  persona raises the reply's likelihood; PBA is the persona prompt used here.

Accuracy comes with a 95% Wilson interval. This module knows records, prompts and
scores; it knows nothing of files, the command line or how the model was loaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from personalign.engine import Engine
from personalign.persona import (
    DEMOGRAPHICS_KEY,
    DIRECTION_KEY,
    PAIRWISE_KEY,
    PROFILE_KEY,
    UGC_KEY,
    Persona,
    from_record,
)
from personalign.prompts import Mode, build_messages
from personalign.scoring import response_logprobs

logger = logging.getLogger(__name__)

MODES = ("raw", "ica", "pba", "contrast")
Z_95 = 1.959963984540054  # two-sided 95% normal quantile

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RecordResult:
    """Scores for one record; ``index`` is its position in the records given."""

    index: int
    score_chosen: float
    score_rejected: float
    correct: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one scorer over some records, with its 95% Wilson interval."""

    mode: str
    records: tuple[RecordResult, ...]
    accuracy: float
    ci_low: float
    ci_high: float
    seconds: float

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.records)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0.

    Chosen over the normal approximation because it stays inside [0, 1] and behaves at
    small n and at accuracies near 0 or 1.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _text(record: Mapping[str, Any], key: str, index: int) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"record {index}: '{key}' must be non-empty text")
    return value


def _profile(record: Mapping[str, Any]) -> str:
    """The record's profile string; else one rendered from its direction; else '' (no preferences)."""
    if isinstance(record.get(PROFILE_KEY), str):
        return record[PROFILE_KEY]
    if DIRECTION_KEY in record:
        return from_record(record).profile
    # A neutral direction would render an arbitrary single pole; saying nothing is more honest.
    return ""


def _messages(kind: str, record: Mapping[str, Any], post: str) -> list[dict[str, str]]:
    if kind == "raw":
        return build_messages(Mode.NONE, None, [], post)
    if kind == "ica":
        # Absent UGC / pairwise / demographics read as empty; the ICA layout then simply holds less.
        # Only the behaviour keys: ICA does not use the direction, so a profile string the
        # parser cannot read must not fail an ICA evaluation.
        behaviour = {k: record[k] for k in (UGC_KEY, PAIRWISE_KEY, DEMOGRAPHICS_KEY) if k in record}
        return build_messages(Mode.ICA, from_record(behaviour), [], post)
    return build_messages(Mode.PBA, Persona(), [], post, profile=_profile(record))


def _base_kinds(mode: str) -> tuple[str, ...]:
    """The prompt kinds whose log-probabilities a mode needs."""
    return ("pba", "raw") if mode == "contrast" else (mode,)


def evaluate_modes(
    records: Sequence[Mapping[str, Any]],
    engine: Engine,
    modes: Sequence[str],
    *,
    progress: Progress | None = None,
) -> dict[str, EvalResult]:
    """Evaluate several modes in one pass; each prompt kind is scored once per record, so
    ``contrast`` reuses the ``raw`` and ``pba`` scores when those modes are asked for too."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if not records:
        raise ValueError("no records to evaluate")
    kinds = list(dict.fromkeys(k for m in modes for k in _base_kinds(m)))
    per_mode: dict[str, list[RecordResult]] = {m: [] for m in modes}
    seconds = dict.fromkeys(modes, 0.0)
    total = len(records)
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            # ValueError, not TypeError: a malformed data file is the user's to fix, and the CLI shows ValueErrors.
            raise ValueError(f"record {index}: not a JSON object")  # noqa: TRY004
        post, chosen, rejected = (_text(record, k, index) for k in ("prompt", "chosen", "rejected"))
        scores: dict[str, tuple[float, float]] = {}
        kind_seconds: dict[str, float] = {}
        for kind in kinds:
            start = time.perf_counter()
            c, r = response_logprobs(engine, _messages(kind, record, post), [chosen, rejected])
            scores[kind] = (c, r)
            kind_seconds[kind] = time.perf_counter() - start
        for mode in modes:
            if mode == "contrast":
                c = scores["pba"][0] - scores["raw"][0]
                r = scores["pba"][1] - scores["raw"][1]
            else:
                c, r = scores[mode]
            per_mode[mode].append(RecordResult(index=index, score_chosen=c, score_rejected=r, correct=c > r))
            seconds[mode] += sum(kind_seconds[k] for k in _base_kinds(mode))
        if progress is not None:
            progress(index + 1, total)
    results = {}
    for mode, rows in per_mode.items():
        hits = sum(r.correct for r in rows)
        low, high = wilson_interval(hits, len(rows))
        results[mode] = EvalResult(
            mode=mode, records=tuple(rows), accuracy=hits / len(rows), ci_low=low, ci_high=high, seconds=seconds[mode]
        )
        logger.info("%s: accuracy %.3f [%.3f, %.3f] over %d records", mode, hits / len(rows), low, high, len(rows))
    return results


def evaluate(
    records: Sequence[Mapping[str, Any]], engine: Engine, mode: str, *, progress: Progress | None = None
) -> EvalResult:
    """Accuracy of one mode (raw|ica|pba|contrast) over ``records``; ``progress(done, total)`` after each."""
    return evaluate_modes(records, engine, [mode], progress=progress)[mode]
