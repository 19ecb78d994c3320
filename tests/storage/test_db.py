import os
import re
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text

import storage
from storage import Database, DatabaseError


def _pragma(db: Database, name: str) -> object:
    with db.session() as session:
        return session.connection().exec_driver_sql(f"PRAGMA {name}").scalar()


def test_open_creates_parent_directories_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "personalign.db"
    with Database.open(path) as db:
        assert db.path == path
    assert path.is_file()


def test_every_connection_gets_wal_foreign_keys_and_busy_timeout(db: Database) -> None:
    assert _pragma(db, "journal_mode") == "wal"
    assert _pragma(db, "foreign_keys") == 1
    assert _pragma(db, "busy_timeout") == 5000
    # WAL is a property of the file, so an unrelated connection sees it too.
    with closing(sqlite3.connect(db.path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_session_commits_on_success(db: Database) -> None:
    with db.session() as session:
        storage.get_or_create_local_user(session=session)
    with db.session() as session:
        assert [u.username for u in storage.list_users(session=session)] == ["local"]


def test_session_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session() as session:
        storage.get_or_create_local_user(session=session)
        raise RuntimeError("boom")
    with db.session() as session:
        assert storage.list_users(session=session) == []


def _damaged_sqlite_file(path: Path) -> bytes:
    """A real database whose pages after the header were overwritten."""
    with Database.open(path) as db, db.session() as session:
        user = storage.create_user(session=session, username="alice", password="alice-password")
        for i in range(50):
            storage.create_persona(session=session, user_id=user.id, name=f"p{i}", data={"x": "y" * 500})
    raw = bytearray(path.read_bytes())
    raw[4096:] = os.urandom(len(raw) - 4096)
    return bytes(raw)


@pytest.mark.parametrize(
    "contents",
    [
        pytest.param(lambda _: os.urandom(8192), id="random-bytes"),
        pytest.param(lambda _: b"my notes, not a database\n" * 100, id="text"),
        pytest.param(lambda _: b"SQLite format 3\x00" + os.urandom(4000), id="sqlite-header-then-garbage"),
        pytest.param(_damaged_sqlite_file, id="damaged-database"),
    ],
)
def test_unusable_file_raises_and_is_left_untouched(tmp_path: Path, contents) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "personalign.db"
    original = contents(path)
    path.write_bytes(original)
    with pytest.raises(DatabaseError) as error:
        Database.open(path)
    message = str(error.value)
    assert str(path) in message and "Nothing was changed" in message
    assert path.read_bytes() == original


def test_directory_instead_of_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match=re.escape(str(tmp_path))):
        Database.open(tmp_path)


def test_empty_file_becomes_a_database(tmp_path: Path) -> None:
    # An empty file is what SQLite itself considers an empty database.
    path = tmp_path / "personalign.db"
    path.touch()
    with Database.open(path) as db, db.session() as session:
        assert storage.list_users(session=session) == []


def test_data_survives_closing_and_reopening(db_path: Path) -> None:
    with Database.open(db_path) as db, db.session() as session:
        alice = storage.create_user(session=session, username="alice", password="alice-password")
        persona = storage.create_persona(session=session, user_id=alice.id, name="Tutor", data={"tone": "calm"})
        v2 = storage.save_persona_version(
            session=session, user_id=alice.id, persona_id=persona.id, data={"tone": "warm"}
        )
        conversation = storage.create_conversation(session=session, user_id=alice.id, title="Hi", persona_id=persona.id)
        message = storage.add_message(
            session=session,
            user_id=alice.id,
            conversation_id=conversation.id,
            role="assistant",
            content="Hello!",
            persona_version_id=v2.id,
            mode="persona",
            prompt="<s>exact prompt</s>",
        )
        feedback = storage.set_feedback(session=session, user_id=alice.id, message_id=message.id, value=1)
        before = (
            storage.list_users(session=session),
            storage.list_personas(session=session, user_id=alice.id),
            storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id),
            storage.list_conversations(session=session, user_id=alice.id),
            storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id),
            storage.list_feedback(session=session, user_id=alice.id),
        )
    assert feedback is not None and not db_path.with_name(db_path.name + "-wal").exists()

    with Database.open(db_path) as db, db.session() as session:
        after = (
            storage.list_users(session=session),
            storage.list_personas(session=session, user_id=alice.id),
            storage.list_persona_versions(session=session, user_id=alice.id, persona_id=persona.id),
            storage.list_conversations(session=session, user_id=alice.id),
            storage.list_messages(session=session, user_id=alice.id, conversation_id=conversation.id),
            storage.list_feedback(session=session, user_id=alice.id),
        )
        assert storage.authenticate(session=session, username="alice", password="alice-password") == alice
    assert after == before


def test_concurrent_writes_from_threads_do_not_fail(db: Database) -> None:
    with db.session() as session:
        user = storage.get_or_create_local_user(session=session)
        persona = storage.create_persona(session=session, user_id=user.id, name="P", data={})
        conversation = storage.create_conversation(session=session, user_id=user.id, title="Busy")
        target = storage.add_message(
            session=session, user_id=user.id, conversation_id=conversation.id, role="assistant", content="rate me"
        )
    threads, per_thread = 6, 15
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                with db.session() as session:
                    storage.add_message(
                        session=session,
                        user_id=user.id,
                        conversation_id=conversation.id,
                        role="user",
                        content=f"{worker}-{i}",
                    )
                    storage.save_persona_version(
                        session=session, user_id=user.id, persona_id=persona.id, data={"w": worker, "i": i}
                    )
                    storage.set_feedback(
                        session=session, user_id=user.id, message_id=target.id, value=1 if i % 2 else -1
                    )
        except BaseException as exc:  # noqa: BLE001 -- the thread hands every failure to the test
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    assert errors == []
    with db.session() as session:
        messages = storage.list_messages(session=session, user_id=user.id, conversation_id=conversation.id)
        versions = storage.list_persona_versions(session=session, user_id=user.id, persona_id=persona.id)
        assert len(messages) == 1 + threads * per_thread
        assert sorted(v.number for v in versions) == list(range(1, 2 + threads * per_thread))
        assert len(storage.list_feedback(session=session, user_id=user.id)) == 1
        integrity = session.connection().execute(text("PRAGMA integrity_check")).scalar()
    assert integrity == "ok"
