import sqlite3
from contextlib import closing
from datetime import UTC

import pytest
from sqlmodel import Session

import storage
from storage import Database, NotFound, UserPublic

# --- users -----------------------------------------------------------------


def test_created_user_authenticates_with_the_right_password_only(session: Session, alice: UserPublic) -> None:
    assert storage.authenticate(session=session, username="alice", password="alice-password") == alice
    assert storage.authenticate(session=session, username="ALICE", password="alice-password") == alice
    assert storage.authenticate(session=session, username="alice", password="wrong-password") is None
    assert storage.authenticate(session=session, username="nobody", password="alice-password") is None


def test_password_is_stored_only_as_an_scrypt_hash(db: Database, alice: UserPublic, session: Session) -> None:
    session.commit()
    with closing(sqlite3.connect(db.path)) as conn:
        (stored,) = conn.execute("SELECT password_hash FROM users WHERE id = ?", (alice.id,)).fetchone()
    assert stored.startswith("scrypt$16384$8$1$") and "alice-password" not in stored
    assert "password_hash" not in alice.model_dump() and "password" not in alice.model_dump()


@pytest.mark.parametrize("username", ["", "a b", "x" * 65, "zoë", "a/b", "tab\t", "new\nline"])
def test_invalid_usernames_are_rejected(session: Session, username: str) -> None:
    with pytest.raises(ValueError):
        storage.create_user(session=session, username=username, password="long-enough")
    assert storage.list_users(session=session) == []


@pytest.mark.parametrize("username", ["a", "a.b-c_D9", "x" * 64])
def test_valid_usernames_are_accepted(session: Session, username: str) -> None:
    assert storage.create_user(session=session, username=username, password="long-enough").username == username


def test_short_password_is_rejected(session: Session) -> None:
    with pytest.raises(ValueError):
        storage.create_user(session=session, username="carol", password="1234567")


@pytest.mark.parametrize("username", ["alice", "Alice", "ALICE"])
def test_duplicate_username_is_rejected_regardless_of_case(session: Session, alice: UserPublic, username: str) -> None:
    with pytest.raises(ValueError, match="not available"):
        storage.create_user(session=session, username=username, password="another-password")


def test_local_user_is_unique_passwordless_and_cannot_log_in(session: Session) -> None:
    local = storage.get_or_create_local_user(session=session)
    assert storage.get_or_create_local_user(session=session) == local
    assert local.username == storage.LOCAL_USERNAME
    for password in ("", "local", "anything-at-all"):
        assert storage.authenticate(session=session, username="local", password=password) is None
    for name in ("local", "LOCAL"):
        with pytest.raises(ValueError):
            storage.create_user(session=session, username=name, password="long-enough")


def test_get_and_list_users(session: Session, alice: UserPublic, bob: UserPublic) -> None:
    assert storage.get_user(session=session, username="bob") == bob
    assert storage.get_user(session=session, username="nobody") is None
    assert storage.list_users(session=session) == [alice, bob]
    assert alice.created_at.tzinfo == UTC


# --- personas ----------------------------------------------------------------


def test_create_persona_starts_at_version_one(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(
        session=session, user_id=alice.id, name="  Tutor ", data={"tone": "calm"}, note="first"
    )
    assert (persona.name, persona.current_version_number, persona.data) == ("Tutor", 1, {"tone": "calm"})
    (version,) = storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id)
    assert (version.id, version.number, version.note, version.data) == (
        persona.current_version_id,
        1,
        "first",
        {"tone": "calm"},
    )
    assert storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id) == persona


def test_saving_adds_a_current_version_and_keeps_the_old_ones(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(session=session, user_id=alice.id, name="Tutor", data={"v": 1})
    v1 = storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id)[0]
    v2 = storage.save_persona_version(
        session=session, user_id=alice.id, persona_id=persona.id, data={"v": 2}, note="warmer"
    )
    current = storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id)
    assert current is not None
    assert (current.current_version_id, current.current_version_number, current.data) == (v2.id, 2, {"v": 2})
    assert current.updated_at >= persona.updated_at
    assert storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id) == [v2, v1]
    assert storage.get_persona_version(session=session, user_id=alice.id, version_id=v1.id) == v1


def test_restore_copies_an_old_version_into_a_new_one(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(session=session, user_id=alice.id, name="Tutor", data={"v": 1})
    storage.save_persona_version(session=session, user_id=alice.id, persona_id=persona.id, data={"v": 2})
    history = storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id)
    v1 = history[-1]

    restored = storage.restore_persona_version(
        session=session, user_id=alice.id, persona_id=persona.id, version_id=v1.id
    )

    assert (restored.number, restored.data, restored.note) == (3, {"v": 1}, "restored from version 1")
    assert restored.id not in {v.id for v in history}
    assert storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id) == [
        restored,
        *history,
    ]
    current = storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id)
    assert current is not None and (current.current_version_id, current.data) == (restored.id, {"v": 1})


def test_restoring_a_version_of_another_persona_is_refused(session: Session, alice: UserPublic) -> None:
    first = storage.create_persona(session=session, user_id=alice.id, name="A", data={})
    second = storage.create_persona(session=session, user_id=alice.id, name="B", data={})
    with pytest.raises(NotFound):
        storage.restore_persona_version(
            session=session, user_id=alice.id, persona_id=second.id, version_id=first.current_version_id
        )


def test_persona_data_is_a_copy_of_what_the_caller_passed(session: Session, alice: UserPublic) -> None:
    data = {"traits": ["kind"]}
    persona = storage.create_persona(session=session, user_id=alice.id, name="P", data=data)
    data["traits"].append("mutated")
    persona.data["traits"].append("also mutated")
    stored = storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id)
    assert stored is not None and stored.data == {"traits": ["kind"]}


@pytest.mark.parametrize("data", [{"x": object()}, {"x": float("nan")}, {1: "non-string key"}, ["not", "a", "dict"]])
def test_non_json_data_is_rejected_before_anything_is_written(
    session: Session, alice: UserPublic, data: object
) -> None:
    with pytest.raises(ValueError):
        storage.create_persona(session=session, user_id=alice.id, name="P", data=data)  # type: ignore[arg-type]
    assert storage.list_personas(session=session, user_id=alice.id) == []


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_invalid_persona_names_are_rejected(session: Session, alice: UserPublic, name: str) -> None:
    with pytest.raises(ValueError):
        storage.create_persona(session=session, user_id=alice.id, name=name, data={})
    persona = storage.create_persona(session=session, user_id=alice.id, name="ok", data={})
    with pytest.raises(ValueError):
        storage.rename_persona(session=session, user_id=alice.id, persona_id=persona.id, name=name)
    assert [p.name for p in storage.list_personas(session=session, user_id=alice.id)] == ["ok"]


def test_list_personas_most_recently_updated_first(session: Session, alice: UserPublic) -> None:
    old = storage.create_persona(session=session, user_id=alice.id, name="old", data={})
    new = storage.create_persona(session=session, user_id=alice.id, name="new", data={})
    assert [p.name for p in storage.list_personas(session=session, user_id=alice.id)] == ["new", "old"]
    storage.rename_persona(session=session, user_id=alice.id, persona_id=old.id, name=" renamed ")
    assert [p.name for p in storage.list_personas(session=session, user_id=alice.id)] == ["renamed", "new"]
    storage.save_persona_version(session=session, user_id=alice.id, persona_id=new.id, data={"x": 1})
    assert [p.name for p in storage.list_personas(session=session, user_id=alice.id)] == ["new", "renamed"]


def test_deleting_a_persona_removes_its_versions_but_not_conversations(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(session=session, user_id=alice.id, name="P", data={})
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T", persona_id=persona.id)
    message = storage.add_message(
        session=session,
        user_id=alice.id,
        conversation_id=conversation.id,
        role="assistant",
        content="hi",
        persona_version_id=persona.current_version_id,
    )

    assert storage.delete_persona(session=session, user_id=alice.id, persona_id=persona.id) is True

    assert storage.get_persona(session=session, user_id=alice.id, persona_id=persona.id) is None
    assert storage.get_persona_version(session=session, user_id=alice.id, version_id=persona.current_version_id) is None
    assert storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id) == []
    kept = storage.get_conversation(session=session, user_id=alice.id, conversation_id=conversation.id)
    assert kept is not None and kept.persona_id is None
    kept_message = storage.get_message(session=session, user_id=alice.id, message_id=message.id)
    assert kept_message is not None and kept_message.persona_version_id is None and kept_message.content == "hi"
    assert storage.delete_persona(session=session, user_id=alice.id, persona_id=persona.id) is False


# --- conversations -------------------------------------------------------------


def test_create_conversation_defaults_and_validation(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="  Chat  ")
    assert (conversation.title, conversation.persona_id, conversation.mode) == ("Chat", None, "none")
    assert conversation.created_at.tzinfo == UTC
    for title in ("", "  ", "x" * 201):
        with pytest.raises(ValueError):
            storage.create_conversation(session=session, user_id=alice.id, title=title)
    with pytest.raises(NotFound):
        storage.create_conversation(session=session, user_id=alice.id, title="T", persona_id=12345)
    assert storage.list_conversations(session=session, user_id=alice.id) == [conversation]


def test_conversations_listed_by_latest_activity(session: Session, alice: UserPublic) -> None:
    first = storage.create_conversation(session=session, user_id=alice.id, title="first")
    second = storage.create_conversation(session=session, user_id=alice.id, title="second")
    assert [c.id for c in storage.list_conversations(session=session, user_id=alice.id)] == [second.id, first.id]
    storage.add_message(session=session, user_id=alice.id, conversation_id=first.id, role="user", content="bump")
    assert [c.id for c in storage.list_conversations(session=session, user_id=alice.id)] == [first.id, second.id]


def test_rename_and_change_settings(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(session=session, user_id=alice.id, name="P", data={})
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    renamed = storage.rename_conversation(
        session=session, user_id=alice.id, conversation_id=conversation.id, title=" New "
    )
    assert renamed.title == "New" and renamed.updated_at >= conversation.updated_at
    with pytest.raises(ValueError):
        storage.rename_conversation(session=session, user_id=alice.id, conversation_id=conversation.id, title=" ")

    changed = storage.update_conversation_settings(
        session=session, user_id=alice.id, conversation_id=conversation.id, persona_id=persona.id, mode="persona"
    )
    assert (changed.persona_id, changed.mode, changed.title) == (persona.id, "persona", "New")
    cleared = storage.update_conversation_settings(
        session=session, user_id=alice.id, conversation_id=conversation.id, persona_id=None, mode="none"
    )
    assert (cleared.persona_id, cleared.mode) == (None, "none")
    assert storage.get_conversation(session=session, user_id=alice.id, conversation_id=conversation.id) == cleared
    with pytest.raises(NotFound):
        storage.update_conversation_settings(
            session=session, user_id=alice.id, conversation_id=conversation.id, persona_id=999, mode="none"
        )
    with pytest.raises(NotFound):
        storage.rename_conversation(session=session, user_id=alice.id, conversation_id=999, title="x")


def test_deleting_a_conversation_takes_messages_and_feedback(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    other = storage.create_conversation(session=session, user_id=alice.id, title="Other")
    message = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="assistant", content="a"
    )
    survivor = storage.add_message(
        session=session, user_id=alice.id, conversation_id=other.id, role="assistant", content="b"
    )
    storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=1)
    kept = storage.set_feedback(session=session, user_id=alice.id, message_id=survivor.id, value=-1)

    assert storage.delete_conversation(session=session, user_id=alice.id, conversation_id=conversation.id) is True

    assert storage.get_conversation(session=session, user_id=alice.id, conversation_id=conversation.id) is None
    assert storage.get_message(session=session, user_id=alice.id, message_id=message.id) is None
    assert storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id) == []
    assert storage.list_feedback(session=session, user_id=alice.id) == [kept]
    assert storage.delete_conversation(session=session, user_id=alice.id, conversation_id=conversation.id) is False


# --- messages ------------------------------------------------------------------


def test_messages_keep_their_order_and_details(session: Session, alice: UserPublic) -> None:
    persona = storage.create_persona(session=session, user_id=alice.id, name="P", data={})
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    question = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="user", content="Why?"
    )
    answer = storage.add_message(
        session=session,
        user_id=alice.id,
        conversation_id=conversation.id,
        role="assistant",
        content="Because.",
        persona_version_id=persona.current_version_id,
        mode="persona",
        prompt="<|user|>Why?<|assistant|>",
    )
    assert storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id) == [
        question,
        answer,
    ]
    assert (question.persona_version_id, question.mode, question.prompt) == (None, None, None)
    assert (answer.persona_version_id, answer.mode, answer.prompt) == (
        persona.current_version_id,
        "persona",
        "<|user|>Why?<|assistant|>",
    )
    assert answer.created_at.tzinfo == UTC and answer.created_at >= question.created_at
    assert storage.get_message(session=session, user_id=alice.id, message_id=answer.id) == answer


def test_the_newest_messages_and_the_count_read_only_what_they_say(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    other = storage.create_conversation(session=session, user_id=alice.id, title="U")
    ids = {"session": session, "user_id": alice.id, "conversation_id": conversation.id}
    assert storage.count_messages(**ids) == 0
    assert storage.last_messages(**ids, limit=2) == []
    added = [storage.add_message(**ids, role=("user", "assistant")[i % 2], content=str(i)) for i in range(5)]
    storage.add_message(session=session, user_id=alice.id, conversation_id=other.id, role="user", content="other")

    assert storage.count_messages(**ids) == 5
    assert storage.last_messages(**ids, limit=2) == added[3:]  # oldest first
    assert storage.last_messages(**ids, limit=9) == added
    assert storage.last_messages(**ids, limit=0) == []
    for limit in (-1, 1.5, True, None):
        with pytest.raises(ValueError):
            storage.last_messages(**ids, limit=limit)


def test_add_message_validation(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    for role in ("system", "User", ""):
        with pytest.raises(ValueError):
            storage.add_message(
                session=session, user_id=alice.id, conversation_id=conversation.id, role=role, content="x"
            )
    with pytest.raises(NotFound):
        storage.add_message(session=session, user_id=alice.id, conversation_id=999, role="user", content="x")
    with pytest.raises(NotFound):
        storage.add_message(
            session=session,
            user_id=alice.id,
            conversation_id=conversation.id,
            role="user",
            content="x",
            persona_version_id=999,
        )
    assert storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id) == []


def test_delete_message_takes_its_feedback(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    first = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="user", content="1"
    )
    second = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="assistant", content="2"
    )
    storage.set_feedback(session=session, user_id=alice.id, message_id=second.id, value=1)
    assert storage.delete_message(session=session, user_id=alice.id, message_id=second.id) is True
    assert storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id) == [first]
    assert storage.list_feedback(session=session, user_id=alice.id) == []
    assert storage.delete_message(session=session, user_id=alice.id, message_id=second.id) is False


# --- feedback ------------------------------------------------------------------


def test_feedback_upserts_and_clears(session: Session, alice: UserPublic) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    message = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="assistant", content="a"
    )
    up = storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=1)
    down = storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=-1)
    assert up is not None and down is not None
    assert (up.value, down.value, down.id, down.message_id) == (1, -1, up.id, message.id)
    assert storage.list_feedback(session=session, user_id=alice.id) == [down]
    assert storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=0) is None
    assert storage.list_feedback(session=session, user_id=alice.id) == []
    assert storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=0) is None


@pytest.mark.parametrize("value", [2, -2, 10])
def test_feedback_values_other_than_plus_minus_one_or_zero_are_rejected(
    session: Session, alice: UserPublic, value: int
) -> None:
    conversation = storage.create_conversation(session=session, user_id=alice.id, title="T")
    message = storage.add_message(
        session=session, user_id=alice.id, conversation_id=conversation.id, role="assistant", content="a"
    )
    with pytest.raises(ValueError):
        storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=value)
    assert storage.list_feedback(session=session, user_id=alice.id) == []


def test_list_feedback_by_conversation(session: Session, alice: UserPublic) -> None:
    ratings = {}
    for title in ("one", "two"):
        conversation = storage.create_conversation(session=session, user_id=alice.id, title=title)
        message = storage.add_message(
            session=session, user_id=alice.id, conversation_id=conversation.id, role="assistant", content=title
        )
        ratings[conversation.id] = storage.set_feedback(
            session=session, user_id=alice.id, message_id=message.id, value=1
        )
    for conversation_id, rating in ratings.items():
        assert storage.list_feedback(session=session, user_id=alice.id, conversation_id=conversation_id) == [rating]
    assert storage.list_feedback(session=session, user_id=alice.id) == list(ratings.values())
    with pytest.raises(NotFound):
        storage.set_feedback(session=session, user_id=alice.id, message_id=999, value=1)


# --- errors are meant for people ---------------------------------------------


def test_validation_errors_are_short_sentences(session: Session, alice: UserPublic) -> None:
    attempts = {
        "a username is 1 to 64 letters": lambda: storage.create_user(session=session, username="a b", password="x" * 8),
        "a password needs at least 8 characters": lambda: storage.create_user(
            session=session, username="carol", password="short"
        ),
        "a title must be 1 to 200 characters": lambda: storage.create_conversation(
            session=session, user_id=alice.id, title=" "
        ),
        "a persona name must be 1 to 100 characters": lambda: storage.create_persona(
            session=session, user_id=alice.id, name="", data={}
        ),
        "data must be plain JSON": lambda: storage.create_persona(
            session=session, user_id=alice.id, name="P", data={"x": {1, 2}}
        ),
    }
    for expected, attempt in attempts.items():
        with pytest.raises(ValueError) as error:
            attempt()
        assert str(error.value).startswith(expected)
        assert "pydantic" not in str(error.value) and "\n" not in str(error.value)
