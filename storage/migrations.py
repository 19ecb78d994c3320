"""Schema migrations: small named functions, each applied once, in order.

Every migration runs in its own transaction together with the row that records
it in ``_migrations``, so a failure leaves neither half-applied schema nor a
false record. Later schema changes are appended as new functions (ALTER TABLE
...); released ones are never edited. This module speaks plain ``sqlite3`` and
knows nothing about the ORM models or about where the database file lives.
"""

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration; its ``__name__`` is its permanent id."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial_schema(conn: sqlite3.Connection) -> None:
    # AUTOINCREMENT: an id is never reused, so a stale id held by a UI can never
    # silently point at a newer row.
    statements = [
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            username TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE personas (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            current_version_id INTEGER
        )""",
        "CREATE INDEX personas_by_user ON personas(user_id, updated_at)",
        """CREATE TABLE persona_versions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            persona_id INTEGER NOT NULL REFERENCES personas(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            data TEXT NOT NULL,
            note TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (persona_id, number)
        )""",
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            title TEXT NOT NULL,
            persona_id INTEGER REFERENCES personas(id) ON DELETE SET NULL,
            mode TEXT NOT NULL DEFAULT 'none',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX conversations_by_user ON conversations(user_id, updated_at)",
        "CREATE INDEX conversations_by_persona ON conversations(persona_id)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            persona_version_id INTEGER REFERENCES persona_versions(id) ON DELETE SET NULL,
            mode TEXT,
            prompt TEXT,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX messages_by_conversation ON messages(conversation_id)",
        "CREATE INDEX messages_by_persona_version ON messages(persona_version_id)",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            value INTEGER NOT NULL CHECK (value IN (-1, 1)),
            created_at TEXT NOT NULL,
            UNIQUE (user_id, message_id)
        )""",
        "CREATE INDEX feedback_by_message ON feedback(message_id)",
    ]
    for statement in statements:
        conn.execute(statement)


@migration
def m002_memory_learning_studio(conn: sqlite3.Connection) -> None:
    # Memory policy per conversation, the saved compressed KV cache that lets a long chat
    # resume without re-reading its history, consent to learn from chat ratings, the
    # ratings and picks themselves as preference events, and saved studio results.
    statements = [
        "ALTER TABLE conversations ADD COLUMN memory TEXT NOT NULL DEFAULT 'dense'",
        """CREATE TABLE memory_snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL UNIQUE REFERENCES conversations(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            policy TEXT NOT NULL,
            model TEXT NOT NULL,
            last_message_id INTEGER NOT NULL,
            message_count INTEGER NOT NULL,
            kv_bytes INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "ALTER TABLE personas ADD COLUMN learn_from_chat BOOLEAN NOT NULL DEFAULT 0",
        """CREATE TABLE preference_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            persona_id INTEGER NOT NULL REFERENCES personas(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('thumb', 'pick')),
            prompt TEXT NOT NULL,
            chosen TEXT,
            rejected TEXT,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            created_at TEXT NOT NULL,
            CHECK (chosen IS NOT NULL OR rejected IS NOT NULL)
        )""",
        "CREATE INDEX preference_events_by_persona ON preference_events(persona_id)",
        "CREATE INDEX preference_events_by_message ON preference_events(message_id)",
        """CREATE TABLE studio_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            title TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX studio_runs_by_user ON studio_runs(user_id, created_at)",
    ]
    for statement in statements:
        conn.execute(statement)


@migration
def m003_persona_adapters(conn: sqlite3.Connection) -> None:
    # A persona's own DPO adapter, trained from its pairwise choices. One per persona:
    # retraining replaces the row, and the adapter goes when its persona does.
    conn.execute(
        """CREATE TABLE persona_adapters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            persona_id INTEGER NOT NULL UNIQUE REFERENCES personas(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            model TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('pba', 'raw')),
            pairs INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            probe_pairs INTEGER NOT NULL,
            accuracy_before REAL,
            accuracy_after REAL,
            created_at TEXT NOT NULL
        )"""
    )


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of the migrations recorded in ``conn``'s database, in the order applied."""
    return [name for (name,) in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending migration to ``conn``; return the names newly applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    newly_applied = []
    for fn in MIGRATIONS:
        # IMMEDIATE takes the write lock up front; re-checking under it means two
        # processes opening the same file at once cannot both apply a migration.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if fn.__name__ not in applied_migrations(conn):
                fn(conn)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (fn.__name__, datetime.now(UTC).isoformat(timespec="microseconds")),
                )
                newly_applied.append(fn.__name__)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
    for name in newly_applied:
        logger.info("applied migration %s", name)
    return newly_applied
