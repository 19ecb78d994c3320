"""Ready-made personas that a user can start from, and that a demo can switch between.

Each preset sets a handful of dimensions by their published label, so a reader can see
what it means without counting indices. This module is data; it knows no storage or UI.
"""

from __future__ import annotations

from personalign.persona import Persona
from personalign.preference_space import DIMENSIONS

_BY_LABEL = {d.positive: (d.index, 1.0) for d in DIMENSIONS} | {d.negative: (d.index, 0.0) for d in DIMENSIONS}


def _preset(demographics: str, *labels: str) -> Persona:
    return Persona(demographics=demographics).with_values(dict(_BY_LABEL[label] for label in labels))


PRESETS: dict[str, Persona] = {
    "Neutral": Persona(),
    "Elementary-school student": _preset(
        "A curious 9-year-old in fourth grade who likes short, simple answers with examples.",
        "Young",
        "Concise communication style",
        "Prefers superficial interaction (casual, stress-free chat)",
        "Indifferent about complexity",
        "Strong need for Play (enjoying fun, relaxation, and laughter)",
        "Likes stories",
        "Likes humor",
    ),
    "PhD researcher": _preset(
        "A doctoral researcher in molecular biology who wants precise, technical, thorough answers.",
        "Older",
        "Detailed communication style",
        "Prefers deep interaction (discussing interests, emotional topics, etc.)",
        "Concerned about complexity",
        "Concerned about truthfulness",
        "Likes science",
        "Likes knowledge",
    ),
    "Busy executive": _preset(
        "A senior manager with little time who wants the bottom line first.",
        "Concise communication style",
        "Prefers direct communication to handle conflict",
        "Strong need for personal achievement",
        "Likes workplace",
        "Likes finance",
    ),
    "Warm companion": _preset(
        "Someone who enjoys friendly, caring, emotionally attentive conversation.",
        "High Agreeableness",
        "Detailed communication style",
        "Strong need for Affiliation (desiring close relationships)",
        "Strong need for Nurturance (caring for others, protecting them from danger)",
        "Likes emotions",
        "Likes psychology",
    ),
}
