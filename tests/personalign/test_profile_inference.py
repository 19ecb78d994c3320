"""Profile inference: behaviour items, AlignX aggregation, both inferrers, and proposed slider changes."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

import storage
from personalign.embeddings import default_embedder, pole_axes
from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.models import LoadedModel
from personalign.persona import PairwiseItem, Persona, UGCItem
from personalign.preference_space import DIMENSIONS, NEUTRAL, SIZE
from personalign.profile import mean_direction, threshold
from personalign.profile_inference import (
    BehaviourItem,
    EmbeddingInferrer,
    EmbeddingInferrerConfig,
    ModelInferrer,
    ModelInferrerConfig,
    aggregate,
    items_from_events,
    items_from_persona,
    propose_changes,
    unique_items,
)

INDEX = {d.positive: d.index for d in DIMENSIONS}
CONCISE = INDEX["Concise communication style"]

LONG_WINDED = {
    "What is the capital of France?": (
        "Paris.",
        ("Well, that is a great question, and there is quite a lot to say about it. France, as you may know, has a "
         "long and rich history, and its capital has moved around over the centuries, but if we look at the "
         "situation today, taking into account all the administrative arrangements, the seat of government and so "
         "on, then after all is said and done the answer would be that the capital of France is Paris."),
    ),
    "How do I repeat something ten times in Python?": (
        "Use a for loop.",
        ("There are many ways one could approach this, and it is worth going through each of them carefully, one "
         "by one, considering the pros and cons of every option, the historical reasons why each exists, and the "
         "many subtle edge cases you may encounter along the way, before finally settling on what is, in most "
         "situations, the simplest approach, namely a for loop."),
    ),
    "Is 7 prime?": (
        "Yes.",
        ("To determine whether 7 is prime, we should first recall the definition of a prime number, which is a "
         "natural number greater than one that has no positive divisors other than one and itself. Let us now check "
         "each candidate divisor in turn: 2, 3, 4, 5 and 6 do not divide 7. Having exhausted all the candidates, we "
         "can conclude with confidence that 7 is indeed prime."),
    ),
}


def concise_pairs(prefer_concise: bool = True) -> list[BehaviourItem]:
    return [
        BehaviourItem("pair", q, chosen=short if prefer_concise else long, rejected=long if prefer_concise else short)
        for q, (short, long) in LONG_WINDED.items()
    ]


def event(kind: str, chosen: str | None, rejected: str | None) -> storage.PreferenceEventPublic:
    return storage.PreferenceEventPublic(
        id=1, user_id=1, persona_id=1, kind=kind, prompt="Q?", chosen=chosen, rejected=rejected,
        message_id=None, created_at=datetime.now(UTC),
    )


# --- behaviour items ----------------------------------------------------------------------


def test_item_keys_hash_the_content():
    a = BehaviourItem("pair", "Q", chosen="x", rejected="y")
    assert a.key == BehaviourItem("pair", "Q", chosen="x", rejected="y").key
    assert a.key != BehaviourItem("pair", "Q", chosen="y", rejected="x").key
    assert a.key != BehaviourItem("pick", "Q", chosen="x", rejected="y").key
    assert len(a.key) == 20


@pytest.mark.parametrize(
    "args",
    [
        ("like", "Q", "x", None),  # unknown source
        ("thumb", "Q", None, None),  # no side
        ("thumb", "Q", "  ", ""),  # blank sides are no sides
        ("pair", "Q", "x", None),  # a pair needs both
        ("pick", "Q", None, "y"),
        ("ugc", "Post", None, "y"),  # ugc is the comment, kept as chosen
    ],
)
def test_invalid_items_are_refused(args):
    source, prompt, chosen, rejected = args
    with pytest.raises(ValueError):
        BehaviourItem(source, prompt, chosen=chosen, rejected=rejected)


def test_shapes_and_summaries():
    assert BehaviourItem("ugc", "P", chosen="mine").summary() == 'wrote "mine"'
    assert BehaviourItem("thumb", "Q", chosen="good").summary() == 'liked "good"'
    assert BehaviourItem("thumb", "Q", rejected="bad").summary() == 'disliked "bad"'
    pick = BehaviourItem("pick", "Q", chosen="a " * 100, rejected="b")
    assert pick.shape == "pair"
    assert pick.summary(width=10) == 'chose "a a a a a…" over "b"'  # each quote at most 10 characters


def test_items_from_persona_and_events():
    persona = Persona(ugc=(UGCItem("post", "comment"),), pairwise=(PairwiseItem("q", "good", "bad"),))
    assert [(i.source, i.prompt, i.chosen, i.rejected) for i in items_from_persona(persona)] == [
        ("ugc", "post", "comment", None),
        ("pair", "q", "good", "bad"),
    ]
    events = [event("thumb", "up", None), event("thumb", None, "down"), event("pick", "a", "b")]
    assert [i.shape for i in items_from_events(events)] == ["up", "down", "pair"]


def test_unique_items_keep_the_first_of_repeats():
    a, b = BehaviourItem("thumb", "Q", chosen="x"), BehaviourItem("thumb", "Q", rejected="x")
    assert unique_items([a, b, BehaviourItem("thumb", "Q", chosen="x")]) == [a, b]


# --- aggregation --------------------------------------------------------------------------


def test_aggregation_follows_alignx():
    items = [BehaviourItem("thumb", "Q", chosen=str(n)) for n in range(3)]
    rows = [[NEUTRAL] * SIZE for _ in items]
    rows[0][0], rows[1][0], rows[2][0] = 0.9, 0.8, 0.4  # mean 0.7: positive pole
    rows[0][1], rows[1][1] = 0.3, 0.6  # mean 0.4667: neutral
    rows[2][5] = 0.1  # mean 0.3667: negative pole
    inference = aggregate("test", items, rows)
    assert inference.values == pytest.approx(mean_direction(rows))
    assert inference.direction == threshold(inference.values)
    assert inference.direction[0] == 1.0 and inference.direction[1] == NEUTRAL and inference.direction[5] == 0.0
    assert inference.item_count == 3
    # Support: items pushing the way the mean went, strongest first; contributions are shares of value - 0.5.
    assert [(s.item, round(s.contribution, 4)) for s in inference.support[0]] == [
        (items[0], round(0.4 / 3, 4)),
        (items[1], round(0.3 / 3, 4)),
    ]
    assert [s.item for s in inference.support[5]] == [items[2]]
    total = sum(s.contribution for s in inference.support[0]) + (0.4 - NEUTRAL) / 3
    assert total == pytest.approx(inference.values[0] - NEUTRAL)
    assert inference.support[2] == ()


def test_aggregation_needs_one_direction_per_item():
    with pytest.raises(ValueError):
        aggregate("test", [BehaviourItem("thumb", "Q", chosen="x")], [])
    with pytest.raises(ValueError):
        aggregate("test", [BehaviourItem("thumb", "Q", chosen="x")], [[1.5] * SIZE])


# --- embedding inferrer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_inferrer() -> EmbeddingInferrer:
    return EmbeddingInferrer(default_embedder())


def test_pole_axes_are_unit_vectors(embedding_inferrer):
    axes = pole_axes(embedding_inferrer.embedder)
    assert axes.shape == (SIZE, 384)
    np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1.0, atol=1e-5)


def test_preferring_concise_replies_pushes_concise_style(embedding_inferrer):
    concise = embedding_inferrer.infer(concise_pairs(prefer_concise=True))
    assert all(values[CONCISE] > NEUTRAL for values in concise.item_values)
    assert concise.values[CONCISE] > 0.52
    detailed = embedding_inferrer.infer(concise_pairs(prefer_concise=False))
    # Swapping chosen and rejected negates the vector: values mirror around 0.5.
    np.testing.assert_allclose(np.array(detailed.values), 1 - np.array(concise.values), atol=1e-6)


def test_a_thumbs_down_alone_is_the_negated_answer(embedding_inferrer):
    answer = "I spent the whole weekend playing with my dogs and cats; my pets are my family."
    up, down = embedding_inferrer.label([BehaviourItem("thumb", "Q", chosen=answer),
                                         BehaviourItem("thumb", "Q", rejected=answer)])
    np.testing.assert_allclose(np.array(down), 1 - np.array(up), atol=1e-6)


@pytest.mark.parametrize(
    ("comment", "dimension"),
    [
        ("I spent the whole weekend playing with my dogs and cats; my pets are my family.", "Likes pets"),
        ("We went camping by the lake and slept in a tent under the stars.", "Likes camping"),
    ],
)
def test_what_someone_writes_about_pushes_its_topic(embedding_inferrer, comment, dimension):
    (values,) = embedding_inferrer.label([BehaviourItem("ugc", "How was your weekend?", chosen=comment)])
    top = np.argsort(-np.array(values))[:3]
    assert INDEX[dimension] in top
    assert values[INDEX[dimension]] >= 0.6  # past the AlignX threshold on its own


def test_a_pair_of_identical_answers_says_nothing(embedding_inferrer):
    (values,) = embedding_inferrer.label([BehaviourItem("pair", "Q", chosen="Same.", rejected="Same.")])
    assert values == (NEUTRAL,) * SIZE


def test_values_follow_the_documented_scale(embedding_inferrer):
    items = concise_pairs()
    scores = embedding_inferrer.scores(items)
    assert scores.shape == (len(items), SIZE)
    steep = EmbeddingInferrer(embedding_inferrer.embedder, EmbeddingInferrerConfig(scale=0.2))
    for inferrer in (embedding_inferrer, steep):
        expected = 0.5 + 0.5 * np.tanh(scores / inferrer.config.scale)
        np.testing.assert_allclose(np.array(inferrer.label(items)), expected, atol=1e-6)
    with pytest.raises(ValueError):
        EmbeddingInferrerConfig(scale=0)


def test_text_embeddings_are_remembered(monkeypatch):
    inferrer = EmbeddingInferrer(default_embedder(), EmbeddingInferrerConfig(cache_size=2))
    first = inferrer.embed(["a", "b", "a"])
    assert set(first) == {"a", "b"}
    encoded: list[list[str]] = []
    real = inferrer.embedder.encode
    monkeypatch.setattr(inferrer.embedder, "encode", lambda texts: (encoded.append(list(texts)), real(texts))[1])
    again = inferrer.embed(["b", "c"])
    assert encoded == [["c"]]
    np.testing.assert_array_equal(again["b"], first["b"])
    inferrer.embed(["a"])  # "a" was evicted: the cache holds 2 texts
    assert encoded[-1] == ["a"]
    with pytest.raises(ValueError):
        EmbeddingInferrerConfig(cache_size=-1)


def test_progress_is_reported(embedding_inferrer):
    calls = []
    embedding_inferrer.infer(concise_pairs(), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (3, 3)]


def test_no_items_is_an_error(embedding_inferrer):
    with pytest.raises(ValueError, match="no behaviour"):
        embedding_inferrer.infer([])


# --- model inferrer (tiny random model: numbers, shapes, batching and caching; not quality) -


@pytest.fixture
def engine(tiny_llm) -> Engine:
    return Engine(tiny_llm)


def count_forwards(model) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


SHORT = BehaviourItem("pair", "Capital of France?", chosen="Paris.", rejected="It is a long story.")


def test_model_labels_are_probabilities_per_dimension(engine):
    inferrer = ModelInferrer(engine)
    calls = []
    inference = inferrer.infer([SHORT, BehaviourItem("thumb", "Hi", rejected="Go away.")],
                               progress=lambda d, t: calls.append((d, t)))
    assert inference.method == "model" and inference.item_count == 2
    values = np.array(inference.item_values)
    assert values.shape == (2, SIZE)
    assert ((values > 0) & (values < 1)).all()
    assert calls == [(0, 2), (1, 2), (2, 2)]


def test_batched_gaps_equal_one_sequence_at_a_time(engine):
    inferrer = ModelInferrer(engine, ModelInferrerConfig(batch_size=7))
    gaps = inferrer.logit_gaps(SHORT)
    assert gaps.shape == (SIZE,)
    prefix, suffixes = inferrer.prompt_parts(SHORT)
    a, b = inferrer.answer_ids()
    for k in (0, CONCISE, SIZE - 1):
        with torch.inference_mode():
            logits = engine.loaded.model(input_ids=torch.tensor([prefix + suffixes[k]])).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        assert gaps[k] == pytest.approx(float(logprobs[a] - logprobs[b]), abs=1e-4)
    np.testing.assert_allclose(ModelInferrer(engine, ModelInferrerConfig(batch_size=90)).logit_gaps(SHORT), gaps,
                               atol=1e-4)


def test_the_content_free_item_calibrates_to_neutral(engine):
    inferrer = ModelInferrer(engine)
    null = BehaviourItem("pair", "N/A", chosen="N/A", rejected="N/A")
    (values,) = inferrer.label([null])
    assert values == pytest.approx((NEUTRAL,) * SIZE)


def test_labels_are_cached_per_item_and_model(engine, tiny_llm):
    inferrer = ModelInferrer(engine)
    first = inferrer.label([SHORT])
    assert inferrer.cached(SHORT) == first[0]
    calls, handle = count_forwards(engine.loaded.model)
    try:
        assert inferrer.label([SHORT]) == first
        assert calls == []
    finally:
        handle.remove()
    # Another model name misses the cache (the inferrer follows the engine's model).
    renamed = LoadedModel.from_parts(tiny_llm.model, tiny_llm.tokenizer, name="another-model")
    inferrer.engine = Engine(renamed)
    assert inferrer.cached(SHORT) is None


def test_the_cache_is_bounded(engine):
    inferrer = ModelInferrer(engine, ModelInferrerConfig(cache_size=1))
    other = BehaviourItem("thumb", "Hi", chosen="Hello.")
    inferrer.label([SHORT, other])
    assert inferrer.cached(SHORT) is None and inferrer.cached(other) is not None


def test_long_items_are_cut_to_fit_the_context(engine):
    inferrer = ModelInferrer(engine)
    huge = BehaviourItem("pair", "Q " * 2000, chosen="yes " * 2000, rejected="no " * 2000)
    prefix, suffixes = inferrer.prompt_parts(huge)
    assert len(prefix) + max(map(len, suffixes)) <= engine.max_context()


def test_labelling_waits_while_a_reply_is_generated(engine):
    inferrer = ModelInferrer(engine)
    stream = engine.stream([{"role": "user", "content": "hi"}], GenerationConfig(max_new_tokens=50, temperature=0.0))
    next(stream)  # the reply now holds the engine
    done = threading.Event()
    worker = threading.Thread(target=lambda: (inferrer.label([SHORT]), done.set()))
    worker.start()
    time.sleep(0.5)
    assert not done.is_set()
    stream.close()
    worker.join(timeout=60)
    assert done.is_set()


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"max_field_chars": -1}, {"cache_size": 1.5}])
def test_model_config_is_checked(kwargs):
    with pytest.raises(ValueError):
        ModelInferrerConfig(**kwargs)


# --- proposals ----------------------------------------------------------------------------


def inference_with(values: dict[int, float], n_items: int = 1):
    items = [BehaviourItem("thumb", "Q", chosen=f"answer {n}") for n in range(n_items)]
    row = [NEUTRAL] * SIZE
    for k, v in values.items():
        row[k] = v
    return aggregate("test", items, [row] * n_items)


def test_proposals_are_poles_that_differ_from_the_sliders_strongest_first():
    inference = inference_with({0: 0.9, 1: 0.2, 2: 0.65, 3: 0.95, 4: 0.55, 5: 0.6})
    current = [NEUTRAL] * SIZE
    current[3] = 0.75  # already reads as the positive pole
    current[1] = 1.0  # the opposite pole
    changes = propose_changes(current, inference)
    assert [c.index for c in changes] == [0, 1, 2, 5]  # 3 already there, 4 neutral
    first = changes[0]
    assert (first.current, first.proposed, first.value) == (NEUTRAL, 1.0, pytest.approx(0.9))
    assert first.strength == pytest.approx(0.8)
    assert first.pole == DIMENSIONS[0].positive and first.dimension is DIMENSIONS[0]
    assert changes[1].pole == DIMENSIONS[1].negative and changes[1].current == 1.0
    assert first.support[0].contribution == pytest.approx(0.4)


def test_min_change_asks_for_stronger_evidence():
    inference = inference_with({0: 0.9, 2: 0.65})
    assert [c.index for c in propose_changes([NEUTRAL] * SIZE, inference, min_change=0.2)] == [0]
    with pytest.raises(ValueError):
        propose_changes([NEUTRAL] * SIZE, inference, min_change=0.7)


def test_a_pole_picked_only_by_the_empty_profile_rule_is_not_proposed():
    inference = inference_with({7: 0.55})
    assert inference.direction[7] == 1.0  # AlignX's rule: the most extreme dimension goes to its pole
    assert propose_changes([NEUTRAL] * SIZE, inference) == []
    assert [c.index for c in propose_changes([NEUTRAL] * SIZE, inference, min_change=0.0)] == [7]
