"""The AlignX preference space: 90 dimensions, each a pair of poles, in published order.

A direction over this space is a vector of 90 values in [0, 1]: 1 is the positive pole,
0 the negative pole, 0.5 neutral. This module knows the dimensions, their exact label
strings and their groups; it knows nothing of personas, prompts or rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

NEUTRAL = 0.5

# Label strings are the published ones, character for character: rendered profiles are
# compared against them, so a changed comma is a changed profile.
_GROUPED_POLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        'Demographics',
        (
            ('Young', 'Older'),
            ('Female', 'Male'),
        ),
    ),
    (
        'Big Five personality',
        (
            ('High Neuroticism', 'Low Neuroticism'),
            ('High Extraversion', 'Low Extraversion'),
            ('High Openness', 'Low Openness'),
            ('High Agreeableness', 'Low Agreeableness'),
            ('High Conscientiousness', 'Low Conscientiousness'),
        ),
    ),
    (
        'Likes and dislikes',
        (
            ('Likes a certain food', 'Dislikes a certain food'),
            ('Likes a certain living environment', 'Dislikes a certain living environment'),
            ('Likes sleep', 'Dislikes sleep'),
        ),
    ),
    (
        'Money and safety',
        (
            ('Aggressive investment', 'Conservative investment'),
            ('Good at saving', 'Bad at saving'),
            ('Concerned about physical safety', 'Not concerned about physical safety'),
            ('Concerned about environmental safety', 'Not concerned about environmental safety'),
        ),
    ),
    (
        'Communication',
        (
            ('Prefers superficial interaction (casual, stress-free chat)', 'Prefers deep interaction (discussing interests, emotional topics, etc.)'),
            ('Prefers direct communication to handle conflict', 'Prefers avoidance, mediation, compromise to handle conflict'),
            ('Concise communication style', 'Detailed communication style'),
        ),
    ),
    (
        'Needs',
        (
            ('Strong need for a certain work environment', 'Indifferent to work environment needs'),
            ('Strong need for recognition from others', 'Indifferent to recognition from others'),
            ('Strong need for personal achievement', 'Indifferent to personal achievement'),
        ),
    ),
    (
        'Learning and creativity',
        (
            ('Likes a certain area of knowledge', 'Dislikes a certain area of knowledge'),
            ('Likes a certain learning style', 'Dislikes a certain learning style'),
            ('Likes a certain form of creative expression (e.g., art, writing, music)', 'Dislikes a certain form of creative expression (e.g., art, writing, music)'),
        ),
    ),
    (
        "Murray's psychological needs",
        (
            ('Strong need for Order (neatness, organization, avoiding chaos)', 'Indifferent to orderliness'),
            ('Strong need for Retention (holding onto objects, unwilling to lose or change)', 'Indifferent to retention (unconcerned about keeping objects)'),
            ('Strong need for Inviolacy (maintaining dignity and reputation)', 'Indifferent to inviolacy (unconcerned with dignity or reputation)'),
            ('Strong need for Infavoidance (avoiding failure and embarrassment)', 'Indifferent to Infavoidance (unconcerned with failure or embarrassment)'),
            ('Strong need for Counteraction (overcoming failure and obstacles)', 'Indifferent to Counteraction (unconcerned with failure)'),
            ('Strong need for Seclusion (desire for isolation from others)', 'Indifferent to Seclusion (does not care about isolation)'),
            ('Strong need for Dominance (controlling others through command or persuasion)', 'Indifferent to Dominance (does not care about control)'),
            ('Strong need for Deference (following authority or rules)', 'Indifferent to Deference (does not care about authority)'),
            ('Strong need for Autonomy (pursuing independence and self-reliance)', 'Indifferent to Autonomy (does not care about independence)'),
            ('Strong need for Contrariance (pursuing uniqueness, opposing the norm)', 'Indifferent to Contrariance (does not seek uniqueness)'),
            ('Strong need for Abasement (accepting blame, enjoying pain or misfortune)', 'Indifferent to Abasement (does not accept blame or enjoy misfortune)'),
            ('Strong need for Aggression (controlling others through forceful means)', 'Indifferent to Aggression (does not engage in aggression)'),
            ('Strong need for Affiliation (desiring close relationships)', 'Indifferent to Affiliation (does not care about close relationships)'),
            ('Strong need for Rejection (isolating oneself from negatively evaluated people)', 'Indifferent to Rejection (does not care about social exclusion)'),
            ('Strong need for Nurturance (caring for others, protecting them from danger)', 'Indifferent to Nurturance (does not care about nurturing others)'),
            ('Strong need for Succorance (desiring help, love, and comfort from others)', 'Indifferent to Succorance (does not rely on others for comfort)'),
            ('Strong need for Play (enjoying fun, relaxation, and laughter)', 'Indifferent to Play (does not prioritize fun or relaxation)'),
        ),
    ),
    (
        'Response qualities',
        (
            ('Concerned about harmlessness', 'Indifferent about harmlessness'),
            ('Concerned about instruction-following', 'Indifferent about instruction-following'),
            ('Concerned about honesty', 'Indifferent about honesty'),
            ('Concerned about truthfulness', 'Indifferent about truthfulness'),
            ('Concerned about helpfulness', 'Indifferent about helpfulness'),
            ('Concerned about coherence', 'Indifferent about coherence'),
            ('Concerned about complexity', 'Indifferent about complexity'),
        ),
    ),
    (
        'Interest topics',
        (
            ('Likes science', 'Dislikes science'),
            ('Likes knowledge', 'Dislikes knowledge'),
            ('Likes psychology', 'Dislikes psychology'),
            ('Likes cinema', 'Dislikes cinema'),
            ('Likes entertainment', 'Dislikes entertainment'),
            ('Likes gaming', 'Dislikes gaming'),
            ('Likes parenting', 'Dislikes parenting'),
            ('Likes wild imagination', 'Dislikes wild imagination'),
            ('Likes anime', 'Dislikes anime'),
            ('Likes sports', 'Dislikes sports'),
            ('Likes law', 'Dislikes law'),
            ('Likes workplace', 'Dislikes workplace'),
            ('Likes pets', 'Dislikes pets'),
            ('Likes travel', 'Dislikes travel'),
            ('Likes health', 'Dislikes health'),
            ('Likes stories', 'Dislikes stories'),
            ('Likes cars', 'Dislikes cars'),
            ('Likes gourmet food', 'Dislikes gourmet food'),
            ('Likes education', 'Dislikes education'),
            ('Likes current events', 'Dislikes current events'),
            ('Likes home decor', 'Dislikes home decor'),
            ('Likes international', 'Dislikes international'),
            ('Likes finance', 'Dislikes finance'),
            ('Likes campus life', 'Dislikes campus life'),
            ('Likes digital technology', 'Dislikes digital technology'),
            ('Likes emotions', 'Dislikes emotions'),
            ('Likes humor', 'Dislikes humor'),
            ('Likes music', 'Dislikes music'),
            ('Likes reading', 'Dislikes reading'),
            ('Likes painting', 'Dislikes painting'),
            ('Likes dance', 'Dislikes dance'),
            ('Likes crafts', 'Dislikes crafts'),
            ('Likes photography', 'Dislikes photography'),
            ('Likes culture', 'Dislikes culture'),
            ('Likes fitness', 'Dislikes fitness'),
            ('Likes art', 'Dislikes art'),
            ('Likes stationery and planners', 'Dislikes stationery and planners'),
            ('Likes celebrities', 'Dislikes celebrities'),
            ('Likes outdoors', 'Dislikes outdoors'),
            ('Likes camping', 'Dislikes camping'),
            ('Likes social sciences', 'Dislikes social sciences'),
            ('Likes weddings', 'Dislikes weddings'),
            ('Likes fashion', 'Dislikes fashion'),
        ),
    ),
)


@dataclass(frozen=True)
class Dimension:
    """One axis of the preference space."""

    index: int
    positive: str
    negative: str
    group: str

    @property
    def title(self) -> str:
        """A slider caption: negative pole on the left (0), positive on the right (1)."""
        return f"{self.negative}  ↔  {self.positive}"

    def matches(self, query: str) -> bool:
        """Whether a case-insensitive search query hits either pole or the group."""
        q = query.strip().lower()
        return not q or any(q in s.lower() for s in (self.positive, self.negative, self.group))


DIMENSIONS: tuple[Dimension, ...] = tuple(
    Dimension(index, positive, negative, group)
    for index, (group, positive, negative) in enumerate(
        (group, pos, neg) for group, poles in _GROUPED_POLES for pos, neg in poles
    )
)
GROUPS: tuple[str, ...] = tuple(group for group, _ in _GROUPED_POLES)
SIZE = len(DIMENSIONS)


def dimensions_in(group: str) -> tuple[Dimension, ...]:
    """The dimensions of one group, in published order."""
    if group not in GROUPS:
        raise KeyError(f"unknown preference group {group!r}")
    return tuple(d for d in DIMENSIONS if d.group == group)


def neutral_direction() -> tuple[float, ...]:
    """A direction with every dimension neutral."""
    return (NEUTRAL,) * SIZE
