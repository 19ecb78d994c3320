"""Fixtures for the storage tests: a real SQLite file in tmp_path and two users."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

import storage
from storage import Database, UserPublic


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "personalign.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    with Database.open(db_path) as database:
        yield database


@pytest.fixture
def session(db: Database) -> Iterator[Session]:
    with db.session() as s:
        yield s


@pytest.fixture
def alice(session: Session) -> UserPublic:
    return storage.create_user(session=session, username="alice", password="alice-password")


@pytest.fixture
def bob(session: Session) -> UserPublic:
    return storage.create_user(session=session, username="bob", password="bob-password")
