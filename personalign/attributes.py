"""Measured attributes of an answer text, and the rank correlation used to relate them to a setting.

Each attribute is a pure function of the text alone (text -> float), cheap enough to run on
every answer of a sweep, and documented well enough that a reader can say why two answers
scored as they did. They are rough, transparent heuristics, not trained classifiers: they
rank answers on one axis, they do not judge them. The one exception is
`embedding_projection`, which reads an answer's sentence embedding against one dimension's
pole descriptions and so needs an embedder passed in.

This module knows no model, persona, storage or UI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# A word: letters or digits, with inner apostrophes kept ("don't", "it's").
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
# A sentence ends at ., ! or ? followed by a space or the end, or at a line break: model
# answers often hold list items with no final full stop.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def words(text: str) -> list[str]:
    """The words of a text, as `length` counts them (curly apostrophes read as straight)."""
    return _WORD.findall(_normalise(text))


def length(text: str) -> float:
    """Length in words: runs of letters/digits, a contraction counting as one word."""
    return float(len(words(text)))


def syllables(word: str) -> int:
    """Syllables of one word by the usual English heuristic.

    Count groups of consecutive vowels (a, e, i, o, u, y); drop a silent final "e"
    ("make" 1, "whale" 1) but not a final consonant + "le" ("table" 2); at least 1 per
    word, so a number or an acronym with no vowel counts as one syllable.
    """
    w = re.sub(r"[^a-z]", "", word.lower())
    count = len(_VOWEL_GROUPS.findall(w))
    if count > 1 and w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        count -= 1
    elif count > 1 and w.endswith("le") and len(w) > 2 and w[-3] in "aeiouy":
        count -= 1  # "whale", "mile": the vowel before "le" already made the syllable
    return max(1, count)


def sentences(text: str) -> int:
    """Sentences: pieces between sentence ends (see `_SENTENCE_END`) that hold a word."""
    return sum(1 for part in _SENTENCE_END.split(_normalise(text)) if _WORD.search(part))


def reading_grade(text: str) -> float:
    """Flesch–Kincaid grade level: 0.39·(words/sentence) + 11.8·(syllables/word) − 15.59.

    Roughly the US school grade needed to read the text; longer sentences and longer
    words raise it. Syllables come from `syllables`. Not clipped: very simple text
    scores below 0. An empty text scores 0.
    """
    ws = words(text)
    if not ws:
        return 0.0
    n_sentences = max(1, sentences(text))
    n_syllables = sum(syllables(w) for w in ws)
    return 0.39 * len(ws) / n_sentences + 11.8 * n_syllables / len(ws) - 15.59


# Formality markers. Informal: contractions, first/second person, slang, hedges and
# fillers, exclamation marks and emoticons. Formal: academic connectives and
# nominalisations (long words ending in -tion, -ment, -ity...), the register of reports.
_CONTRACTION_SUFFIXES = ("n't", "'re", "'ll", "'ve", "'m", "'d")
# "'s" is also the possessive ("John's"), so it only counts after a pronoun or adverb.
_S_CONTRACTIONS = frozenset({"it's", "that's", "what's", "there's", "here's", "he's", "she's", "let's", "who's",
                             "where's", "how's", "everyone's", "nothing's", "something's"})
_PERSONAL = frozenset({"i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves", "you", "your",
                       "yours", "yourself", "yourselves", "u", "ya", "y'all"})
_SLANG = frozenset({"lol", "lmao", "omg", "gonna", "wanna", "gotta", "kinda", "sorta", "yeah", "yep", "yup", "nope",
                    "hey", "hi", "cool", "awesome", "stuff", "ok", "okay", "dude", "btw", "tbh", "haha", "wow",
                    "totally", "super", "guys", "cuz", "ain't", "nah", "huh", "oops", "yay", "thx", "pls"})
_HEDGES = frozenset({"maybe", "basically", "actually", "literally", "really", "just", "pretty", "like", "anyway",
                     "whatever", "probably", "guess"})
_FORMAL = frozenset({"therefore", "however", "moreover", "furthermore", "consequently", "thus", "hence",
                     "nevertheless", "nonetheless", "accordingly", "whereas", "regarding", "additionally",
                     "subsequently", "approximately", "respectively", "namely", "wherein", "herein", "therein",
                     "shall", "whom", "thereby", "notwithstanding", "pursuant", "hereby"})
_NOMINAL_SUFFIXES = ("tion", "sion", "ment", "ness", "ity", "ance", "ence", "ism")
_EXCLAMATION = re.compile(r"!+")
_EMOTICON = re.compile(r"(?:^|\s)[:;]-?[()DPp](?=\s|$)")


def _is_contraction(word: str) -> bool:
    return word.endswith(_CONTRACTION_SUFFIXES) or word in _S_CONTRACTIONS


def formality(text: str) -> float:
    """Net formal markers per word, in [-1, 1]; 0 for an empty text.

    Each word scores −1 if it is a contraction ("don't", "it's"), a first/second person
    pronoun (I, we, you...), slang ("gonna", "cool", "lol") or a hedge/filler ("maybe",
    "basically", "just"), and +1 if it is an academic connective ("therefore",
    "moreover", "regarding") or a nominalisation (7+ letters ending in -tion, -sion,
    -ment, -ness, -ity, -ance, -ence, -ism). Each run of "!" and each emoticon scores −1.
    The sum over the number of words, clipped to [-1, 1]: positive reads formal,
    negative reads chatty.
    """
    clean = _normalise(text)
    ws = [w.lower() for w in _WORD.findall(clean)]
    if not ws:
        return 0.0
    score = 0
    for w in ws:
        if _is_contraction(w) or w in _PERSONAL or w in _SLANG or w in _HEDGES:
            score -= 1
        elif w in _FORMAL or (len(w) >= 7 and w.endswith(_NOMINAL_SUFFIXES)):
            score += 1
    score -= len(_EXCLAMATION.findall(clean)) + len(_EMOTICON.findall(clean))
    return max(-1.0, min(1.0, score / len(ws)))


_POSITIVE = frozenset({
    "good", "great", "excellent", "wonderful", "amazing", "fantastic", "love", "loved", "lovely", "like", "enjoy",
    "enjoyed", "happy", "glad", "pleased", "delighted", "best", "better", "nice", "beautiful", "brilliant",
    "helpful", "useful", "positive", "success", "successful", "benefit", "beneficial", "easy", "fun", "exciting",
    "excited", "perfect", "awesome", "recommend", "favorite", "favourite", "hope", "hopeful", "safe", "calm",
    "comfortable", "healthy", "kind", "thanks", "thank", "grateful", "win", "improve", "improved", "strong",
})
_NEGATIVE = frozenset({
    "bad", "terrible", "awful", "horrible", "poor", "worst", "worse", "hate", "hated", "dislike", "sad", "unhappy",
    "angry", "upset", "annoying", "annoyed", "boring", "ugly", "useless", "harmful", "negative", "fail", "failed",
    "failure", "problem", "problems", "difficult", "hard", "painful", "pain", "wrong", "risk", "risky", "dangerous",
    "unsafe", "afraid", "fear", "worry", "worried", "stress", "stressful", "sick", "broken", "lose", "lost",
    "loss", "weak", "disappointing", "disappointed", "sorry", "unfortunately", "bleak",
})
_NEGATORS = frozenset({"not", "no", "never", "without", "hardly", "barely", "nor", "cannot"})
_NEGATION_WINDOW = 3  # a negator this many words back flips a polar word ("not very good")


def sentiment(text: str) -> float:
    """Balance of positive over negative words, in [-1, 1]; 0 when no word is polar.

    Words are looked up in two small hand-made lexicons (about 50 positive and 50
    negative everyday words). A polar word preceded within 3 words by a negator (not,
    no, never, without, hardly, a "n't" contraction...) counts for the other side.
    Score = (positive − negative) / (positive + negative).
    """
    ws = [w.lower() for w in _WORD.findall(_normalise(text))]
    positive = negative = 0
    for i, w in enumerate(ws):
        polarity = 1 if w in _POSITIVE else -1 if w in _NEGATIVE else 0
        if polarity == 0:
            continue
        window = ws[max(0, i - _NEGATION_WINDOW):i]
        if any(p in _NEGATORS or p.endswith("n't") for p in window):
            polarity = -polarity
        if polarity > 0:
            positive += 1
        else:
            negative += 1
    total = positive + negative
    return (positive - negative) / total if total else 0.0


def embedding_projection(text: str, dimension_index: int, embedder: Any) -> float:
    """How far the answer leans to one dimension's positive pole, by sentence embedding.

    The projection of the answer's L2-normalised embedding on the unit vector from the
    dimension's negative pole embedding to its positive one (`pole_axes`): in [-1, 1],
    positive when the answer reads closer to the positive pole's description. Only
    differences between answers mean something; the level depends on the embedder.
    """
    from personalign.embeddings import pole_axes  # cached per embedding model there

    axes = pole_axes(embedder)
    if not 0 <= dimension_index < axes.shape[0]:
        raise ValueError(f"dimension index must be in [0, {axes.shape[0] - 1}]; got {dimension_index}")
    vector = np.asarray(embedder.encode([text]), dtype=np.float64)[0]  # (1, D) -> (D,)
    return float(vector @ axes[dimension_index])


TextAttribute = Callable[[str], float]

ATTRIBUTES: dict[str, tuple[str, TextAttribute]] = {
    "length": ("Length (words)", length),
    "reading_grade": ("Reading grade (Flesch–Kincaid)", reading_grade),
    "formality": ("Formality (net formal markers per word)", formality),
    "sentiment": ("Sentiment (positive − negative balance)", sentiment),
}
"""Text-only attributes by name: (label for display, function text -> float)."""


def measure(text: str) -> dict[str, float]:
    """Every text-only attribute of one text, by name."""
    return {name: fn(text) for name, (_, fn) in ATTRIBUTES.items()}


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1
        for k in range(start, end + 1):
            ranks[order[k]] = mean_rank
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation, with average ranks for ties.

    The Pearson correlation of the two rank lists, in [-1, 1]. None when it is
    undefined: fewer than two pairs, or one side all tied (a constant has no order).
    """
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs two equally long lists; got {len(xs)} and {len(ys)}")
    if any(not math.isfinite(float(v)) for v in (*xs, *ys)):
        raise ValueError("spearman needs finite numbers")
    if len(xs) < 2:
        return None
    rx, ry = _average_ranks([float(v) for v in xs]), _average_ranks([float(v) for v in ys])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
