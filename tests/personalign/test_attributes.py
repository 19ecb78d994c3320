import math

import numpy as np
import pytest

from personalign.attributes import (
    ATTRIBUTES,
    embedding_projection,
    formality,
    length,
    measure,
    reading_grade,
    sentences,
    sentiment,
    spearman,
    syllables,
)
from personalign.embeddings import pole_axes

CHATTY = "Hey!! I'm gonna grab you some cool stuff lol, you'll love it"
PLAIN = "The meeting starts at noon in the main hall."
FORMAL = ("Consequently, the implementation of the regulation requires careful consideration; moreover, "
          "compliance with its provisions is therefore mandatory.")


def test_length_counts_words_and_contractions_once():
    assert length("") == 0
    assert length("One two three.") == 3
    assert length("Don't stop — it\u2019s 2 a.m.") == 6  # don't, stop, it's, 2, a, m
    assert length("Yes.") < length(PLAIN) < length(FORMAL)


@pytest.mark.parametrize("word, count", [
    ("cat", 1), ("make", 1), ("whale", 1), ("table", 2), ("people", 2), ("agree", 2), ("beautiful", 3),
    ("readability", 5), ("NASA", 2), ("42", 1), ("rhythm", 1),
])
def test_syllable_heuristic(word, count):
    assert syllables(word) == count


def test_sentences_end_at_stops_and_line_breaks():
    assert sentences("One. Two! Three?") == 3
    assert sentences("- first item\n- second item") == 2
    assert sentences("3.5 is a number") == 1  # a stop inside a number ends nothing
    assert sentences("") == 0


def test_reading_grade_matches_the_formula_and_orders_texts():
    # 6 words, 1 sentence, 6 syllables: 0.39 * 6 + 11.8 * 1 - 15.59
    assert reading_grade("The cat sat on the mat.") == pytest.approx(0.39 * 6 + 11.8 - 15.59)
    # 4 words in 2 sentences, 1 + 1 + 3 + 2 syllables
    assert reading_grade("I ran. Beautiful table.") == pytest.approx(0.39 * 2 + 11.8 * 7 / 4 - 15.59)
    assert reading_grade("") == 0.0
    simple = "I like dogs. Dogs are fun. We play a lot."
    assert reading_grade(simple) < reading_grade(PLAIN) < reading_grade(FORMAL)


def test_formality_orders_chatty_plain_and_formal_text():
    assert formality(CHATTY) < formality(PLAIN) < formality(FORMAL)
    assert formality(CHATTY) < 0 < formality(FORMAL)
    assert formality(PLAIN) == 0.0
    assert formality("") == 0.0
    assert -1.0 <= formality("You! You!! I! :)") <= 1.0
    # Each marker kind moves the score on its own.
    assert formality("We went there.") < formality("They went there.")
    assert formality("They didn't go.") < formality("They did not go.")
    assert formality("They went there!") < formality("They went there.")
    assert formality("The regulation changed.") > formality("The rule changed.")


def test_sentiment_orders_positive_neutral_negative_and_handles_negation():
    happy = "What a wonderful, great day; I love it."
    sad = "This is terrible and I hate it."
    assert sentiment(happy) == 1.0
    assert sentiment(PLAIN) == 0.0
    assert sentiment(sad) == -1.0
    assert sentiment("It was good, but the ending was bad and sad.") == pytest.approx((1 - 2) / 3)
    assert sentiment("This is not good.") == -1.0
    assert sentiment("It isn't a bad idea.") == 1.0
    assert sentiment(happy) > sentiment("Good food, terrible service.") > sentiment(sad)


def test_registry_lists_text_attributes_with_labels():
    assert set(ATTRIBUTES) == {"length", "reading_grade", "formality", "sentiment"}
    for name, (label, fn) in ATTRIBUTES.items():
        assert label and fn.__doc__, name
        assert isinstance(fn(PLAIN), float)
    assert measure(PLAIN) == {name: fn(PLAIN) for name, (_, fn) in ATTRIBUTES.items()}


def test_spearman_on_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # Monotone but not linear: ranks only.
    assert spearman([1, 2, 3, 4, 5], [1, 4, 9, 16, 1000]) == pytest.approx(1.0)
    # y has a tie: ranks [1, 2, 3.5, 5, 3.5]; sum dxdy = 8, sum dx2 = 10, sum dy2 = 9.5.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    # Ties on both sides: ranks [1.5, 1.5, 3.5, 3.5] vs [1, 2, 3, 4] -> 4 / sqrt(4 * 5).
    assert spearman([0, 0, 1, 1], [1, 2, 3, 4]) == pytest.approx(4 / math.sqrt(20))
    # No monotone relation at all.
    assert spearman([1, 2, 3], [1, 3, 1]) == pytest.approx(0.0)


def test_spearman_is_undefined_without_variation():
    assert spearman([], []) is None
    assert spearman([1], [2]) is None
    assert spearman([1, 2, 3], [4, 4, 4]) is None
    assert spearman([0.5, 0.5], [1, 2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])
    with pytest.raises(ValueError):
        spearman([1, float("nan")], [1, 2])


def test_embedding_projection_reads_the_pole_axis():
    from personalign.embeddings import default_embedder, pole_vectors

    embedder = default_embedder()
    concise = next(i for i, (label, _) in enumerate(_poles()) if label == "Concise communication style")
    poles = np.asarray(pole_vectors(embedder), dtype=np.float64)  # (90, 2, 384)
    axis = poles[concise, 0] - poles[concise, 1]
    text = "A concise answer, short and to the point."
    expected = float(np.asarray(embedder.encode([text]), dtype=np.float64)[0] @ axis / np.linalg.norm(axis))
    assert embedding_projection(text, concise, embedder) == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= expected <= 1.0
    assert np.allclose(np.linalg.norm(pole_axes(embedder), axis=1), 1.0)
    brief = embedding_projection("Concise communication style: brief, short replies.", concise, embedder)
    detailed = embedding_projection("Detailed communication style: long, thorough replies.", concise, embedder)
    assert brief > detailed
    with pytest.raises(ValueError):
        embedding_projection(text, 90, embedder)


def _poles():
    from personalign.preference_space import DIMENSIONS

    return [(d.positive, d.negative) for d in DIMENSIONS]
