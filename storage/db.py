"""The database handle: one SQLite file, one engine, short-lived sessions.

Opening checks the file is a healthy SQLite database *before* anything can
write to it, then applies pending migrations. This module knows how to connect
and how transactions are scoped; it does not know any table or query.
"""

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from .migrations import migrate

logger = logging.getLogger(__name__)

# busy_timeout first, so that switching to WAL waits for a lock instead of failing.
_PRAGMAS = ("busy_timeout=5000", "journal_mode=WAL", "foreign_keys=ON")


class DatabaseError(Exception):
    """The database file cannot be used; the message says which file and why."""


def _apply_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    for pragma in _PRAGMAS:
        dbapi_connection.execute(f"PRAGMA {pragma}")


def _check_health(path: Path) -> None:
    """Raise DatabaseError unless ``path`` passes SQLite's quick_check.

    The check uses a read-only connection, so a damaged or foreign file is
    reported without a single byte of it being changed.
    """
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
    except sqlite3.Error as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        raise DatabaseError(
            f"{path} is not a usable Personalign database ({'; '.join(problems[:3])}). "
            "Nothing was changed. Move the file aside or restore it from a backup, then try again."
        )


class Database:
    """An open Personalign database. Create it with ``Database.open``."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self._path = path
        self._engine = engine

    @classmethod
    def open(cls, path: Path) -> "Database":
        """Open (creating if missing) the database at ``path`` and apply pending migrations."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _check_health(path)
        # Gradio calls from worker threads, so connections must cross threads.
        engine = create_engine(URL.create("sqlite", database=str(path)), connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _apply_pragmas)
        try:
            raw = engine.raw_connection()
            try:
                migrate(cast(sqlite3.Connection, raw.driver_connection))
            finally:
                raw.close()
        except (DBAPIError, sqlite3.Error) as exc:
            engine.dispose()
            raise DatabaseError(f"could not open or migrate the database {path}: {exc}") from exc
        logger.info("opened database %s", path)
        return cls(path, engine)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        with Session(self._engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def close(self) -> None:
        """Close every pooled connection; sessions still open keep theirs until they end."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
