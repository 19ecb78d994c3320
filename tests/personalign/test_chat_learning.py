"""The feedback loop: ratings and picks in chat become a persona's behaviour, only with consent."""

from __future__ import annotations

import pytest

import storage
from personalign.errors import UserError
from personalign.generation import GenerationConfig
from personalign.persona import Persona

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)


def _events(services, persona_id):
    with services.chat._db.session() as s:
        return storage.list_preference_events(session=s, user_id=services.accounts.user_id(None), persona_id=persona_id)


def _consent(services, persona_id, enabled=True):
    with services.chat._db.session() as s:
        storage.set_persona_learning(session=s, user_id=services.accounts.user_id(None), persona_id=persona_id,
                                     enabled=enabled)


def _answered(services, persona_id, question="Plan my weekend"):
    last = list(services.chat.send(None, None, question, persona_id=persona_id, mode="pba", generation=GREEDY))[-1]
    return last.conversation_id, last.assistant_message_id, last.text


@pytest.fixture
def persona_id(services) -> int:
    return services.personas.create(None, "Kid", Persona().with_values({0: 1.0})).id


def test_ratings_are_not_kept_without_consent(services, persona_id) -> None:
    _, message_id, _ = _answered(services, persona_id)
    services.chat.feedback(None, message_id, 1)
    assert _events(services, persona_id) == []


def test_thumbs_become_one_sided_pairs_and_follow_changes(services, persona_id) -> None:
    _consent(services, persona_id)
    _, message_id, answer = _answered(services, persona_id)
    services.chat.feedback(None, message_id, 1)
    (event,) = _events(services, persona_id)
    assert (event.kind, event.prompt, event.chosen, event.rejected) == ("thumb", "Plan my weekend", answer, None)
    services.chat.feedback(None, message_id, -1)
    (event,) = _events(services, persona_id)
    assert (event.chosen, event.rejected) == (None, answer)
    services.chat.feedback(None, message_id, 0)
    assert _events(services, persona_id) == []


def test_picking_the_alternative_keeps_it_and_records_the_pair(services, persona_id) -> None:
    _consent(services, persona_id)
    conversation_id, _, first = _answered(services, persona_id)
    sampled = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=7)
    alternative = list(services.chat.alternative(None, conversation_id, persona_id=persona_id, mode="pba",
                                                 generation=sampled))[-1]
    assert len(services.chat.turns(None, conversation_id)) == 2  # not stored until picked
    services.chat.pick(None, conversation_id, alternative=alternative, keep_alternative=True)
    turns = services.chat.turns(None, conversation_id)
    assert [t.role for t in turns] == ["user", "assistant"] and turns[-1].content == alternative.strip()
    (event,) = _events(services, persona_id)
    assert (event.kind, event.chosen, event.rejected) == ("pick", alternative.strip(), first)


def test_keeping_the_first_answer_changes_nothing_but_the_behaviour(services, persona_id) -> None:
    _consent(services, persona_id)
    conversation_id, message_id, first = _answered(services, persona_id)
    services.chat.pick(None, conversation_id, alternative="A much longer alternative.", keep_alternative=False)
    assert services.chat.turns(None, conversation_id)[-1].id == message_id
    (event,) = _events(services, persona_id)
    assert (event.chosen, event.rejected) == (first, "A much longer alternative.")


def test_pick_needs_an_answer_and_an_alternative(services, persona_id) -> None:
    conversation_id, _, _ = _answered(services, persona_id)
    with pytest.raises(UserError):
        services.chat.pick(None, conversation_id, alternative="  ", keep_alternative=True)
    empty = services.chat.new_conversation(None).id
    with pytest.raises(UserError):
        list(services.chat.alternative(None, empty, persona_id=None, mode="none", generation=GREEDY))


def test_persona_strength_guides_a_dense_reply(services, persona_id) -> None:
    plain = _answered(services, persona_id, "Describe the sea")[2]
    guided = GenerationConfig(max_new_tokens=6, temperature=0.0, persona_strength=3.0)
    last = list(services.chat.send(None, None, "Describe the sea", persona_id=persona_id, mode="pba",
                                   generation=guided))[-1]
    assert last.done and last.text and last.text != plain
