import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import UniqueConstraint
from sqlalchemy.dialects import sqlite
from sqlmodel import SQLModel

import storage
from storage import Database, DatabaseError, migrations
from storage.migrations import MIGRATIONS, applied_migrations

ALL = [fn.__name__ for fn in MIGRATIONS]


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path)) as conn:
        yield conn


def _applied_at(path: Path) -> dict[str, str]:
    with _connect(path) as conn:
        return dict(conn.execute("SELECT name, applied_at FROM _migrations"))


def test_fresh_database_gets_every_migration_once(db: Database) -> None:
    with _connect(db.path) as conn:
        assert applied_migrations(conn) == ALL


def test_reopening_applies_nothing_again(db_path: Path) -> None:
    Database.open(db_path).close()
    first = _applied_at(db_path)
    Database.open(db_path).close()
    assert _applied_at(db_path) == first
    with _connect(db_path) as conn:
        assert migrations.migrate(conn) == []


def test_new_migration_is_applied_on_next_open(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Database.open(db_path).close()
    before = _applied_at(db_path)

    def m999_add_bio(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE users ADD COLUMN bio TEXT")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, m999_add_bio])
    Database.open(db_path).close()
    Database.open(db_path).close()
    with _connect(db_path) as conn:
        assert applied_migrations(conn) == [*ALL, "m999_add_bio"]
        assert "bio" in {row[1] for row in conn.execute("PRAGMA table_info(users)")}
    assert {k: v for k, v in _applied_at(db_path).items() if k in before} == before


def test_failed_migration_leaves_no_trace(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Database.open(db_path) as db, db.session() as session:
        storage.get_or_create_local_user(session=session)

    def m999_broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("THIS IS NOT SQL")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, m999_broken])
    with pytest.raises(DatabaseError, match=re.escape(str(db_path))):
        Database.open(db_path)
    with _connect(db_path) as conn:
        assert applied_migrations(conn) == ALL
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone() == (0,)
        assert conn.execute("SELECT username FROM users").fetchall() == [("local",)]


def test_simultaneous_first_opens_migrate_once(db_path: Path) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_and_close() -> None:
        try:
            start.wait()
            Database.open(db_path).close()
        except BaseException as exc:  # noqa: BLE001 -- the thread hands every failure to the test
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with _connect(db_path) as conn:
        assert applied_migrations(conn) == ALL


# --- the SQLModel tables must describe exactly the schema the migrations built ---


def _affinity(declared: str) -> str:
    """SQLite's type-affinity rules (https://sqlite.org/datatype3.html, section 3.1)."""
    declared = declared.upper()
    if "INT" in declared:
        return "INTEGER"
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not declared or "BLOB" in declared:
        return "BLOB"
    if any(word in declared for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _migrated_schema(conn: sqlite3.Connection, table: str) -> tuple[dict, set, set]:  # type: ignore[type-arg]
    columns = {
        name: (_affinity(declared), bool(notnull or pk), bool(pk))
        for _, name, declared, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})")
    }
    foreign_keys = {(row[3], row[2], row[4], row[6]) for row in conn.execute(f"PRAGMA foreign_key_list({table})")}
    uniques = {
        frozenset(col for *_, col in conn.execute(f"PRAGMA index_info({index})"))
        for _, index, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})")
        if unique and origin == "u"
    }
    return columns, foreign_keys, uniques


def _model_schema(table) -> tuple[dict, set, set]:  # type: ignore[no-untyped-def, type-arg]
    dialect = sqlite.dialect()
    columns = {
        c.name: (_affinity(c.type.compile(dialect=dialect)), not c.nullable, c.primary_key) for c in table.columns
    }
    foreign_keys = {
        (fk.parent.name, fk.column.table.name, fk.column.name, (fk.ondelete or "NO ACTION").upper())
        for fk in table.foreign_keys
    }
    uniques = {
        frozenset(c.name for c in constraint.columns)
        for constraint in table.constraints
        if isinstance(constraint, UniqueConstraint)
    } | {frozenset([c.name]) for c in table.columns if c.unique}
    return columns, foreign_keys, uniques


def test_migrated_tables_are_exactly_the_model_tables(db: Database) -> None:
    with _connect(db.path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables - {"_migrations", "sqlite_sequence"} == set(SQLModel.metadata.tables)


@pytest.mark.parametrize("table", SQLModel.metadata.sorted_tables, ids=lambda t: t.name)
def test_model_table_matches_migrated_schema(db: Database, table) -> None:  # type: ignore[no-untyped-def]
    with _connect(db.path) as conn:
        assert _model_schema(table) == _migrated_schema(conn, table.name)
