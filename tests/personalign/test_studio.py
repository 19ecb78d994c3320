"""The studio's data path without the UI: real SQLite and the tiny random model."""

import json
import threading

import pytest

from personalign.attributes import length, measure
from personalign.errors import NotFoundError, UserError
from personalign.generation import GenerationConfig
from personalign.persona import Persona
from personalign.studio import (
    ADDED,
    CHANGED,
    DEFAULT_SLIDER_VALUES,
    PERSONA_STRENGTH,
    Comparison,
    Setting,
    StudioError,
    Sweep,
    loads,
    word_diff,
)

CONCISE = 16  # "Concise communication style" / "Detailed communication style"
SAMPLED = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=7)
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)
QUESTION = "How do I brew green tea?"


@pytest.fixture
def persona_id(services):
    return services.personas.create(None, "Brief", Persona().with_values({CONCISE: 1.0, 3: 0.9})).id


def _joined(segments):
    return "".join(text for text, _ in segments)


def test_word_diff_marks_changed_and_added_words_and_rebuilds_the_text():
    segments = word_diff("the cat sat", "the dog sat down")
    assert segments == [("the ", None), ("dog", CHANGED), (" sat ", None), ("down", ADDED)]
    assert word_diff("same  words\n", "same  words\n") == [("same  words\n", None)]
    assert word_diff("", "all new here") == [("all new here", ADDED)]
    assert word_diff("gone", "") == []
    text = "  leading and\ttrailing  \n"
    assert _joined(word_diff("and more", text)) == text


def test_compare_answers_once_per_setting_with_one_seed(services, persona_id):
    settings = [Setting("plain"), Setting("pba", persona_id, "pba"),
                Setting("detailed", persona_id, "pba", overrides={CONCISE: 0.0})]
    seen = []
    result = services.studio.compare(None, QUESTION, settings, SAMPLED, progress=lambda *a: seen.append(a))
    assert [a.label for a in result.answers] == ["plain", "pba", "detailed"]
    assert not result.cancelled and result.generation.seed == SAMPLED.seed
    assert "Concise communication style" in result.answers[1].prompt
    assert "Detailed communication style" in result.answers[2].prompt
    assert "User Preferences" not in result.answers[0].prompt
    assert all(a.attributes == measure(a.text) for a in result.answers)
    assert [(done, total) for done, total, _ in seen] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_same_settings_and_seed_give_the_same_answer(services, persona_id):
    setting = Setting("a", persona_id, "pba")
    first = services.studio.compare(None, QUESTION, [setting, Setting("b", persona_id, "pba")], SAMPLED)
    again = services.studio.compare(None, QUESTION, [Setting("c", persona_id, "pba"), Setting("plain")], SAMPLED)
    assert first.answers[0].text == first.answers[1].text == again.answers[0].text
    assert all(label is None for _, label in first.diffs[1])
    assert first.similarities == [1.0, 1.0]


def test_a_blank_seed_is_drawn_once_and_shared(services, persona_id):
    result = services.studio.compare(None, QUESTION, [Setting("a", persona_id, "pba"), Setting("b", persona_id, "pba")],
                                     GenerationConfig(max_new_tokens=12, temperature=0.9, seed=None))
    assert result.generation.seed is not None
    assert result.answers[0].text == result.answers[1].text


def test_diff_segments_rebuild_every_answer(services, persona_id):
    settings = [Setting("plain"), Setting("ica", persona_id, "ica"), Setting("pba", persona_id, "pba"),
                Setting("low", persona_id, "pba", overrides={CONCISE: 0.0, 3: 0.0})]
    result = services.studio.compare(None, QUESTION, settings, SAMPLED)
    assert len(result.diffs) == 4
    for answer, segments in zip(result.answers, result.diffs):
        assert _joined(segments) == answer.text
        assert all(label in (None, CHANGED, ADDED) for _, label in segments)
    assert all(label is None for _, label in result.diffs[0])


def test_compare_rejects_bad_requests(services, persona_id):
    studio = services.studio
    with pytest.raises(StudioError):
        studio.compare(None, QUESTION, [Setting("only")], GREEDY)
    with pytest.raises(UserError, match="question"):
        studio.compare(None, "   ", [Setting("a"), Setting("b")], GREEDY)
    with pytest.raises(UserError):
        Setting("x", None, "pba")
    with pytest.raises(UserError):
        Setting("x", persona_id, "none", persona_strength=1.0)
    with pytest.raises(UserError):
        Setting("x", persona_id, "ica", overrides={CONCISE: 1.0})
    with pytest.raises(UserError):
        Setting("x", persona_id, "pba", overrides={90: 1.0})
    with pytest.raises(NotFoundError):
        studio.compare(None, QUESTION, [Setting("a"), Setting("b", persona_id + 1, "pba")], GREEDY)


def test_slider_sweep_has_every_point_and_follows_pba_thresholds(services, persona_id):
    seen = []
    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, None, "length", "pba", GREEDY, samples=2,
                                   progress=lambda *a: seen.append(a[:2]))
    assert result.values == DEFAULT_SLIDER_VALUES
    assert len(result.points) == len(DEFAULT_SLIDER_VALUES) * 2 and not result.cancelled
    assert [p.value for p in result.points] == [v for v in DEFAULT_SLIDER_VALUES for _ in range(2)]
    seed = result.generation.seed
    assert [p.seed for p in result.points] == [seed, seed + 1] * len(DEFAULT_SLIDER_VALUES)
    assert seen[-1] == (10, 10) and [d for d, _ in seen] == list(range(11))
    by_value = {}
    for p in result.points:
        by_value.setdefault(p.value, []).append(p)
        assert p.score == length(p.text)
    # PBA renders 0 and .25 both as the negative pole, .75 and 1 both as the positive one:
    # the prompts match, so greedy answers match.
    assert by_value[0.0][0].text == by_value[0.25][0].text
    assert by_value[0.75][0].text == by_value[1.0][0].text
    scores = [p.score for p in result.points]
    assert len(result.means) == 5
    if len(set(scores)) > 1:
        assert -1.0 <= result.rho <= 1.0
    else:
        assert result.rho is None


def test_sweep_rho_is_none_when_the_attribute_never_moves(services, persona_id):
    # Two values that PBA renders alike, greedy: identical answers, so no rank order exists.
    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, [0.8, 1.0], "length", "pba", GREEDY)
    assert result.points[0].text == result.points[1].text
    assert result.rho is None and result.means[0] == result.means[1]


def test_sweep_stops_between_answers_and_keeps_what_is_done(services, persona_id):
    stop = threading.Event()

    def progress(done, total, note):
        if done == 3:
            stop.set()

    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, None, "formality", "pba", SAMPLED,
                                   samples=2, progress=progress, stop_event=stop)
    assert result.cancelled and len(result.points) == 3
    assert result.means[2] is None and result.means[1] is not None


def test_stop_by_user_reaches_a_running_sweep(services, persona_id):
    def progress(done, total, note):
        if done == 1:
            services.studio.stop(None)

    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, [0, 1], "length", "pba", GREEDY,
                                   progress=progress)
    assert result.cancelled and len(result.points) == 1


def test_sweep_rejects_bad_requests(services, persona_id):
    studio = services.studio
    with pytest.raises(StudioError, match="PBA"):
        studio.sweep(None, QUESTION, persona_id, CONCISE, None, "length", "ica", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, CONCISE, [0.5], "length", "pba", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, CONCISE, [0, 2], "length", "pba", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, 90, None, "length", "pba", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, CONCISE, None, "charm", "pba", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, PERSONA_STRENGTH, None, "length", "none", GREEDY)
    with pytest.raises(StudioError):
        studio.sweep(None, QUESTION, persona_id, CONCISE, None, "length", "pba", GREEDY, samples=0)
    with pytest.raises(NotFoundError):
        studio.sweep(None, QUESTION, persona_id + 1, CONCISE, None, "length", "pba", GREEDY)


def test_persona_strength_sweep_starts_from_plain_decoding(services, persona_id):
    result = services.studio.sweep(None, QUESTION, persona_id, PERSONA_STRENGTH, [0, 2], "length", "pba", GREEDY)
    assert [p.value for p in result.points] == [0.0, 2.0]
    plain = services.studio.compare(None, QUESTION, [Setting("a", persona_id, "pba"), Setting("b")], GREEDY)
    assert result.points[0].text == plain.answers[0].text  # γ = 0 is the ordinary persona answer
    guided = services.studio.compare(
        None, QUESTION, [Setting("a", persona_id, "pba", persona_strength=2.0), Setting("b")], GREEDY)
    assert result.points[1].text == guided.answers[0].text


def test_export_json_round_trips(services, persona_id):
    comparison = services.studio.compare(
        None, QUESTION, [Setting("plain"), Setting("pba", persona_id, "pba", overrides={CONCISE: 0.0})], SAMPLED)
    sweep = services.studio.sweep(None, QUESTION, persona_id, CONCISE, [0, 1], "sentiment", "pba", SAMPLED, samples=2)
    for result in (comparison, sweep):
        text = services.studio.export_json(result)
        assert loads(text) == result
        data = json.loads(text)
        assert data["kind"] == ("comparison" if isinstance(result, Comparison) else "sweep")
    assert json.loads(services.studio.export_json(sweep))["rho"] == sweep.rho
    with pytest.raises(StudioError):
        loads('{"kind": "nothing"}')
    with pytest.raises(StudioError):
        loads("not json")


def test_export_png_is_a_png_for_both_kinds(services, persona_id):
    comparison = services.studio.compare(None, QUESTION, [Setting("plain"), Setting("pba", persona_id, "pba")], GREEDY)
    sweep = services.studio.sweep(None, QUESTION, persona_id, CONCISE, [0, 1], "length", "pba", GREEDY)
    for result in (comparison, sweep):
        png = services.studio.export_png(result)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_saved_runs_are_scoped_by_user(services, persona_id):
    services.accounts.create_user("alice", "password-a")
    services.accounts.create_user("bob", "password-b")
    alices = services.personas.create("alice", "Alice's", Persona().with_values({CONCISE: 0.0})).id
    studio = services.studio
    sweep = studio.sweep("alice", QUESTION, alices, CONCISE, [0, 1], "length", "pba", GREEDY)
    comparison = studio.compare("alice", QUESTION, [Setting("a"), Setting("b", alices, "pba")], GREEDY)
    first = studio.save("alice", sweep, "My sweep")
    second = studio.save("alice", comparison, "")
    assert [r.id for r in studio.runs("alice")] == [second.id, first.id]  # newest first
    assert (first.kind, first.title) == ("sweep", "My sweep")
    assert second.kind == "comparison" and QUESTION in second.title
    assert studio.runs("bob") == [] and studio.runs(None) == []
    assert studio.load("alice", first.id) == sweep
    assert isinstance(studio.load("alice", second.id), Comparison)
    with pytest.raises(NotFoundError):
        studio.load("bob", first.id)
    with pytest.raises(NotFoundError):
        studio.delete("bob", first.id)
    with pytest.raises(NotFoundError):
        studio.sweep("bob", QUESTION, alices, CONCISE, [0, 1], "length", "pba", GREEDY)
    studio.delete("alice", first.id)
    assert [r.id for r in studio.runs("alice")] == [second.id]
    with pytest.raises(NotFoundError):
        studio.load("alice", first.id)


def test_projection_attribute_on_the_swept_dimension(services, persona_id):
    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, [0, 1], "projection", "pba", GREEDY)
    assert isinstance(result, Sweep) and result.projection_dimension == CONCISE
    assert all(-1.0 <= p.score <= 1.0 for p in result.points)
    assert "Concise communication style" in result.attribute_label


def test_values_that_render_the_same_prompt_are_answered_once(services, persona_id, monkeypatch):
    engine = services.studio._engine
    prompts = []
    real_stream = engine.stream

    def counting(messages, *args, **kwargs):
        prompts.append(engine.render(messages))
        return real_stream(messages, *args, **kwargs)

    monkeypatch.setattr(engine, "stream", counting)
    result = services.studio.sweep(None, QUESTION, persona_id, CONCISE, None, "length", "pba", SAMPLED, samples=2)
    # Five values but three prompts (negative pole, left out, positive pole), two seeds each.
    assert len(result.points) == 10 and len(prompts) == 6 == 2 * len(set(prompts))
    texts = {(p.value, p.seed): p.text for p in result.points}
    assert all(texts[(0.0, s)] == texts[(0.25, s)] and texts[(0.75, s)] == texts[(1.0, s)]
               for s in {p.seed for p in result.points})
