"""User isolation: bob can never read, list, change, delete or attach to alice's rows.

Every crud function that takes ``user_id`` appears in at least one case below;
``test_every_user_scoped_function_is_covered`` keeps it that way.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlmodel import Session

import storage
from storage import NotFound, UserPublic


@dataclass
class Owned:
    """One user's rows: a persona with two versions and a trained adapter, a conversation
    with a saved memory, a rated message kept as a preference event, and a saved studio run."""

    user: UserPublic
    persona: storage.PersonaPublic
    first_version: storage.PersonaVersionPublic
    conversation: storage.ConversationPublic
    message: storage.MessagePublic
    feedback: storage.FeedbackPublic
    snapshot: storage.MemorySnapshotPublic
    event: storage.PreferenceEventPublic
    run: storage.StudioRunPublic
    adapter: storage.PersonaAdapterPublic


def _populate(session: Session, user: UserPublic) -> Owned:
    persona = storage.create_persona(session=session, user_id=user.id, name=f"{user.username}'s", data={"v": 1})
    first = storage.list_persona_versions(session=session, user_id=user.id, persona_id=persona.id)[0]
    storage.save_persona_version(session=session, user_id=user.id, persona_id=persona.id, data={"v": 2})
    conversation = storage.create_conversation(session=session, user_id=user.id, title="chat", persona_id=persona.id)
    message = storage.add_message(
        session=session, user_id=user.id, conversation_id=conversation.id, role="assistant", content="hi"
    )
    feedback = storage.set_feedback(session=session, user_id=user.id, message_id=message.id, value=1)
    assert feedback is not None
    snapshot = storage.set_memory_snapshot(
        session=session, user_id=user.id, conversation_id=conversation.id, path=f"{user.username}.pt",
        policy="streaming-dialogue", model="m", last_message_id=message.id, message_count=1, kv_bytes=10,
    )
    event = storage.add_preference_event(
        session=session, user_id=user.id, persona_id=persona.id, kind="thumb", prompt="q", chosen="hi",
        message_id=message.id,
    )
    run = storage.save_studio_run(session=session, user_id=user.id, kind="sweep", title="t", data={"x": 1})
    adapter = storage.set_persona_adapter(
        session=session, user_id=user.id, persona_id=persona.id, path=f"{user.username}/a", model="m", kind="pba",
        pairs=2, steps=1, probe_pairs=0,
    )
    return Owned(user, persona, first, conversation, message, feedback, snapshot, event, run, adapter)


def _everything(session: Session, owner: Owned) -> tuple[Any, ...]:
    uid, conversation_id = owner.user.id, owner.conversation.id
    return (
        storage.list_personas(session=session, user_id=uid),
        storage.list_persona_versions(session=session, user_id=uid, persona_id=owner.persona.id),
        storage.list_conversations(session=session, user_id=uid),
        storage.list_messages(session=session, user_id=uid, conversation_id=conversation_id),
        storage.list_feedback(session=session, user_id=uid),
        storage.get_memory_snapshot(session=session, user_id=uid, conversation_id=conversation_id),
        storage.list_preference_events(session=session, user_id=uid, persona_id=owner.persona.id),
        storage.list_studio_runs(session=session, user_id=uid),
        storage.get_persona_adapter(session=session, user_id=uid, persona_id=owner.persona.id),
    )


@pytest.fixture
def a(session: Session, alice: UserPublic) -> Owned:
    return _populate(session, alice)


@pytest.fixture
def b(session: Session, bob: UserPublic) -> Owned:
    return _populate(session, bob)


Case = Callable[[Session, Owned, Owned], Any]  # (session, alice's rows, bob's rows) -> bob's attempt

READS: dict[str, Case] = {
    "get_persona": lambda s, a, b: storage.get_persona(session=s, user_id=b.user.id, persona_id=a.persona.id),
    "get_persona_version": lambda s, a, b: storage.get_persona_version(
        session=s, user_id=b.user.id, version_id=a.first_version.id
    ),
    "get_conversation": lambda s, a, b: storage.get_conversation(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "get_message": lambda s, a, b: storage.get_message(session=s, user_id=b.user.id, message_id=a.message.id),
    "get_memory_snapshot": lambda s, a, b: storage.get_memory_snapshot(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "get_studio_run": lambda s, a, b: storage.get_studio_run(session=s, user_id=b.user.id, run_id=a.run.id),
    "get_persona_adapter": lambda s, a, b: storage.get_persona_adapter(
        session=s, user_id=b.user.id, persona_id=a.persona.id
    ),
}

LISTS: dict[str, Case] = {
    "list_personas": lambda s, a, b: storage.list_personas(session=s, user_id=b.user.id),
    "list_persona_versions": lambda s, a, b: storage.list_persona_versions(
        session=s, user_id=b.user.id, persona_id=a.persona.id
    ),
    "list_conversations": lambda s, a, b: storage.list_conversations(session=s, user_id=b.user.id),
    "list_messages": lambda s, a, b: storage.list_messages(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "last_messages": lambda s, a, b: storage.last_messages(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id, limit=5
    ),
    "list_feedback": lambda s, a, b: storage.list_feedback(session=s, user_id=b.user.id),
    "list_feedback/conversation": lambda s, a, b: storage.list_feedback(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "list_preference_events": lambda s, a, b: storage.list_preference_events(
        session=s, user_id=b.user.id, persona_id=a.persona.id
    ),
    "list_studio_runs": lambda s, a, b: storage.list_studio_runs(session=s, user_id=b.user.id),
    "list_persona_adapters": lambda s, a, b: storage.list_persona_adapters(session=s, user_id=b.user.id),
}

DELETES: dict[str, Case] = {
    "delete_persona": lambda s, a, b: storage.delete_persona(session=s, user_id=b.user.id, persona_id=a.persona.id),
    "delete_conversation": lambda s, a, b: storage.delete_conversation(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "delete_message": lambda s, a, b: storage.delete_message(session=s, user_id=b.user.id, message_id=a.message.id),
    "delete_memory_snapshot": lambda s, a, b: storage.delete_memory_snapshot(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "delete_studio_run": lambda s, a, b: storage.delete_studio_run(session=s, user_id=b.user.id, run_id=a.run.id),
    "delete_persona_adapter": lambda s, a, b: storage.delete_persona_adapter(
        session=s, user_id=b.user.id, persona_id=a.persona.id
    ),
}

WRITES: dict[str, Case] = {
    "rename_persona": lambda s, a, b: storage.rename_persona(
        session=s, user_id=b.user.id, persona_id=a.persona.id, name="mine"
    ),
    "save_persona_version": lambda s, a, b: storage.save_persona_version(
        session=s, user_id=b.user.id, persona_id=a.persona.id, data={"stolen": True}
    ),
    "restore_persona_version": lambda s, a, b: storage.restore_persona_version(
        session=s, user_id=b.user.id, persona_id=a.persona.id, version_id=a.first_version.id
    ),
    "restore_persona_version/into-own-persona": lambda s, a, b: storage.restore_persona_version(
        session=s, user_id=b.user.id, persona_id=b.persona.id, version_id=a.first_version.id
    ),
    "create_conversation/with-their-persona": lambda s, a, b: storage.create_conversation(
        session=s, user_id=b.user.id, title="t", persona_id=a.persona.id
    ),
    "rename_conversation": lambda s, a, b: storage.rename_conversation(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id, title="mine"
    ),
    "update_conversation_settings": lambda s, a, b: storage.update_conversation_settings(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id, persona_id=None, mode="none"
    ),
    "update_conversation_settings/own-conversation-their-persona": lambda s, a, b: storage.update_conversation_settings(
        session=s, user_id=b.user.id, conversation_id=b.conversation.id, persona_id=a.persona.id, mode="persona"
    ),
    "add_message": lambda s, a, b: storage.add_message(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id, role="user", content="hello"
    ),
    "add_message/own-conversation-their-version": lambda s, a, b: storage.add_message(
        session=s,
        user_id=b.user.id,
        conversation_id=b.conversation.id,
        role="assistant",
        content="x",
        persona_version_id=a.first_version.id,
    ),
    "set_feedback": lambda s, a, b: storage.set_feedback(
        session=s, user_id=b.user.id, message_id=a.message.id, value=-1
    ),
    "set_feedback/clear": lambda s, a, b: storage.set_feedback(
        session=s, user_id=b.user.id, message_id=a.message.id, value=0
    ),
    "set_persona_learning": lambda s, a, b: storage.set_persona_learning(
        session=s, user_id=b.user.id, persona_id=a.persona.id, enabled=True
    ),
    "set_memory_snapshot": lambda s, a, b: storage.set_memory_snapshot(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id, path="x", policy="dense", model="m",
        last_message_id=a.message.id, message_count=1, kv_bytes=1,
    ),
    "add_preference_event": lambda s, a, b: storage.add_preference_event(
        session=s, user_id=b.user.id, persona_id=a.persona.id, kind="thumb", prompt="q", chosen="x"
    ),
    "add_preference_event/own-persona-their-message": lambda s, a, b: storage.add_preference_event(
        session=s, user_id=b.user.id, persona_id=b.persona.id, kind="thumb", prompt="q", chosen="x",
        message_id=a.message.id,
    ),
    "set_persona_adapter": lambda s, a, b: storage.set_persona_adapter(
        session=s, user_id=b.user.id, persona_id=a.persona.id, path="x", model="m", kind="raw", pairs=1, steps=1,
        probe_pairs=0,
    ),
}


COUNTS: dict[str, Case] = {  # bob's call on alice's rows counts (or removes) none of them
    "count_messages": lambda s, a, b: storage.count_messages(
        session=s, user_id=b.user.id, conversation_id=a.conversation.id
    ),
    "delete_preference_events_for_message": lambda s, a, b: storage.delete_preference_events_for_message(
        session=s, user_id=b.user.id, message_id=a.message.id
    ),
}

CREATES: dict[str, Case] = {
    "create_persona": lambda s, a, b: storage.create_persona(session=s, user_id=b.user.id, name="new", data={}),
    "create_conversation": lambda s, a, b: storage.create_conversation(session=s, user_id=b.user.id, title="new"),
    "save_studio_run": lambda s, a, b: storage.save_studio_run(
        session=s, user_id=b.user.id, kind="compare", title="new", data={}
    ),
}


def _check(session: Session, a: Owned, b: Owned, case: Case, expect: Callable[[Any], None]) -> None:
    """Run bob's attempt, check its outcome, and check alice's rows did not change at all."""
    alice_before = _everything(session, a)
    expect(lambda: case(session, a, b))
    assert _everything(session, a) == alice_before


@pytest.mark.parametrize("case", READS.values(), ids=READS.keys())
def test_reads_of_other_users_rows_return_none(session: Session, a: Owned, b: Owned, case: Case) -> None:
    def expect(call: Callable[[], Any]) -> None:
        assert call() is None

    _check(session, a, b, case, expect)


@pytest.mark.parametrize("case", LISTS.values(), ids=LISTS.keys())
def test_lists_never_include_other_users_rows(session: Session, a: Owned, b: Owned, case: Case) -> None:
    def expect(call: Callable[[], Any]) -> None:
        assert all(row.user_id == b.user.id for row in call())

    _check(session, a, b, case, expect)


@pytest.mark.parametrize("case", DELETES.values(), ids=DELETES.keys())
def test_deletes_of_other_users_rows_do_nothing(session: Session, a: Owned, b: Owned, case: Case) -> None:
    def expect(call: Callable[[], Any]) -> None:
        assert call() is False

    _check(session, a, b, case, expect)


@pytest.mark.parametrize("case", WRITES.values(), ids=WRITES.keys())
def test_writes_to_or_attaching_other_users_rows_raise_not_found(
    session: Session, a: Owned, b: Owned, case: Case
) -> None:
    def expect(call: Callable[[], Any]) -> None:
        with pytest.raises(NotFound):
            call()

    _check(session, a, b, case, expect)


@pytest.mark.parametrize("case", COUNTS.values(), ids=COUNTS.keys())
def test_counts_and_bulk_deletes_of_other_users_rows_touch_nothing(
    session: Session, a: Owned, b: Owned, case: Case
) -> None:
    def expect(call: Callable[[], Any]) -> None:
        assert call() == 0

    _check(session, a, b, case, expect)


@pytest.mark.parametrize("case", CREATES.values(), ids=CREATES.keys())
def test_created_rows_belong_only_to_their_creator(session: Session, a: Owned, b: Owned, case: Case) -> None:
    def expect(call: Callable[[], Any]) -> None:
        assert call().user_id == b.user.id

    _check(session, a, b, case, expect)


def test_each_user_sees_exactly_their_own_rows(session: Session, a: Owned, b: Owned) -> None:
    for owner in (a, b):
        personas, versions, conversations, messages, feedback, snapshot, events, runs, adapter = _everything(
            session, owner
        )
        assert [p.id for p in personas] == [owner.persona.id]
        assert {v.persona_id for v in versions} == {owner.persona.id} and len(versions) == 2
        assert [c.id for c in conversations] == [owner.conversation.id]
        assert [m.id for m in messages] == [owner.message.id]
        assert feedback == [owner.feedback]
        assert snapshot == owner.snapshot
        assert events == [owner.event]
        assert runs == [owner.run]
        assert adapter == owner.adapter


def test_not_found_reads_the_same_as_a_missing_row(session: Session, a: Owned, b: Owned) -> None:
    with pytest.raises(NotFound) as theirs:
        storage.rename_conversation(session=session, user_id=b.user.id, conversation_id=a.conversation.id, title="x")
    with pytest.raises(NotFound) as missing:
        storage.rename_conversation(session=session, user_id=b.user.id, conversation_id=10**9, title="x")
    assert str(theirs.value).replace(str(a.conversation.id), "N") == str(missing.value).replace(str(10**9), "N")
    assert isinstance(theirs.value, LookupError)


def test_every_user_scoped_function_is_covered() -> None:
    scoped = {
        name
        for name in storage.__all__
        if inspect.isfunction(getattr(storage, name))
        and "user_id" in inspect.signature(getattr(storage, name)).parameters
    }
    covered = {key.split("/")[0] for cases in (READS, LISTS, DELETES, WRITES, COUNTS, CREATES) for key in cases}
    assert scoped - covered == set()

