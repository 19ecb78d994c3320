"""Service fixtures: the services over a real SQLite file and the tiny random model."""

import pytest

import storage
from personalign.engine import Engine
from personalign.services import Services, build_services


@pytest.fixture
def services(tmp_path, tiny_llm) -> Services:
    db = storage.Database.open(tmp_path / "personalign.db")
    yield build_services(db, Engine(tiny_llm))
    db.close()
