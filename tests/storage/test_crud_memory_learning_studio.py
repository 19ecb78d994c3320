"""Conversation memory settings, saved memory snapshots, preference events and studio runs."""

import pytest
from sqlmodel import Session

import storage
from storage import NotFound, UserPublic


def _chat(session: Session, user: UserPublic) -> tuple[storage.PersonaPublic, storage.ConversationPublic, storage.MessagePublic]:
    persona = storage.create_persona(session=session, user_id=user.id, name="p", data={})
    conversation = storage.create_conversation(session=session, user_id=user.id, title="c", persona_id=persona.id)
    message = storage.add_message(
        session=session, user_id=user.id, conversation_id=conversation.id, role="assistant", content="an answer"
    )
    return persona, conversation, message


def _snapshot(session: Session, user: UserPublic, conversation_id: int, message_id: int, **changes):
    values = {"path": "a.pt", "policy": "streaming-dialogue", "model": "m", "last_message_id": message_id,
              "message_count": 2, "kv_bytes": 100}
    values.update(changes)
    return storage.set_memory_snapshot(session=session, user_id=user.id, conversation_id=conversation_id, **values)


def test_conversation_memory_defaults_to_dense_and_can_change(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="c")
    assert conversation.memory == "dense"
    changed = storage.update_conversation_settings(
        session=session, user_id=alice.id, conversation_id=conversation.id, persona_id=None, mode="none",
        memory="streaming-dialogue",
    )
    assert changed.memory == "streaming-dialogue"
    kept = storage.update_conversation_settings(
        session=session, user_id=alice.id, conversation_id=conversation.id, persona_id=None, mode="ica"
    )
    assert kept.memory == "streaming-dialogue" and kept.mode == "ica"


def test_memory_snapshot_is_one_per_conversation_and_replaced(session: Session, alice: UserPublic) -> None:
    _, conversation, message = _chat(session, alice)
    assert storage.get_memory_snapshot(session=session, user_id=alice.id, conversation_id=conversation.id) is None
    first = _snapshot(session, alice, conversation.id, message.id)
    second = _snapshot(session, alice, conversation.id, message.id, path="b.pt", message_count=4, kv_bytes=50)
    assert second.id == first.id and second.path == "b.pt" and second.message_count == 4
    assert storage.get_memory_snapshot(session=session, user_id=alice.id, conversation_id=conversation.id) == second
    assert storage.delete_memory_snapshot(session=session, user_id=alice.id, conversation_id=conversation.id)
    assert storage.get_memory_snapshot(session=session, user_id=alice.id, conversation_id=conversation.id) is None


def test_memory_snapshot_goes_with_its_conversation(session: Session, alice: UserPublic) -> None:
    _, conversation, message = _chat(session, alice)
    _snapshot(session, alice, conversation.id, message.id)
    storage.delete_conversation(session=session, user_id=alice.id, conversation_id=conversation.id)
    assert storage.get_memory_snapshot(session=session, user_id=alice.id, conversation_id=conversation.id) is None


def test_memory_snapshot_rejects_negative_sizes(session: Session, alice: UserPublic) -> None:
    _, conversation, message = _chat(session, alice)
    with pytest.raises(ValueError):
        _snapshot(session, alice, conversation.id, message.id, kv_bytes=-1)


def test_learning_consent_defaults_off_and_toggles(session: Session, alice: UserPublic) -> None:
    persona, _, _ = _chat(session, alice)
    assert persona.learn_from_chat is False
    assert storage.set_persona_learning(session=session, user_id=alice.id, persona_id=persona.id, enabled=True).learn_from_chat
    assert storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id).learn_from_chat is True


def test_preference_events_keep_thumbs_and_picks_in_order(session: Session, alice: UserPublic) -> None:
    persona, _, message = _chat(session, alice)
    up = storage.add_preference_event(session=session, user_id=alice.id, persona_id=persona.id, kind="thumb",
                                      prompt="q", chosen="an answer", message_id=message.id)
    pick = storage.add_preference_event(session=session, user_id=alice.id, persona_id=persona.id, kind="pick",
                                        prompt="q2", chosen="short", rejected="long")
    events = storage.list_preference_events(session=session, user_id=alice.id, persona_id=persona.id)
    assert events == [up, pick]
    assert (up.chosen, up.rejected, up.message_id) == ("an answer", None, message.id)
    assert storage.delete_preference_events_for_message(session=session, user_id=alice.id, message_id=message.id) == 1
    assert storage.list_preference_events(session=session, user_id=alice.id, persona_id=persona.id) == [pick]


@pytest.mark.parametrize(
    "kind, chosen, rejected",
    [("thumb", None, None), ("thumb", "", ""), ("pick", "only one", None), ("vote", "a", "b")],
)
def test_incomplete_or_unknown_preference_events_are_rejected(
    session: Session, alice: UserPublic, kind: str, chosen, rejected
) -> None:
    persona, _, _ = _chat(session, alice)
    with pytest.raises(ValueError):
        storage.add_preference_event(session=session, user_id=alice.id, persona_id=persona.id, kind=kind,
                                     prompt="q", chosen=chosen, rejected=rejected)
    assert storage.list_preference_events(session=session, user_id=alice.id, persona_id=persona.id) == []


def test_preference_events_outlive_their_message_but_not_their_persona(session: Session, alice: UserPublic) -> None:
    persona, _, message = _chat(session, alice)
    storage.add_preference_event(session=session, user_id=alice.id, persona_id=persona.id, kind="thumb",
                                 prompt="q", rejected="an answer", message_id=message.id)
    storage.delete_message(session=session, user_id=alice.id, message_id=message.id)
    (event,) = storage.list_preference_events(session=session, user_id=alice.id, persona_id=persona.id)
    assert event.message_id is None and event.rejected == "an answer"
    storage.delete_persona(session=session, user_id=alice.id, persona_id=persona.id)
    assert storage.list_preference_events(session=session, user_id=alice.id, persona_id=persona.id) == []


def test_studio_runs_round_trip_newest_first(session: Session, alice: UserPublic) -> None:
    first = storage.save_studio_run(session=session, user_id=alice.id, kind="sweep", title="a", data={"rho": 0.9})
    second = storage.save_studio_run(session=session, user_id=alice.id, kind="compare", title="b", data={"x": [1]})
    assert storage.list_studio_runs(session=session, user_id=alice.id) == [second, first]
    assert storage.get_studio_run(session=session, user_id=alice.id, run_id=first.id).data == {"rho": 0.9}
    assert storage.delete_studio_run(session=session, user_id=alice.id, run_id=first.id)
    assert storage.get_studio_run(session=session, user_id=alice.id, run_id=first.id) is None
    with pytest.raises(ValueError):
        storage.save_studio_run(session=session, user_id=alice.id, kind="sweep", title="t", data={"x": float("nan")})


def test_snapshot_for_a_missing_conversation_is_not_found(session: Session, alice: UserPublic) -> None:
    with pytest.raises(NotFound):
        storage.set_memory_snapshot(session=session, user_id=alice.id, conversation_id=999, path="x", policy="dense",
                                    model="m", last_message_id=1, message_count=0, kv_bytes=0)
