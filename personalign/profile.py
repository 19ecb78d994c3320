"""Rendering a direction over the preference space as an AlignX profile string, and back.

Follows the published AlignX recipe: average item directions, threshold at 0.6 / 0.4,
render the positive label of each 1 and the negative label of each 0, leave neutral
dimensions out, and if nothing is left, push the most extreme dimension to its pole.
This module knows labels and numbers only; it knows nothing of personas or prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from personalign.preference_space import DIMENSIONS, NEUTRAL, SIZE

POSITIVE_AT = 0.6
NEGATIVE_AT = 0.4
SEPARATOR = ", "


def check_direction(direction: Sequence[float]) -> tuple[float, ...]:
    """Return the direction as a tuple, or raise ValueError if it is not 90 values in [0, 1]."""
    values = tuple(float(v) for v in direction)
    if len(values) != SIZE:
        raise ValueError(f"a direction has {SIZE} values, got {len(values)}")
    bad = [i for i, v in enumerate(values) if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"direction values must lie in [0, 1]; dimension {bad[0]} is {values[bad[0]]}")
    return values


def mean_direction(directions: Iterable[Sequence[float]]) -> tuple[float, ...]:
    """The per-dimension mean of several directions (step 1 of the recipe)."""
    rows = [check_direction(d) for d in directions]
    if not rows:
        raise ValueError("cannot average zero directions")
    return tuple(sum(col) / len(rows) for col in zip(*rows))


def threshold(direction: Sequence[float]) -> tuple[float, ...]:
    """Snap each value to 1, 0 or 0.5 at the published thresholds, applying the empty-profile rule."""
    values = check_direction(direction)
    snapped = tuple(1.0 if v >= POSITIVE_AT else 0.0 if v <= NEGATIVE_AT else NEUTRAL for v in values)
    if any(v != NEUTRAL for v in snapped) or all(v == NEUTRAL for v in values):
        # A direction with no signal at all has no "most extreme" dimension: it stays empty
        # rather than turning every tie at 0.5 into a pole.
        return snapped
    hi, lo = max(values), min(values)
    # As published: whichever extreme lies nearer its pole wins, and ties at that value all move.
    if 1.0 - hi < lo:
        return tuple(1.0 if v == hi else NEUTRAL for v in values)
    return tuple(0.0 if v == lo else NEUTRAL for v in values)


def render_profile(direction: Sequence[float]) -> str:
    """The AlignX profile string of a direction: poles joined by ", ", neutral dimensions omitted."""
    labels = []
    for dim, v in zip(DIMENSIONS, threshold(direction)):
        if v == 1.0:
            labels.append(dim.positive)
        elif v == 0.0:
            labels.append(dim.negative)
    return SEPARATOR.join(labels)


def parse_profile(profile: str) -> tuple[float, ...]:
    """The thresholded direction that a rendered profile string stands for.

    Labels can contain commas ("casual, stress-free chat"), so the string is matched
    against the known labels in order rather than split on commas.
    """
    direction = [NEUTRAL] * SIZE
    rest = profile.strip()
    for dim in DIMENSIONS:
        if not rest:
            break
        for label, value in ((dim.positive, 1.0), (dim.negative, 0.0)):
            if rest == label or rest.startswith(label + SEPARATOR):
                direction[dim.index] = value
                rest = rest[len(label) + len(SEPARATOR):] if rest != label else ""
                break
    if rest:
        raise ValueError(f"unknown or out-of-order profile label at: {rest[:80]!r}")
    return tuple(direction)
