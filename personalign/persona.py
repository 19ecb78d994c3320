"""A persona: a direction over the preference space plus the behaviour that describes a person.

The persona travels as JSON in the AlignX record shape, so a benchmark record can be
imported as a persona and an exported persona reads like a record:

    {"Preference Direction": [90 floats], "profile": "...",
     "Demographic Information": "...",
     "User-Generated Content": [{"prompt": post, "comment": ...}],
     "Pair-wise Comparative Feedback": [{"prompt": post, "chosen": ..., "rejected": ...}]}

This module validates and converts; it knows nothing of storage, prompts or models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from personalign.errors import UserError
from personalign.preference_space import SIZE, neutral_direction
from personalign.profile import check_direction, parse_profile, render_profile

DIRECTION_KEY = "Preference Direction"
PROFILE_KEY = "profile"
DEMOGRAPHICS_KEY = "Demographic Information"
UGC_KEY = "User-Generated Content"
PAIRWISE_KEY = "Pair-wise Comparative Feedback"

# Generous bounds: they exist to turn a pasted novel or a wrong file into a clear error.
MAX_TEXT = 20_000
MAX_ITEMS = 500


class PersonaFormatError(UserError, ValueError):
    """Persona JSON that cannot be read; the message lists what is wrong."""


@dataclass(frozen=True)
class UGCItem:
    """A post the person commented on, with their comment."""

    post: str
    comment: str


@dataclass(frozen=True)
class PairwiseItem:
    """A post with the reply the person chose and the one they rejected."""

    post: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Persona:
    """Everything the app knows about whom it is talking to."""

    direction: tuple[float, ...] = field(default_factory=neutral_direction)
    demographics: str = ""
    ugc: tuple[UGCItem, ...] = ()
    pairwise: tuple[PairwiseItem, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", check_direction(self.direction))
        problems = _text_problems(self)
        if problems:
            raise PersonaFormatError("; ".join(problems))

    @property
    def profile(self) -> str:
        """The rendered AlignX profile of this persona's direction."""
        return render_profile(self.direction)

    def with_values(self, values: Mapping[int, float]) -> Persona:
        """A copy with some dimensions set, by index."""
        direction = list(self.direction)
        for index, value in values.items():
            direction[index] = value
        return replace(self, direction=tuple(direction))


def _text_problems(persona: Persona) -> list[str]:
    problems = []
    if len(persona.demographics) > MAX_TEXT:
        problems.append(f"demographic text is longer than {MAX_TEXT} characters")
    for name, items in (("UGC", persona.ugc), ("pairwise", persona.pairwise)):
        if len(items) > MAX_ITEMS:
            problems.append(f"more than {MAX_ITEMS} {name} items")
        for n, item in enumerate(items, 1):
            for key, text in vars(item).items():
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{name} item {n}: '{key}' is empty")
                elif len(text) > MAX_TEXT:
                    problems.append(f"{name} item {n}: '{key}' is longer than {MAX_TEXT} characters")
    return problems


def to_record(persona: Persona) -> dict[str, Any]:
    """The persona as an AlignX-shaped record (JSON-ready)."""
    return {
        DIRECTION_KEY: list(persona.direction),
        PROFILE_KEY: persona.profile,
        DEMOGRAPHICS_KEY: persona.demographics,
        UGC_KEY: [{"prompt": i.post, "comment": i.comment} for i in persona.ugc],
        PAIRWISE_KEY: [{"prompt": i.post, "chosen": i.chosen, "rejected": i.rejected} for i in persona.pairwise],
    }


def from_record(record: Any) -> Persona:
    """Read a persona from an AlignX-shaped record; raise PersonaFormatError listing every problem.

    The direction comes from "Preference Direction" if present, else from parsing the
    "profile" string (as in benchmark records), else it is neutral.
    """
    if not isinstance(record, Mapping):
        raise PersonaFormatError("a persona must be a JSON object")
    problems: list[str] = []
    direction = _read_direction(record, problems)
    demographics = record.get(DEMOGRAPHICS_KEY, "")
    if not isinstance(demographics, str):
        problems.append(f"'{DEMOGRAPHICS_KEY}' must be text")
        demographics = ""
    ugc = _read_items(record, UGC_KEY, ("prompt", "comment"), UGCItem, problems)
    pairwise = _read_items(record, PAIRWISE_KEY, ("prompt", "chosen", "rejected"), PairwiseItem, problems)
    if problems:
        raise PersonaFormatError("; ".join(problems))
    return Persona(direction=direction, demographics=demographics, ugc=ugc, pairwise=pairwise)


def _read_direction(record: Mapping, problems: list[str]) -> tuple[float, ...]:
    if DIRECTION_KEY in record:
        raw = record[DIRECTION_KEY]
        try:
            if not isinstance(raw, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
                raise ValueError(f"'{DIRECTION_KEY}' must be a list of {SIZE} numbers")
            return check_direction(raw)
        except ValueError as err:
            problems.append(str(err))
    elif isinstance(record.get(PROFILE_KEY), str):
        try:
            return parse_profile(record[PROFILE_KEY])
        except ValueError as err:
            problems.append(f"'{PROFILE_KEY}': {err}")
    return neutral_direction()


def _read_items(record: Mapping, key: str, fields: tuple[str, ...], cls: type, problems: list[str]) -> tuple:
    raw = record.get(key, [])
    if not isinstance(raw, list):
        problems.append(f"'{key}' must be a list")
        return ()
    items = []
    for n, item in enumerate(raw, 1):
        if not isinstance(item, Mapping) or not all(isinstance(item.get(f), str) for f in fields):
            problems.append(f"'{key}' item {n} needs text fields {', '.join(fields)}")
            continue
        items.append(cls(*(item[f] for f in fields)))
    return tuple(items)


def loads(text: str | bytes) -> Persona:
    """Parse persona JSON text."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PersonaFormatError(f"not valid JSON: {err}") from err
    return from_record(record)


def dumps(persona: Persona) -> str:
    """Persona JSON text, readable by `loads`."""
    return json.dumps(to_record(persona), indent=2, ensure_ascii=False)
