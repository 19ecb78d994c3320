"""Pairwise preference accuracy on AlignX benchmark records (METHODS.md section 1).

A record holds a post, a ``chosen`` and a ``rejected`` reply and some description of the
person. Each reply is scored by a no-training scorer, and the record counts as correct
when chosen scores strictly higher (a tie counts as wrong):

- ``raw``: log p(y | plain prompt, the post alone, Mode.NONE);
- ``ica``: log p(y | ICA prompt from the record's UGC, pairwise feedback and demographics);
- ``pba``: log p(y | PBA prompt with the record's profile);
- ``contrast``: log p(y | PBA prompt) - log p(y | plain prompt), i.e. how much the PBA
  persona raises the reply's likelihood; PBA is the persona prompt used here.

Where the PBA profile comes from is the ``profile_source``:

- ``given``: the record's ``profile`` string (else one rendered from its Preference
  Direction, else none), i.e. the benchmark's own label of the person;
- ``embedding``: PBA's bridge, a profile inferred from what the person did. The record's
  UGC and pairwise items are labelled by the ``EmbeddingInferrer``, the item directions
  averaged and thresholded, and the result rendered with ``render_profile``; the record's
  ``profile`` and Preference Direction are not read. A record with no behaviour items gets
  the empty-profile rule's result for no evidence: every mean is then 0.5, and the rule
  leaves a direction with no signal empty rather than turning an arbitrary dimension into
  a pole, so the profile is "" (as ``given`` does for a record with no profile at all).

Accuracy comes with a 95% Wilson interval. This module knows records, prompts, scores and
the inferrers' public API; it knows nothing of files, the command line or how the model
was loaded.
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
from personalign.preference_space import NEUTRAL, neutral_direction
from personalign.profile import render_profile, threshold
from personalign.profile_inference import (
    EmbeddingInferrer,
    ProfileInferrer,
    items_from_persona,
)
from personalign.prompts import Mode, build_messages
from personalign.scoring import response_logprobs

logger = logging.getLogger(__name__)

MODES = ("raw", "ica", "pba", "contrast")
PROFILE_SOURCES = ("given", "embedding")
Z_95 = 1.959963984540054  # two-sided 95% normal quantile

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RecordResult:
    """Scores for one record; ``index`` is its position in the records given.

    ``profile`` is the inferred profile the PBA prompt used, for ``pba`` and ``contrast``
    under an inferred profile source; None otherwise (the given profile is in the data).
    """

    index: int
    score_chosen: float
    score_rejected: float
    correct: bool
    profile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; ``profile`` only when one was inferred."""
        row = asdict(self)
        if self.profile is None:
            # Keeps the per-record lines of a given-profile run exactly as they were.
            del row["profile"]
        return row


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one scorer over some records, with its 95% Wilson interval."""

    mode: str
    records: tuple[RecordResult, ...]
    accuracy: float
    ci_low: float
    ci_high: float
    seconds: float
    profile_source: str | None = None  # where the PBA profile came from; None for raw and ica

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


def paired_exact_p(won: int, lost: int) -> float:
    """Two-sided exact p-value of a paired comparison (exact McNemar, i.e. a sign test).

    ``won`` and ``lost`` are the discordant pairs: items only the first system got right, and
    items only the second did. Ties carry no information and are left out; 1.0 when none differ.
    """
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def parse_selection(spec: str, count: int) -> list[int]:
    """Record indices from a spec like ``"0:50,300:350,420"`` (Python slices and single indices).

    Sorted and without repeats; an index past ``count`` is an error, so a typo does not
    silently evaluate fewer records. ``"all"`` selects every record.
    """
    if spec.strip() == "all":
        return list(range(count))
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        try:
            if ":" in part:
                start, _, stop = part.partition(":")
                span = range(int(start) if start else 0, int(stop) if stop else count)
            else:
                span = range(int(part), int(part) + 1)
        except ValueError:
            raise ValueError(f"record selection {spec!r}: {part!r} is neither an index nor a start:stop range") from None
        if span.start < 0 or span.stop > count or not span:
            raise ValueError(f"record selection {spec!r}: {part!r} is empty or outside the {count} records (0:{count})")
        chosen.update(span)
    return sorted(chosen)


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


def _behaviour(record: Mapping[str, Any]) -> Persona:
    """The record's person without its direction: UGC, pairwise feedback and demographics.

    Absent keys read as empty. The direction keys are left out so that a profile string
    the parser cannot read fails neither ICA nor inference, which never use it.
    """
    return from_record({k: record[k] for k in (UGC_KEY, PAIRWISE_KEY, DEMOGRAPHICS_KEY) if k in record})


def inferred_direction(record: Mapping[str, Any], inferrer: ProfileInferrer) -> tuple[float, ...]:
    """The thresholded direction ``inferrer`` reads off the record's UGC and pairwise items.

    The record's own ``profile`` and Preference Direction are not read. With no items it is
    the empty-profile rule's result for no evidence, all neutral (see the module docstring);
    ``render_profile`` of either gives the PBA profile.
    """
    items = items_from_persona(_behaviour(record))
    if not items:
        return threshold(neutral_direction())
    return inferrer.infer(items).direction


def record_messages(kind: str, record: Mapping[str, Any], post: str,
                    profile: str | None = None) -> list[dict[str, str]]:
    """The prompt messages for ``post`` as ``kind`` (raw | ica | pba) frames it for ``record``'s person.

    PBA uses ``profile`` when one is given (an inferred one), else the record's own.
    """
    if kind == "raw":
        return build_messages(Mode.NONE, None, [], post)
    if kind == "ica":
        return build_messages(Mode.ICA, _behaviour(record), [], post)
    return build_messages(Mode.PBA, Persona(), [], post, profile=_profile(record) if profile is None else profile)


def _base_kinds(mode: str) -> tuple[str, ...]:
    """The prompt kinds whose log-probabilities a mode needs."""
    return ("pba", "raw") if mode == "contrast" else (mode,)


def _inferrer_for(profile_source: str, inferrer: ProfileInferrer | None) -> ProfileInferrer | None:
    """The inferrer a profile source needs (None for ``given``), checked against one passed in."""
    if profile_source not in PROFILE_SOURCES:
        raise ValueError(f"unknown profile source {profile_source!r}; choose from {', '.join(PROFILE_SOURCES)}")
    if profile_source == "given":
        if inferrer is not None:
            raise ValueError("an inferrer was given, but profile_source 'given' uses the records' own profiles")
        return None
    if inferrer is None:
        from personalign.embeddings import default_embedder

        return EmbeddingInferrer(default_embedder())
    if inferrer.method != profile_source:
        raise ValueError(f"profile_source {profile_source!r} needs an inferrer of that method; got {inferrer.method!r}")
    return inferrer


def evaluate_modes(
    records: Sequence[Mapping[str, Any]],
    engine: Engine,
    modes: Sequence[str],
    *,
    progress: Progress | None = None,
    profile_source: str = "given",
    inferrer: ProfileInferrer | None = None,
) -> dict[str, EvalResult]:
    """Evaluate several modes in one pass; each prompt kind is scored once per record, so
    ``contrast`` reuses the ``raw`` and ``pba`` scores when those modes are asked for too.

    ``profile_source`` (one of ``PROFILE_SOURCES``) picks the PBA profile; for ``embedding``
    the profile is inferred per record by ``inferrer`` (default: an ``EmbeddingInferrer`` on
    the packaged embedding model), and its time counts in the pba and contrast seconds.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if not records:
        raise ValueError("no records to evaluate")
    kinds = list(dict.fromkeys(k for m in modes for k in _base_kinds(m)))
    # Checked even when no mode needs a profile, so a bad source fails the same way for every mode.
    chosen_inferrer = _inferrer_for(profile_source, inferrer)
    inferred_labels: list[int] = []  # per record, the poles in its inferred profile
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
        profile: str | None = None
        for kind in kinds:
            start = time.perf_counter()
            if kind == "pba" and chosen_inferrer is not None:
                try:
                    direction = inferred_direction(record, chosen_inferrer)
                except ValueError as err:  # an unreadable behaviour item: say which record
                    raise ValueError(f"record {index}: {err}") from err
                profile = render_profile(direction)
                inferred_labels.append(sum(v != NEUTRAL for v in direction))
            c, r = response_logprobs(engine, record_messages(kind, record, post, profile), [chosen, rejected])
            scores[kind] = (c, r)
            kind_seconds[kind] = time.perf_counter() - start
        for mode in modes:
            if mode == "contrast":
                c = scores["pba"][0] - scores["raw"][0]
                r = scores["pba"][1] - scores["raw"][1]
            else:
                c, r = scores[mode]
            shown = profile if mode in ("pba", "contrast") else None
            per_mode[mode].append(
                RecordResult(index=index, score_chosen=c, score_rejected=r, correct=c > r, profile=shown)
            )
            seconds[mode] += sum(kind_seconds[k] for k in _base_kinds(mode))
        if progress is not None:
            progress(index + 1, total)
    if inferred_labels:
        logger.info(
            "profiles inferred by %s: %.1f labels on average, %d of %d empty",
            profile_source, sum(inferred_labels) / len(inferred_labels),
            inferred_labels.count(0), len(inferred_labels),
        )
    results = {}
    for mode, rows in per_mode.items():
        hits = sum(r.correct for r in rows)
        low, high = wilson_interval(hits, len(rows))
        results[mode] = EvalResult(
            mode=mode, records=tuple(rows), accuracy=hits / len(rows), ci_low=low, ci_high=high, seconds=seconds[mode],
            profile_source=profile_source if mode in ("pba", "contrast") else None,
        )
        logger.info("%s: accuracy %.3f [%.3f, %.3f] over %d records", mode, hits / len(rows), low, high, len(rows))
    return results


def accuracy_by_group(result: EvalResult, labels: Sequence[str]) -> dict[str, EvalResult]:
    """``result`` split by a label per record (``labels[i]`` for the record at index i), in first-seen order.

    Each group's accuracy and Wilson interval are its own; seconds are not split.
    """
    groups: dict[str, list[RecordResult]] = {}
    for row in result.records:
        groups.setdefault(labels[row.index], []).append(row)
    out = {}
    for label, rows in groups.items():
        hits = sum(r.correct for r in rows)
        low, high = wilson_interval(hits, len(rows))
        out[label] = EvalResult(mode=result.mode, records=tuple(rows), accuracy=hits / len(rows), ci_low=low,
                                ci_high=high, seconds=0.0, profile_source=result.profile_source)
    return out


def evaluate(
    records: Sequence[Mapping[str, Any]],
    engine: Engine,
    mode: str,
    *,
    progress: Progress | None = None,
    profile_source: str = "given",
    inferrer: ProfileInferrer | None = None,
) -> EvalResult:
    """Accuracy of one mode (raw|ica|pba|contrast) over ``records``; ``progress(done, total)`` after each.

    ``profile_source`` and ``inferrer`` are as in ``evaluate_modes``.
    """
    return evaluate_modes(
        records, engine, [mode], progress=progress, profile_source=profile_source, inferrer=inferrer
    )[mode]
